//! The file formats a dataset may come in, each read into the same [`Columns`]: CSV, JSON Lines
//! and Parquet. The format follows the file's extension unless the pipeline names it
//! (`dataset.format`), and every reader reports problems the same way: the file, the line or row
//! (a Parquet file: the row group and column too), and what was expected.

mod csv;
mod jsonl;
mod parquet;

use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::data::DataError;

/// A dataset file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Format {
    /// Comma-separated values with a header row (any extension but the ones below).
    #[serde(rename = "csv")]
    Csv,
    /// One JSON object per line (`.jsonl`, `.ndjson`).
    #[serde(rename = "jsonl")]
    JsonLines,
    /// Apache Parquet (`.parquet`, `.pq`), as the Hugging Face hub stores datasets.
    #[serde(rename = "parquet")]
    Parquet,
}

impl std::str::FromStr for Format {
    type Err = String;

    /// The names a pipeline uses (`csv`, `jsonl`, `parquet`), e.g. for a command-line option.
    fn from_str(name: &str) -> Result<Format, String> {
        match name {
            "csv" => Ok(Format::Csv),
            "jsonl" => Ok(Format::JsonLines),
            "parquet" => Ok(Format::Parquet),
            _ => Err(format!("unknown format `{name}`: expected csv, jsonl or parquet")),
        }
    }
}

impl Format {
    /// `explicit` if given, else the format `path`'s extension names (CSV for any other).
    pub fn of(path: &Path, explicit: Option<Format>) -> Format {
        let extension = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        explicit.unwrap_or(match extension.as_deref() {
            Some("jsonl" | "ndjson") => Format::JsonLines,
            Some("parquet" | "pq") => Format::Parquet,
            _ => Format::Csv,
        })
    }
}

/// Some columns of a data file, as they are (not trimmed), in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Columns {
    /// Each requested column's values, one per row; `None` for an optional column the file lacks.
    pub values: Vec<Option<Vec<String>>>,
    /// Where each row is, for error messages: the line it starts on in a text file (a CSV
    /// header is line 1), the row number (from 1) in a Parquet file.
    pub lines: Vec<u64>,
}

/// Reads the named columns of the data file at `path` (each `(name, required)`; a required column
/// the file lacks is an error naming the columns found), in `format` or the one its extension
/// names. The file must hold at least one row. Other columns are not read.
pub fn read_columns(
    path: &Path,
    format: Option<Format>,
    wanted: &[(&str, bool)],
) -> Result<Columns, DataError> {
    match Format::of(path, format) {
        Format::Csv => csv::read(path, wanted),
        Format::JsonLines => jsonl::read(path, wanted),
        Format::Parquet => parquet::read(path, wanted),
    }
}

/// The position of each wanted `(name, required)` column in `columns` (`None` for an optional one
/// the file lacks); a required column it lacks is an error listing the columns and the closest.
fn find_columns(
    path: &Path,
    columns: &[String],
    wanted: &[(&str, bool)],
) -> Result<Vec<Option<usize>>, DataError> {
    let mut indices = Vec::with_capacity(wanted.len());
    for &(name, required) in wanted {
        indices.push(match column_index(path, columns, name) {
            Ok(index) => Some(index),
            Err(_) if !required => None,
            Err(missing) => return Err(missing),
        });
    }
    Ok(indices)
}

/// The position of `column` in the header, or an error listing the columns and the closest one.
fn column_index(path: &Path, columns: &[String], column: &str) -> Result<usize, DataError> {
    if let Some(index) = columns.iter().position(|c| c == column) {
        return Ok(index);
    }
    Err(DataError::MissingColumn {
        path: path.into(),
        column: column.into(),
        found: columns.to_vec(),
        suggestion: closest_column(column, columns).map(str::to_owned),
    })
}

/// The column whose name is within a few edits of `wanted`, ignoring case (`Text` for `text`).
fn closest_column<'a>(wanted: &str, columns: &'a [String]) -> Option<&'a str> {
    let wanted = wanted.trim().to_lowercase();
    let limit = (wanted.chars().count() / 3).max(1);
    columns
        .iter()
        .map(|c| (strsim::osa_distance(&wanted, &c.trim().to_lowercase()), c.as_str()))
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, column)| column)
}
