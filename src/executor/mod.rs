//! Where a pipeline's stages run. The local executor is the engine itself ([`crate::engine::run`],
//! and [`crate::sweep::run::run`] for sweeps); the [`slurm`] executor submits `pipe` to a cluster
//! (one batch job per stage chained by dependencies; a sweep's trials as a job array, [`trials`])
//! and then finishes the run or sweep here from the store the nodes share.
//!
//! Executors decide where work happens, never what it is: every job runs the same engine on the
//! same resolved pipeline, so keys, outputs and run ids are the ones a local run gives.

pub mod slurm;
pub mod trials;
