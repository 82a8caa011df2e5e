//! The JSON Schema of a pipeline file, generated from the Rust types.
//!
//! Two forms: [`type_schema`] describes the merged, complete pipeline (with `required` keys) and
//! drives the key checks; [`schema_json`] describes one *file* for editors (taplo, Even Better
//! TOML): it allows `extends` and requires nothing, because a file that extends another may leave
//! any key to its base. Required keys are checked by the loader after layering. Draft 7, the
//! newest draft that the TOML editor plugins understand.

use std::sync::OnceLock;

use schemars::generate::SchemaSettings;
use serde_json::{Value, json};

use super::Pipeline;

/// The schema of the resolved [`Pipeline`] as schemars writes it.
pub(crate) fn type_schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        SchemaSettings::draft07().into_generator().into_root_schema_for::<Pipeline>().to_value()
    })
}

/// The pretty-printed JSON Schema of a pipeline file, with a trailing newline; checked in as
/// `schemas/pipeline.schema.json`.
pub fn schema_json() -> String {
    let mut schema = type_schema().clone();
    remove_required(&mut schema);
    schema["properties"]["extends"] = json!({
        "description": "Path of a pipeline file to build on, relative to this file. This file's \
                        keys are merged over it, table by table.",
        "type": "string"
    });
    let mut text = serde_json::to_string_pretty(&schema).expect("a JSON value always serializes");
    text.push('\n');
    text
}

fn remove_required(value: &mut Value) {
    match value {
        Value::Object(object) => {
            // Only the keyword (an array of names), never a property that happens to be called so.
            if object.get("required").is_some_and(Value::is_array) {
                object.remove("required");
            }
            object.values_mut().for_each(remove_required);
        }
        Value::Array(items) => items.iter_mut().for_each(remove_required),
        _ => {}
    }
}

/// Test helper: fails unless the checked-in file at `path` (relative to the crate) is `fresh`,
/// and rewrites it when `PIPE_BLESS` is set (`regenerate` says how).
#[cfg(test)]
pub(crate) fn assert_checked_in(path: &str, fresh: &str, regenerate: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    if std::env::var_os("PIPE_BLESS").is_some() {
        std::fs::write(&path, fresh).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(on_disk == fresh, "{} is stale; regenerate it with `{regenerate}`", path.display());
}
