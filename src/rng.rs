//! The project's one source of randomness: seeded, and derived per purpose.
//!
//! candle's CPU RNG cannot be seeded, so every random draw (head initialisation, shuffling,
//! dropout masks, validation splits) comes from here. Each purpose gets its own stream, derived
//! from the run's seed, a domain name and an index (an epoch, an optimizer step): a stream never
//! depends on how many numbers another purpose drew, and a resumed run can recreate the stream of
//! any step without replaying the ones before it.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

/// The generator behind every stream.
pub type Rng = ChaCha8Rng;

/// A generator for `domain` (e.g. `"shuffle"`) at `index` (e.g. the epoch), under `seed`.
pub fn stream(seed: u64, domain: &str, index: u64) -> Rng {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update((domain.len() as u64).to_le_bytes());
    h.update(domain.as_bytes());
    h.update(index.to_le_bytes());
    Rng::from_seed(h.finalize().into())
}

/// A draw from the standard normal distribution: Marsaglia's polar method, on uniform draws from
/// `rng` and pipe's portable logarithm, so the same stream gives the same values on every machine
/// (`rand_distr`'s samplers call the system's `exp`/`ln` and may change between its versions).
pub fn standard_normal(rng: &mut Rng) -> f64 {
    use rand::Rng as _;
    loop {
        let u = 2.0 * rng.random::<f64>() - 1.0;
        let v = 2.0 * rng.random::<f64>() - 1.0;
        let s = u * u + v * v;
        if s > 0.0 && s < 1.0 {
            return u * (-2.0 * crate::ops::math::ln_f64(s) / s).sqrt();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng as _;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: u64 = stream(42, "shuffle", 0).random();
        assert_eq!(a, stream(42, "shuffle", 0).random::<u64>());
        assert_ne!(a, stream(42, "shuffle", 1).random::<u64>());
        assert_ne!(a, stream(43, "shuffle", 0).random::<u64>());
        assert_ne!(a, stream(42, "dropout", 0).random::<u64>());
    }

    #[test]
    fn standard_normal_has_mean_zero_and_unit_variance() {
        let mut rng = stream(7, "init", 0);
        let draws: Vec<f64> = (0..200_000).map(|_| standard_normal(&mut rng)).collect();
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        let var = draws.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / draws.len() as f64;
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.01, "mean {mean}, variance {var}");
        let tail = draws.iter().filter(|x| x.abs() > 1.96).count() as f64 / draws.len() as f64;
        assert!((tail - 0.05).abs() < 0.003, "two-sided 5% tail: {tail}");
    }
}
