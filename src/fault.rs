//! Fault injection for the failure tests: abort the process at a named point.
//!
//! `PIPE_FAULT=<point>` makes the process abort (as abruptly as `kill -9`: no destructors, no
//! flushing) when it first reaches that point, and `PIPE_FAULT=<point>:<stage>` when it reaches it
//! in that stage (`store.manifest-written:train`), so tests can stop pipe at exact moments of its
//! commit protocols instead of only at random times. Without the variable every point is a no-op
//! (one cached environment lookup). The points, in the order a run reaches them:
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

use std::sync::OnceLock;

/// The environment variable naming the point to abort at.
pub const FAULT_ENV: &str = "PIPE_FAULT";

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

/// Aborts the process if `PIPE_FAULT` names `name`.
pub fn point(name: &str) {
    point_in(name, "");
}

/// Aborts the process if `PIPE_FAULT` names `name`, or `name:stage`.
pub fn point_in(name: &str, stage: &str) {
    static TARGET: OnceLock<Option<String>> = OnceLock::new();
    debug_assert!(POINTS.contains(&name), "unknown fault point {name}");
    let Some(target) = TARGET.get_or_init(|| std::env::var(FAULT_ENV).ok()) else { return };
    let hit = match target.split_once(':') {
        Some((point, in_stage)) => point == name && in_stage == stage,
        None => target == name,
    };
    if hit {
        eprintln!("{FAULT_ENV}: aborting at {target}");
        std::process::abort();
    }
}
