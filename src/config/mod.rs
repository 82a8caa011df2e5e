//! The pipeline configuration: TOML files, layered, checked, and turned into a typed [`Pipeline`].
//!
//! # Layers
//!
//! From lowest to highest precedence:
//!
//! 1. **Built-in defaults**: the serde defaults of the section types (`seed = 42`,
//!    `device = "cpu"`, `[train] epochs = 3`, ...).
//! 2. **The pipeline file.** A file may say `extends = "base.toml"`, a path relative to the
//!    extending file; the base is loaded first (recursively: chains are allowed, cycles are an
//!    error) and the file is merged over it.
//! 3. **Environment variables** `PIPE_<KEY>` and `PIPE_<SECTION>__<KEY>`: a double underscore
//!    separates a section from its key, because keys contain single underscores
//!    (`PIPE_SEED=7`, `PIPE_TRAIN__BATCH_SIZE=8`, `PIPE_OPTIMIZER__LR=3e-5`). Names are
//!    case-insensitive after the prefix. Variables in [`RESERVED_ENV_VARS`] (`PIPE_STORE`, `PIPE_REMOTE`, `PIPE_PUSH`,
//!    `PIPE_KERNEL`, `PIPE_FAULT`, ...) belong to the CLI and are skipped; any other `PIPE_*` variable must name a pipeline key. They apply
//!    in name order.
//! 4. **`--set key=value`** overrides, in command-line order, with a dotted key
//!    (`--set train.epochs=2`, `--set optimizer.lr=3e-5`).
//!
//! In layers 3 and 4 the value is read as a TOML value when it parses as one (`2`, `3e-5`, `true`,
//! `["accuracy"]`) and as a plain string otherwise (`models/x`, `cuda:0`); quote it to force a
//! string (`--set 'name="123"'`). Layers merge table by table; any other value, arrays included,
//! replaces the lower one. After merging, two defaults are derived: `name` is the stem of the file
//! named on the command line, and `tokenizer.source` is `model.source`.
//!
//! Relative paths in `[dataset]` and local `source` directories are relative to the working
//! directory (pipelines run from the project root), not to the file; only `extends` is
//! file-relative. The config layer does not check that they exist: that is the stages' business,
//! and `pipe show` must work on a machine without the data.
//!
//! # Checks and error positions
//!
//! Every problem is reported with the place that wrote the offending key or value:
//! `file:line:column` with the line and a caret under it, or the environment variable, or the
//! `--set` argument (see [`ConfigError`]). To know that place, each layer is read into a
//! `toml::Table` together with a *provenance* map from key path to origin (for files, the byte
//! spans of key and value from `toml::de::DeTable`); merging keeps, per key path, the layer that
//! wrote it last. The checks then run in order, each ending in a key path that the map turns into
//! a position:
//!
//! 1. syntax, per file (the span of the `toml` parser's error);
//! 2. unknown keys, per layer before merging, against the keys of [`Pipeline`]'s JSON Schema (so
//!    the check cannot drift from the types), suggesting the nearest valid key by edit distance or
//!    the section where that key lives (`lr` in `[train]` -> `optimizer.lr`);
//! 3. missing required keys on the merged table (again from the schema);
//! 4. types: the merged table is deserialized into [`Pipeline`] through `serde_path_to_error`,
//!    which names the key path of a wrong type;
//! 5. values: ranges and consistency (`validate.rs`), each problem naming its key path.
//!
//! Figment is not used: it merges well but drops spans and value origins below the provider
//! level, and this module's main job is precise positions. Layering `toml::Table`s directly is a
//! dozen lines.

mod error;
mod keys;
pub(crate) mod layers;
pub(crate) mod schema;
mod source;
mod validate;

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::optim::{OptimizerConfig, ScheduleConfig};
use crate::train::TrainConfig;

pub use error::{ConfigError, Origin, Snippet};
pub use layers::RESERVED_ENV_VARS;
pub use schema::schema_json;
pub use source::{resolve_source, resolve_source_with_env};

use layers::{KeyPath, Part, Provenance, Written};

/// A fine-tuning pipeline: what to train on, which model, and how. The resolved form of a
/// pipeline file and its layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Name of the pipeline, shown in run listings. Defaults to the pipeline file's stem.
    #[serde(default)]
    #[schemars(transform = without_default)]
    pub name: String,
    /// Seed of every random choice: head initialisation, shuffling, dropout, validation split.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Where to compute: "cpu", "cuda" (the first GPU) or "cuda:N".
    #[serde(default = "default_device")]
    #[schemars(regex(pattern = r"^(cpu|cuda|cuda:[0-9]+)$"))]
    pub device: String,
    /// How to compute: "f32", or "bf16" mixed precision: bf16 matrix products (on a GPU also
    /// activations), f32 master weights, optimizer moments and loss.
    #[serde(default, skip_serializing_if = "is_f32")]
    pub dtype: crate::device::Precision,
    /// The training and validation data.
    pub dataset: DatasetConfig,
    /// The tokenizer.
    #[serde(default)]
    #[schemars(transform = without_default)]
    pub tokenizer: TokenizerConfig,
    /// The pre-trained model to fine-tune.
    pub model: ModelConfig,
    /// The optimizer.
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    /// The learning-rate schedule.
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// The training loop.
    #[serde(default)]
    pub train: TrainConfig,
    /// Evaluation on the validation data.
    #[serde(default)]
    pub evaluate: EvaluateConfig,
}

/// For keys whose real default is derived while loading: the empty placeholder would mislead
/// editors that show schema defaults.
fn without_default(schema: &mut schemars::Schema) {
    schema.remove("default");
}

fn default_seed() -> u64 {
    42
}

fn is_f32(p: &crate::device::Precision) -> bool {
    *p == crate::device::Precision::F32
}

fn default_device() -> String {
    "cpu".into()
}

/// `[dataset]`: data files (CSV with a header row, JSON Lines or Parquet). Exactly one of
/// `validation` and `validation_split`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// Training data (CSV with a header, JSON Lines or Parquet), relative to the working directory.
    pub train: PathBuf,
    /// Validation data (any format `train` may be in), relative to the working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<PathBuf>,
    /// Hold out this fraction of the training rows for validation (seeded, stratified), in (0, 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("exclusiveMinimum" = 0, "exclusiveMaximum" = 1))]
    pub validation_split: Option<f64>,
    /// Held-out test data (any format `train` may be in): scored by the evaluate stage (`test_metrics.json`,
    /// the run record's `[test_metrics]`) and never read by training, early stopping or a sweep's
    /// decisions, so that it stays an honest estimate after selecting on validation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<PathBuf>,
    /// Drop from the validation (and test) data every row whose exact text also occurs in the training data
    /// (leakage inflates their scores); the counts are reported in the tokenize stage's
    /// `labels.json`. Without it, such rows are only warned about.
    #[serde(default)]
    pub drop_duplicates: bool,
    /// The data files' format: `"csv"`, `"jsonl"` or `"parquet"`. Without it, each file's
    /// extension decides (`.jsonl`/`.ndjson`: JSON Lines, `.parquet`/`.pq`: Parquet, anything
    /// else: CSV).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<crate::data::Format>,
    /// Column holding the text.
    #[serde(default = "default_text_column")]
    pub text_column: String,
    /// Column holding the label (any string or integer; labels are mapped to ids in sorted order).
    #[serde(default = "default_label_column")]
    pub label_column: String,
    /// Causal LM, supervised fine-tuning: the column holding each row's prompt (set together
    /// with `completion_column`; the loss covers only the completion). Without both, a causal LM
    /// learns the whole of `text_column`, documents packed into blocks of `tokenizer.max_length`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_column: Option<String>,
    /// Causal LM, supervised fine-tuning: the column holding each row's completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_column: Option<String>,
}

impl DatasetConfig {
    /// The prompt and completion columns, when the data is prompt/completion pairs.
    pub fn prompt_completion(&self) -> Option<(&str, &str)> {
        Some((self.prompt_column.as_deref()?, self.completion_column.as_deref()?))
    }
}

fn default_text_column() -> String {
    "text".into()
}

fn default_label_column() -> String {
    "label".into()
}

/// `[tokenizer]`: which tokenizer and how long its output may be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizerConfig {
    /// A local directory with `tokenizer.json`, or a hub id ("org/name") found in the Hugging Face
    /// cache. Defaults to `model.source`.
    #[serde(default)]
    #[schemars(transform = without_default)]
    pub source: String,
    /// Truncate sequences to this many tokens, `[CLS]` and `[SEP]` included (causal LM: the
    /// length of a packed block, or the longest prompt and completion together).
    #[serde(default = "default_max_length")]
    #[schemars(range(min = 2))]
    pub max_length: usize,
    /// Causal LM with prompt/completion data: write each prompt as a user message through the
    /// model's chat template (`tokenizer_config.json`'s, or the GGUF file's), the completion as
    /// the assistant's answer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub chat_template: bool,
}

fn default_max_length() -> usize {
    128
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        Self { source: String::new(), max_length: default_max_length(), chat_template: false }
    }
}

/// `[model]`: the pre-trained checkpoint and the head put on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A local directory with `config.json` and `model.safetensors`, or a hub id ("org/name")
    /// found in the Hugging Face cache.
    pub source: String,
    /// The head to train.
    #[serde(default)]
    pub task: Task,
    /// Dropout on hidden states, in [0, 1); defaults to the checkpoint's `hidden_dropout_prob`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropout: Option<f64>,
    /// Dropout on attention probabilities, in [0, 1); defaults to the checkpoint's
    /// `attention_probs_dropout_prob`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_dropout: Option<f64>,
    /// Dropout before the classifier, in [0, 1); defaults to the checkpoint's
    /// `classifier_dropout`, else `dropout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classifier_dropout: Option<f64>,
}

/// What the model is fine-tuned to do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// One label per text, from the pooled `[CLS]` representation.
    #[default]
    SequenceClassification,
    /// Next-token prediction with a decoder (Llama, Qwen2, Qwen3): language modelling of a text
    /// column, or supervised fine-tuning on prompt/completion columns.
    CausalLm,
}

impl Task {
    /// What the task trains, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Task::SequenceClassification => "sequence classifier",
            Task::CausalLm => "causal language model",
        }
    }
}

/// `[evaluate]`: how the evaluate stage scores the validation data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluateConfig {
    /// Rows per forward pass (no gradients, so it can be larger than training's).
    #[schemars(range(min = 1))]
    pub batch_size: usize,
    /// Metrics to report.
    #[schemars(length(min = 1))]
    pub metrics: Vec<Metric>,
    /// Causal LM: also score the pretrained model, before fine-tuning, on the validation split
    /// (`baseline` in the evaluate stage's `metrics.json`), to see what fine-tuning changed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub baseline: bool,
}

impl Default for EvaluateConfig {
    fn default() -> Self {
        Self { batch_size: 64, metrics: vec![Metric::Accuracy, Metric::F1], baseline: false }
    }
}

/// An evaluation metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Fraction of correct predictions.
    Accuracy,
    /// Macro-averaged F1 over the classes.
    F1,
    /// Macro-averaged precision.
    Precision,
    /// Macro-averaged recall.
    Recall,
    /// Mean cross-entropy loss.
    Loss,
    /// Causal LM: `exp` of the mean next-token loss.
    Perplexity,
    /// Causal LM with prompt/completion data: the fraction of prompts whose greedy generation
    /// is exactly the completion (the evaluate stage only: it generates).
    #[serde(rename = "exact_match")]
    ExactMatch,
}

impl Metric {
    /// The name used in pipeline files and reports (`"f1"`).
    pub fn name(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::F1 => "f1",
            Metric::Precision => "precision",
            Metric::Recall => "recall",
            Metric::Loss => "loss",
            Metric::Perplexity => "perplexity",
            Metric::ExactMatch => "exact_match",
        }
    }

    /// Whether a smaller value is better (early stopping's direction).
    pub fn lower_is_better(self) -> bool {
        matches!(self, Metric::Loss | Metric::Perplexity)
    }

    /// Whether the metric scores a causal language model (else a classifier; the loss scores both).
    pub fn for_causal_lm(self) -> Option<bool> {
        match self {
            Metric::Loss => None,
            Metric::Perplexity | Metric::ExactMatch => Some(true),
            _ => Some(false),
        }
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Pipeline {
    /// The fully resolved pipeline as TOML, which [`load`] reads back to an equal `Pipeline`.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a Pipeline always serializes to TOML")
    }
}

/// Loads the pipeline at `path` with its `extends` chain, the `PIPE_*` environment variables and
/// the `--set` `overrides`, then checks it. See the module documentation for the layering.
pub fn load(path: &Path, overrides: &[String]) -> Result<Pipeline, ConfigError> {
    let env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
        .collect();
    load_with_env(path, overrides, &env)
}

/// [`load`] with the environment given as `(name, value)` pairs instead of read from the process.
pub fn load_with_env(
    path: &Path,
    overrides: &[String],
    env: &[(String, String)],
) -> Result<Pipeline, ConfigError> {
    let mut layers = layers::file_chain(path)?;
    layers.extend(layers::env_layers(env)?);
    layers.extend(layers::override_layers(overrides)?);

    let mut merged = toml::Table::new();
    let mut provenance = Provenance::new();
    for layer in layers {
        let unknown = keys::unknown_keys(&layer.table)
            .into_iter()
            .min_by_key(|path| layer.provenance.get(path).map_or(0, Written::position));
        if let Some(unknown) = unknown {
            let (message, help) = keys::unknown_key_message(&unknown);
            let written = layer.provenance.get(&unknown).expect("every key of a layer is recorded");
            return Err(ConfigError::Invalid {
                origin: written.origin(Part::Key),
                message,
                help: Some(help),
            });
        }
        layers::merge(&mut merged, layer.table);
        provenance.extend(layer.provenance);
    }
    derive_defaults(&mut merged, &mut provenance, path);

    // Errors without a more precise origin point at the file named on the command line.
    let blame = |key_path: &[String], part| {
        layers::origin_of(&provenance, key_path, part)
            .unwrap_or_else(|| Origin::File { path: path.to_owned(), snippet: None })
    };
    if let Some(missing) = keys::first_missing_key(&merged) {
        let (key, section) = missing.split_last().expect("a key path is never empty");
        let what = match keys::table_schema(&missing) {
            Some(_) => format!("section [{}]", missing.join(".")),
            None => format!("key `{key}` in {}", keys::describe_section(section)),
        };
        return Err(ConfigError::Invalid {
            origin: blame(section, Part::Key),
            message: format!("missing required {what}"),
            help: Some(
                "a pipeline needs at least [dataset] `train` and `validation` (or \
                 `validation_split`), and [model] `source`"
                    .into(),
            ),
        });
    }

    let pipeline: Pipeline = serde_path_to_error::deserialize(toml::Value::Table(merged)).map_err(|err| {
        let key_path = key_path_of(err.path());
        let message = readable_serde_message(err.inner().message());
        ConfigError::Invalid {
            origin: blame(&key_path, Part::Value),
            message: match key_path.is_empty() {
                true => message,
                false => format!("wrong value for `{}`: {message}", key_path.join(".")),
            },
            help: None,
        }
    })?;

    if let Some(problem) = validate::first_problem(&pipeline) {
        let key_path: KeyPath = problem.path.split('.').map(str::to_owned).collect();
        return Err(ConfigError::Invalid {
            origin: blame(&key_path, Part::Value),
            message: problem.message,
            help: problem.help,
        });
    }
    Ok(pipeline)
}

/// `name` from the file stem; `tokenizer.source` from `model.source` (blamed on the same place);
/// a causal LM's `evaluate.metrics`: loss and perplexity, and exact match for prompt/completion data.
fn derive_defaults(merged: &mut toml::Table, provenance: &mut Provenance, path: &Path) {
    if !merged.contains_key("name") {
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        merged.insert("name".into(), toml::Value::String(stem));
    }
    let causal_lm =
        merged.get("model").and_then(|m| m.get("task")).and_then(|t| t.as_str()) == Some("causal-lm");
    let sft = merged.get("dataset").and_then(|d| d.get("completion_column")).is_some();
    let evaluate = merged.entry("evaluate").or_insert_with(|| toml::Value::Table(Default::default()));
    if let Some(evaluate) = evaluate.as_table_mut()
        && causal_lm
        && !evaluate.contains_key("metrics")
    {
        let mut metrics = vec![toml::Value::from("loss"), toml::Value::from("perplexity")];
        if sft {
            metrics.push(toml::Value::from("exact_match"));
        }
        evaluate.insert("metrics".into(), toml::Value::Array(metrics));
    }
    let Some(model_source) = merged.get("model").and_then(|m| m.get("source")).cloned() else {
        return;
    };
    let tokenizer = merged.entry("tokenizer").or_insert_with(|| toml::Value::Table(Default::default()));
    if let Some(tokenizer) = tokenizer.as_table_mut()
        && !tokenizer.contains_key("source")
    {
        tokenizer.insert("source".into(), model_source);
        let from = vec!["model".to_owned(), "source".to_owned()];
        if let Some(written) = provenance.get(&from).cloned() {
            provenance.insert(vec!["tokenizer".into(), "source".into()], written);
        }
    }
}

/// The map keys of a serde path (`train.epochs`); array indices and the rest are dropped, since
/// positions are known per key only.
fn key_path_of(path: &serde_path_to_error::Path) -> KeyPath {
    path.iter()
        .map_while(|segment| match segment {
            serde_path_to_error::Segment::Map { key } => Some(key.clone()),
            _ => None,
        })
        .collect()
}

/// serde's messages name Rust types (`expected u64`); say what to write in TOML instead.
fn readable_serde_message(message: &str) -> String {
    let replacements = [
        ("expected u64", "expected a non-negative integer"),
        ("expected usize", "expected a non-negative integer"),
        ("expected u32", "expected a non-negative integer"),
        ("expected i64", "expected an integer"),
        ("expected f64", "expected a number"),
        ("expected path string", "expected a string (a path)"),
    ];
    replacements.iter().fold(message.to_owned(), |text, (from, to)| text.replace(from, to))
}

#[cfg(test)]
mod tests;
