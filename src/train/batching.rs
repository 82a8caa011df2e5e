//! Which rows form which batch, epoch by epoch.

use rand::seq::SliceRandom;

use super::TrainConfig;
use crate::rng;

/// The micro-batches (row indices) of `epoch`, a pure function of the seed and epoch.
///
/// Without bucketing: a seeded shuffle cut into consecutive batches (the reference's
/// `DataLoader(shuffle=True)` behaviour). With bucketing: the shuffled rows are cut into windows
/// of 50 batches, each window sorted by length and cut into batches (similar lengths pad little),
/// and the batches are shuffled again so that lengths do not drift through the epoch.
pub fn epoch_batches(
    rows: usize,
    lengths: &[usize],
    config: &TrainConfig,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..rows).collect();
    let mut rng = rng::stream(seed, "shuffle", epoch);
    if config.shuffle {
        order.shuffle(&mut rng);
    }
    let size = config.batch_size;
    if !config.length_bucketing {
        return order.chunks(size).map(<[usize]>::to_vec).collect();
    }
    let mut batches: Vec<Vec<usize>> = Vec::with_capacity(rows.div_ceil(size));
    for window in order.chunks(size * 50) {
        let mut window = window.to_vec();
        // Stable sort keeps the shuffled order among equal lengths.
        window.sort_by_key(|&r| lengths[r]);
        batches.extend(window.chunks(size).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_once_per_epoch_and_seeded() {
        let lengths: Vec<usize> = (0..103).map(|i| (i * 7) % 31 + 2).collect();
        for bucketing in [false, true] {
            let config = TrainConfig { batch_size: 8, length_bucketing: bucketing, ..Default::default() };
            let a = epoch_batches(103, &lengths, &config, 1, 0);
            let mut seen: Vec<usize> = a.iter().flatten().copied().collect();
            seen.sort();
            assert_eq!(seen, (0..103).collect::<Vec<_>>());
            assert_eq!(a, epoch_batches(103, &lengths, &config, 1, 0));
            assert_ne!(a, epoch_batches(103, &lengths, &config, 1, 1));
        }
    }
}
