//! Where a pipeline's stages run. The local executor is the engine itself ([`crate::engine::run`]);
//! the [`slurm`] executor submits `pipe` to a cluster, one batch job per stage chained by
//! dependencies, and then finishes the run here from the store the nodes share.
//!
//! Executors decide where work happens, never what it is: every job runs the same engine on the
//! same resolved pipeline, so keys, outputs and the run id are the ones a local run gives.

pub mod slurm;
pub mod trials;

/// The executors, as `--executor` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExecutorKind {
    /// Here, in this process (the default).
    #[default]
    Local,
    /// As Slurm batch jobs (`sbatch`), polled with `scontrol`.
    Slurm,
}
