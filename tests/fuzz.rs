//! Property tests over the parsers and the key derivation: arbitrary pipeline files and `--set`
//! strings never panic and every error says where; arbitrary CSV bytes never panic and every error
//! names the file; equal key fields give equal keys and any change to a keyed field changes the key.

use std::collections::BTreeMap;

use pipe::config::{ConfigError, Origin};
use pipe::plan::{KeyFields, StageKind};
use proptest::prelude::*;
use serde_json::{Value, json};

const CASES: u32 = 3000;

/// Keys and sections a pipeline file really has (so generated files often get deep into
/// validation), mixed with near misses.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("seed"),
        Just("name"),
        Just("device"),
        Just("extends"),
        Just("train"),
        Just("source"),
        Just("validation"),
        Just("validation_split"),
        Just("text_column"),
        Just("label_column"),
        Just("max_length"),
        Just("lr"),
        Just("weight_decay"),
        Just("betas"),
        Just("epochs"),
        Just("batch_size"),
        Just("metrics"),
        Just("kind"),
        Just("warmup_ratio"),
        Just("dropout"),
        Just("epoch"),
        Just("max_steps"),
        Just("class_weights"),
        Just("patience"),
    ]
    .prop_map(str::to_owned)
}

fn section() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("dataset"),
        Just("tokenizer"),
        Just("model"),
        Just("optimizer"),
        Just("schedule"),
        Just("train"),
        Just("evaluate"),
        Just("train.early_stopping"),
        Just("trian"),
    ]
    .prop_map(str::to_owned)
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| format!("{v:?}")),
        Just("nan".to_owned()),
        Just("-inf".to_owned()),
        any::<bool>().prop_map(|v| v.to_string()),
        "[\\PC]{0,12}".prop_map(|s| format!("{s:?}")),
        Just("\"data/train.csv\"".to_owned()),
        Just("[\"accuracy\", \"f1\"]".to_owned()),
        Just("[0.9, 0.999]".to_owned()),
        Just("{ metric = \"loss\" }".to_owned()),
        "[\\PC]{0,8}",
    ]
}

fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (key(), value()).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => section().prop_map(|s| format!("[{s}]")),
        1 => "\\PC{0,30}",
    ]
}

/// Whether a configuration error says where it comes from.
fn has_position(e: &ConfigError) -> bool {
    match e {
        ConfigError::Invalid { origin: Origin::File { snippet, .. }, message, .. } => {
            // Keys that are missing altogether have no text to point at; the message names them.
            snippet.is_some() || message.contains("needs") || message.contains("missing")
        }
        ConfigError::Invalid { .. } => true, // an environment variable or a --set argument
        ConfigError::Read { .. } | ConfigError::SourceNotFound { .. } => true,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn pipeline_files_and_overrides_never_panic_and_errors_have_positions(
        lines in proptest::collection::vec(line(), 0..14),
        overrides in proptest::collection::vec(
            prop_oneof![(key(), value()).prop_map(|(k, v)| format!("train.{k}={v}")), "\\PC{0,20}"], 0..3),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, lines.join("\n")).unwrap();
        let result = std::panic::catch_unwind(|| pipe::config::load_with_env(&path, &overrides, &[]));
        let result = result.map_err(|_| TestCaseError::fail(format!("panicked on:\n{}\n--set {overrides:?}", lines.join("\n"))))?;
        if let Err(e) = result {
            prop_assert!(!e.to_string().is_empty());
            prop_assert!(has_position(&e), "no position in `{e}` for:\n{}", lines.join("\n"));
        }
    }

    #[test]
    fn csv_bytes_never_panic_and_errors_name_the_file(
        body in proptest::collection::vec(
            prop_oneof![
                6 => proptest::sample::select(b"ab ,\"\n\r".to_vec()),
                1 => any::<u8>(),
            ],
            0..400),
        header in prop_oneof![Just(b"text,label\n".to_vec()), Just(b"\xef\xbb\xbftext,label\r\n".to_vec()), Just(Vec::new())],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.csv");
        std::fs::write(&path, [header, body].concat()).unwrap();
        let result = std::panic::catch_unwind(|| pipe::data::read_labeled(&path, None, "text", "label"));
        let result = result.map_err(|_| TestCaseError::fail("read_labeled panicked"))?;
        if let Err(e) = result {
            prop_assert!(e.to_string().contains("data.csv"), "{e}");
        }
    }

    #[test]
    fn keys_are_a_function_of_the_keyed_fields_only(
        params in proptest::collection::btree_map("[a-z]{1,6}", prop_oneof![
            any::<i64>().prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
            "\\PC{0,8}".prop_map(Value::from),
            (-1e9f64..1e9).prop_map(Value::from),
        ], 1..8),
        inputs in proptest::collection::btree_map("[a-z.]{1,10}", "[0-9a-f]{64}", 0..4),
        pick in any::<prop::sample::Index>(),
    ) {
        let fields = |params: &BTreeMap<String, Value>| KeyFields {
            kind: StageKind::Train,
            version: 4,
            params: json!({ "train": params }),
            inputs: inputs.clone(),
        };
        let key = fields(&params).key();
        // Equal values, built in another insertion order, give the same key.
        let reversed: serde_json::Map<String, Value> = params.iter().rev().map(|(k, v)| (k.clone(), v.clone())).collect();
        let other = KeyFields { params: json!({ "train": reversed }), ..fields(&params) };
        prop_assert_eq!(&key, &other.key());
        // Any change to one keyed value changes the key.
        let name = pick.get(&params.keys().cloned().collect::<Vec<_>>()).clone();
        let mut changed = params.clone();
        let old = changed[&name].clone();
        changed.insert(name, json!({ "was": old }));
        prop_assert_ne!(&key, &fields(&changed).key());
        // So do the version and an input digest.
        prop_assert_ne!(&key, &KeyFields { version: 5, ..fields(&params) }.key());
        let mut other_inputs = inputs.clone();
        other_inputs.insert("another.input".into(), "0".repeat(64));
        prop_assert_ne!(&key, &KeyFields { inputs: other_inputs, ..fields(&params) }.key());
    }
}
