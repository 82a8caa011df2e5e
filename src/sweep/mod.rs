//! Hyperparameter search (`pipe sweep`, issue 12), built from the inside out: first what proposes
//! trials ([`sampler`]: grid, random, TPE) and what stops them early ([`pruner`]: the median rule,
//! ASHA). Both are functions of the trials they are shown and of a seeded stream only, so a
//! sweep's trial list and its pruning never depend on timing, threads or a dependency's version.

pub mod pruner;
pub mod sampler;
