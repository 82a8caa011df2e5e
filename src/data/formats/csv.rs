//! CSV: a header row naming the columns, then one record per row. Line numbers come from the
//! reader's byte offsets, not from counting records, because a quoted field may span several lines.

use std::fs;
use std::path::Path;

use super::{Columns, find_columns};
use crate::data::DataError;

/// [`read_columns`](super::read_columns) for CSV: the file must start with a header row and hold
/// at least one row; fields may be quoted (and then hold commas, quotes and line breaks).
pub(super) fn read(path: &Path, wanted: &[(&str, bool)]) -> Result<Columns, DataError> {
    // Read whole, because the csv crate's own line numbers are wrong after blank lines and CRLF
    // endings: lines are counted from the bytes instead (see `LineCounter`).
    let bytes = fs::read(path).map_err(|source| DataError::Read { path: path.into(), source })?;
    let mut lines = LineCounter::new(&bytes);
    let mut reader = ::csv::ReaderBuilder::new().has_headers(true).from_reader(bytes.as_slice());

    let header = reader.byte_headers().map_err(|e| csv_error(path, e, &mut lines))?.clone();
    if header.is_empty() {
        return Err(DataError::Empty { path: path.into() });
    }
    let header_line = lines.line_of(header.position());
    let columns = header
        .iter()
        .enumerate()
        .map(|(i, name)| {
            // Spreadsheet programs often save "UTF-8 CSV" with a byte-order mark, which the csv
            // crate leaves in the first column's name.
            let name = if i == 0 { name.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(name) } else { name };
            std::str::from_utf8(name).map(str::to_owned).map_err(|_| DataError::InvalidUtf8 {
                path: path.into(),
                line: header_line,
                column: "header".into(),
            })
        })
        .collect::<Result<Vec<String>, DataError>>()?;
    for (i, name) in columns.iter().enumerate() {
        if columns[..i].contains(name) {
            return Err(DataError::MalformedRow {
                path: path.into(),
                line: header_line,
                message: format!("the header names column `{name}` twice"),
            });
        }
    }
    let indices = find_columns(path, &columns, wanted)?;

    let mut data =
        Columns { values: indices.iter().map(|i| i.map(|_| Vec::new())).collect(), lines: Vec::new() };
    let mut record = ::csv::ByteRecord::new();
    while reader.read_byte_record(&mut record).map_err(|e| csv_error(path, e, &mut lines))? {
        let line = lines.line_of(record.position());
        let field = |index: usize, column: &str| -> Result<String, DataError> {
            let bytes = record.get(index).ok_or_else(|| DataError::MalformedRow {
                path: path.into(),
                line,
                message: format!("no field for column `{column}`"),
            })?;
            if bytes.contains(&0) {
                return Err(DataError::MalformedRow {
                    path: path.into(),
                    line,
                    message: format!("column `{column}` holds a NUL byte (is this a binary file?)"),
                });
            }
            std::str::from_utf8(bytes).map(str::to_owned).map_err(|_| DataError::InvalidUtf8 {
                path: path.into(),
                line,
                column: column.into(),
            })
        };
        for ((&(name, _), index), values) in wanted.iter().zip(&indices).zip(&mut data.values) {
            if let (Some(index), Some(values)) = (index, values) {
                values.push(field(*index, name)?);
            }
        }
        data.lines.push(line);
    }
    if data.lines.is_empty() {
        return Err(DataError::NoRows { path: path.into() });
    }
    Ok(data)
}

/// Turns the byte offsets the csv reader gives for records into 1-based line numbers.
///
/// The reader's offset for a record is where the previous record's terminator ended, which can be
/// the `\n` of a `\r\n` or the start of blank lines the reader then skipped; a record never starts
/// with a line break, so the record's own first byte is past any CR and LF bytes. Line breaks are
/// `\n`, `\r\n` and a lone `\r`, as the csv reader accepts. Offsets arrive in increasing order,
/// so counting resumes from the previous one and the whole file is scanned once.
struct LineCounter<'a> {
    bytes: &'a [u8],
    offset: usize,
    line: u64,
}

impl<'a> LineCounter<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        LineCounter { bytes, offset: 0, line: 1 }
    }

    fn line_of(&mut self, position: Option<&::csv::Position>) -> u64 {
        let Some(position) = position else { return self.line };
        let mut start = usize::try_from(position.byte()).unwrap_or(usize::MAX).min(self.bytes.len());
        while matches!(self.bytes.get(start), Some(b'\r' | b'\n')) {
            start += 1;
        }
        if start < self.offset {
            self.offset = 0;
            self.line = 1;
        }
        for i in self.offset..start {
            let is_break = match self.bytes[i] {
                b'\n' => true,
                b'\r' => self.bytes.get(i + 1) != Some(&b'\n'),
                _ => false,
            };
            if is_break {
                self.line += 1;
            }
        }
        self.offset = start;
        self.line
    }
}

fn csv_error(path: &Path, error: ::csv::Error, lines: &mut LineCounter) -> DataError {
    let line = lines.line_of(error.position());
    let message = error.to_string();
    match error.into_kind() {
        ::csv::ErrorKind::Io(source) => DataError::Read { path: path.into(), source },
        ::csv::ErrorKind::UnequalLengths { expected_len, len, .. } => DataError::MalformedRow {
            path: path.into(),
            line,
            message: format!(
                "found {len} field{} but the header has {expected_len} (quote fields that contain commas)",
                if len == 1 { "" } else { "s" }
            ),
        },
        ::csv::ErrorKind::Utf8 { err, .. } => {
            DataError::InvalidUtf8 { path: path.into(), line, column: format!("#{}", err.field() + 1) }
        }
        _ => DataError::MalformedRow { path: path.into(), line, message },
    }
}
