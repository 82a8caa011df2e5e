//! The train stage: fine-tunes the model on the tokenized training split.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device};
use serde_json::json;

use super::tokenize::{LABELS_FILE, TOKENS_FILE};
use super::{Event, Input, Observer, Stage, StageError, Upstream, io_error, upstream_digest};
use crate::config::ModelConfig;
use crate::data;
use crate::model::{BertClassifier, Dropout};
use crate::optim::{OptimizerConfig, ScheduleConfig};
use crate::plan::{KeyFields, StageKind};
use crate::store::WorkDir;
use crate::train::{Examples, TrainConfig, Trainer};

/// Directory (inside the outputs) of the trained model, in Hugging Face layout.
pub const MODEL_DIR: &str = "model";
/// One JSON line per optimizer step: step, epoch, loss, learning rate.
pub const TRAIN_LOG: &str = "train_log.jsonl";

/// Fine-tunes the pretrained model.
pub struct TrainStage {
    pub(crate) seed: u64,
    pub(crate) device: String,
    pub(crate) model: ModelConfig,
    pub(crate) optimizer: OptimizerConfig,
    pub(crate) schedule: ScheduleConfig,
    pub(crate) train: TrainConfig,
    pub(crate) model_dir: PathBuf,
    pub(crate) model_config: Input,
    pub(crate) model_weights: Input,
    pub(crate) tokenizer: Input,
}

impl TrainStage {
    fn dropout_for(&self, model: &BertClassifier) -> Dropout {
        let base = model.dropout();
        Dropout {
            hidden: self.model.dropout.unwrap_or(base.hidden),
            attention: self.model.attention_dropout.unwrap_or(base.attention),
            classifier: self.model.classifier_dropout.or(self.model.dropout).unwrap_or(base.classifier),
        }
    }
}

impl Stage for TrainStage {
    fn kind(&self) -> StageKind {
        StageKind::Train
    }

    fn key_fields(&self, upstream: &Upstream) -> KeyFields {
        let params = json!({
            "seed": self.seed,
            "device": self.device,
            "model": {
                "task": self.model.task,
                "dropout": self.model.dropout,
                "attention_dropout": self.model.attention_dropout,
                "classifier_dropout": self.model.classifier_dropout,
            },
            "optimizer": self.optimizer,
            "schedule": self.schedule,
            "train": self.train,
        });
        let inputs = BTreeMap::from([
            ("tokenize".to_string(), upstream_digest(upstream, StageKind::Tokenize)),
            ("model.config".to_string(), self.model_config.sha256.clone()),
            ("model.weights".to_string(), self.model_weights.sha256.clone()),
            ("tokenizer".to_string(), self.tokenizer.sha256.clone()),
        ]);
        KeyFields { kind: StageKind::Train, version: StageKind::Train.version(), params, inputs }
    }

    fn preflight(&mut self) -> Result<(), StageError> {
        crate::model::BertConfig::from_file(&self.model_config.path)?;
        Ok(())
    }

    fn run(
        &mut self,
        work: &WorkDir,
        upstream: &Upstream,
        observe: Observer<'_>,
    ) -> Result<serde_json::Value, StageError> {
        let tokenized = &upstream[&StageKind::Tokenize];
        let splits = data::load_tokens(&tokenized.file(TOKENS_FILE))?;
        let train = splits
            .get("train")
            .ok_or_else(|| StageError::Invalid("tokenize output has no train split".into()))?;
        let labels = read_labels(&tokenized.file(LABELS_FILE))?;
        let mut model = BertClassifier::from_pretrained(
            &self.model_dir,
            Some(labels),
            DType::F32,
            &Device::Cpu,
            self.seed,
        )?;
        model.set_dropout(self.dropout_for(&model));
        let data = Examples { ids: &train.ids, labels: &train.labels };
        let mut trainer = Trainer::new(
            model,
            self.optimizer.clone(),
            self.schedule.clone(),
            self.train.clone(),
            self.seed,
            data,
        )?;
        let checkpoints = work.checkpoint_dir();
        let mut log = trainer.load_checkpoint(&checkpoints)?;
        if !log.is_empty() {
            observe(Event::Resumed {
                kind: StageKind::Train,
                step: trainer.steps_done(),
                total: trainer.total_steps(),
            });
        }
        let start = std::time::Instant::now();
        let mut last_checkpoint = std::time::Instant::now();
        let (mut rows, mut tokens) = (0usize, 0usize);
        while !trainer.finished() {
            let report = trainer.step(data)?;
            rows += report.rows;
            tokens += report.real_tokens;
            observe(Event::Step(&report));
            let epoch_done = report.step % trainer.steps_per_epoch() == 0;
            log.push(report);
            if crate::interrupt::requested() {
                trainer.save_checkpoint(&checkpoints, &log)?;
                return Err(StageError::Interrupted { step: trainer.steps_done() });
            }
            if !trainer.finished() && (epoch_done || last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL) {
                trainer.save_checkpoint(&checkpoints, &log)?;
                last_checkpoint = std::time::Instant::now();
            }
        }
        write_log(&work.out().join(TRAIN_LOG), &log)?;
        let seconds = start.elapsed().as_secs_f64();
        let model = trainer.into_model();
        let model_dir = work.out().join(MODEL_DIR);
        model.save_pretrained(&model_dir)?;
        let tokenizer_copy = model_dir.join("tokenizer.json");
        std::fs::copy(&self.tokenizer.path, &tokenizer_copy).map_err(io_error(&tokenizer_copy))?;
        Ok(json!({
            "seconds": seconds,
            "samples_per_second": rows as f64 / seconds.max(1e-9),
            "tokens_per_second": tokens as f64 / seconds.max(1e-9),
            "final_loss": log.last().map_or(f64::NAN, |r| r.loss),
            "parameters": model.num_parameters(),
        }))
    }
}

/// Checkpoints are written at the end of every epoch and at least this often.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);

/// One JSON line per optimizer step.
fn write_log(path: &std::path::Path, log: &[crate::train::StepReport]) -> Result<(), StageError> {
    let mut text = String::new();
    for r in log {
        let line =
            json!({ "step": r.step, "epoch": r.epoch, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).map_err(io_error(path))
}

/// The class names written by the tokenize stage.
pub(crate) fn read_labels(path: &std::path::Path) -> Result<Vec<String>, StageError> {
    let text = std::fs::read_to_string(path).map_err(io_error(path))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| StageError::Invalid(format!("{}: {e}", path.display())))?;
    value["labels"]
        .as_array()
        .and_then(|a| a.iter().map(|l| l.as_str().map(str::to_string)).collect::<Option<Vec<_>>>())
        .ok_or_else(|| StageError::Invalid(format!("{}: no label list", path.display())))
}
