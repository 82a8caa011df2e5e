//! Learning-rate schedules with linear warm-up, as in `transformers.get_scheduler`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The shape of the learning-rate curve after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// The peak learning rate throughout (after warm-up).
    Constant,
    /// Linear decay from the peak to zero at the last step (`get_linear_schedule_with_warmup`).
    Linear,
    /// Half a cosine from the peak to zero (`get_cosine_schedule_with_warmup`).
    Cosine,
}

/// `[schedule]`: how the learning rate moves over the optimizer steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// Shape after warm-up.
    pub kind: ScheduleKind,
    /// Optimizer steps of linear warm-up from 0 to the peak learning rate.
    pub warmup_steps: u64,
    /// Warm-up as a fraction of all optimizer steps; used when `warmup_steps` is 0.
    pub warmup_ratio: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self { kind: ScheduleKind::Linear, warmup_steps: 0, warmup_ratio: 0.0 }
    }
}

impl ScheduleConfig {
    /// Warm-up steps for a run of `total_steps` optimizer steps.
    pub fn warmup_for(&self, total_steps: u64) -> u64 {
        if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            (self.warmup_ratio * total_steps as f64).ceil() as u64
        }
    }

    /// Learning rate for optimizer step `step` (0-based) out of `total_steps`, peaking at `peak`.
    ///
    /// Matches transformers' `LambdaLR` schedules: the multiplier for step `s` is `s / warmup`
    /// during warm-up, then decays (linearly or as a half cosine) to 0 at `total_steps`.
    pub fn lr_at(&self, peak: f64, step: u64, total_steps: u64) -> f64 {
        let warmup = self.warmup_for(total_steps);
        if step < warmup {
            return peak * step as f64 / warmup.max(1) as f64;
        }
        let decay_steps = total_steps.saturating_sub(warmup).max(1) as f64;
        let progress = (step - warmup) as f64 / decay_steps;
        let factor = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((total_steps.saturating_sub(step)) as f64 / decay_steps).max(0.0),
            ScheduleKind::Cosine => {
                (0.5 * (1.0 + crate::ops::math::cos_f64(std::f64::consts::PI * progress))).max(0.0)
            }
        };
        peak * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_with_one_warmup_step_matches_transformers() {
        // get_linear_schedule_with_warmup(opt, 1, 4) with lr 1e-3: [0, 1e-3, 2/3e-3, 1/3e-3]
        let s = ScheduleConfig { kind: ScheduleKind::Linear, warmup_steps: 1, warmup_ratio: 0.0 };
        let lrs: Vec<f64> = (0..4).map(|i| s.lr_at(1e-3, i, 4)).collect();
        let want = [0.0, 1e-3, 2e-3 / 3.0, 1e-3 / 3.0];
        for (a, b) in lrs.iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{lrs:?}");
        }
    }

    #[test]
    fn linear_without_warmup_starts_at_peak_and_ends_above_zero() {
        let s = ScheduleConfig::default();
        assert_eq!(s.lr_at(5e-5, 0, 125), 5e-5);
        assert!(s.lr_at(5e-5, 124, 125) > 0.0);
    }

    #[test]
    fn cosine_is_half_way_at_the_middle() {
        let s = ScheduleConfig { kind: ScheduleKind::Cosine, warmup_steps: 0, warmup_ratio: 0.0 };
        assert!((s.lr_at(1.0, 50, 100) - 0.5).abs() < 1e-12);
    }
}
