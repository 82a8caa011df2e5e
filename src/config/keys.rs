//! Which keys a pipeline may have, read from [`Pipeline`](super::Pipeline)'s JSON Schema so that
//! the unknown-key and required-key checks can never drift from the Rust types.

use serde_json::Value;

use super::layers::KeyPath;
use super::schema::type_schema;

/// The key paths in `table` that no section declares, in the table's order.
pub(crate) fn unknown_keys(table: &toml::Table) -> Vec<KeyPath> {
    let mut out = Vec::new();
    let root = table_schema(&[]).expect("Pipeline is a table");
    collect_unknown(table, root, &mut Vec::new(), &mut out);
    out
}

fn collect_unknown(table: &toml::Table, schema: &'static Value, path: &mut KeyPath, out: &mut Vec<KeyPath>) {
    let properties = &schema["properties"];
    for (key, value) in table {
        path.push(key.clone());
        match properties.get(key) {
            None => out.push(path.clone()),
            Some(child) => {
                // A table where a scalar belongs is a type error; serde reports those.
                if let (toml::Value::Table(inner), Some(child)) = (value, as_table_schema(child)) {
                    collect_unknown(inner, child, path, out);
                }
            }
        }
        path.pop();
    }
}

/// The first required key missing from the merged `table` (sections are checked only if present
/// or required).
pub(crate) fn first_missing_key(table: &toml::Table) -> Option<KeyPath> {
    fn walk(table: &toml::Table, schema: &'static Value, path: &mut KeyPath) -> Option<KeyPath> {
        for key in required(schema) {
            if !table.contains_key(key) {
                path.push(key.to_owned());
                return Some(path.clone());
            }
        }
        let properties = schema["properties"].as_object()?;
        for (key, child) in properties {
            if let (Some(toml::Value::Table(inner)), Some(child)) = (table.get(key), as_table_schema(child)) {
                path.push(key.clone());
                if let Some(missing) = walk(inner, child, path) {
                    return Some(missing);
                }
                path.pop();
            }
        }
        None
    }
    walk(table, table_schema(&[])?, &mut Vec::new())
}

/// The message and help for the unknown key at `path`: the nearest valid key by edit distance,
/// else the section where a key of that name lives, and the list of valid keys.
pub(crate) fn unknown_key_message(path: &[String]) -> (String, String) {
    let (key, section) = path.split_last().expect("a key path is never empty");
    let place = match section.is_empty() {
        true => "at the top level".to_owned(),
        false => format!("in [{}]", section.join(".")),
    };
    let valid = table_schema(section).map(keys).unwrap_or_default();
    let suggestion = closest(key, &valid).map(str::to_owned).or_else(|| elsewhere(key, section));
    let message = match suggestion {
        Some(suggestion) => format!("unknown key `{key}` {place}; did you mean `{suggestion}`?"),
        None => format!("unknown key `{key}` {place}"),
    };
    (message, format!("valid keys {place}: {}", valid.join(", ")))
}

/// Section name for messages: `[dataset]`, or `the top level`.
pub(crate) fn describe_section(section: &[String]) -> String {
    match section.is_empty() {
        true => "the top level".to_owned(),
        false => format!("[{}]", section.join(".")),
    }
}

/// The valid key closest to `key`: a small edit distance (typos, transpositions) or `key` being a
/// prefix of it (`warmup` -> `warmup_steps`).
fn closest<'a>(key: &str, valid: &[&'a str]) -> Option<&'a str> {
    let limit = (key.chars().count() / 3).max(1);
    valid
        .iter()
        .map(|candidate| (strsim::osa_distance(key, candidate), *candidate))
        .filter(|(distance, candidate)| *distance <= limit || (key.len() >= 4 && candidate.starts_with(key)))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// The dotted path of a key named exactly `key` in another section (`lr` in [train] ->
/// `optimizer.lr`).
fn elsewhere(key: &str, section: &[String]) -> Option<String> {
    fn walk(schema: &'static Value, path: &mut KeyPath, key: &str, skip: &[String]) -> Option<String> {
        let properties = schema["properties"].as_object()?;
        if path.as_slice() != skip && properties.contains_key(key) {
            return Some(path.iter().map(String::as_str).chain([key]).collect::<Vec<_>>().join("."));
        }
        for (name, child) in properties {
            if let Some(child) = as_table_schema(child) {
                path.push(name.clone());
                let found = walk(child, path, key, skip);
                path.pop();
                if found.is_some() {
                    return found;
                }
            }
        }
        None
    }
    walk(table_schema(&[])?, &mut Vec::new(), key, section)
}

/// The schema of the table at `path`, or `None` if the value there is not a table.
pub(crate) fn table_schema(path: &[String]) -> Option<&'static Value> {
    let mut schema = as_table_schema(type_schema())?;
    for key in path {
        schema = as_table_schema(schema["properties"].get(key)?)?;
    }
    Some(schema)
}

/// `schema` with references and `allOf`/`anyOf`/`oneOf` wrappers (schemars writes those for
/// defaults and `Option`s) resolved, if it describes a table.
fn as_table_schema(schema: &'static Value) -> Option<&'static Value> {
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        return as_table_schema(type_schema().pointer(reference.strip_prefix('#')?)?);
    }
    if schema.get("properties").is_some() {
        return Some(schema);
    }
    ["allOf", "anyOf", "oneOf"]
        .iter()
        .filter_map(|combinator| schema.get(combinator)?.as_array())
        .flatten()
        .find_map(as_table_schema)
}

fn keys(schema: &'static Value) -> Vec<&'static str> {
    schema["properties"].as_object().map_or_else(Vec::new, |p| p.keys().map(String::as_str).collect())
}

fn required(schema: &'static Value) -> Vec<&'static str> {
    schema
        .get("required")
        .and_then(Value::as_array)
        .map_or_else(Vec::new, |r| r.iter().filter_map(Value::as_str).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(dotted: &str) -> KeyPath {
        dotted.split('.').map(str::to_owned).collect()
    }

    #[test]
    fn suggests_the_nearest_key_in_every_section() {
        let cases = [
            ("train.epoch", "did you mean `epochs`?"),
            ("train.batchsize", "did you mean `batch_size`?"),
            ("optimizer.lrr", "did you mean `lr`?"),
            ("schedule.warmup", "did you mean `warmup_steps`?"),
            ("dataset.validaton", "did you mean `validation`?"),
            ("tokenizer.max_len", "did you mean `max_length`?"),
            ("model.sorce", "did you mean `source`?"),
            ("evaluate.metric", "did you mean `metrics`?"),
            ("seeed", "did you mean `seed`?"),
            ("train.lr", "did you mean `optimizer.lr`?"),
            ("lr", "did you mean `optimizer.lr`?"),
        ];
        for (key, want) in cases {
            let (message, _) = unknown_key_message(&path(key));
            assert!(message.contains(want), "{key}: {message}");
        }
    }

    #[test]
    fn finds_unknown_keys_at_every_depth() {
        let table: toml::Table =
            toml::from_str("bogus = 1\n[train]\nepoch = 3\nepochs = 2\n[optimizer]\nlr = 1e-5\n").unwrap();
        assert_eq!(unknown_keys(&table), vec![path("bogus"), path("train.epoch")]);
    }

    #[test]
    fn required_keys_come_from_the_types() {
        let table: toml::Table =
            toml::from_str("[dataset]\nvalidation = \"v.csv\"\n[model]\nsource = \"m\"\n").unwrap();
        assert_eq!(first_missing_key(&table), Some(path("dataset.train")));
        let table: toml::Table = toml::from_str("[dataset]\ntrain = \"t.csv\"\n").unwrap();
        assert_eq!(first_missing_key(&table), Some(path("model")));
    }
}
