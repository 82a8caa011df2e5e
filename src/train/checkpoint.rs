//! Training checkpoints: everything needed to continue a run to the same bits.
//!
//! Because every random draw is a function of the seed and the step (see [`crate::rng`]), the
//! state of a run is only: the parameters, AdamW's step count and moments, and the per-step log.
//! The data position is the step itself. One safetensors file holds it all; it is written to a
//! temporary name and renamed, so a kill during the write leaves the previous checkpoint intact.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::{StepReport, Trainer};
use crate::optim::AdamWState;

/// The checkpoint's file name inside a stage's checkpoint directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

impl Trainer {
    /// Writes the current state and the log of the steps so far into `dir`.
    pub fn save_checkpoint(&self, dir: &Path, log: &[StepReport]) -> candle_core::Result<()> {
        std::fs::create_dir_all(dir)?;
        let state = self.optimizer().state();
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (i, (name, var)) in self.model().params().iter().enumerate() {
            tensors.push((format!("param.{name}"), var.as_tensor().to_device(&Device::Cpu)?));
            tensors.push((format!("adam_m.{name}"), Tensor::new(state.m[i].as_slice(), &Device::Cpu)?));
            tensors.push((format!("adam_v.{name}"), Tensor::new(state.v[i].as_slice(), &Device::Cpu)?));
        }
        let column = |f: &dyn Fn(&StepReport) -> f64| {
            Tensor::new(log.iter().map(f).collect::<Vec<f64>>(), &Device::Cpu)
        };
        tensors.push(("log.loss".into(), column(&|r| r.loss)?));
        tensors.push(("log.lr".into(), column(&|r| r.lr)?));
        tensors.push(("log.grad_norm".into(), column(&|r| r.grad_norm.unwrap_or(f64::NAN))?));
        tensors.push(("log.rows".into(), column(&|r| r.rows as f64)?));
        tensors.push(("log.real_tokens".into(), column(&|r| r.real_tokens as f64)?));
        let metadata = HashMap::from([
            ("format".to_string(), "pipe-checkpoint-1".to_string()),
            ("step".to_string(), state.step.to_string()),
        ]);
        let tmp = dir.join(format!("{CHECKPOINT_FILE}.tmp"));
        safetensors::serialize_to_file(tensors, Some(metadata), &tmp)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", tmp.display())))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, dir.join(CHECKPOINT_FILE))?;
        Ok(())
    }

    /// Restores the state saved in `dir`, if there is a checkpoint; returns the log of the steps
    /// it covers (empty when there is none).
    pub fn load_checkpoint(&mut self, dir: &Path) -> candle_core::Result<Vec<StepReport>> {
        let path = dir.join(CHECKPOINT_FILE);
        if !path.is_file() {
            return Ok(Vec::new());
        }
        let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
        let mut take = |name: &str| {
            tensors
                .remove(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("{}: no tensor {name}", path.display())))
        };
        let mut state = AdamWState::default();
        for (name, var) in self.model().params() {
            var.set(&take(&format!("param.{name}"))?.to_device(var.device())?)?;
            state.m.push(take(&format!("adam_m.{name}"))?.to_vec1::<f32>()?);
            state.v.push(take(&format!("adam_v.{name}"))?.to_vec1::<f32>()?);
        }
        let losses = take("log.loss")?.to_vec1::<f64>()?;
        let lrs = take("log.lr")?.to_vec1::<f64>()?;
        let norms = take("log.grad_norm")?.to_vec1::<f64>()?;
        let rows = take("log.rows")?.to_vec1::<f64>()?;
        let tokens = take("log.real_tokens")?.to_vec1::<f64>()?;
        state.step = losses.len() as u64;
        self.optimizer_mut().set_state(state)?;
        let log = (0..losses.len())
            .map(|i| StepReport {
                epoch: i as u64 / self.steps_per_epoch(),
                step: i as u64 + 1,
                total_steps: self.total_steps(),
                loss: losses[i],
                lr: lrs[i],
                grad_norm: Some(norms[i]).filter(|n| !n.is_nan()),
                rows: rows[i] as usize,
                real_tokens: tokens[i] as usize,
            })
            .collect();
        Ok(log)
    }
}
