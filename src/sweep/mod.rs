//! Hyperparameter search (`pipe sweep`, issue 12): sweep files read and checked against their
//! pipeline ([`spec`], and their JSON Schema in [`schema`]), what proposes trials ([`sampler`]:
//! grid, random, TPE; [`trials`]: trial `k`'s values for a sweep, and the plan before it runs)
//! and what stops them early ([`pruner`]: the median rule, ASHA). All are functions of the trials
//! they are shown and of seeded streams only, so a sweep's trial list and its pruning never depend
//! on timing, threads or a dependency's version. [`run`] runs the trials as ordinary pipeline
//! runs (in parallel where that changes nothing) and keeps the sweep record; [`plots`] draws it.

pub mod plots;
pub mod pruner;
pub mod run;
pub mod sampler;
pub mod schema;
pub mod spec;
pub mod trials;
