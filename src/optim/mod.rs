//! Optimisation: the fused AdamW, learning-rate schedules and gradient clipping.
//!
//! The optimiser works on the raw parameter buffers in place (one pass per parameter that reads the
//! gradient and updates the weight and both moments), instead of building a candle op graph per
//! parameter as `candle_nn::AdamW` does; see `adamw.rs` for why that matters.

mod adamw;
mod schedule;

pub use adamw::{AdamW, AdamWState, OptimizerConfig, OptimizerName, global_grad_norm};
pub use schedule::{ScheduleConfig, ScheduleKind};
