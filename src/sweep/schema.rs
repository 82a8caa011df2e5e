//! The JSON Schema of a sweep file (`schemas/sweep.schema.json`, `pipe schema --sweep`), for
//! editors (taplo, Even Better TOML) as for pipeline files. Sweep files are read by
//! [`super::spec`], whose key lists this schema is built from and checked against, so the two
//! cannot drift; the loader's own checks (a key the pipeline lacks, a bound the space cannot take)
//! go further than a schema can.

use serde_json::{Value, json};

use super::spec::{SPACES, TOP_KEYS};

/// The pretty-printed schema, with a trailing newline.
pub fn schema_json() -> String {
    let bounds =
        |item: &str| json!({ "type": "array", "items": { "type": item }, "minItems": 2, "maxItems": 2 });
    let list = json!({ "type": "array", "minItems": 1 });
    let spaces: Vec<(&str, Value, &str)> = vec![
        ("uniform", bounds("number"), "[low, high]: floats drawn uniformly."),
        ("log_uniform", bounds("number"), "[low, high], both > 0: floats drawn uniformly in log space."),
        ("int", bounds("integer"), "[low, high]: integers, both ends included."),
        ("choice", list.clone(), "Values to choose among (random search and TPE)."),
        ("grid", list, "Values to try in turn (method = \"grid\"): the cross product in file order."),
    ];
    debug_assert!(spaces.iter().map(|s| s.0).eq(SPACES.iter().copied()));
    let space = json!({
        "type": "object",
        "minProperties": 1,
        "maxProperties": 1,
        "additionalProperties": false,
        "properties": spaces
            .into_iter()
            .map(|(name, schema, description)| {
                let mut schema = schema;
                schema["description"] = json!(description);
                (name.to_string(), schema)
            })
            .collect::<serde_json::Map<_, _>>(),
    });
    let count = |description: &str| json!({ "type": "integer", "minimum": 1, "description": description });
    let properties = json!({
        "extends": { "type": "string", "description": "A sweep file to build on, relative to this file." },
        "pipeline": { "type": "string", "description": "The pipeline file to sweep, relative to this file." },
        "method": { "enum": ["grid", "random", "tpe"], "default": "tpe", "description": "How trials are proposed: the cross product of grid spaces, random draws, or TPE (Optuna's defaults) after 10 random start-up trials." },
        "n_trials": count("Trials to run (default 10). Raising it keeps the first trials."),
        "timeout": count("Seconds after which no new trial starts."),
        "parallel": count("Trials at a time (default 1); the machine's threads are shared among them. Never changes a result."),
        "seed": { "type": "integer", "minimum": 0, "default": 0, "description": "The search's own seed (training keeps the pipeline's)." },
        "objective": {
            "type": "object",
            "additionalProperties": false,
            "description": "What the sweep optimises.",
            "properties": {
                "metric": { "type": "string", "description": "One of the pipeline's evaluate.metrics (default: the first)." },
                "direction": { "enum": ["maximize", "minimize"], "description": "Default: minimize loss and perplexity, maximize the rest." }
            }
        },
        "pruner": {
            "type": "object",
            "additionalProperties": false,
            "description": "Stops poor trials early, deciding after epochs (rungs).",
            "properties": {
                "method": { "enum": ["none", "median", "asha"], "default": "none" },
                "startup": { "type": "integer", "minimum": 0, "description": "median: complete trials before any is stopped (default 5)." },
                "warmup": { "type": "integer", "minimum": 0, "description": "median: epochs never stopped after (default 0)." },
                "min_trials": { "type": "integer", "minimum": 1, "description": "median: complete trials that reached the epoch (default 1)." },
                "min_epochs": { "type": "integer", "minimum": 1, "description": "asha: the first rung (default 1)." },
                "reduction": { "type": "integer", "minimum": 2, "description": "asha: keep the best 1/reduction at each rung (default 4)." }
            }
        },
        "params": {
            "type": "object",
            "minProperties": 1,
            "description": "The searched parameters: keys as `pipe run --set` takes them (\"optimizer.lr\"), each with one space.",
            "additionalProperties": space
        }
    });
    debug_assert!(
        TOP_KEYS.iter().all(|k| properties.get(*k).is_some()),
        "every key a sweep file may have is in its schema"
    );
    let schema = json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "pipe sweep file",
        "type": "object",
        "additionalProperties": false,
        "properties": properties,
    });
    let mut text = serde_json::to_string_pretty(&schema).expect("a JSON value always serializes");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_file_is_fresh() {
        crate::config::schema::assert_checked_in(
            "schemas/sweep.schema.json",
            &schema_json(),
            "PIPE_BLESS=1 cargo test --lib sweep::schema",
        );
    }

    #[test]
    fn the_schema_knows_every_key_and_space_the_loader_takes() {
        let schema: Value = serde_json::from_str(&schema_json()).unwrap();
        for key in TOP_KEYS.iter().chain(["extends"].iter()) {
            assert!(schema["properties"][key].is_object(), "{key}");
        }
        let spaces = &schema["properties"]["params"]["additionalProperties"]["properties"];
        assert_eq!(spaces.as_object().unwrap().keys().collect::<Vec<_>>().len(), SPACES.len());
        for space in SPACES {
            assert!(spaces[space].is_object(), "{space}");
        }
    }
}
