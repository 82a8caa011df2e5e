//! Where the next trial's values come from: a grid, uniform random draws, or the Tree-structured
//! Parzen Estimator (TPE) with Optuna's defaults.
//!
//! The samplers are written here, on the project's seeded streams and the `libm` crate's math, so
//! that a dependency update can never change a stored trial list. They minimise: a caller
//! maximising a metric hands them its negation.
//!
//! TPE (Bergstra et al. 2011, as Optuna 5's `TPESampler` does it by default, multivariate for
//! one objective): after `startup` random trials, the finished trials are split into the best
//! `gamma(n) = min(ceil(n / 10), 25)` ("below") and the rest ("above"), and each set becomes a
//! Parzen estimator: one kernel per trial (a product over the parameters: normals truncated to the
//! range with Optuna's bandwidths, the larger gap to a neighbour clipped to at least
//! `range / min(100, n + 2)`; for choices, the trial's option plus a spread prior) and a prior
//! kernel over the whole space (weight 1). `candidates` (24) draws from `l` (below) are scored by
//! `log l(x) - log g(x)` and the best is taken. Integers are reals on `[low - 0.5, high + 0.5]`,
//! rounded; log parameters live in log space.

use rand::Rng as _;

use crate::rng::{Rng, standard_normal};

/// One parameter's domain.
#[derive(Debug, Clone, PartialEq)]
pub enum Domain {
    /// A real in `[low, high]`, uniform in log space when `log`.
    Float { low: f64, high: f64, log: bool },
    /// An integer in `[low, high]`, uniform in log space when `log`.
    Int { low: i64, high: i64, log: bool },
    /// One of `n` options, by index.
    Choice { n: usize },
}

/// One parameter's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Float(f64),
    Int(i64),
    Choice(usize),
}

/// A finished trial as the samplers see it: its values and its objective (`None`: it failed and
/// tells nothing).
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub values: Vec<Value>,
    pub objective: Option<f64>,
}

/// Every combination of `options` (one list per parameter), the last parameter varying fastest.
pub fn grid(options: &[Vec<Value>]) -> Vec<Vec<Value>> {
    options.iter().fold(vec![Vec::new()], |acc, opts| {
        acc.iter()
            .flat_map(|prefix| {
                opts.iter().map(move |&v| {
                    let mut next = prefix.clone();
                    next.push(v);
                    next
                })
            })
            .collect()
    })
}

/// Independent uniform draws (log-uniform for log domains).
pub fn random(domains: &[Domain], rng: &mut Rng) -> Vec<Value> {
    domains
        .iter()
        .map(|d| match *d {
            Domain::Float { .. } | Domain::Int { .. } => {
                let (low, high) = bounds(d);
                from_internal(d, low + (high - low) * rng.random::<f64>())
            }
            Domain::Choice { n } => Value::Choice(((rng.random::<f64>() * n as f64) as usize).min(n - 1)),
        })
        .collect()
}

/// TPE's settings; the defaults are Optuna's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tpe {
    /// Random trials before the model takes over.
    pub startup: usize,
    /// Draws from `l` scored per parameter.
    pub candidates: usize,
    /// Weight of the prior component in each estimator.
    pub prior_weight: f64,
}

impl Default for Tpe {
    fn default() -> Self {
        Self { startup: 10, candidates: 24, prior_weight: 1.0 }
    }
}

impl Tpe {
    /// The next trial's values given the finished trials (in trial order).
    pub fn suggest(&self, domains: &[Domain], history: &[Observation], rng: &mut Rng) -> Vec<Value> {
        let done: Vec<(f64, &[Value])> =
            history.iter().filter_map(|o| o.objective.map(|y| (y, o.values.as_slice()))).collect();
        if done.len() < self.startup {
            return random(domains, rng);
        }
        // Best first; ties keep trial order. NaN objectives sort last (a diverged trial is bad).
        let mut order: Vec<usize> = (0..done.len()).collect();
        order.sort_by(|&a, &b| done[a].0.total_cmp(&done[b].0).then(a.cmp(&b)));
        let n_below = gamma(done.len());
        let mut below: Vec<usize> = order[..n_below].to_vec();
        let mut above: Vec<usize> = order[n_below..].to_vec();
        below.sort_unstable();
        above.sort_unstable();
        let internal = |set: &[usize]| -> Vec<Vec<f64>> {
            set.iter()
                .map(|&i| domains.iter().zip(done[i].1).map(|(d, &v)| to_internal(d, v)).collect())
                .collect()
        };
        let l = Mixture::new(domains, &internal(&below), self.prior_weight);
        let g = Mixture::new(domains, &internal(&above), self.prior_weight);
        let mut best: Option<(f64, Vec<f64>)> = None;
        for _ in 0..self.candidates {
            let x = l.sample(rng);
            let score = l.log_pdf(&x) - g.log_pdf(&x);
            if best.as_ref().is_none_or(|(b, _)| score > *b) {
                best = Some((score, x));
            }
        }
        let (_, x) = best.expect("at least one candidate");
        domains.iter().zip(x).map(|(d, v)| from_internal(d, v)).collect()
    }
}

/// How many of `n` finished trials count as good: Optuna's default `min(ceil(0.1 n), 25)`.
pub fn gamma(n: usize) -> usize {
    n.div_ceil(10).min(25)
}

/// Optuna's default observation weights in trial order: 1 for the last 25, a ramp from `1/n`
/// before them.
fn weights(n: usize) -> Vec<f64> {
    if n < 25 {
        return vec![1.0; n];
    }
    let ramp = n - 25;
    let mut w: Vec<f64> = (0..ramp)
        .map(|i| {
            if ramp == 1 {
                1.0 / n as f64
            } else {
                1.0 / n as f64 + (1.0 - 1.0 / n as f64) * i as f64 / (ramp - 1) as f64
            }
        })
        .collect();
    w.extend(std::iter::repeat_n(1.0, 25));
    w
}

/// The sampling interval in internal coordinates (log for log domains; integers widened by half a
/// step so that every integer gets the same mass).
fn bounds(domain: &Domain) -> (f64, f64) {
    match *domain {
        Domain::Float { low, high, log: false } => (low, high),
        Domain::Float { low, high, log: true } => (libm::log(low), libm::log(high)),
        Domain::Int { low, high, log: false } => (low as f64 - 0.5, high as f64 + 0.5),
        Domain::Int { low, high, log: true } => (libm::log(low as f64 - 0.5), libm::log(high as f64 + 0.5)),
        Domain::Choice { n } => (0.0, n as f64),
    }
}

fn to_internal(domain: &Domain, v: Value) -> f64 {
    let x = match v {
        Value::Float(x) => x,
        Value::Int(i) => i as f64,
        Value::Choice(c) => c as f64,
    };
    match domain {
        Domain::Float { log: true, .. } | Domain::Int { log: true, .. } => libm::log(x),
        _ => x,
    }
}

fn from_internal(domain: &Domain, x: f64) -> Value {
    match *domain {
        Domain::Float { low, high, log } => {
            Value::Float((if log { libm::exp(x) } else { x }).clamp(low, high))
        }
        Domain::Int { low, high, log } => {
            let v = if log { libm::exp(x) } else { x };
            Value::Int((libm::round(v) as i64).clamp(low, high))
        }
        Domain::Choice { n } => Value::Choice((x as usize).min(n - 1)),
    }
}

/// An index drawn with probabilities `p` (which sum to 1).
fn draw_index(p: &[f64], rng: &mut Rng) -> usize {
    let u = rng.random::<f64>();
    let mut acc = 0.0;
    for (i, &pi) in p.iter().enumerate() {
        acc += pi;
        if u < acc {
            return i;
        }
    }
    p.len() - 1
}

/// A Parzen estimator over every parameter at once (Optuna's multivariate TPE, its default for
/// one objective): one kernel per observation, a product over the parameters, plus a prior
/// kernel; kernels weighted by [`weights`] and `prior_weight`.
struct Mixture {
    weights: Vec<f64>,
    dims: Vec<Dim>,
}

/// One parameter's factor in every kernel (the prior's last).
enum Dim {
    /// Normals truncated to `[low, high]` (internal coordinates).
    Numeric { mus: Vec<f64>, sigmas: Vec<f64>, low: f64, high: f64 },
    /// Per kernel, the probability of each option.
    Categorical { probs: Vec<Vec<f64>> },
}

impl Mixture {
    fn new(domains: &[Domain], observed: &[Vec<f64>], prior_weight: f64) -> Self {
        let n = observed.len();
        let mut weights = weights(n);
        weights.push(prior_weight);
        let total: f64 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= total);
        let dims = domains
            .iter()
            .enumerate()
            .map(|(d, domain)| {
                let column: Vec<f64> = observed.iter().map(|o| o[d]).collect();
                match *domain {
                    Domain::Choice { n: choices } => {
                        // Each observation's kernel: prior_weight / kernels on every option plus 1
                        // on its own; the prior's: uniform.
                        let kernels = n + 1;
                        let mut probs = vec![vec![prior_weight / kernels as f64; choices]; kernels];
                        for (k, &c) in column.iter().enumerate() {
                            probs[k][(c as usize).min(choices - 1)] += 1.0;
                        }
                        for row in &mut probs {
                            let sum: f64 = row.iter().sum();
                            row.iter_mut().for_each(|p| *p /= sum);
                        }
                        Dim::Categorical { probs }
                    }
                    _ => {
                        let (low, high) = bounds(domain);
                        let mut sigmas = bandwidths(&column, low, high);
                        let mut mus = column;
                        mus.push(0.5 * (low + high));
                        sigmas.push(high - low);
                        Dim::Numeric { mus, sigmas, low, high }
                    }
                }
            })
            .collect();
        Self { weights, dims }
    }

    /// A draw: a kernel by weight, then each parameter from that kernel's factor (truncated
    /// normals by rejection: every centre lies in the interval and every bandwidth is at most its
    /// width, so at least a sixth of draws land).
    fn sample(&self, rng: &mut Rng) -> Vec<f64> {
        let k = draw_index(&self.weights, rng);
        self.dims
            .iter()
            .map(|dim| match dim {
                Dim::Categorical { probs } => draw_index(&probs[k], rng) as f64,
                Dim::Numeric { mus, sigmas, low, high } => {
                    for _ in 0..1000 {
                        let x = mus[k] + sigmas[k] * standard_normal(rng);
                        if (*low..=*high).contains(&x) {
                            return x;
                        }
                    }
                    mus[k].clamp(*low, *high)
                }
            })
            .collect()
    }

    /// `log` of the mixture's density at `x`, each normal renormalised to its interval.
    fn log_pdf(&self, x: &[f64]) -> f64 {
        let terms: Vec<f64> = (0..self.weights.len())
            .map(|k| {
                let mut t = libm::log(self.weights[k]);
                for (dim, &xd) in self.dims.iter().zip(x) {
                    t += match dim {
                        Dim::Categorical { probs } => libm::log(probs[k][xd as usize]),
                        Dim::Numeric { mus, sigmas, low, high } => {
                            let (mu, sigma) = (mus[k], sigmas[k]);
                            let z = (xd - mu) / sigma;
                            let mass = normal_cdf((high - mu) / sigma) - normal_cdf((low - mu) / sigma);
                            -0.5 * z * z
                                - libm::log(sigma * (2.0 * std::f64::consts::PI).sqrt() * mass.max(1e-300))
                        }
                    };
                }
                t
            })
            .collect();
        let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        max + libm::log(terms.iter().map(|t| libm::exp(t - max)).sum::<f64>())
    }
}

/// Optuna's bandwidths for centres `mus` in `[low, high]`: the larger gap to a sorted neighbour
/// (the interval's ends standing in for missing neighbours; with two or more centres the
/// outermost take their one inner gap), clipped to `[range / min(100, n + 2), range]`.
fn bandwidths(mus: &[f64], low: f64, high: f64) -> Vec<f64> {
    let n = mus.len();
    let mut sorted: Vec<usize> = (0..n).collect();
    sorted.sort_by(|&a, &b| mus[a].total_cmp(&mus[b]).then(a.cmp(&b)));
    let range = high - low;
    let min_sigma = range / (100f64).min(2.0 + n as f64);
    let mut sigmas = vec![0.0; n];
    for (rank, &i) in sorted.iter().enumerate() {
        let left = mus[i] - if rank > 0 { mus[sorted[rank - 1]] } else { low };
        let right = if rank + 1 < n { mus[sorted[rank + 1]] } else { high } - mus[i];
        let sigma = if n >= 2 && rank == 0 {
            right
        } else if n >= 2 && rank + 1 == n {
            left
        } else {
            left.max(right)
        };
        sigmas[i] = sigma.clamp(min_sigma, range);
    }
    sigmas
}

fn normal_cdf(z: f64) -> f64 {
    0.5 * (1.0 + libm::erf(z / std::f64::consts::SQRT_2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_is_the_cross_product_in_file_order() {
        let g = grid(&[
            vec![Value::Int(1), Value::Int(2)],
            vec![Value::Choice(0), Value::Choice(1), Value::Choice(2)],
        ]);
        assert_eq!(g.len(), 6);
        assert_eq!(g[0], vec![Value::Int(1), Value::Choice(0)]);
        assert_eq!(g[1], vec![Value::Int(1), Value::Choice(1)]);
        assert_eq!(g[5], vec![Value::Int(2), Value::Choice(2)]);
    }

    #[test]
    fn draws_stay_in_their_domains_and_reproduce() {
        let domains = [
            Domain::Float { low: 1e-5, high: 2e-4, log: true },
            Domain::Int { low: 1, high: 3, log: false },
            Domain::Choice { n: 4 },
        ];
        let tpe = Tpe::default();
        let mut history = Vec::new();
        for k in 0..40u64 {
            let values = tpe.suggest(&domains, &history, &mut crate::rng::stream(1, "sweep", k));
            assert_eq!(values, tpe.suggest(&domains, &history, &mut crate::rng::stream(1, "sweep", k)));
            let Value::Float(lr) = values[0] else { panic!() };
            let Value::Int(epochs) = values[1] else { panic!() };
            let Value::Choice(c) = values[2] else { panic!() };
            assert!((1e-5..=2e-4).contains(&lr) && (1..=3).contains(&epochs) && c < 4, "{values:?}");
            let objective = (libm::log(lr) - libm::log(5e-5)).abs() + epochs as f64 + c as f64;
            history.push(Observation { values, objective: (k % 7 != 3).then_some(objective) });
        }
    }

    #[test]
    fn gamma_and_weights_are_optunas() {
        assert_eq!((gamma(10), gamma(11), gamma(300)), (1, 2, 25));
        assert_eq!(weights(3), vec![1.0; 3]);
        let w = weights(30);
        assert_eq!(w.len(), 30);
        assert!((w[0] - 1.0 / 30.0).abs() < 1e-12 && w[4] == 1.0 && w[29] == 1.0);
    }

    /// A 5-D sphere, a bowl in log space and a categorical penalty: minimum 0.
    fn synthetic(values: &[Value]) -> f64 {
        let mut y = 0.0;
        for v in &values[..5] {
            let Value::Float(x) = *v else { panic!() };
            y += (x - 0.3) * (x - 0.3);
        }
        let Value::Float(lr) = values[5] else { panic!() };
        let d = libm::log10(lr) + 4.0;
        y += d * d;
        let Value::Choice(c) = values[6] else { panic!() };
        y + [1.0, 0.0, 0.5, 2.0][c]
    }

    /// Best objective after `trials` trials of `tpe` (or random search when `None`).
    fn best_of(seed: u64, trials: usize, tpe: Option<Tpe>) -> f64 {
        let mut domains = vec![Domain::Float { low: -2.0, high: 2.0, log: false }; 5];
        domains.push(Domain::Float { low: 1e-6, high: 1e-2, log: true });
        domains.push(Domain::Choice { n: 4 });
        let mut history: Vec<Observation> = Vec::new();
        for k in 0..trials as u64 {
            let mut rng = crate::rng::stream(seed, "sweep", k);
            let values = match tpe {
                Some(t) => t.suggest(&domains, &history, &mut rng),
                None => random(&domains, &mut rng),
            };
            let objective = synthetic(&values);
            history.push(Observation { values, objective: Some(objective) });
        }
        history.iter().filter_map(|o| o.objective).fold(f64::INFINITY, f64::min)
    }

    /// Acceptance of issue 12: over 30 seeds at 50 trials, TPE's mean best is at most half of
    /// random search's, and TPE wins at least 24 of the 30 paired seeds. Measured: 1.007 against
    /// 2.787 (0.36), 28 wins. Optuna 5.0.0's `TPESampler` on the same objective (its own seeds):
    /// 0.986 against 2.827 (0.35), 30 wins; an independent (per-parameter) TPE here gave 0.53.
    #[test]
    fn tpe_beats_random_search_on_synthetic_objectives() {
        let (mut tpe_sum, mut random_sum, mut wins) = (0.0, 0.0, 0);
        for seed in 0..30 {
            let t = best_of(seed, 50, Some(Tpe::default()));
            let r = best_of(seed, 50, None);
            tpe_sum += t;
            random_sum += r;
            wins += usize::from(t < r);
        }
        let (tpe_mean, random_mean) = (tpe_sum / 30.0, random_sum / 30.0);
        println!("mean best: TPE {tpe_mean:.4}, random {random_mean:.4}; TPE wins {wins}/30");
        assert!(tpe_mean <= 0.5 * random_mean, "TPE {tpe_mean} vs random {random_mean}");
        assert!(wins >= 24, "TPE won {wins} of 30");
    }
}
