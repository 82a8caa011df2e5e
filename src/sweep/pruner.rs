//! Whether a trial stops early: the median rule and asynchronous successive halving (ASHA), as
//! Optuna's `MedianPruner` and `SuccessiveHalvingPruner` decide, on the per-epoch objectives that
//! the train stage's evaluations already give.
//!
//! A decision is a function of the trial's own curve and of the curves it is shown: the sweep
//! shows each trial only the trials that every execution order would have finished before it, so
//! decisions never depend on timing. Objectives are minimised (a maximised metric is negated). A
//! NaN objective always stops the trial.

/// An earlier trial as a pruner sees it: its objective after each epoch it ran, and whether it
/// ran to the end (a pruned trial's curve stops where it was stopped).
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub curve: &'a [f64],
    pub complete: bool,
}

/// How trials are stopped early.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pruner {
    /// Every trial runs to the end.
    None,
    /// Stop when the objective after this epoch is worse than the median, at the same epoch, of
    /// the complete trials; not before `startup` trials are complete, not within the first
    /// `warmup` epochs, and only when at least `min_trials` complete trials reached this epoch.
    Median { startup: usize, warmup: usize, min_trials: usize },
    /// Rungs at `min_epochs * reduction^k` epochs: at a rung, continue only when in the best
    /// `1 / reduction` of every trial that reached it (complete or stopped there), itself included.
    Asha { min_epochs: usize, reduction: usize },
}

impl Pruner {
    /// Optuna's defaults for the median rule (5 startup trials, no warm-up, 1 trial).
    pub fn median() -> Self {
        Self::Median { startup: 5, warmup: 0, min_trials: 1 }
    }

    /// The epochs before the last of `epochs` after which this rule may stop a trial: where a
    /// sweep ends a trial's run to decide.
    pub fn rungs(&self, epochs: usize) -> Vec<usize> {
        match *self {
            Self::None => Vec::new(),
            Self::Median { warmup, .. } => (warmup + 1..epochs).collect(),
            Self::Asha { min_epochs, reduction } => {
                (1..epochs).filter(|&e| is_rung(e, min_epochs, reduction)).collect()
            }
        }
    }

    /// Whether a decision at `epoch` can be taken while an earlier trial still runs, given its
    /// curve so far: ASHA reads only values at the rung; the median rule needs to know which
    /// trials completed.
    pub fn decided_by(&self, epoch: usize, curve_so_far: &[f64]) -> bool {
        matches!(self, Self::Asha { .. }) && curve_so_far.len() >= epoch
    }

    /// The name and settings, for records.
    pub fn describe(&self) -> serde_json::Value {
        match *self {
            Self::None => serde_json::json!({ "method": "none" }),
            Self::Median { startup, warmup, min_trials } => {
                serde_json::json!({ "method": "median", "startup": startup, "warmup": warmup, "min_trials": min_trials })
            }
            Self::Asha { min_epochs, reduction } => {
                serde_json::json!({ "method": "asha", "min_epochs": min_epochs, "reduction": reduction })
            }
        }
    }

    /// Whether a trial stops after `epoch` (1-based), where its objective is `curve[epoch - 1]`.
    pub fn stops(&self, curve: &[f64], epoch: usize, seen: &[Seen<'_>]) -> bool {
        let Some(&value) = curve.get(epoch.wrapping_sub(1)) else { return false };
        if value.is_nan() {
            return !matches!(self, Self::None);
        }
        match *self {
            Self::None => false,
            Self::Median { startup, warmup, min_trials } => {
                let complete: Vec<&Seen<'_>> = seen.iter().filter(|s| s.complete).collect();
                if complete.len() < startup || epoch <= warmup {
                    return false;
                }
                let mut at: Vec<f64> = complete
                    .iter()
                    .filter_map(|s| s.curve.get(epoch - 1).copied())
                    .filter(|v| !v.is_nan())
                    .collect();
                if at.is_empty() || at.len() < min_trials {
                    return false;
                }
                at.sort_by(f64::total_cmp);
                let n = at.len();
                let median = if n % 2 == 1 { at[n / 2] } else { 0.5 * (at[n / 2 - 1] + at[n / 2]) };
                value > median
            }
            Self::Asha { min_epochs, reduction } => {
                if !is_rung(epoch, min_epochs, reduction) {
                    return false;
                }
                // Every trial that reached this rung, this one included.
                let mut at: Vec<f64> = seen.iter().filter_map(|s| s.curve.get(epoch - 1).copied()).collect();
                at.push(value);
                at.sort_by(f64::total_cmp);
                let keep = (at.len() / reduction).max(1);
                value > at[keep - 1]
            }
        }
    }
}

/// Whether `epoch` is one of ASHA's rungs `min_epochs * reduction^k`.
fn is_rung(epoch: usize, min_epochs: usize, reduction: usize) -> bool {
    let (mut rung, reduction) = (min_epochs.max(1), reduction.max(2));
    while rung < epoch {
        rung = rung.saturating_mul(reduction);
    }
    rung == epoch
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Learning curves that never cross: trial `k`'s objective after epoch `e` is
    /// `final_k + 1 / e`, with finals in a shuffled order; trial 7 diverges (NaN from epoch 2).
    fn curves(trials: usize, epochs: usize) -> Vec<Vec<f64>> {
        (0..trials)
            .map(|k| {
                let last = ((k * 37 + 11) % trials) as f64 / trials as f64;
                (1..=epochs)
                    .map(|e| if k == 7 && e >= 2 { f64::NAN } else { last + 1.0 / e as f64 })
                    .collect()
            })
            .collect()
    }

    /// A stopping rule: (curve, epoch, earlier trials) -> stop.
    type Rule<'a> = &'a dyn Fn(&[f64], usize, &[Seen<'_>]) -> bool;

    /// A sequential sweep: each trial runs until its pruner stops it, seeing every earlier trial.
    /// Returns the epochs each trial ran.
    fn sweep(pruner: Rule<'_>, curves: &[Vec<f64>]) -> Vec<usize> {
        let mut ran: Vec<usize> = Vec::new();
        for (k, curve) in curves.iter().enumerate() {
            let seen: Vec<Seen<'_>> = (0..k)
                .map(|j| Seen { curve: &curves[j][..ran[j]], complete: ran[j] == curves[j].len() })
                .collect();
            let stop = (1..=curve.len()).find(|&e| pruner(curve, e, &seen)).unwrap_or(curve.len());
            ran.push(stop);
        }
        ran
    }

    /// The rules written out longhand, as the reference.
    fn median_reference(startup: usize, curve: &[f64], epoch: usize, seen: &[Seen<'_>]) -> bool {
        let value = curve[epoch - 1];
        if value.is_nan() {
            return true;
        }
        let complete: Vec<_> = seen.iter().filter(|s| s.complete).collect();
        if complete.len() < startup {
            return false;
        }
        let others: Vec<f64> = complete.iter().map(|s| s.curve[epoch - 1]).filter(|v| !v.is_nan()).collect();
        // value > median  <=>  more than half of the others are below it (odd n), or it exceeds
        // the mean of the middle two (even n).
        let below = others.iter().filter(|&&o| o < value).count();
        let n = others.len();
        if n == 0 {
            return false;
        }
        if n % 2 == 1 {
            below > n / 2
        } else {
            let mut s = others.clone();
            s.sort_by(f64::total_cmp);
            value > 0.5 * (s[n / 2 - 1] + s[n / 2])
        }
    }

    fn asha_reference(
        min_epochs: usize,
        reduction: usize,
        curve: &[f64],
        epoch: usize,
        seen: &[Seen<'_>],
    ) -> bool {
        let value = curve[epoch - 1];
        if value.is_nan() {
            return true;
        }
        let rungs: Vec<usize> = (0..10).map(|k| min_epochs * reduction.pow(k)).collect();
        if !rungs.contains(&epoch) {
            return false;
        }
        let reached: Vec<f64> =
            seen.iter().filter(|s| s.curve.len() >= epoch).map(|s| s.curve[epoch - 1]).collect();
        let total = reached.len() + 1;
        let better = reached.iter().filter(|&&o| o < value).count();
        // Promoted when fewer than max(1, total / reduction) trials are strictly better.
        better >= (total / reduction).max(1)
    }

    /// Acceptance of issue 12: both pruners agree with the longhand rules at every decision,
    /// stop the diverging trial, save at least 40% of the epochs and keep the best trial.
    #[test]
    fn pruners_agree_with_the_reference_save_epochs_and_keep_the_best() {
        let curves = curves(40, 9);
        let full: usize = curves.iter().map(Vec::len).sum();
        let best = (0..curves.len())
            .filter(|&k| !curves[k].iter().any(|v| v.is_nan()))
            .min_by(|&a, &b| curves[a][8].total_cmp(&curves[b][8]))
            .unwrap();
        let median = Pruner::Median { startup: 5, warmup: 0, min_trials: 1 };
        let asha = Pruner::Asha { min_epochs: 1, reduction: 3 };
        for (pruner, reference) in [
            (
                median,
                &(|c: &[f64], e, s: &[Seen<'_>]| median_reference(5, c, e, s))
                    as &dyn Fn(&[f64], usize, &[Seen<'_>]) -> bool,
            ),
            (asha, &|c: &[f64], e, s: &[Seen<'_>]| asha_reference(1, 3, c, e, s)),
        ] {
            let ran = sweep(&|c, e, s| pruner.stops(c, e, s), &curves);
            assert_eq!(ran, sweep(reference, &curves), "{pruner:?} against the reference");
            assert!(ran[7] < 9, "{pruner:?} let the diverging trial finish");
            let saved = 1.0 - ran.iter().sum::<usize>() as f64 / full as f64;
            assert!(saved >= 0.4, "{pruner:?} saved {saved:.2} of the epochs");
            assert_eq!(ran[best], 9, "{pruner:?} stopped the best trial");
            println!("{pruner:?}: saved {:.0}% of the epochs", saved * 100.0);
        }
    }

    #[test]
    fn rungs_and_startup() {
        assert!(is_rung(1, 1, 3) && is_rung(3, 1, 3) && is_rung(9, 1, 3) && !is_rung(4, 1, 3));
        assert!(is_rung(2, 2, 2) && is_rung(8, 2, 2) && !is_rung(1, 2, 2));
        let seen = [Seen { curve: &[0.1, 0.1], complete: true }];
        assert!(!Pruner::median().stops(&[5.0, 5.0], 1, &seen), "within the startup trials");
        assert!(Pruner::median().stops(&[f64::NAN], 1, &seen), "NaN always stops");
        assert!(!Pruner::None.stops(&[f64::NAN], 1, &seen));
    }
}
