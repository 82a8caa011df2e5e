//! The training loop: seeded batching, forward/backward, accumulation, clipping, AdamW, class
//! weights; and around it, the evaluations during training, early stopping, checkpoints, the
//! training curves and TensorBoard's event file.
//!
//! Every source of randomness is a function of the seed and a position (the epoch for shuffling,
//! the micro-batch for dropout), so a run is fully determined by its inputs and any optimizer step
//! can be recomputed on its own: that is what makes checkpoints resume to the same bits.

mod batching;
mod checkpoint;
mod config;
mod curves;
mod evaluation;
mod events;

pub use batching::epoch_batches;
pub use checkpoint::{CHECKPOINT_FILE, History};
pub use config::{ClassWeights, EarlyStoppingConfig, TrainConfig};
pub use curves::draw_curves;
pub use evaluation::{EarlyStopping, Evaluation};
pub use events::{EVENTS_FILE, Scalars, event_file, logged_scalars};

use candle_core::{Result, Tensor};

use crate::model::{Mode, Model};
use crate::optim::{AdamW, OptimizerConfig, ScheduleConfig, global_grad_norm};
use crate::{ops, rng};

/// Tokenized training rows.
#[derive(Debug, Clone, Copy)]
pub struct Examples<'a> {
    /// Token ids per row (ragged, special tokens included).
    pub ids: &'a [Vec<u32>],
    /// Per row: the class index (a classifier), or the first position whose token the loss
    /// predicts (a causal LM).
    pub labels: &'a [u32],
}

/// What happened in one optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Epoch (0-based) the step belongs to.
    pub epoch: u64,
    /// Optimizer steps done, this one included.
    pub step: u64,
    /// Optimizer steps in the whole run.
    pub total_steps: u64,
    /// Mean training loss over the step's rows (a classifier) or predicted tokens (a causal LM).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping (computed only when clipping).
    pub grad_norm: Option<f64>,
    /// Rows in the step.
    pub rows: usize,
    /// Non-pad tokens in the step.
    pub real_tokens: usize,
}

impl StepReport {
    /// The step as a line of the train stage's `train_log.jsonl`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "step": self.step, "epoch": self.epoch, "loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm
        })
    }
}

/// A model with its optimizer, schedule and position in the run.
pub struct Trainer {
    model: Model,
    optimizer: AdamW,
    schedule: ScheduleConfig,
    config: TrainConfig,
    seed: u64,
    /// Loss weight per class, when `config.class_weights` asks for weighting.
    class_weights: Option<Vec<f64>>,
    rows: usize,
    lengths: Vec<usize>,
    steps_per_epoch: u64,
    total_steps: u64,
}

impl Trainer {
    /// Prepares to train `model` on `data`.
    pub fn new(
        model: Model,
        optimizer: OptimizerConfig,
        schedule: ScheduleConfig,
        config: TrainConfig,
        seed: u64,
        data: Examples<'_>,
    ) -> Result<Self> {
        if config.batch_size == 0 || config.grad_accum_steps == 0 {
            candle_core::bail!("batch_size and grad_accum_steps must be at least 1");
        }
        if data.ids.is_empty() || data.ids.len() != data.labels.len() {
            candle_core::bail!("no training rows, or rows and labels differ in number");
        }
        let micro_per_epoch = data.ids.len().div_ceil(config.batch_size) as u64;
        let steps_per_epoch = micro_per_epoch.div_ceil(config.grad_accum_steps as u64);
        let total_steps = match config.max_steps {
            Some(steps) => steps,
            None => config.epochs.checked_mul(steps_per_epoch).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "train.epochs = {} at {steps_per_epoch} steps per epoch is more steps than can be counted",
                    config.epochs
                ))
            })?,
        };
        let class_weights = match (&config.class_weights, model.as_classifier()) {
            (Some(weights), Some(classifier)) => Some(
                weights.resolve(data.labels, classifier.labels().len()).map_err(candle_core::Error::Msg)?,
            ),
            (Some(_), None) => candle_core::bail!("class weights apply to a classifier only"),
            (None, _) => None,
        };
        let optimizer = AdamW::new(optimizer, model.params().to_vec())?;
        Ok(Self {
            model,
            optimizer,
            schedule,
            seed,
            class_weights,
            rows: data.ids.len(),
            lengths: data.ids.iter().map(Vec::len).collect(),
            steps_per_epoch,
            total_steps,
            config,
        })
    }

    /// The model being trained.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The optimizer (and its state).
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// Mutable optimizer, to restore a checkpointed state.
    pub fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.optimizer
    }

    /// Ends training, handing back the model.
    pub fn into_model(self) -> Model {
        self.model
    }

    /// Optimizer steps in one epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch
    }

    /// Optimizer steps in the whole run.
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// Optimizer steps done so far.
    pub fn steps_done(&self) -> u64 {
        self.optimizer.steps()
    }

    /// The step training ends after: the last one, or the last of `stop_after_epoch`.
    pub fn last_step(&self) -> u64 {
        match self.config.stop_after_epoch {
            Some(epoch) => self.total_steps.min(epoch.saturating_mul(self.steps_per_epoch)),
            None => self.total_steps,
        }
    }

    /// Whether every step of the run is done (up to `stop_after_epoch` when set).
    pub fn finished(&self) -> bool {
        self.steps_done() >= self.last_step()
    }

    /// Epochs done so far, fractional mid-epoch.
    pub fn epochs_done(&self) -> f64 {
        self.steps_done() as f64 / self.steps_per_epoch as f64
    }

    /// Whether the configuration asks for an evaluation after the step just done: at an epoch's
    /// end (`eval_every_epoch`), every `eval_every_steps` steps, and after the last step whenever
    /// training evaluates at all (so that the last weights are always scored).
    pub fn evaluation_due(&self) -> bool {
        let step = self.steps_done();
        let c = &self.config;
        step > 0
            && ((c.eval_every_epoch && step.is_multiple_of(self.steps_per_epoch))
                || c.eval_every_steps.is_some_and(|n| step.is_multiple_of(n))
                || (c.evaluates() && step == self.last_step()))
    }

    /// Runs the next optimizer step: its micro-batches' forward and backward passes, clipping, and
    /// the update.
    pub fn step(&mut self, data: Examples<'_>) -> Result<StepReport> {
        let step = self.steps_done();
        let epoch = step / self.steps_per_epoch;
        let batches = epoch_batches(self.rows, &self.lengths, &self.config, self.seed, epoch);
        let accum = self.config.grad_accum_steps;
        let first = ((step % self.steps_per_epoch) as usize) * accum;
        let micro = &batches[first..(first + accum).min(batches.len())];
        let params = self.model.params().to_vec();
        let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
        let (mut loss_sum, mut rows, mut real_tokens) = (0f64, 0usize, 0usize);
        let rows_of = |indices: &[usize]| -> (Vec<&[u32]>, Vec<u32>) {
            (
                indices.iter().map(|&r| data.ids[r].as_slice()).collect(),
                indices.iter().map(|&r| data.labels[r]).collect(),
            )
        };
        // A classifier's step loss is the mean of its micro-batches' means (as the reference's
        // accumulation); a causal LM's, the mean over every predicted token of the step, however
        // they fall into micro-batches.
        let step_items: usize = micro
            .iter()
            .map(|indices| {
                let (row_ids, targets) = rows_of(indices);
                self.model.loss_items(&row_ids, &targets)
            })
            .sum();
        for (i, indices) in micro.iter().enumerate() {
            let (row_ids, targets) = rows_of(indices);
            let items = self.model.loss_items(&row_ids, &targets);
            let weight = match &self.model {
                Model::Classifier(_) => 1.0 / micro.len() as f64,
                Model::CausalLm(_) => items as f64 / step_items.max(1) as f64,
            };
            rows += row_ids.len();
            real_tokens += row_ids.iter().map(|r| r.len()).sum::<usize>();
            if items == 0 {
                // Nothing to predict (a causal LM's micro-batch of prompts only; the tokenize
                // stage does not make one): no loss, no gradient, no NaN from an empty mean.
                continue;
            }
            let mut dropout_rng = rng::stream(self.seed, "dropout", step * accum as u64 + i as u64);
            // The gradients by pipe's own reverse pass where the model's ops all record (see
            // `ops::tape`), else by candle's: the same either way.
            let recording = ops::tape::Recording::start();
            let loss = self.model.loss(
                &row_ids,
                &targets,
                self.class_weights.as_deref(),
                Mode::Train(&mut dropout_rng),
            )?;
            loss_sum += loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? * items as f64;
            let store = recording.gradients(&loss, weight)?;
            for (sum, (_, var)) in grads.iter_mut().zip(&params) {
                if let Some(g) = store.get(var.as_tensor()) {
                    *sum = Some(match sum.take() {
                        Some(s) => (s + g)?,
                        None => g.clone(),
                    });
                }
            }
        }
        let loss_items = match &self.model {
            Model::Classifier(_) => rows,
            Model::CausalLm(_) => step_items,
        };
        let (grad_norm, scale) = match self.config.max_grad_norm {
            Some(max) => {
                let norm = global_grad_norm(&grads)?;
                // torch.nn.utils.clip_grad_norm_: coef = max / (norm + 1e-6), clamped to 1.
                (Some(norm), (max / (norm + 1e-6)).min(1.0))
            }
            None => (None, 1.0),
        };
        let lr = self.schedule.lr_at(self.optimizer.config().lr, step, self.total_steps);
        self.optimizer.step(&grads, lr, scale)?;
        Ok(StepReport {
            epoch,
            step: step + 1,
            total_steps: self.total_steps,
            loss: loss_sum / loss_items as f64,
            lr,
            grad_norm,
            rows,
            real_tokens,
        })
    }
}
