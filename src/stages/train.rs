//! The train stage: fine-tunes the model on the tokenized training split, evaluating it on the
//! validation split as configured and stopping early when asked.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use serde_json::json;

use super::tokenize::{LABELS_FILE, TOKENS_FILE};
use super::{Event, Input, Observer, Stage, StageError, Upstream, io_error, upstream_digest};
use crate::config::{EvaluateConfig, Metric, ModelConfig, Task};
use crate::data::{self, Flavor, LmTokenizer, TextEncoder, TokenizedSplit};
use crate::device::{Precision, Target};
use crate::model::{CausalLm, Classifier, DecoderConfig, Dropout, Model};
use crate::optim::{OptimizerConfig, ScheduleConfig};
use crate::plan::{KeyFields, StageKind};
use crate::store::WorkDir;
use crate::train::{
    EVENTS_FILE, EarlyStopping, Evaluation, Examples, History, StepReport, TrainConfig, Trainer, draw_curves,
    event_file, logged_scalars,
};

/// Directory (inside the outputs) of the trained model, in Hugging Face layout.
pub const MODEL_DIR: &str = "model";
/// One JSON line per optimizer step: step, epoch, loss, learning rate.
pub const TRAIN_LOG: &str = "train_log.jsonl";
/// One JSON line per evaluation during training: epoch, step, train_loss, validation_loss, each
/// configured metric, and with early stopping whether it is the best (whose weights are saved).
pub const METRICS_LOG: &str = "metrics.jsonl";
/// The evaluations drawn as a bitmap.
pub const CURVES_PNG: &str = "curves.png";
/// The evaluations drawn as a vector graphic.
pub const CURVES_SVG: &str = "curves.svg";
/// The class probabilities of the validation rows under the saved model, `(rows, classes)` f32,
/// written when the last evaluation during training scored exactly that model as the evaluate
/// stage would (on the CPU): the evaluate stage then reads them instead of predicting the same
/// rows again.
pub const VALIDATION_PROBABILITIES: &str = "validation_probabilities.safetensors";
/// A causal LM's validation loss under the saved model (`{"loss", "predicted_tokens"}`), written
/// under the same conditions as [`VALIDATION_PROBABILITIES`], for the same reason.
pub const VALIDATION_LOSS: &str = "validation_loss.json";

/// What an evaluation during training computed that the evaluate stage would compute again for
/// the same weights.
enum Scores {
    /// A classifier's class probabilities per row, in row order.
    Probabilities(Vec<Vec<f32>>),
    /// A causal LM's mean validation loss and the tokens it averages over.
    LmLoss { loss: f64, predicted_tokens: usize },
}

/// Fine-tunes the pretrained model.
pub struct TrainStage {
    pub(crate) seed: u64,
    /// Where to train (the pipeline's `device`, opened).
    pub(crate) target: Target,
    pub(crate) precision: Precision,
    pub(crate) model: ModelConfig,
    pub(crate) optimizer: OptimizerConfig,
    pub(crate) schedule: ScheduleConfig,
    pub(crate) train: TrainConfig,
    /// How evaluations during training predict and what they report: the evaluate stage's
    /// settings, so that both score the same weights alike.
    pub(crate) evaluate: EvaluateConfig,
    /// The model's directory, or its GGUF file (a causal LM).
    pub(crate) model_dir: PathBuf,
    pub(crate) model_config: Input,
    pub(crate) model_weights: Input,
    /// `tokenizer.json`, or the GGUF file whose tokenizer a causal LM uses.
    pub(crate) tokenizer: Input,
    /// A causal LM's files beside `tokenizer.json` (`tokenizer_config.json`, `chat_template.jinja`:
    /// the saved model's tokenizer config comes from them), by input name.
    pub(crate) tokenizer_files: BTreeMap<String, String>,
    /// `tokenizer.max_length`: checked against the model's positions before anything runs (not
    /// part of the key: the tokenize output it shapes already is).
    pub(crate) max_length: usize,
}

impl TrainStage {
    fn dropout_for(&self, model: &Classifier) -> Dropout {
        let base = model.dropout();
        Dropout {
            hidden: self.model.dropout.unwrap_or(base.hidden),
            attention: self.model.attention_dropout.unwrap_or(base.attention),
            classifier: self.model.classifier_dropout.or(self.model.dropout).unwrap_or(base.classifier),
        }
    }

    /// Scores the model as it is after the last step of `history` on `validation`: the evaluation
    /// and the scores it came from.
    fn evaluate(
        &self,
        trainer: &Trainer,
        validation: &TokenizedSplit,
        history: &History,
    ) -> Result<(Evaluation, Scores), StageError> {
        let since = history.evaluations.last().map_or(0, |e| e.step as usize);
        let losses = &history.steps[since.min(history.steps.len())..];
        let train_loss = losses.iter().map(|r| r.loss).sum::<f64>() / losses.len().max(1) as f64;
        let (step, epoch) = (trainer.steps_done(), trainer.epochs_done());
        let batch_size = self.evaluate.batch_size;
        Ok(match trainer.model() {
            Model::Classifier(model) => {
                let scored = crate::evaluate::score(model, &validation.ids, &validation.labels, batch_size)?;
                let evaluation =
                    Evaluation::new(step, epoch, train_loss, &scored.report, &self.evaluate.metrics);
                (evaluation, Scores::Probabilities(scored.probabilities))
            }
            Model::CausalLm(model) => {
                let (loss, predicted_tokens) =
                    crate::evaluate::lm_loss(model, &validation.ids, &validation.labels, batch_size)?;
                let metrics = match self.evaluate.metrics.contains(&Metric::Perplexity) {
                    true => vec![(Metric::Perplexity, libm::exp(loss))],
                    false => Vec::new(),
                };
                let evaluation = Evaluation { step, epoch, train_loss, validation_loss: loss, metrics };
                (evaluation, Scores::LmLoss { loss, predicted_tokens })
            }
        })
    }

    /// The pretrained model, with the stage's dropout and precision (`labels`: a classifier's
    /// classes).
    fn load_model(&self, labels: Option<Vec<String>>) -> Result<Model, StageError> {
        let device = &self.target.device;
        let mut model = match self.model.task {
            Task::SequenceClassification => {
                let mut model =
                    Classifier::from_pretrained(&self.model_dir, labels, DType::F32, device, self.seed)?;
                model.set_dropout(self.dropout_for(&model));
                Model::Classifier(model)
            }
            Task::CausalLm => {
                let mut model = CausalLm::from_source(&self.model_dir, DType::F32, device)?;
                if let Some(p) = self.model.attention_dropout {
                    model.set_attention_dropout(p);
                }
                Model::CausalLm(model)
            }
        };
        model.set_precision(self.precision);
        Ok(model)
    }

    /// A causal LM's checks before anything runs: its config, the tokenizer's vocabulary and the
    /// sequence length against the model's.
    fn preflight_causal_lm(&self) -> Result<(), StageError> {
        let config = match is_gguf(&self.model_dir) {
            true => {
                let gguf = crate::model::GgufFile::open(&self.model_dir)?;
                DecoderConfig::from_json(crate::model::gguf_config(&gguf, &self.model_dir)?, &self.model_dir)?
            }
            false => {
                crate::model::check_safetensors(&self.model_weights.path)?;
                DecoderConfig::from_file(&self.model_config.path)?
            }
        };
        let tokens = LmTokenizer::load(&self.tokenizer.path)?.vocab_size();
        self.check_fit(
            tokens,
            config.vocab_size,
            config.max_position_embeddings,
            config.max_position_embeddings,
        )?;
        Ok(())
    }

    /// Checks that the tokenizer's `tokens` ids fit the model's `vocab_size` embeddings and that
    /// `tokenizer.max_length` fits its `longest` input (of `positions` position embeddings).
    fn check_fit(
        &self,
        tokens: usize,
        vocab_size: usize,
        longest: usize,
        positions: usize,
    ) -> Result<(), StageError> {
        let model = self.model_config.path.display();
        if tokens > vocab_size {
            return Err(StageError::Invalid(format!(
                "{}: the tokenizer has {tokens} tokens, more than the model's embeddings hold (vocab_size = {vocab_size} in {model})",
                self.tokenizer.path.display(),
            )));
        }
        if self.max_length > longest {
            return Err(StageError::Invalid(format!(
                "tokenizer.max_length = {} exceeds the model's longest input, {longest} tokens (max_position_embeddings = {positions}, {model})",
                self.max_length,
            )));
        }
        Ok(())
    }

    /// Writes the tokenizer beside the saved model: a classifier's `tokenizer.json` copied as it
    /// is; a causal LM's as transformers loads it (`tokenizer.json` rebuilt from a GGUF file, and
    /// `tokenizer_config.json` with its special tokens and chat template).
    fn save_tokenizer(&self, model_dir: &Path) -> Result<(), StageError> {
        let tokenizer_copy = model_dir.join("tokenizer.json");
        match self.model.task {
            Task::SequenceClassification => {
                std::fs::copy(&self.tokenizer.path, &tokenizer_copy).map_err(io_error(&tokenizer_copy))?;
            }
            Task::CausalLm => {
                let tokenizer = LmTokenizer::load(&self.tokenizer.path)?;
                tokenizer
                    .tokenizer()
                    .save(&tokenizer_copy, true)
                    .map_err(|e| StageError::Invalid(format!("{}: {e}", tokenizer_copy.display())))?;
                let config_path = model_dir.join("tokenizer_config.json");
                let json = serde_json::to_string_pretty(&tokenizer.tokenizer_config()).expect("JSON") + "\n";
                std::fs::write(&config_path, json).map_err(io_error(&config_path))?;
            }
        }
        // The key names the tokenizer's bytes as they were hashed before training; an edit since
        // then must not be stored under that key.
        let now = match self.model.task {
            Task::SequenceClassification => &tokenizer_copy,
            Task::CausalLm => &self.tokenizer.path,
        };
        let digest = crate::digest::file(now).map_err(io_error(now))?;
        if digest != self.tokenizer.sha256 {
            return Err(StageError::Invalid(format!(
                "{} changed while the stage ran (sha256 {} when it started, {} now); run again",
                self.tokenizer.path.display(),
                crate::store::short(&self.tokenizer.sha256),
                crate::store::short(&digest)
            )));
        }
        Ok(())
    }

    /// Whether evaluations during training compute what the evaluate stage computes for the same
    /// weights, to the bit: that stage predicts on the CPU in the pipeline's dtype, which is this
    /// stage's `precision`.
    fn evaluates_as_the_evaluate_stage(&self) -> bool {
        self.target.device.is_cpu()
    }

    /// Writes `metrics.jsonl` (marking early stopping's best evaluation, when it watches) and
    /// draws the losses and the first configured metric other than the loss; returns the lines.
    fn write_evaluations(
        &self,
        out: &Path,
        evaluations: &[Evaluation],
        stopping: Option<&EarlyStopping>,
    ) -> Result<Vec<serde_json::Value>, StageError> {
        let best = stopping.and_then(EarlyStopping::best).map(|(index, _)| index);
        let lines: Vec<_> = evaluations
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let mut line = e.to_json();
                if stopping.is_some() {
                    line["best"] = json!(best == Some(i));
                }
                line
            })
            .collect();
        write_lines(&out.join(METRICS_LOG), &lines)?;
        let metric = self.evaluate.metrics.iter().copied().find(|&m| m != Metric::Loss);
        draw_curves(evaluations, metric, best, &out.join(CURVES_PNG), &out.join(CURVES_SVG))?;
        Ok(lines)
    }

    /// The key fields of this stage trained as `train` says.
    fn fields(&self, upstream: &Upstream, train: &TrainConfig) -> KeyFields {
        let mut params = json!({
            "seed": self.seed,
            "device": if self.target.device.is_cpu() { "cpu" } else { "cuda" },
            "model": {
                "task": self.model.task,
                "dropout": self.model.dropout,
                "attention_dropout": self.model.attention_dropout,
                "classifier_dropout": self.model.classifier_dropout,
            },
            "optimizer": self.optimizer,
            "schedule": self.schedule,
            "train": train,
        });
        // A GPU's bits are its own: the key names what they depend on (the GPU, driver, cuBLAS
        // and kernels; see `crate::device`), and bf16 when used. CPU keys carry neither, and stay
        // what they were before GPUs existed.
        if let Some(gpu) = &self.target.gpu {
            params["gpu"] = json!(gpu);
        }
        if self.precision != Precision::F32 {
            params["dtype"] = json!(self.precision.name());
        }
        if train.evaluates() {
            // Evaluations during training batch and report as the evaluate stage does.
            params["evaluate"] =
                json!({ "batch_size": self.evaluate.batch_size, "metrics": self.evaluate.metrics });
        }
        let mut inputs = BTreeMap::from([
            ("tokenize".to_string(), upstream_digest(upstream, StageKind::Tokenize)),
            ("model.config".to_string(), self.model_config.sha256.clone()),
            ("model.weights".to_string(), self.model_weights.sha256.clone()),
            ("tokenizer".to_string(), self.tokenizer.sha256.clone()),
        ]);
        inputs.extend(self.tokenizer_files.clone());
        KeyFields { kind: StageKind::Train, version: StageKind::Train.version(), params, inputs }
    }
}

impl Stage for TrainStage {
    fn kind(&self) -> StageKind {
        StageKind::Train
    }

    fn key_fields(&self, upstream: &Upstream) -> KeyFields {
        self.fields(upstream, &self.train)
    }

    /// Training that stops after an epoch is the first part of training to the end: they share
    /// checkpoints, so the longer run resumes where the shorter stopped (a sweep's rungs).
    fn lineage(&self, upstream: &Upstream) -> String {
        let to_the_end = TrainConfig { stop_after_epoch: None, ..self.train.clone() };
        self.fields(upstream, &to_the_end).key()
    }

    fn preflight(&mut self) -> Result<(), StageError> {
        if self.model.task == Task::CausalLm {
            return self.preflight_causal_lm();
        }
        let config = crate::model::EncoderConfig::from_file(&self.model_config.path)?;
        crate::model::check_safetensors(&self.model_weights.path)?;
        let tokens =
            TextEncoder::from_file(&self.tokenizer.path, self.max_length, Flavor::AsFile)?.vocab_size();
        self.check_fit(tokens, config.vocab_size, config.max_length(), config.max_position_embeddings)?;
        Ok(())
    }

    fn run(
        &mut self,
        work: &WorkDir,
        upstream: &Upstream,
        observe: Observer<'_>,
    ) -> Result<serde_json::Value, StageError> {
        let tokenized = &upstream[&StageKind::Tokenize];
        let mut splits = data::load_tokens(&tokenized.file(TOKENS_FILE))?;
        let train = splits
            .remove("train")
            .ok_or_else(|| StageError::Invalid("tokenize output has no train split".into()))?;
        let validation = splits
            .remove("validation")
            .ok_or_else(|| StageError::Invalid("tokenize output has no validation split".into()))?;
        let model = match self.model.task {
            Task::SequenceClassification => {
                let labels = read_labels(&tokenized.file(LABELS_FILE))?;
                if let Some(weights) = &self.train.class_weights {
                    weights.resolve(&train.labels, labels.len()).map_err(|message| {
                        StageError::Invalid(format!("{message} ({})", labels.join(", ")))
                    })?;
                }
                self.load_model(Some(labels))?
            }
            Task::CausalLm => self.load_model(None)?,
        };
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
        let mut history = match trainer.load_checkpoint(&checkpoints) {
            Ok(history) => history,
            Err(e) => {
                // A damaged checkpoint (a disk error, a truncated copy) costs the progress it held,
                // never the run: it was read in full before anything was restored, so training
                // starts afresh from the pretrained weights.
                observe(Event::Warning(format!("ignoring the checkpoint, starting the stage afresh: {e}")));
                let bad = checkpoints.join(crate::train::CHECKPOINT_FILE);
                std::fs::remove_file(&bad).map_err(io_error(&bad))?;
                History::default()
            }
        };
        if !history.steps.is_empty() {
            observe(Event::Resumed {
                kind: StageKind::Train,
                step: trainer.steps_done(),
                total: trainer.total_steps(),
            });
        }
        // Replaying the restored evaluations gives early stopping the state it had.
        let mut stopping = self.train.early_stopping.clone().map(EarlyStopping::new);
        if let Some(stopping) = &mut stopping {
            for evaluation in &history.evaluations {
                stopping.observe(evaluation);
            }
        }
        let stop_early =
            |stopping: &Option<EarlyStopping>| stopping.as_ref().is_some_and(|s| s.should_stop());

        let start = Instant::now();
        let mut evaluating = Duration::ZERO;
        let mut last_checkpoint = Instant::now();
        let (mut rows, mut tokens) = (0usize, 0usize);
        // The latest evaluation's index and scores while the weights are still the ones it scored
        // (cleared by the next step).
        let mut latest: Option<(usize, Scores)> = None;
        while !trainer.finished() && !stop_early(&stopping) {
            let report = trainer.step(data)?;
            latest = None;
            rows += report.rows;
            tokens += report.real_tokens;
            observe(Event::Step(&report));
            let epoch_done = report.step % trainer.steps_per_epoch() == 0;
            history.steps.push(report);
            if trainer.evaluation_due() {
                let evaluation_start = Instant::now();
                let (evaluation, scores) = self.evaluate(&trainer, &validation, &history)?;
                latest = Some((history.evaluations.len(), scores));
                evaluating += evaluation_start.elapsed();
                observe(Event::Evaluated(&evaluation));
                if let Some(stopping) = &mut stopping
                    && stopping.observe(&evaluation)
                {
                    history.best_params = Some(copy_params(trainer.model())?);
                }
                history.evaluations.push(evaluation);
            }
            if crate::interrupt::requested() {
                trainer.save_checkpoint(&checkpoints, &history)?;
                return Err(StageError::Interrupted { step: trainer.steps_done() });
            }
            let done = trainer.finished() || stop_early(&stopping);
            if !done && (epoch_done || last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL) {
                trainer.save_checkpoint(&checkpoints, &history)?;
                last_checkpoint = Instant::now();
            }
        }
        // Stopped by `stop_after_epoch` before the end: the checkpoint is where the run trained
        // to the end resumes (the store keeps it; see `Store::begin`).
        if trainer.steps_done() < trainer.total_steps() && !stop_early(&stopping) {
            trainer.save_checkpoint(&checkpoints, &history)?;
        }
        let seconds = start.elapsed().as_secs_f64();
        let training_seconds = start.elapsed().saturating_sub(evaluating).as_secs_f64();
        let stopped_early = !trainer.finished();
        let steps_done = trainer.steps_done();
        let best = stopping.as_ref().and_then(EarlyStopping::best);

        let out = work.out();
        let steps: Vec<_> = history.steps.iter().map(StepReport::to_json).collect();
        write_lines(&out.join(TRAIN_LOG), &steps)?;
        let evaluations = match self.train.evaluates() {
            true => self.write_evaluations(out, &history.evaluations, stopping.as_ref())?,
            false => Vec::new(),
        };
        let events = out.join(EVENTS_FILE);
        std::fs::write(&events, event_file(&logged_scalars(&steps, &evaluations)))
            .map_err(io_error(&events))?;

        let model = trainer.into_model();
        if let Some(best_params) = &history.best_params {
            for ((_, var), tensor) in model.params().iter().zip(best_params) {
                var.set(tensor)?;
            }
        }
        let model_dir = out.join(MODEL_DIR);
        model.save_pretrained(&model_dir)?;
        // Which evaluation scored the saved weights: early stopping's best when it kept those,
        // else the last (`latest` is set only while no step came after it).
        let saved = match (&history.best_params, best) {
            (Some(_), Some((index, _))) => Some(index),
            (Some(_), None) => None,
            (None, _) => history.evaluations.len().checked_sub(1),
        };
        if let Some((index, scores)) = latest
            && Some(index) == saved
            && self.evaluates_as_the_evaluate_stage()
        {
            match (scores, &model) {
                (Scores::Probabilities(probabilities), Model::Classifier(classifier)) => write_probabilities(
                    &out.join(VALIDATION_PROBABILITIES),
                    probabilities,
                    classifier.labels().len(),
                )?,
                (Scores::LmLoss { loss, predicted_tokens }, _) => {
                    let path = out.join(VALIDATION_LOSS);
                    let json =
                        json!({ "loss": loss, "predicted_tokens": predicted_tokens }).to_string() + "\n";
                    std::fs::write(&path, json).map_err(io_error(&path))?;
                }
                (Scores::Probabilities(_), Model::CausalLm(_)) => {
                    unreachable!("a causal LM has no class probabilities")
                }
            }
        }
        self.save_tokenizer(&model_dir)?;
        let mut facts = json!({
            "seconds": seconds,
            "evaluation_seconds": evaluating.as_secs_f64(),
            "samples_per_second": rows as f64 / training_seconds.max(1e-9),
            "tokens_per_second": tokens as f64 / training_seconds.max(1e-9),
            "parameters": model.num_parameters(),
            "evaluations": history.evaluations.len(),
        });
        // Run records are TOML, which has no null for a NaN: a diverged loss is left out.
        if let Some(loss) = history.steps.last().map(|r| r.loss).filter(|l| l.is_finite()) {
            facts["final_loss"] = json!(loss);
        }
        if let (Some(stopping), Some((index, value))) = (&stopping, best) {
            let best = &history.evaluations[index];
            let mut early = json!({
                "metric": stopping.metric().name(),
                "best_epoch": best.epoch,
                "best_step": best.step,
                "stopped_early": stopped_early,
                "steps_done": steps_done,
            });
            if value.is_finite() {
                early["best_value"] = json!(value);
            }
            facts["early_stopping"] = early;
        }
        Ok(facts)
    }
}

/// A copy of every parameter that later optimizer steps (which update in place) leave alone.
fn copy_params(model: &Model) -> Result<Vec<Tensor>, StageError> {
    Ok(model.params().iter().map(|(_, var)| var.as_tensor().copy()).collect::<candle_core::Result<_>>()?)
}

/// Writes [`VALIDATION_PROBABILITIES`].
fn write_probabilities(path: &Path, probabilities: Vec<Vec<f32>>, classes: usize) -> Result<(), StageError> {
    let rows = probabilities.len();
    let flat: Vec<f32> = probabilities.into_iter().flatten().collect();
    let tensor = Tensor::from_vec(flat, (rows, classes), &candle_core::Device::Cpu)?;
    candle_core::safetensors::save(&std::collections::HashMap::from([("probabilities", tensor)]), path)?;
    Ok(())
}

/// Reads [`VALIDATION_PROBABILITIES`]: one row of `classes` probabilities for each of `rows` rows.
pub(crate) fn read_probabilities(
    path: &Path,
    rows: usize,
    classes: usize,
) -> Result<Vec<Vec<f32>>, StageError> {
    let invalid = |what: String| StageError::Invalid(format!("{}: {what}", path.display()));
    let tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .map_err(|e| invalid(format!("not a readable safetensors file ({e})")))?;
    let tensor = tensors.get("probabilities").ok_or_else(|| invalid("no `probabilities` tensor".into()))?;
    if tensor.dims() != [rows, classes] || tensor.dtype() != DType::F32 {
        return Err(invalid(format!(
            "expected f32 probabilities of shape [{rows}, {classes}] (the validation rows and classes), found {:?} {:?}",
            tensor.dtype(),
            tensor.dims()
        )));
    }
    Ok(tensor.to_vec2::<f32>()?)
}

/// Whether a model source is a GGUF file (else a Hugging Face directory).
pub fn is_gguf(source: &Path) -> bool {
    source.extension().is_some_and(|e| e == "gguf") && source.is_file()
}

/// Checkpoints are written at the end of every epoch and at least this often.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(600);

/// One JSON object per line.
fn write_lines(path: &Path, lines: &[serde_json::Value]) -> Result<(), StageError> {
    let mut text = String::new();
    for line in lines {
        text.push_str(&line.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).map_err(io_error(path))
}

/// The class names written by the tokenize stage.
pub(crate) fn read_labels(path: &Path) -> Result<Vec<String>, StageError> {
    let text = std::fs::read_to_string(path).map_err(io_error(path))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| StageError::Invalid(format!("{}: {e}", path.display())))?;
    value["labels"]
        .as_array()
        .and_then(|a| a.iter().map(|l| l.as_str().map(str::to_string)).collect::<Option<Vec<_>>>())
        .ok_or_else(|| StageError::Invalid(format!("{}: no label list", path.display())))
}
