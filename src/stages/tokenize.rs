//! The tokenize stage: dataset rows -> class indices and ragged token ids.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;

use super::{Event, Input, Observer, Stage, StageError, Upstream, io_error};
use crate::config::DatasetConfig;
use crate::data::{self, Flavor, LabelMap, TextEncoder, TokenizedSplit};
use crate::plan::{KeyFields, StageKind};
use crate::store::WorkDir;

/// Output file with the tokenized splits.
pub const TOKENS_FILE: &str = "tokens.safetensors";
/// Output file with the class names, row counts per split and class, and the validation (and
/// test) rows whose text also occurs in the training data (found, and dropped with
/// `dataset.drop_duplicates`).
pub const LABELS_FILE: &str = "labels.json";

/// Reads the dataset, maps labels to classes, splits off validation if asked, and tokenizes.
pub struct TokenizeStage {
    dataset: DatasetConfig,
    max_length: usize,
    seed: u64,
    train_csv: Input,
    validation_csv: Option<Input>,
    /// The held-out test data (`dataset.test`): tokenized for the evaluate stage only.
    test_csv: Option<Input>,
    tokenizer: TokenizerFile,
    prepared: Option<Prepared>,
}

/// A `tokenizer.json`, and how transformers builds a tokenizer from it (part of the key where that
/// changes the ids).
pub struct TokenizerFile {
    pub file: Input,
    pub flavor: Flavor,
}

/// A split's texts and their classes.
type Rows = (Vec<String>, Vec<u32>);

/// The parsed, checked dataset, ready to tokenize.
struct Prepared {
    encoder: TextEncoder,
    labels: LabelMap,
    train: Rows,
    validation: Rows,
    leakage: Leakage,
    test: Option<(Rows, Leakage)>,
    /// Test rows whose text is also in the validation split, which selection reads.
    test_in_validation: usize,
}

/// Rows of a held-out split whose exact text also occurs in the training data.
struct Leakage {
    /// Which split: "validation" or "test".
    split: &'static str,
    /// How many of its rows (before any were dropped).
    rows: usize,
    /// Its rows in all, before any were dropped.
    of: usize,
    /// A few of the texts, for the warning.
    examples: Vec<String>,
    /// Whether they were dropped (`dataset.drop_duplicates`).
    dropped: bool,
}

impl Leakage {
    /// Finds the rows of `split` that leak from `train` and, if `drop`, removes them; refuses to
    /// drop every row.
    fn handle(
        split: &'static str,
        train: &[String],
        rows: &mut Rows,
        drop: bool,
    ) -> Result<Self, StageError> {
        let leaked: BTreeSet<usize> = data::leaked_validation_rows(train, &rows.0).into_iter().collect();
        let of = rows.0.len();
        let examples = leaked.iter().take(3).map(|&v| rows.0[v].clone()).collect();
        let dropped = drop && !leaked.is_empty();
        if dropped {
            if leaked.len() == of {
                return Err(StageError::Invalid(format!(
                    "every one of the {of} {split} rows also occurs in the training data, so \
                     `dataset.drop_duplicates = true` would leave nothing to score"
                )));
            }
            let (texts, classes) = std::mem::take(rows);
            *rows = texts
                .into_iter()
                .zip(classes)
                .enumerate()
                .filter(|(row, _)| !leaked.contains(row))
                .map(|(_, kept)| kept)
                .unzip();
        }
        Ok(Self { split, rows: leaked.len(), of, examples, dropped })
    }

    /// The warning to show, if any row leaks.
    fn warning(&self) -> Option<String> {
        if self.rows == 0 {
            return None;
        }
        // Long texts are cut, so that the warning stays a few lines long.
        let examples: Vec<String> = self
            .examples
            .iter()
            .map(|text| match text.char_indices().nth(60) {
                Some((cut, _)) => format!("{:?}...", &text[..cut]),
                None => format!("{text:?}"),
            })
            .collect();
        let (n, of, split, examples) = (self.rows, self.of, self.split, examples.join(", "));
        Some(if self.dropped {
            format!(
                "dropped {n} of {of} {split} rows whose text also occurs in the training data \
                 (dataset.drop_duplicates), e.g. {examples}"
            )
        } else {
            format!(
                "{n} of {of} {split} rows also occur in the training data (leakage inflates \
                 {split} scores), e.g. {examples}; set `dataset.drop_duplicates = true` to drop them"
            )
        })
    }
}

impl TokenizeStage {
    pub fn new(
        dataset: DatasetConfig,
        max_length: usize,
        seed: u64,
        train_csv: Input,
        validation_csv: Option<Input>,
        test_csv: Option<Input>,
        tokenizer: TokenizerFile,
    ) -> Self {
        Self { dataset, max_length, seed, train_csv, validation_csv, test_csv, tokenizer, prepared: None }
    }
}

impl Stage for TokenizeStage {
    fn kind(&self) -> StageKind {
        StageKind::Tokenize
    }

    fn key_fields(&self, _upstream: &Upstream) -> KeyFields {
        let d = &self.dataset;
        let mut params = json!({
            "dataset": {
                "text_column": d.text_column,
                "label_column": d.label_column,
                "drop_duplicates": d.drop_duplicates,
            },
            "tokenizer": { "max_length": self.max_length },
        });
        if let Some(flavor) = self.tokenizer.flavor.key_name() {
            params["tokenizer"]["flavor"] = json!(flavor);
        }
        if let Some(split) = d.validation_split {
            // The seed matters only when it draws the split.
            params["dataset"]["validation_split"] = json!(split);
            params["seed"] = json!(self.seed);
        }
        let mut inputs = BTreeMap::from([
            ("dataset.train".to_string(), self.train_csv.sha256.clone()),
            ("tokenizer".to_string(), self.tokenizer.file.sha256.clone()),
        ]);
        if let Some(v) = &self.validation_csv {
            inputs.insert("dataset.validation".into(), v.sha256.clone());
        }
        if let Some(t) = &self.test_csv {
            inputs.insert("dataset.test".into(), t.sha256.clone());
        }
        KeyFields { kind: StageKind::Tokenize, version: StageKind::Tokenize.version(), params, inputs }
    }

    fn preflight(&mut self) -> Result<(), StageError> {
        let d = &self.dataset;
        let train = data::read_labeled(&self.train_csv.path, d.format, &d.text_column, &d.label_column)?;
        let labels = LabelMap::from_train(&train.labels)?;
        let train_classes = labels.encode(&train, &self.train_csv.path)?;
        let (train, mut validation) = match &self.validation_csv {
            Some(v) => {
                let val = data::read_labeled(&v.path, d.format, &d.text_column, &d.label_column)?;
                let val_classes = labels.encode(&val, &v.path)?;
                ((train.texts, train_classes), (val.texts, val_classes))
            }
            None => {
                let fraction = d.validation_split.unwrap_or(0.0);
                let (train_rows, val_rows) = data::stratified_split(&train_classes, fraction, self.seed);
                let pick = |rows: &[usize]| {
                    (
                        rows.iter().map(|&r| train.texts[r].clone()).collect(),
                        rows.iter().map(|&r| train_classes[r]).collect(),
                    )
                };
                (pick(&train_rows), pick(&val_rows))
            }
        };
        let leakage = Leakage::handle("validation", &train.0, &mut validation, d.drop_duplicates)?;
        let test = match &self.test_csv {
            Some(t) => {
                let rows = data::read_labeled(&t.path, d.format, &d.text_column, &d.label_column)?;
                let classes = labels.encode(&rows, &t.path)?;
                let mut test = (rows.texts, classes);
                let leakage = Leakage::handle("test", &train.0, &mut test, d.drop_duplicates)?;
                Some((test, leakage))
            }
            None => None,
        };
        let test_in_validation =
            test.as_ref().map_or(0, |(t, _)| data::leaked_validation_rows(&validation.0, &t.0).len());
        let encoder =
            TextEncoder::from_file(&self.tokenizer.file.path, self.max_length, self.tokenizer.flavor)?;
        self.prepared =
            Some(Prepared { encoder, labels, train, validation, leakage, test, test_in_validation });
        Ok(())
    }

    fn run(
        &mut self,
        work: &WorkDir,
        _upstream: &Upstream,
        observe: Observer<'_>,
    ) -> Result<serde_json::Value, StageError> {
        if self.prepared.is_none() {
            self.preflight()?;
        }
        let p = self.prepared.take().expect("prepared above");
        let start = std::time::Instant::now();
        for leakage in std::iter::once(&p.leakage).chain(p.test.as_ref().map(|(_, l)| l)) {
            if let Some(warning) = leakage.warning() {
                observe(Event::Warning(warning));
            }
        }
        if let (Some((test, _)), n @ 1..) = (&p.test, p.test_in_validation) {
            observe(Event::Warning(format!(
                "{n} of {} test rows also occur in the validation data, which selection (early \
                 stopping, a sweep) reads: their test score is not held out; remove them from one file",
                test.0.len()
            )));
        }
        let train = TokenizedSplit { ids: p.encoder.encode_all(&p.train.0)?, labels: p.train.1 };
        let validation =
            TokenizedSplit { ids: p.encoder.encode_all(&p.validation.0)?, labels: p.validation.1 };
        let test = match p.test {
            Some(((texts, labels), leakage)) => {
                Some((TokenizedSplit { ids: p.encoder.encode_all(&texts)?, labels }, leakage))
            }
            None => None,
        };
        let seconds = start.elapsed().as_secs_f64();
        let mut splits = vec![("train", &train), ("validation", &validation)];
        splits.extend(test.as_ref().map(|(split, _)| ("test", split)));
        data::save_tokens(&work.out().join(TOKENS_FILE), &splits)?;
        let truncated = train.ids.iter().filter(|r| r.len() >= self.max_length).count();
        let mut summary = json!({
            "labels": p.labels.names(),
            "train_rows": train.labels.len(),
            "validation_rows": validation.labels.len(),
            "train_tokens": train.ids.iter().map(Vec::len).sum::<usize>(),
            "train_rows_truncated": truncated,
            "train_class_counts": class_counts(&train.labels, p.labels.names().len()),
            "validation_class_counts": class_counts(&validation.labels, p.labels.names().len()),
            "validation_leaked_rows": p.leakage.rows,
            "validation_rows_dropped": if p.leakage.dropped { p.leakage.rows } else { 0 },
        });
        // Only with a test split, so that the outputs of pipelines without one stay as they were.
        if let Some((split, leakage)) = &test {
            summary["test_rows"] = json!(split.labels.len());
            summary["test_class_counts"] = json!(class_counts(&split.labels, p.labels.names().len()));
            summary["test_leaked_rows"] = json!(leakage.rows);
            summary["test_rows_dropped"] = json!(if leakage.dropped { leakage.rows } else { 0 });
        }
        let path = work.out().join(LABELS_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(&summary).expect("JSON") + "\n")
            .map_err(io_error(&path))?;
        let rows = train.labels.len() + validation.labels.len() + test.map_or(0, |(t, _)| t.labels.len());
        Ok(json!({ "seconds": seconds, "rows_per_second": rows as f64 / seconds.max(1e-9) }))
    }
}

/// Rows per class, in class order.
fn class_counts(labels: &[u32], classes: usize) -> Vec<usize> {
    let mut counts = vec![0; classes];
    for &label in labels {
        if let Some(count) = counts.get_mut(label as usize) {
            *count += 1;
        }
    }
    counts
}
