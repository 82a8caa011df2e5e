//! Labelled datasets (in any of the [`formats`](super::formats)): reading a text and a label
//! column, mapping labels to class indices, splitting off a stratified validation set and
//! reporting train/validation leakage.
//!
//! Every error names the file and, for a row, the line it starts on (`data/train.csv:17: ...`; in a
//! Parquet file, its row number from 1), so a user can open the file at the offending row.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;

use super::formats::{Columns, Format, read_columns};

/// Everything that can go wrong while reading a dataset. `Display` is the complete message for
/// the user and leads with the file (and line, for a row).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file is missing, cannot be opened, or reading it failed.
    #[error("cannot read data file `{}`: {source}", path.display())]
    Read {
        /// The path as given.
        path: PathBuf,
        /// Why reading failed.
        source: io::Error,
    },
    /// The file has no header row (it is empty or holds only blank lines).
    #[error("data file `{}` is empty: expected a header row naming the columns", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The header row does not name a configured column.
    #[error("{}", missing_column_message(.path, .column, .found, .suggestion.as_deref()))]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The column the pipeline asked for.
        column: String,
        /// The columns the header does name, in order.
        found: Vec<String>,
        /// The found column closest to `column`, if any is close.
        suggestion: Option<String>,
    },
    /// The header is there but no data row follows it.
    #[error("data file `{}` has a header but no rows", path.display())]
    NoRows {
        /// The file.
        path: PathBuf,
    },
    /// A row the CSV reader rejects (most often a field count that differs from the header's).
    #[error("{}:{line}: malformed row: {message}", path.display())]
    MalformedRow {
        /// The file.
        path: PathBuf,
        /// The line the row starts on (the header is line 1).
        line: u64,
        /// What is wrong with the row.
        message: String,
    },
    /// A Parquet file pipe cannot read: not Parquet or truncated, a column without a text form, a
    /// null value.
    #[error("data file `{}`{location}: {message}", path.display())]
    Parquet {
        /// The file.
        path: PathBuf,
        /// Where in the file (`, row 17 (row group 0), column `label``), or empty for the whole file.
        location: String,
        /// What is wrong, and what was expected.
        message: String,
    },
    /// A field that pipe reads is not valid UTF-8.
    #[error("{}:{line}: column `{column}` is not valid UTF-8 (save the file as UTF-8)", path.display())]
    InvalidUtf8 {
        /// The file.
        path: PathBuf,
        /// The line the row starts on (the header is line 1).
        line: u64,
        /// The column holding the bad bytes (`header` for the header row itself).
        column: String,
    },
    /// A row has an empty (or all-whitespace) label.
    #[error("{}:{line}: empty label in column `{column}`", path.display())]
    EmptyLabel {
        /// The file.
        path: PathBuf,
        /// The line the row starts on (the header is line 1).
        line: u64,
        /// The label column.
        column: String,
    },
    /// A validation or test row carries a label the training data never has, so the model has no
    /// class for it.
    #[error(
        "{}:{line}: label `{label}` does not occur in the training data; known labels: {}",
        path.display(),
        .known.join(", ")
    )]
    UnseenLabel {
        /// The file.
        path: PathBuf,
        /// The line the row starts on (the header is line 1).
        line: u64,
        /// The unknown label.
        label: String,
        /// The labels the model knows, in class index order.
        known: Vec<String>,
    },
    /// A label set with no class at all.
    #[error("no labels to build classes from: the training data has no rows")]
    NoClasses,
    /// More classes than pipe supports (a label column of ids, most likely).
    #[error(
        "{count} distinct labels: pipe supports at most {MAX_CLASSES} classes (is the label column the right one?)"
    )]
    TooManyClasses {
        /// How many distinct labels there are.
        count: usize,
    },
    /// A list of class names (e.g. a checkpoint's `id2label`) names one class twice.
    #[error("label `{label}` appears twice in the list of class names")]
    DuplicateLabel {
        /// The repeated name.
        label: String,
    },
}

fn missing_column_message(path: &Path, column: &str, found: &[String], suggestion: Option<&str>) -> String {
    let mut message = format!("data file `{}` has no column `{column}`", path.display());
    if let Some(suggestion) = suggestion {
        message.push_str(&format!("; did you mean `{suggestion}`?"));
    }
    let found: Vec<String> = found.iter().map(|c| format!("`{c}`")).collect();
    message.push_str(&format!("\n  = columns found: {}", found.join(", ")));
    message
}

/// The texts and raw labels of a data file, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabeledTexts {
    /// The text column, one entry per row.
    pub texts: Vec<String>,
    /// The label column, trimmed of surrounding whitespace, one entry per row.
    pub labels: Vec<String>,
    /// Where each row is, for error messages ([`Columns::lines`]).
    pub lines: Vec<u64>,
}

impl LabeledTexts {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }

    /// The given rows, in the order given (e.g. one side of [`stratified_split`]). Indices past
    /// the end are skipped.
    pub fn select(&self, rows: &[usize]) -> LabeledTexts {
        let mut selected = LabeledTexts::default();
        for &row in rows {
            if let (Some(text), Some(label), Some(line)) =
                (self.texts.get(row), self.labels.get(row), self.lines.get(row))
            {
                selected.texts.push(text.clone());
                selected.labels.push(label.clone());
                selected.lines.push(*line);
            }
        }
        selected
    }
}

/// Reads `text_column` and `label_column` of the data file at `path`, in `format` or the one its
/// extension names ([`read_columns`]).
///
/// Other columns are ignored. Empty texts are kept; an empty label is an error. Labels are
/// trimmed, because hand-written CSV often has a space after the comma and `" 1"` should be the
/// same class as `"1"`.
pub fn read_labeled(
    path: &Path,
    format: Option<Format>,
    text_column: &str,
    label_column: &str,
) -> Result<LabeledTexts, DataError> {
    read_rows(path, format, text_column, label_column, true).map(|(rows, _)| rows)
}

/// Texts to predict, with their labels when the file has them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextsToPredict {
    /// The file has the label column: texts and labels, as [`read_labeled`] reads them.
    Labeled(LabeledTexts),
    /// The file has no label column.
    Unlabeled(Vec<String>),
}

impl TextsToPredict {
    /// The texts, in file order.
    pub fn texts(&self) -> &[String] {
        match self {
            TextsToPredict::Labeled(data) => &data.texts,
            TextsToPredict::Unlabeled(texts) => texts,
        }
    }
}

/// Reads `text_column` of the data file at `path`, and `label_column` too if the file has it;
/// otherwise as [`read_labeled`].
pub fn read_to_predict(
    path: &Path,
    format: Option<Format>,
    text_column: &str,
    label_column: &str,
) -> Result<TextsToPredict, DataError> {
    let (rows, labeled) = read_rows(path, format, text_column, label_column, false)?;
    Ok(if labeled { TextsToPredict::Labeled(rows) } else { TextsToPredict::Unlabeled(rows.texts) })
}

/// [`read_labeled`], with the label column optional unless `label_required`; the flag says whether
/// labels were read (when not, `labels` is empty).
fn read_rows(
    path: &Path,
    format: Option<Format>,
    text_column: &str,
    label_column: &str,
    label_required: bool,
) -> Result<(LabeledTexts, bool), DataError> {
    let Columns { mut values, lines } =
        read_columns(path, format, &[(text_column, true), (label_column, label_required)])?;
    let (raw_labels, texts) = (values.pop().flatten(), values.pop().flatten().unwrap_or_default());
    let mut data = LabeledTexts { texts, labels: Vec::new(), lines };
    let labeled = raw_labels.is_some();
    for (label, &line) in raw_labels.into_iter().flatten().zip(&data.lines) {
        let label = label.trim().to_owned();
        if label.is_empty() {
            return Err(DataError::EmptyLabel { path: path.into(), line, column: label_column.into() });
        }
        data.labels.push(label);
    }
    Ok((data, labeled))
}

/// The classes of a model: class index to label name and back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    names: Vec<String>,
    indices: HashMap<String, u32>,
}

/// The most classes a classifier may have: the evaluation's confusion matrix is `classes^2`, and a
/// label column with more distinct values is almost surely the wrong column (ids, free text).
pub const MAX_CLASSES: usize = 1024;

impl LabelMap {
    /// The classes of the training labels: their distinct values, sorted as in the reference
    /// recipe (a sorted set of the train labels). When every label is an integer they sort
    /// numerically, so `"10"` comes after `"9"`; otherwise lexicographically.
    pub fn from_train(labels: &[String]) -> Result<LabelMap, DataError> {
        let mut names: Vec<String> = labels.to_vec();
        names.sort_unstable();
        names.dedup();
        if names.is_empty() {
            return Err(DataError::NoClasses);
        }
        let numbers: Option<Vec<i128>> = names.iter().map(|n| n.parse::<i128>().ok()).collect();
        if let Some(numbers) = numbers {
            let mut numbered: Vec<(i128, String)> = numbers.into_iter().zip(names).collect();
            // Ties ("1" and "01") keep their string order so the result stays deterministic.
            numbered.sort();
            names = numbered.into_iter().map(|(_, name)| name).collect();
        }
        Self::from_names(names)
    }

    /// Classes with the given names, in index order (e.g. a checkpoint's `id2label`).
    pub fn from_names(names: Vec<String>) -> Result<LabelMap, DataError> {
        if names.is_empty() {
            return Err(DataError::NoClasses);
        }
        if names.len() > MAX_CLASSES {
            return Err(DataError::TooManyClasses { count: names.len() });
        }
        let mut indices = HashMap::with_capacity(names.len());
        for (index, name) in names.iter().enumerate() {
            let index = u32::try_from(index).map_err(|_| DataError::TooManyClasses { count: names.len() })?;
            if indices.insert(name.clone(), index).is_some() {
                return Err(DataError::DuplicateLabel { label: name.clone() });
            }
        }
        Ok(LabelMap { names, indices })
    }

    /// Label names by class index.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The class index of `label`, if it is one of the classes.
    pub fn index(&self, label: &str) -> Option<u32> {
        self.indices.get(label).copied()
    }

    /// The class index of every row of `data`, which was read from `path`; a label that is not
    /// one of the classes is an error naming its line.
    pub fn encode(&self, data: &LabeledTexts, path: &Path) -> Result<Vec<u32>, DataError> {
        data.labels
            .iter()
            .enumerate()
            .map(|(row, label)| {
                self.index(label).ok_or_else(|| DataError::UnseenLabel {
                    path: path.into(),
                    line: data.lines.get(row).copied().unwrap_or(0),
                    label: label.clone(),
                    known: self.names.clone(),
                })
            })
            .collect()
    }
}

/// Splits rows into `(train_rows, validation_rows)`, both sorted ascending, keeping each class's
/// share: `round(fraction * n)` of a class's `n` rows go to validation, at least one when the
/// class has two or more rows (so every class is validated) and never all of them (so every class
/// is trained on). The draw depends only on `seed` and the labels.
pub fn stratified_split(labels: &[u32], fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let class_count = labels.iter().max().map_or(0, |&max| max as usize + 1);
    let mut rows_by_class: Vec<Vec<usize>> = vec![Vec::new(); class_count];
    for (row, &label) in labels.iter().enumerate() {
        rows_by_class[label as usize].push(row);
    }

    // One generator over the classes in index order: the split is a function of the seed alone.
    let mut rng = crate::rng::stream(seed, "validation-split", 0);
    let mut train = Vec::with_capacity(labels.len());
    let mut validation = Vec::new();
    for mut rows in rows_by_class {
        rows.shuffle(&mut rng);
        let n = rows.len();
        let take = if fraction > 0.0 && n >= 2 {
            ((fraction * n as f64).round() as usize).clamp(1, n - 1)
        } else {
            0
        };
        validation.extend_from_slice(&rows[..take]);
        train.extend_from_slice(&rows[take..]);
    }
    train.sort_unstable();
    validation.sort_unstable();
    (train, validation)
}

/// The validation rows whose text is exactly a training row's, in order: rows the model has seen
/// in training inflate the validation score. Linear in the rows (a set of the training texts), so
/// many equal texts on both sides cost nothing extra.
pub fn leaked_validation_rows(train: &[String], validation: &[String]) -> Vec<usize> {
    let train_texts: std::collections::HashSet<&str> = train.iter().map(String::as_str).collect();
    validation
        .iter()
        .enumerate()
        .filter(|(_, text)| train_texts.contains(text.as_str()))
        .map(|(row, _)| row)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn csv_file(contents: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new().suffix(".csv").tempfile().unwrap();
        file.write_all(contents).unwrap();
        file.flush().unwrap();
        file
    }

    fn read(contents: &[u8]) -> Result<LabeledTexts, DataError> {
        let file = csv_file(contents);
        read_labeled(file.path(), None, "text", "label")
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reads_columns_in_row_order_with_line_numbers() {
        let data = read(b"id,label,text\n1,pos,good film\n2,neg,\"bad, very bad\"\n3,pos,\n").unwrap();
        assert_eq!(data.texts, strings(&["good film", "bad, very bad", ""]));
        assert_eq!(data.labels, strings(&["pos", "neg", "pos"]));
        assert_eq!(data.lines, vec![2, 3, 4]);
    }

    #[test]
    fn line_numbers_follow_quoted_line_breaks_blank_lines_and_crlf() {
        let data =
            read(b"text,label\r\n\"two\r\nlines\",a\r\n\"three\nmore\nlines\",b\r\n\r\nlast,c\r\n").unwrap();
        assert_eq!(data.texts, strings(&["two\r\nlines", "three\nmore\nlines", "last"]));
        assert_eq!(data.lines, vec![2, 4, 8]);

        let data = read(b"\n\ntext,label\n\n\na,1\n\nb,2").unwrap();
        assert_eq!(data.lines, vec![6, 8]);
        let data = read(b"text,label\rx,1\ry,2\r").unwrap();
        assert_eq!(data.lines, vec![2, 3]);
        let error = read(b"text,label\r\nok,1\r\n\r\ntoo,many,fields\r\n").unwrap_err();
        assert!(matches!(error, DataError::MalformedRow { line: 4, .. }), "{error:?}");
    }

    #[test]
    fn byte_order_mark_and_label_whitespace_are_dropped() {
        let data = read(b"\xEF\xBB\xBFtext,label\nhello, 1 \n").unwrap();
        assert_eq!(data.texts, strings(&["hello"]));
        assert_eq!(data.labels, strings(&["1"]));
    }

    #[test]
    fn labels_to_predict_are_read_when_the_column_exists() {
        let file = csv_file(b"text,label\ngood,pos\nbad,neg\n");
        let TextsToPredict::Labeled(data) = read_to_predict(file.path(), None, "text", "label").unwrap()
        else {
            panic!("the label column was not read");
        };
        assert_eq!(data.labels, strings(&["pos", "neg"]));
        let file = csv_file(b"id,text\n1,good\n2,\"bad, really\"\n");
        let texts = read_to_predict(file.path(), None, "text", "label").unwrap();
        assert_eq!(texts, TextsToPredict::Unlabeled(strings(&["good", "bad, really"])));
        assert!(matches!(
            read_to_predict(file.path(), None, "sentence", "label"),
            Err(DataError::MissingColumn { .. })
        ));
    }

    #[test]
    fn missing_file_names_the_path() {
        let error = read_labeled(Path::new("/no/such/dir/train.csv"), None, "text", "label").unwrap_err();
        assert!(matches!(error, DataError::Read { .. }));
        let message = error.to_string();
        assert!(message.starts_with("cannot read data file `/no/such/dir/train.csv`: "), "{message}");
    }

    #[test]
    fn empty_file_and_header_only_file_are_errors() {
        assert!(matches!(read(b""), Err(DataError::Empty { .. })));
        assert!(matches!(read(b"\n\n"), Err(DataError::Empty { .. })));
        let error = read(b"text,label\n").unwrap_err();
        assert!(matches!(error, DataError::NoRows { .. }));
        assert!(error.to_string().ends_with("has a header but no rows"), "{error}");
    }

    #[test]
    fn missing_column_lists_columns_and_suggests_the_closest() {
        let file = csv_file(b"Text,labels,id\nhi,1,7\n");
        let error = read_labeled(file.path(), None, "text", "label").unwrap_err();
        let DataError::MissingColumn { column, suggestion, found, .. } = &error else {
            panic!("unexpected error {error}");
        };
        assert_eq!(column, "text");
        assert_eq!(suggestion.as_deref(), Some("Text"));
        assert_eq!(found, &strings(&["Text", "labels", "id"]));
        let message = error.to_string();
        assert!(message.contains("has no column `text`; did you mean `Text`?"), "{message}");
        assert!(message.contains("columns found: `Text`, `labels`, `id`"), "{message}");

        let error = read_labeled(file.path(), None, "Text", "sentiment").unwrap_err();
        assert!(matches!(&error, DataError::MissingColumn { suggestion: None, .. }), "{error}");
    }

    #[test]
    fn wrong_field_count_names_the_line() {
        let error = read(b"text,label\nok,1\ntoo,many,fields\n").unwrap_err();
        assert!(matches!(error, DataError::MalformedRow { line: 3, .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.contains(".csv:3: malformed row: found 3 fields but the header has 2"), "{message}");
    }

    #[test]
    fn empty_label_names_the_line() {
        let error = read(b"text,label\nok,1\n\"multi\nline\",1\nnothing,  \n").unwrap_err();
        assert!(matches!(error, DataError::EmptyLabel { line: 5, .. }), "{error:?}");
        assert!(error.to_string().contains(".csv:5: empty label in column `label`"), "{error}");
    }

    #[test]
    fn invalid_utf8_names_the_line_and_column() {
        let error = read(b"text,label\nok,1\nbad \xFF byte,1\n").unwrap_err();
        assert!(
            matches!(&error, DataError::InvalidUtf8 { line: 3, column, .. } if column == "text"),
            "{error:?}"
        );
        // Bytes in a column pipe does not read are not its business.
        let data = read(b"text,label,note\nok,1,\xFF\n").unwrap();
        assert_eq!(data.texts, strings(&["ok"]));
    }

    fn jsonl_file(contents: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".jsonl").tempfile().unwrap();
        std::io::Write::write_all(&mut f, contents.as_bytes()).unwrap();
        f
    }

    #[test]
    fn json_lines_read_like_the_same_csv() {
        let csv = csv_file(b"sentence,label\n\"a, b\",1\nc d,0\n");
        let jsonl = jsonl_file(
            "{\"sentence\": \"a, b\", \"label\": 1}\n\n{\"label\": 0, \"sentence\": \"c d\", \"id\": 7}\n",
        );
        let from_csv = read_labeled(csv.path(), None, "sentence", "label").unwrap();
        let from_jsonl = read_labeled(jsonl.path(), None, "sentence", "label").unwrap();
        assert_eq!(from_jsonl.texts, from_csv.texts);
        assert_eq!(from_jsonl.labels, from_csv.labels);
        assert_eq!(from_jsonl.lines, vec![1, 3], "blank lines are skipped, numbering is the file's");
    }

    #[test]
    fn bad_json_lines_name_the_file_and_line() {
        let message = |contents: &str| {
            read_labeled(jsonl_file(contents).path(), None, "sentence", "label").unwrap_err().to_string()
        };
        let first = "{\"sentence\": \"a\", \"label\": 1}\n";
        let not_json = message(&format!("{first}{{\"sentence\": \"b\", \"label\": 1\n"));
        assert!(not_json.contains(":2: malformed row: not JSON"), "{not_json}");
        let array = message(&format!("{first}[1, 2]\n"));
        assert!(array.contains(":2:") && array.contains("expected a JSON object, found an array"), "{array}");
        let wrong_type = message(&format!("{first}{{\"sentence\": [\"b\"], \"label\": 0}}\n"));
        assert!(
            wrong_type.contains(":2:") && wrong_type.contains("column `sentence` is an array"),
            "{wrong_type}"
        );
        let missing_key = message(&format!("{first}{{\"sentence\": \"b\"}}\n"));
        assert!(missing_key.contains(":2:") && missing_key.contains("no key `label`"), "{missing_key}");
        let missing_column = message("{\"text\": \"a\", \"label\": 1}\n");
        assert!(missing_column.contains("sentence") && missing_column.contains("text"), "{missing_column}");
        assert!(message("").contains("is empty"));
        assert!(message("\n\n").contains("is empty"));
    }

    #[test]
    fn integer_labels_sort_numerically_others_lexicographically() {
        let map = LabelMap::from_train(&strings(&["10", "9", "2", "9", "-1"])).unwrap();
        assert_eq!(map.names(), strings(&["-1", "2", "9", "10"]).as_slice());
        assert_eq!(map.index("10"), Some(3));
        assert_eq!(map.index("11"), None);

        let map = LabelMap::from_train(&strings(&["neg", "pos", "10", "9", "neg"])).unwrap();
        assert_eq!(map.names(), strings(&["10", "9", "neg", "pos"]).as_slice());

        assert!(matches!(LabelMap::from_train(&[]), Err(DataError::NoClasses)));
        assert!(matches!(
            LabelMap::from_names(strings(&["a", "b", "a"])),
            Err(DataError::DuplicateLabel { label }) if label == "a"
        ));
    }

    #[test]
    fn encode_maps_labels_and_names_the_line_of_an_unseen_one() {
        let map = LabelMap::from_train(&strings(&["pos", "neg"])).unwrap();
        let data = LabeledTexts {
            texts: strings(&["a", "b", "c"]),
            labels: strings(&["pos", "neg", "neutral"]),
            lines: vec![2, 3, 5],
        };
        let ok = data.select(&[0, 1]);
        assert_eq!(map.encode(&ok, Path::new("val.csv")).unwrap(), vec![1, 0]);
        let error = map.encode(&data, Path::new("val.csv")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "val.csv:5: label `neutral` does not occur in the training data; known labels: neg, pos"
        );
    }

    #[test]
    fn stratified_split_keeps_class_shares_and_is_deterministic() {
        // 10 rows of class 0, 4 of class 1, 1 of class 2, interleaved.
        let mut labels = Vec::new();
        labels.extend(std::iter::repeat_n(0u32, 10));
        labels.extend(std::iter::repeat_n(1u32, 4));
        labels.push(2);
        labels.rotate_left(3);
        let (train, validation) = stratified_split(&labels, 0.2, 7);

        let count = |rows: &[usize], class: u32| rows.iter().filter(|&&r| labels[r] == class).count();
        assert_eq!((count(&validation, 0), count(&validation, 1), count(&validation, 2)), (2, 1, 0));
        assert_eq!(train.len() + validation.len(), labels.len());
        assert!(train.is_sorted() && validation.is_sorted());
        let mut all: Vec<usize> = train.iter().chain(&validation).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..labels.len()).collect::<Vec<_>>());

        assert_eq!(stratified_split(&labels, 0.2, 7), (train.clone(), validation.clone()));
        let other_seeds: Vec<_> = (8..12).map(|seed| stratified_split(&labels, 0.2, seed).1).collect();
        assert!(other_seeds.iter().any(|v| *v != validation), "the seed should change the draw");
    }

    #[test]
    fn stratified_split_never_empties_a_class() {
        let labels = [0, 0, 1, 1, 1];
        let (train, validation) = stratified_split(&labels, 0.99, 1);
        assert_eq!((train.len(), validation.len()), (2, 3));
        let (train, validation) = stratified_split(&labels, 0.01, 1);
        assert_eq!((train.len(), validation.len()), (3, 2));
        let (train, validation) = stratified_split(&labels, 0.0, 1);
        assert_eq!((train, validation), (vec![0, 1, 2, 3, 4], vec![]));
        assert_eq!(stratified_split(&[], 0.2, 1), (vec![], vec![]));
    }

    #[test]
    fn leaked_rows_are_found_in_linear_time() {
        let train = strings(&["a", "b", "a", "c"]);
        let validation = strings(&["c", "a", "d", "A"]);
        assert_eq!(leaked_validation_rows(&train, &validation), vec![0, 1]);
        assert!(leaked_validation_rows(&train, &[]).is_empty());
        // 100k equal empty texts against 10k: 10^9 pairs if they were materialised.
        let (train, validation) = (vec![String::new(); 100_000], vec![String::new(); 10_000]);
        assert_eq!(leaked_validation_rows(&train, &validation).len(), 10_000);
    }

    #[test]
    fn a_label_column_of_ids_is_too_many_classes() {
        let ids: Vec<String> = (0..100_000).map(|i| i.to_string()).collect();
        assert!(matches!(LabelMap::from_train(&ids), Err(DataError::TooManyClasses { count: 100_000 })));
    }
}
