//! The tokenize stage of a causal LM: a text column packed into blocks, or prompt/completion
//! pairs (through the chat template when asked), with the same validation split, leakage check
//! and test split as classification.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

use crate::config::DatasetConfig;
use crate::data::{self, LmTokenizer, Sequences, TokenizedSplit};
use crate::plan::{KeyFields, StageKind};
use crate::stages::{Event, Input, Observer, Stage, StageError, TOKENS_FILE, Upstream, io_error};
use crate::store::WorkDir;

/// Output file with row counts, token counts and leakage (the classifier's `labels.json`).
pub const DATA_FILE: &str = "data.json";

/// Reads the dataset, splits off validation if asked, and tokenizes for a causal LM. In the tokens
/// file, a row's `labels` entry is its first predicted position (see [`Sequences`]).
pub struct LmTokenizeStage {
    pub(crate) dataset: DatasetConfig,
    pub(crate) max_length: usize,
    pub(crate) chat_template: bool,
    pub(crate) seed: u64,
    pub(crate) train_csv: Input,
    pub(crate) validation_csv: Option<Input>,
    pub(crate) test_csv: Option<Input>,
    /// `tokenizer.json` or a GGUF file.
    pub(crate) tokenizer: Input,
    /// The digests of the files beside `tokenizer.json` that the tokenizer reads
    /// (`tokenizer_config.json`, `chat_template.jinja`), by input name.
    pub(crate) tokenizer_files: BTreeMap<String, String>,
    /// What `preflight` read and checked, for `run`.
    pub(crate) prepared: Option<Prepared>,
}

/// The tokenizer and the splits as read (validation and test, when they are files).
pub(crate) struct Prepared {
    tokenizer: LmTokenizer,
    train: Rows,
    validation: Option<Rows>,
    test: Option<Rows>,
}

/// One split's rows as read: the texts (or prompts) and completions, with their lines.
struct Rows {
    texts: Vec<String>,
    completions: Vec<String>,
    lines: Vec<u64>,
    path: std::path::PathBuf,
}

impl Rows {
    fn read(path: &Path, d: &DatasetConfig) -> Result<Self, StageError> {
        let (first, second) = match d.prompt_completion() {
            Some((prompt, completion)) => (prompt, Some(completion)),
            None => (d.text_column.as_str(), None),
        };
        let mut wanted = vec![(first, true)];
        wanted.extend(second.map(|c| (c, true)));
        let mut columns = data::read_columns(path, d.format, &wanted)?;
        let completions =
            if second.is_some() { columns.values.pop().flatten().unwrap_or_default() } else { Vec::new() };
        let texts = columns.values.pop().flatten().unwrap_or_default();
        Ok(Self { texts, completions, lines: columns.lines, path: path.into() })
    }

    fn select(&self, rows: &[usize]) -> Self {
        let pick = |v: &Vec<String>| {
            if v.is_empty() { Vec::new() } else { rows.iter().map(|&r| v[r].clone()).collect() }
        };
        Self {
            texts: pick(&self.texts),
            completions: pick(&self.completions),
            lines: rows.iter().map(|&r| self.lines[r]).collect(),
            path: self.path.clone(),
        }
    }

    fn len(&self) -> usize {
        self.texts.len()
    }

    /// The rows that also occur in `train` (the same text, or prompt and completion).
    fn leaked_from(&self, train: &Rows) -> Vec<usize> {
        let key = |rows: &Rows| -> Vec<String> {
            match rows.completions.is_empty() {
                true => rows.texts.clone(),
                false => {
                    rows.texts.iter().zip(&rows.completions).map(|(p, c)| format!("{p}\u{0}{c}")).collect()
                }
            }
        };
        data::leaked_validation_rows(&key(train), &key(self))
    }
}

impl LmTokenizeStage {
    fn sequences(&self, tokenizer: &LmTokenizer, rows: &Rows) -> Result<(Sequences, usize), StageError> {
        Ok(match self.dataset.prompt_completion() {
            Some(_) => tokenizer.prompt_completion(
                &rows.texts,
                &rows.completions,
                self.chat_template,
                self.max_length,
                &rows.path,
                &rows.lines,
            )?,
            None => (tokenizer.pack(&rows.texts, self.max_length)?, 0),
        })
    }
}

impl Stage for LmTokenizeStage {
    fn kind(&self) -> StageKind {
        StageKind::Tokenize
    }

    fn key_fields(&self, _upstream: &Upstream) -> KeyFields {
        let d = &self.dataset;
        let mut params = json!({
            "task": "causal-lm",
            "dataset": { "drop_duplicates": d.drop_duplicates },
            "tokenizer": { "max_length": self.max_length },
        });
        match d.prompt_completion() {
            Some((prompt, completion)) => {
                params["dataset"]["prompt_column"] = json!(prompt);
                params["dataset"]["completion_column"] = json!(completion);
                params["tokenizer"]["chat_template"] = json!(self.chat_template);
            }
            None => params["dataset"]["text_column"] = json!(d.text_column),
        }
        if let Some(split) = d.validation_split {
            params["dataset"]["validation_split"] = json!(split);
            params["seed"] = json!(self.seed);
        }
        let mut inputs = BTreeMap::from([
            ("dataset.train".to_string(), self.train_csv.sha256.clone()),
            ("tokenizer".to_string(), self.tokenizer.sha256.clone()),
        ]);
        if let Some(v) = &self.validation_csv {
            inputs.insert("dataset.validation".into(), v.sha256.clone());
        }
        if let Some(t) = &self.test_csv {
            inputs.insert("dataset.test".into(), t.sha256.clone());
        }
        inputs.extend(self.tokenizer_files.clone());
        KeyFields { kind: StageKind::Tokenize, version: StageKind::Tokenize.version(), params, inputs }
    }

    fn preflight(&mut self) -> Result<(), StageError> {
        let tokenizer = LmTokenizer::load(&self.tokenizer.path)?;
        if self.chat_template && tokenizer.chat_template().is_none() {
            return Err(StageError::Invalid(format!(
                "{}: tokenizer.chat_template = true, and the tokenizer has no chat template",
                self.tokenizer.path.display()
            )));
        }
        let read = |input: &Input| Rows::read(&input.path, &self.dataset);
        self.prepared = Some(Prepared {
            train: read(&self.train_csv)?,
            validation: self.validation_csv.as_ref().map(read).transpose()?,
            test: self.test_csv.as_ref().map(read).transpose()?,
            tokenizer,
        });
        Ok(())
    }

    fn run(
        &mut self,
        work: &WorkDir,
        _upstream: &Upstream,
        observe: Observer<'_>,
    ) -> Result<serde_json::Value, StageError> {
        let start = std::time::Instant::now();
        if self.prepared.is_none() {
            self.preflight()?;
        }
        let Prepared { tokenizer, train: all, validation, test } =
            self.prepared.take().expect("prepared above");
        let d = &self.dataset;
        let (train, mut validation) = match validation {
            Some(validation) => (all, validation),
            None => {
                // One class: a seeded random split.
                let (t, v) =
                    data::stratified_split(&vec![0; all.len()], d.validation_split.unwrap_or(0.0), self.seed);
                (all.select(&t), all.select(&v))
            }
        };
        let mut summary = json!({ "task": "causal-lm", "train_rows": train.len() });
        let mut held_out = |name: &str,
                            rows: &mut Rows,
                            summary: &mut serde_json::Value|
         -> Result<(), StageError> {
            let leaked = rows.leaked_from(&train);
            summary[format!("{name}_leaked_rows")] = json!(leaked.len());
            if leaked.is_empty() {
                return Ok(());
            }
            if d.drop_duplicates {
                if leaked.len() == rows.len() {
                    return Err(StageError::Invalid(format!(
                        "every one of the {} {name} rows also occurs in the training data, so `dataset.drop_duplicates = true` would leave nothing to score",
                        rows.len()
                    )));
                }
                let keep: Vec<usize> = (0..rows.len()).filter(|r| leaked.binary_search(r).is_err()).collect();
                observe(Event::Warning(format!(
                    "dropped {} of {} {name} rows that also occur in the training data (dataset.drop_duplicates)",
                    leaked.len(),
                    rows.len()
                )));
                *rows = rows.select(&keep);
            } else {
                observe(Event::Warning(format!(
                    "{} of {} {name} rows also occur in the training data (leakage inflates {name} scores); set `dataset.drop_duplicates = true` to drop them",
                    leaked.len(),
                    rows.len()
                )));
            }
            Ok(())
        };
        held_out("validation", &mut validation, &mut summary)?;
        let mut test = test;
        if let Some(test) = &mut test {
            held_out("test", test, &mut summary)?;
        }
        let split = |rows: &Rows| -> Result<(TokenizedSplit, usize), StageError> {
            let (s, truncated) = self.sequences(&tokenizer, rows)?;
            Ok((TokenizedSplit { ids: s.ids, labels: s.loss_from }, truncated))
        };
        let (train, truncated) = split(&train)?;
        let (validation, _) = split(&validation)?;
        let test = test.as_ref().map(split).transpose()?.map(|(t, _)| t);
        if train.ids.is_empty() || validation.ids.is_empty() {
            return Err(StageError::Invalid(
                "the data makes no sequence of two tokens or more to train or validate on".into(),
            ));
        }
        let mut splits = vec![("train", &train), ("validation", &validation)];
        splits.extend(test.as_ref().map(|t| ("test", t)));
        data::save_tokens(&work.out().join(TOKENS_FILE), &splits)?;
        let predicted = |s: &TokenizedSplit| -> usize {
            s.ids
                .iter()
                .zip(&s.labels)
                .map(|(ids, &from)| crate::model::predicted_tokens(ids.len(), from as usize))
                .sum()
        };
        summary["train_sequences"] = json!(train.ids.len());
        summary["validation_sequences"] = json!(validation.ids.len());
        summary["train_tokens"] = json!(train.ids.iter().map(Vec::len).sum::<usize>());
        summary["train_predicted_tokens"] = json!(predicted(&train));
        summary["validation_predicted_tokens"] = json!(predicted(&validation));
        summary["train_rows_truncated"] = json!(truncated);
        if let Some(test) = &test {
            summary["test_sequences"] = json!(test.ids.len());
        }
        let path = work.out().join(DATA_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(&summary).expect("JSON") + "\n")
            .map_err(io_error(&path))?;
        let seconds = start.elapsed().as_secs_f64();
        Ok(json!({ "seconds": seconds, "sequences_per_second": train.ids.len() as f64 / seconds.max(1e-9) }))
    }
}
