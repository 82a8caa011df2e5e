//! Training checkpoints: everything needed to continue a run to the same bits.
//!
//! Because every random draw is a function of the seed and the step (see [`crate::rng`]), the
//! state of a run is only: the parameters, AdamW's step count and moments, and its [`History`]
//! (the per-step log, the evaluations so far and, with early stopping, the best evaluation's
//! parameters). The data position is the step itself. One safetensors file holds it all; it is
//! written to a temporary name and renamed, so a kill during the write leaves the previous
//! checkpoint intact, and the history can never disagree with the parameters.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::{Evaluation, StepReport, Trainer};
use crate::config::Metric;
use crate::optim::AdamWState;

/// The checkpoint's file name inside a stage's checkpoint directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// The checkpoint format written and accepted (its `format` metadata).
const FORMAT: &str = "pipe-checkpoint-2";

/// What a run has produced so far besides its parameters and optimizer state.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Every optimizer step so far.
    pub steps: Vec<StepReport>,
    /// Every evaluation so far.
    pub evaluations: Vec<Evaluation>,
    /// The parameters at the best evaluation so far, in [`crate::model::Classifier::params`]
    /// order (kept with early stopping, to be saved instead of the last ones).
    pub best_params: Option<Vec<Tensor>>,
}

impl Trainer {
    /// Writes the current state and the history so far into `dir`.
    pub fn save_checkpoint(&self, dir: &Path, history: &History) -> candle_core::Result<()> {
        std::fs::create_dir_all(dir)?;
        let state = self.optimizer().state()?;
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (i, (name, var)) in self.model().params().iter().enumerate() {
            tensors.push((format!("param.{name}"), var.as_tensor().to_device(&Device::Cpu)?));
            tensors.push((format!("adam_m.{name}"), Tensor::new(state.m[i].as_slice(), &Device::Cpu)?));
            tensors.push((format!("adam_v.{name}"), Tensor::new(state.v[i].as_slice(), &Device::Cpu)?));
        }
        if let Some(best) = &history.best_params {
            for ((name, _), tensor) in self.model().params().iter().zip(best) {
                tensors.push((format!("best.{name}"), tensor.to_device(&Device::Cpu)?));
            }
        }
        let log = &history.steps;
        let column = |f: &dyn Fn(&StepReport) -> f64| {
            Tensor::new(log.iter().map(f).collect::<Vec<f64>>(), &Device::Cpu)
        };
        tensors.push(("log.loss".into(), column(&|r| r.loss)?));
        tensors.push(("log.lr".into(), column(&|r| r.lr)?));
        tensors.push(("log.grad_norm".into(), column(&|r| r.grad_norm.unwrap_or(f64::NAN))?));
        tensors.push(("log.rows".into(), column(&|r| r.rows as f64)?));
        tensors.push(("log.real_tokens".into(), column(&|r| r.real_tokens as f64)?));
        // Numbers go in as f64 tensors rather than JSON, which need not round-trip every float.
        let evaluations = &history.evaluations;
        if let Some(first) = evaluations.first() {
            let column = |f: &dyn Fn(&Evaluation) -> f64| {
                Tensor::new(evaluations.iter().map(f).collect::<Vec<f64>>(), &Device::Cpu)
            };
            tensors.push(("eval.step".into(), column(&|e| e.step as f64)?));
            tensors.push(("eval.train_loss".into(), column(&|e| e.train_loss)?));
            tensors.push(("eval.validation_loss".into(), column(&|e| e.validation_loss)?));
            // The index keeps the configured order of the metrics, which metrics.jsonl follows.
            for (i, (metric, _)) in first.metrics.iter().enumerate() {
                let values = column(&|e| e.value(*metric).unwrap_or(f64::NAN))?;
                tensors.push((format!("eval.metric.{i}.{}", metric.name()), values));
            }
        }
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("step".to_string(), state.step.to_string()),
        ]);
        let tmp = dir.join(format!("{CHECKPOINT_FILE}.tmp"));
        safetensors::serialize_to_file(tensors, Some(metadata), &tmp)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", tmp.display())))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        crate::fault::point_in("checkpoint.written", "train");
        std::fs::rename(&tmp, dir.join(CHECKPOINT_FILE))?;
        crate::fault::point_in("checkpoint.saved", "train");
        Ok(())
    }

    /// Restores the state saved in `dir`, if there is a checkpoint; returns the history it covers
    /// (empty when there is none).
    pub fn load_checkpoint(&mut self, dir: &Path) -> candle_core::Result<History> {
        let path = dir.join(CHECKPOINT_FILE);
        if !path.is_file() {
            return Ok(History::default());
        }
        let invalid = |why: String| candle_core::Error::Msg(format!("{}: {why}", path.display()));
        // Everything is read and checked before the model or optimizer is touched, so a bad
        // checkpoint leaves the trainer as it was (the caller then starts afresh).
        let bytes = std::fs::read(&path)?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| invalid(e.to_string()))?;
        let format = meta.metadata().as_ref().and_then(|m| m.get("format")).cloned();
        if format.as_deref() != Some(FORMAT) {
            return Err(invalid(format!("format {format:?}, expected {FORMAT:?}")));
        }
        let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        let missing = |name: &str| invalid(format!("no tensor {name}"));
        let mut state = AdamWState::default();
        let (mut params, mut best_params) = (Vec::new(), Vec::new());
        for (name, var) in self.model().params() {
            let mut take = |prefix: &str| {
                let key = format!("{prefix}.{name}");
                tensors.remove(&key).ok_or_else(|| missing(&key))
            };
            let param = take("param")?;
            if param.dims() != var.dims() {
                return Err(invalid(format!(
                    "param.{name} has shape {:?}, the model {:?}",
                    param.dims(),
                    var.dims()
                )));
            }
            params.push(param);
            state.m.push(take("adam_m")?.to_vec1::<f32>()?);
            state.v.push(take("adam_v")?.to_vec1::<f32>()?);
            if let Ok(best) = take("best") {
                // Where the weights live: the run sets them back at its end.
                best_params.push(best.to_device(var.device())?);
            }
        }
        let mut column = |name: &str| -> candle_core::Result<Vec<f64>> {
            tensors.remove(name).ok_or_else(|| missing(name))?.to_vec1::<f64>()
        };
        let losses = column("log.loss")?;
        let lrs = column("log.lr")?;
        let norms = column("log.grad_norm")?;
        let rows = column("log.rows")?;
        let tokens = column("log.real_tokens")?;
        if [&lrs, &norms, &rows, &tokens].iter().any(|c| c.len() != losses.len()) {
            return Err(invalid("log.* columns differ in length".into()));
        }
        let evaluations = self.evaluations_from(&mut tensors, &path)?;
        state.step = losses.len() as u64;
        // A longer run of the same lineage may have left it (see `Store::begin`).
        if state.step > self.last_step() {
            return Err(invalid(format!("{} steps, more than this run's {}", state.step, self.last_step())));
        }
        self.optimizer_mut().set_state(state)?;
        for ((_, var), param) in self.model().params().iter().zip(&params) {
            var.set(&param.to_device(var.device())?)?;
        }
        let steps = (0..losses.len())
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
        let device = self.model().device().clone();
        let best_params = (!best_params.is_empty() && best_params.len() == self.model().params().len())
            .then(|| {
                best_params.iter().map(|t| t.to_device(&device)).collect::<candle_core::Result<Vec<_>>>()
            })
            .transpose()?;
        Ok(History { steps, evaluations, best_params })
    }

    /// The evaluations stored as `eval.*` columns (none in a checkpoint written before the first).
    fn evaluations_from(
        &self,
        tensors: &mut HashMap<String, Tensor>,
        path: &Path,
    ) -> candle_core::Result<Vec<Evaluation>> {
        let Some(steps) = tensors.remove("eval.step") else { return Ok(Vec::new()) };
        let steps = steps.to_vec1::<f64>()?;
        let names: Vec<String> = tensors.keys().filter(|k| k.starts_with("eval.metric.")).cloned().collect();
        let mut column = |name: &str| -> candle_core::Result<Vec<f64>> {
            tensors
                .remove(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("{}: no tensor {name}", path.display())))?
                .to_vec1::<f64>()
        };
        let train_loss = column("eval.train_loss")?;
        let validation_loss = column("eval.validation_loss")?;
        let mut metric_columns: Vec<(usize, Metric, Vec<f64>)> = Vec::new();
        for name in names {
            let parsed = name.strip_prefix("eval.metric.").and_then(|rest| {
                let (index, metric) = rest.split_once('.')?;
                let metric: Metric = serde_json::from_value(serde_json::json!(metric)).ok()?;
                Some((index.parse::<usize>().ok()?, metric))
            });
            let (index, metric) = parsed.ok_or_else(|| {
                candle_core::Error::Msg(format!("{}: unknown tensor {name}", path.display()))
            })?;
            metric_columns.push((index, metric, column(&name)?));
        }
        metric_columns.sort_by_key(|(index, _, _)| *index);
        let lengths = [train_loss.len(), validation_loss.len()];
        if lengths.into_iter().chain(metric_columns.iter().map(|(_, _, v)| v.len())).any(|n| n != steps.len())
        {
            return Err(candle_core::Error::Msg(format!(
                "{}: eval.* columns differ in length",
                path.display()
            )));
        }
        Ok((0..steps.len())
            .map(|i| {
                let step = steps[i] as u64;
                Evaluation {
                    step,
                    epoch: step as f64 / self.steps_per_epoch() as f64,
                    train_loss: train_loss[i],
                    validation_loss: validation_loss[i],
                    metrics: metric_columns.iter().map(|(_, metric, values)| (*metric, values[i])).collect(),
                }
            })
            .collect())
    }
}
