//! Parquet (`.parquet`, `.pq`): columnar, in row groups; the format the Hugging Face hub stores
//! datasets in. Only the wanted columns are decoded (a projection), one row group at a time, so a
//! wide file costs what its text and label columns cost. Text columns are strings (plain, large or
//! view) or a dictionary of strings (pandas' categorical); a label column may also hold integers
//! or booleans, written as CSV would hold them (`0`, `true`). Rows are numbered from 1 across the
//! file (`Columns::lines`), and a problem names the row group and column as well.

use std::fs::File;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow_array::{Array, ArrowPrimitiveType};
use arrow_schema::DataType;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};

use super::{Columns, find_columns};
use crate::data::DataError;

/// Rows decoded at a time: large enough that per-batch costs vanish, small enough that a row group
/// of long texts is not held twice.
const BATCH_ROWS: usize = 8192;

/// [`read_columns`](super::read_columns) for Parquet.
pub(super) fn read(path: &Path, wanted: &[(&str, bool)]) -> Result<Columns, DataError> {
    let file = File::open(path).map_err(|source| DataError::Read { path: path.into(), source })?;
    let unreadable = |location: String, e: &dyn std::fmt::Display| DataError::Parquet {
        path: path.into(),
        location,
        message: format!("{e} (is the file complete? a truncated Parquet file has no footer)"),
    };
    let metadata = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
        .map_err(|e| unreadable(String::new(), &e))?;
    let schema = metadata.schema().clone();
    let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    let indices = find_columns(path, &names, wanted)?;
    for (&(name, _), index) in wanted.iter().zip(&indices) {
        let Some(index) = *index else { continue };
        let data_type = schema.field(index).data_type();
        if !has_text_form(data_type) {
            return Err(DataError::Parquet {
                path: path.into(),
                location: format!(", column `{name}`"),
                message: format!(
                    "holds {data_type}; expected strings, integers, booleans or a dictionary of strings"
                ),
            });
        }
    }

    let mask = ProjectionMask::roots(metadata.parquet_schema(), indices.iter().flatten().copied());
    let mut data =
        Columns { values: indices.iter().map(|i| i.map(|_| Vec::new())).collect(), lines: Vec::new() };
    let groups = metadata.metadata().num_row_groups();
    for group in 0..groups {
        let in_group = |e: &dyn std::fmt::Display| unreadable(format!(", row group {group} of {groups}"), e);
        let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(
            file.try_clone().map_err(|source| DataError::Read { path: path.into(), source })?,
            metadata.clone(),
        )
        .with_row_groups(vec![group])
        .with_projection(mask.clone())
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(|e| in_group(&e))?;
        for batch in reader {
            let batch = batch.map_err(|e| in_group(&e))?;
            let first_row = data.lines.len() as u64 + 1;
            for (&(name, _), values) in wanted.iter().zip(&mut data.values) {
                let Some(values) = values else { continue };
                let Some(column) = batch.column_by_name(name) else {
                    return Err(in_group(&format!("no column `{name}` in the decoded rows")));
                };
                if let Some(null) = (0..column.len()).find(|&i| column.is_null(i)) {
                    return Err(DataError::Parquet {
                        path: path.into(),
                        location: format!(
                            ", row {} (row group {group}), column `{name}`",
                            first_row + null as u64
                        ),
                        message: "null, expected a value".into(),
                    });
                }
                append_texts(column.as_ref(), values);
            }
            data.lines.extend(first_row..first_row + batch.num_rows() as u64);
        }
    }
    if data.lines.is_empty() {
        return Err(DataError::NoRows { path: path.into() });
    }
    Ok(data)
}

/// Whether a column of this type has a text form [`append_texts`] writes.
fn has_text_form(data_type: &DataType) -> bool {
    use DataType::*;
    match data_type {
        Utf8 | LargeUtf8 | Utf8View | Boolean => true,
        Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 | UInt64 => true,
        Dictionary(_, values) => has_text_form(values),
        _ => false,
    }
}

/// Appends the text form of every value of `column` (no nulls; a type [`has_text_form`] accepts).
fn append_texts(column: &dyn Array, out: &mut Vec<String>) {
    fn numbers<T: ArrowPrimitiveType>(column: &dyn Array, out: &mut Vec<String>)
    where
        T::Native: ToString,
    {
        out.extend(column.as_primitive::<T>().values().iter().map(ToString::to_string));
    }
    match column.data_type() {
        DataType::Utf8 => {
            out.extend(column.as_string::<i32>().iter().map(|v| v.unwrap_or_default().to_owned()))
        }
        DataType::LargeUtf8 => {
            out.extend(column.as_string::<i64>().iter().map(|v| v.unwrap_or_default().to_owned()))
        }
        DataType::Utf8View => {
            out.extend(column.as_string_view().iter().map(|v| v.unwrap_or_default().to_owned()))
        }
        DataType::Boolean => {
            out.extend(column.as_boolean().iter().map(|v| v.unwrap_or_default().to_string()))
        }
        DataType::Int8 => numbers::<Int8Type>(column, out),
        DataType::Int16 => numbers::<Int16Type>(column, out),
        DataType::Int32 => numbers::<Int32Type>(column, out),
        DataType::Int64 => numbers::<Int64Type>(column, out),
        DataType::UInt8 => numbers::<UInt8Type>(column, out),
        DataType::UInt16 => numbers::<UInt16Type>(column, out),
        DataType::UInt32 => numbers::<UInt32Type>(column, out),
        DataType::UInt64 => numbers::<UInt64Type>(column, out),
        DataType::Dictionary(_, _) => {
            let dictionary = column.as_any_dictionary();
            let mut values = Vec::with_capacity(dictionary.values().len());
            append_texts(dictionary.values().as_ref(), &mut values);
            out.extend(dictionary.normalized_keys().into_iter().map(|key| values[key].clone()));
        }
        other => unreachable!("{other} has no text form (has_text_form checks first)"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{
        ArrayRef, BooleanArray, DictionaryArray, Float64Array, Int64Array, RecordBatch, StringArray,
    };
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;

    use super::*;

    /// A Parquet file of these columns, `rows_per_group` rows to a row group.
    fn parquet_file(columns: Vec<(&str, ArrayRef)>, rows_per_group: usize) -> tempfile::NamedTempFile {
        let batch = RecordBatch::try_from_iter(columns).unwrap();
        let file = tempfile::Builder::new().suffix(".parquet").tempfile().unwrap();
        let properties =
            WriterProperties::builder().set_max_row_group_row_count(Some(rows_per_group)).build();
        let mut writer =
            ArrowWriter::try_new(file.reopen().unwrap(), batch.schema(), Some(properties)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        file
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn strings_integers_booleans_and_categoricals_read_as_csv_holds_them() {
        let sentences: ArrayRef = Arc::new(StringArray::from(vec!["a, b", "", "c \"d\"", "e"]));
        let file = parquet_file(
            vec![
                ("id", Arc::new(Float64Array::from(vec![0.5, 1.5, 2.5, 3.5])) as ArrayRef),
                ("sentence", sentences),
                ("label", Arc::new(Int64Array::from(vec![1, 0, -7, 1]))),
                ("flag", Arc::new(BooleanArray::from(vec![true, false, true, true]))),
                ("kind", Arc::new(DictionaryArray::<Int32Type>::from_iter(["pos", "neg", "pos", "neg"]))),
            ],
            3,
        );
        let wanted = [("sentence", true), ("label", true), ("flag", true), ("kind", true), ("gone", false)];
        let data = read(file.path(), &wanted).unwrap();
        assert_eq!(data.values[0], Some(strings(&["a, b", "", "c \"d\"", "e"])));
        assert_eq!(data.values[1], Some(strings(&["1", "0", "-7", "1"])));
        assert_eq!(data.values[2], Some(strings(&["true", "false", "true", "true"])));
        assert_eq!(data.values[3], Some(strings(&["pos", "neg", "pos", "neg"])));
        assert_eq!(data.values[4], None, "an optional column the file lacks");
        assert_eq!(data.lines, vec![1, 2, 3, 4], "rows numbered across both row groups");
    }

    #[test]
    fn a_missing_column_a_wrong_type_and_a_null_name_the_file_and_where() {
        let file = parquet_file(
            vec![
                ("sentence", Arc::new(StringArray::from(vec![Some("a"), Some("b"), None])) as ArrayRef),
                ("score", Arc::new(Float64Array::from(vec![0.5, 1.5, 2.5]))),
                ("label", Arc::new(Int64Array::from(vec![1, 0, 1]))),
            ],
            2,
        );
        let message = |wanted: &[(&str, bool)]| read(file.path(), wanted).unwrap_err().to_string();
        let missing = message(&[("text", true)]);
        assert!(
            missing.contains("has no column `text`") && missing.contains("`sentence`, `score`"),
            "{missing}"
        );
        let float = message(&[("sentence", true), ("score", true)]);
        assert!(float.contains("column `score`: holds Float64; expected strings"), "{float}");
        let null = message(&[("sentence", true), ("label", true)]);
        assert!(null.contains(".parquet`, row 3 (row group 1), column `sentence`: null"), "{null}");
    }

    #[test]
    fn a_truncated_file_is_an_error_naming_it_not_a_panic() {
        let file = parquet_file(vec![("text", Arc::new(StringArray::from(vec!["a"; 100])) as ArrayRef)], 10);
        let bytes = std::fs::read(file.path()).unwrap();
        for cut in [0, 4, bytes.len() / 2, bytes.len() - 1] {
            std::fs::write(file.path(), &bytes[..cut]).unwrap();
            let error = read(file.path(), &[("text", true)]).unwrap_err();
            assert!(matches!(error, DataError::Parquet { .. }), "cut at {cut}: {error:?}");
            assert!(error.to_string().contains(".parquet`"), "{error}");
        }
        // A footer that survives but points at data that is gone: the row group is named.
        let mut damaged = bytes.clone();
        damaged[4..24].fill(0xAB);
        std::fs::write(file.path(), &damaged).unwrap();
        let error = read(file.path(), &[("text", true)]).unwrap_err().to_string();
        assert!(error.contains("row group 0 of 10"), "{error}");
        // Any damaged byte reads as an error or (say, in a statistic) as data; never a panic.
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x5A;
            std::fs::write(file.path(), &damaged).unwrap();
            let _ = read(file.path(), &[("text", true)]);
        }
    }
}
