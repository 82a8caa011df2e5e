//! `pipe predict` and `pipe generate`: a recorded run's trained model on new texts.
//!
//! The model is the run's train stage output in the store (`stages/train/<key>/model`, verified
//! against its manifest), tokenized with the `tokenizer.json` saved beside it and the run's
//! `tokenizer.max_length`, and predicted in batches of the run's `evaluate.batch_size`: exactly as
//! the evaluate stage did, so the validation CSV gets the evaluate stage's accuracy.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::config::Task;
use crate::data::{
    DataError, Flavor, Format, LabelMap, LmTokenizer, TextEncoder, TextsToPredict, TokenizeError,
};
use crate::evaluate::{ClassificationReport, Sampling, argmax, generate, predict_probabilities, score};
use crate::model::{CausalLm, Classifier, ModelError};
use crate::records::{Record, RecordError};
use crate::stages::MODEL_DIR;
use crate::store::{Lookup, Store, StoreError};

/// Errors from predicting with a run's model.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The run's trained model is not (or no longer intact) in this store.
    #[error(
        "run {run}: its trained model is not in {} ({why}); `pipe reproduce {run}` trains it again",
        store.display()
    )]
    ModelMissing { run: String, store: PathBuf, why: String },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Tokenize(#[from] TokenizeError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{}: {source}", path.display())]
    Write { path: PathBuf, source: csv::Error },
    /// A prompt that cannot be generated from.
    #[error("{0}")]
    BadPrompt(String),
    /// The command does not fit the run's task.
    #[error("run {run} trained a {task}: {hint}")]
    WrongTask { run: String, task: &'static str, hint: &'static str },
}

impl PredictError {
    /// Exit code for the CLI: 2 for a missing run or model, or bad input; 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Record(e) => e.exit_code(),
            Self::Candle(_) | Self::Store(_) | Self::Write { .. } => 1,
            Self::Model(ModelError::Candle(_)) | Self::Tokenize(TokenizeError::Encode { .. }) => 1,
            _ => 2,
        }
    }
}

/// The directory of `record`'s trained model in `store`, verified against its manifest.
fn trained_model_dir(store: &Store, record: &Record) -> Result<PathBuf, PredictError> {
    let missing = |why: String| PredictError::ModelMissing {
        run: record.id.clone(),
        store: store.root().to_path_buf(),
        why,
    };
    let key = record
        .stage("train")
        .and_then(|s| s.get("key"))
        .and_then(toml::Value::as_str)
        .ok_or_else(|| missing("the record names no train stage".into()))?;
    match store.lookup("train", key)? {
        Lookup::Hit(output) => Ok(output.file(MODEL_DIR)),
        Lookup::Miss => Err(missing(format!("no stages/train/{key}"))),
        Lookup::Corrupt(why) => Err(missing(format!("stages/train/{key} {why}"))),
    }
}

/// A run's trained causal LM, ready to continue prompts (`pipe generate`).
pub struct Generator {
    model: CausalLm,
    tokenizer: LmTokenizer,
    /// Whether the run trained on prompts written through the chat template.
    chat_template: bool,
}

/// One generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The prompt's ids, as the model saw them (through the chat template when used).
    pub prompt_ids: Vec<u32>,
    /// The generated ids (ending with the end-of-sequence id when the model stopped by itself).
    pub ids: Vec<u32>,
    /// The generated text, special tokens left out.
    pub text: String,
}

impl Generator {
    /// The trained model of `record`, found in `store`, with the tokenizer saved beside it and
    /// the run's precision.
    pub fn for_run(store: &Store, record: &Record) -> Result<Self, PredictError> {
        let pipeline = record.pipeline()?;
        if pipeline.model.task != Task::CausalLm {
            return Err(PredictError::WrongTask {
                run: record.id.clone(),
                task: pipeline.model.task.name(),
                hint: "`pipe predict RUN --text TEXT` classifies texts",
            });
        }
        let model_dir = trained_model_dir(store, record)?;
        let mut model = CausalLm::from_pretrained(&model_dir, DType::F32, &Device::Cpu)?;
        model.set_precision(pipeline.dtype);
        let tokenizer = LmTokenizer::load(&model_dir.join("tokenizer.json"))?;
        Ok(Self { model, tokenizer, chat_template: pipeline.tokenizer.chat_template })
    }

    /// Whether the run's prompts went through the chat template (the default for `generate`).
    pub fn chat_template(&self) -> bool {
        self.chat_template
    }

    /// Continues `prompt` (written through the chat template when `chat`) by up to
    /// `max_new_tokens` tokens, stopping at the end-of-sequence token or at the model's longest
    /// input.
    pub fn generate(
        &self,
        prompt: &str,
        chat: bool,
        max_new_tokens: usize,
        sampling: Sampling,
    ) -> Result<Generation, PredictError> {
        let bad =
            |message: String| PredictError::BadPrompt(format!("cannot generate from the prompt: {message}"));
        let text = match chat {
            true if self.tokenizer.chat_template().is_none() => {
                return Err(bad("--chat: the run's tokenizer has no chat template".into()));
            }
            true => self.tokenizer.chat_prompt(prompt)?,
            false => prompt.to_string(),
        };
        let prompt_ids = self.tokenizer.encode(&text, !chat).map_err(bad)?;
        let longest = self.model.config().max_position_embeddings;
        if prompt_ids.is_empty() {
            return Err(bad("it has no tokens".into()));
        }
        if prompt_ids.len() >= longest {
            return Err(bad(format!(
                "it is {} tokens, and the model's longest input is {longest}",
                prompt_ids.len()
            )));
        }
        // Generation ends where the model's positions do.
        let max_new_tokens = max_new_tokens.min(longest - prompt_ids.len());
        let ids = generate(&self.model, &prompt_ids, max_new_tokens, &[self.tokenizer.eos()], sampling)?;
        let text = self.tokenizer.decode(&ids).map_err(bad)?;
        Ok(Generation { prompt_ids, ids, text })
    }
}

/// A run's trained model, ready to classify texts.
pub struct Predictor {
    model: Classifier,
    encoder: TextEncoder,
    batch_size: usize,
    text_column: String,
    label_column: String,
}

/// Predictions for a list of texts.
#[derive(Debug, Clone)]
pub struct Predictions {
    /// Class probabilities per text, in input order.
    pub probabilities: Vec<Vec<f32>>,
    /// The most probable class per text.
    pub predicted: Vec<u32>,
    /// The true class per text, when the input had labels.
    pub labels: Option<Vec<u32>>,
    /// The scores against those labels.
    pub report: Option<ClassificationReport>,
}

impl Predictor {
    /// The trained model of `record`, found in `store`, with its run's tokenizer settings and
    /// evaluation batch size.
    pub fn for_run(store: &Store, record: &Record) -> Result<Self, PredictError> {
        let pipeline = record.pipeline()?;
        if pipeline.model.task != Task::SequenceClassification {
            return Err(PredictError::WrongTask {
                run: record.id.clone(),
                task: pipeline.model.task.name(),
                hint: "`pipe generate RUN --prompt TEXT` continues a prompt",
            });
        }
        let model_dir = trained_model_dir(store, record)?;
        let mut model = Classifier::from_pretrained(&model_dir, None, DType::F32, &Device::Cpu, 0)?;
        // As the run's evaluations predicted: with bf16 products for a bf16 run.
        model.set_precision(pipeline.dtype);
        let flavor = Flavor::of_dir(&model_dir)?;
        let max_length = pipeline.tokenizer.max_length;
        let encoder = TextEncoder::from_file(&model_dir.join("tokenizer.json"), max_length, flavor)?;
        Ok(Self {
            model,
            encoder,
            batch_size: pipeline.evaluate.batch_size,
            text_column: pipeline.dataset.text_column,
            label_column: pipeline.dataset.label_column,
        })
    }

    /// The class names, by class index.
    pub fn labels(&self) -> &[String] {
        self.model.labels()
    }

    /// The run's `dataset.text_column`.
    pub fn text_column(&self) -> &str {
        &self.text_column
    }

    /// The run's `dataset.label_column`.
    pub fn label_column(&self) -> &str {
        &self.label_column
    }

    /// Classifies `texts`; with `labels` (class indices), scores them too.
    pub fn predict(&self, texts: &[String], labels: Option<Vec<u32>>) -> Result<Predictions, PredictError> {
        let ids = self.encoder.encode_all(texts)?;
        Ok(match labels {
            Some(labels) => {
                let scored = score(&self.model, &ids, &labels, self.batch_size)?;
                Predictions {
                    probabilities: scored.probabilities,
                    predicted: scored.predicted,
                    labels: Some(labels),
                    report: Some(scored.report),
                }
            }
            None => {
                let probabilities = predict_probabilities(&self.model, &ids, self.batch_size)?;
                let predicted = argmax(&probabilities);
                Predictions { probabilities, predicted, labels: None, report: None }
            }
        })
    }

    /// Classifies the texts of a data file (in `format`, or the one its extension names), scoring
    /// them when it has the label column; returns the texts with their predictions.
    pub fn predict_file(
        &self,
        path: &Path,
        format: Option<Format>,
        text_column: &str,
        label_column: &str,
    ) -> Result<(Vec<String>, Predictions), PredictError> {
        match crate::data::read_to_predict(path, format, text_column, label_column)? {
            TextsToPredict::Labeled(data) => {
                let classes = LabelMap::from_names(self.labels().to_vec())?.encode(&data, path)?;
                let predictions = self.predict(&data.texts, Some(classes))?;
                Ok((data.texts, predictions))
            }
            TextsToPredict::Unlabeled(texts) => {
                let predictions = self.predict(&texts, None)?;
                Ok((texts, predictions))
            }
        }
    }

    /// Writes one CSV row per text: the text, its label when known, the predicted label and each
    /// class's probability (`p_<label>`). `path` names the destination in errors.
    pub fn write_csv(
        &self,
        out: impl Write,
        path: &Path,
        texts: &[String],
        predictions: &Predictions,
    ) -> Result<(), PredictError> {
        let err = |source| PredictError::Write { path: path.into(), source };
        let names = self.labels();
        let mut csv = csv::Writer::from_writer(out);
        let mut header = vec!["text".to_string()];
        if predictions.labels.is_some() {
            header.push("label".into());
        }
        header.push("predicted".into());
        header.extend(names.iter().map(|l| format!("p_{l}")));
        csv.write_record(&header).map_err(err)?;
        for (row, text) in texts.iter().enumerate() {
            let mut record = vec![text.clone()];
            if let Some(labels) = &predictions.labels {
                record.push(names[labels[row] as usize].clone());
            }
            record.push(names[predictions.predicted[row] as usize].clone());
            record.extend(predictions.probabilities[row].iter().map(|p| format!("{p:.6}")));
            csv.write_record(&record).map_err(err)?;
        }
        csv.flush().map_err(|e| err(e.into()))
    }
}
