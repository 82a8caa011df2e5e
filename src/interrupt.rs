//! Ctrl-C and SIGTERM: ask the running stage to stop at a safe point.
//!
//! The first signal only sets a flag; the train stage checks it after every optimizer step, writes
//! a checkpoint and stops (the CLI then exits with 130). A second signal exits at once, for a user
//! who does not want to wait for the checkpoint.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Exit code of a process stopped by SIGINT, by shell convention (128 + 2).
pub const EXIT_CODE: i32 = 130;

/// Installs the handlers (once; later calls do nothing).
pub fn install() -> std::io::Result<()> {
    if FLAG.get().is_some() {
        return Ok(());
    }
    let flag = FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Order matters: the conditional shutdown sees the flag as it was before this signal.
        signal_hook::flag::register_conditional_shutdown(signal, EXIT_CODE, Arc::clone(flag))?;
        signal_hook::flag::register(signal, Arc::clone(flag))?;
    }
    Ok(())
}

/// Whether a stop was requested.
pub fn requested() -> bool {
    FLAG.get().is_some_and(|f| f.load(Ordering::Relaxed))
}
