//! Hyperparameter search (`pipe sweep`, issue 12), built from the inside out: sweep files read and
//! checked against their pipeline ([`spec`]), what proposes trials ([`sampler`]: grid, random,
//! TPE; [`trials`]: trial `k`'s values for a sweep) and what stops them early ([`pruner`]: the
//! median rule, ASHA). All are functions of the trials they are shown and of seeded streams only,
//! so a sweep's trial list and its pruning never depend on timing, threads or a dependency's
//! version. [`run`] runs a sweep's trials as pipeline runs (one at a time, without pruning yet).

pub mod plots;
pub mod pruner;
pub mod run;
pub mod sampler;
pub mod schema;
pub mod spec;
pub mod trials;
