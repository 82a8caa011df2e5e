//! JSON Lines (`.jsonl`, `.ndjson`): one JSON object per line, its keys the columns.

use std::fs;
use std::path::Path;

use super::{Columns, column_index};
use crate::data::DataError;

/// [`read_columns`](super::read_columns) for JSON Lines: one JSON object per line (blank lines skipped), the columns
/// its keys. The first object plays the header's part: a required column it lacks is an error
/// naming the keys it has. A value is a string, or a number or boolean (written as JSON writes it:
/// integer labels stay `0`, `1`); anything else, or a row without the key, names the line.
pub(super) fn read(path: &Path, wanted: &[(&str, bool)]) -> Result<Columns, DataError> {
    let bytes = fs::read(path).map_err(|source| DataError::Read { path: path.into(), source })?;
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        let line = 1 + bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() as u64;
        DataError::InvalidUtf8 { path: path.into(), line, column: "(the line)".into() }
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut data = Columns { values: Vec::new(), lines: Vec::new() };
    let malformed = |line: u64, message: String| DataError::MalformedRow { path: path.into(), line, message };
    for (n, raw) in text.lines().enumerate() {
        let line = n as u64 + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let object: serde_json::Map<String, serde_json::Value> = match serde_json::from_str(raw) {
            Ok(serde_json::Value::Object(object)) => object,
            Ok(other) => {
                return Err(malformed(line, format!("expected a JSON object, found {}", json_kind(&other))));
            }
            Err(e) => return Err(malformed(line, format!("not JSON: {e}"))),
        };
        if data.lines.is_empty() {
            // The first row decides which optional columns the file has.
            let keys: Vec<String> = object.keys().cloned().collect();
            for &(name, required) in wanted {
                let present = object.contains_key(name);
                if required && !present {
                    column_index(path, &keys, name)?;
                }
                data.values.push(present.then(Vec::new));
            }
        }
        for (&(name, _), values) in wanted.iter().zip(&mut data.values) {
            let Some(values) = values else { continue };
            let value = match object.get(name) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => v.to_string(),
                Some(other) => {
                    return Err(malformed(
                        line,
                        format!("column `{name}` is {}, expected a string or a number", json_kind(other)),
                    ));
                }
                None => return Err(malformed(line, format!("no key `{name}` (the first row has it)"))),
            };
            if value.contains('\0') {
                return Err(malformed(line, format!("column `{name}` holds a NUL character")));
            }
            values.push(value);
        }
        data.lines.push(line);
    }
    if data.lines.is_empty() {
        return Err(if text.trim().is_empty() {
            DataError::Empty { path: path.into() }
        } else {
            DataError::NoRows { path: path.into() }
        });
    }
    Ok(data)
}

/// What a JSON value is, for messages.
fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
