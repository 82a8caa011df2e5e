//! Fault injection for the failure tests: abort the process at a named point, or slow a sweep's
//! trials down.
//!
//! `PIPE_FAULT=<point>` makes the process abort (as abruptly as `kill -9`: no destructors, no
//! flushing) when it first reaches that point, `PIPE_FAULT=<point>:<stage>` when it reaches it
//! in that stage (`store.manifest-written:train`), and a `#n` suffix when it reaches it the n-th
//! time (`checkpoint.saved#5`: in a sweep's third trial), so tests can stop pipe at exact moments
//! of its commit protocols instead of only at random times. Without the variable every point is
//! a no-op (one cached environment lookup). `PIPE_SWEEP_DELAYS=<trial>:<ms>,...` makes a sweep's
//! trial sleep before each of its runs, so that parallel trials end out of order. The points, in
//! the order a run reaches them:
//!
//! | point | where |
//! |---|---|
//! | `store.outputs-hashed` | a stage's outputs are hashed; its manifest is not yet written |
//! | `store.manifest-written` | the manifest is in `tmp/`; the directory is not yet renamed into `stages/` |
//! | `store.renamed` | the stage is in `stages/`; its work directory is not yet removed |
//! | `checkpoint.written` | a checkpoint's temporary file is written; not yet renamed over the last one |
//! | `checkpoint.saved` | a checkpoint is in place |
//! | `record.written` | a run record's temporary file is written; not yet renamed into place |
//! | `atomic.before-rename` | any atomic write (manifests, refs, records), just before its rename |
//! | `remote.part-pushed` | one part of a multipart upload to the remote is handed over |
//! | `remote.blobs-pushed` | a stage's blobs are in the remote; its manifest is not yet written |

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The environment variable naming the point to abort at.
pub const FAULT_ENV: &str = "PIPE_FAULT";
/// The environment variable naming sweep trials to slow down.
pub const DELAYS_ENV: &str = "PIPE_SWEEP_DELAYS";

/// Every named point (tests iterate over them).
pub const POINTS: [&str; 7] = [
    "store.outputs-hashed",
    "store.manifest-written",
    "store.renamed",
    "checkpoint.written",
    "checkpoint.saved",
    "record.written",
    "atomic.before-rename",
];

/// The points only a push to a remote reaches.
pub const REMOTE_POINTS: [&str; 2] = ["remote.part-pushed", "remote.blobs-pushed"];

/// Aborts the process if `PIPE_FAULT` names `name`.
pub fn point(name: &str) {
    point_in(name, "");
}

/// Aborts the process if `PIPE_FAULT` names `name`, or `name:stage`.
pub fn point_in(name: &str, stage: &str) {
    static TARGET: OnceLock<Option<String>> = OnceLock::new();
    debug_assert!(POINTS.contains(&name) || REMOTE_POINTS.contains(&name), "unknown fault point {name}");
    static HITS: AtomicU64 = AtomicU64::new(0);
    let Some(target) = TARGET.get_or_init(|| std::env::var(FAULT_ENV).ok()) else { return };
    let (at, nth) = match target.split_once('#') {
        Some((at, n)) => (at, n.parse().unwrap_or(1)),
        None => (target.as_str(), 1),
    };
    let hit = match at.split_once(':') {
        Some((point, in_stage)) => point == name && in_stage == stage,
        None => at == name,
    };
    if hit && HITS.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        eprintln!("{FAULT_ENV}: aborting at {target}");
        std::process::abort();
    }
}

/// How long trial `trial` of a sweep sleeps before each of its runs (`PIPE_SWEEP_DELAYS`).
pub fn trial_delay(trial: u64) -> Duration {
    static DELAYS: OnceLock<Vec<(u64, u64)>> = OnceLock::new();
    let delays = DELAYS.get_or_init(|| {
        let text = std::env::var(DELAYS_ENV).unwrap_or_default();
        text.split(',')
            .filter_map(|pair| {
                let (k, ms) = pair.split_once(':')?;
                Some((k.trim().parse().ok()?, ms.trim().parse().ok()?))
            })
            .collect()
    });
    let ms = delays.iter().find(|(k, _)| *k == trial).map_or(0, |(_, ms)| *ms);
    Duration::from_millis(ms)
}
