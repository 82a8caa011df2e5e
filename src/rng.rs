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
}
