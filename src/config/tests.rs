//! Loading, layering and error reporting, end to end through files in temp dirs.

use std::path::{Path, PathBuf};

use super::*;
use crate::optim::ScheduleKind;
use crate::train::ClassWeights;

const MINIMAL: &str = r#"[dataset]
train = "data/train.csv"
validation = "data/validation.csv"

[model]
source = "models/tiny"
"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn sets(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Loads `text` as `p.toml` with the given overrides and environment.
fn load_text(text: &str, overrides: &[&str], vars: &[(&str, &str)]) -> Result<Pipeline, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "p.toml", text);
    load_with_env(&path, &sets(overrides), &env(vars))
}

/// The error message for `text` as `p.toml`; panics if it loads.
fn error_text(text: &str, overrides: &[&str], vars: &[(&str, &str)]) -> String {
    match load_text(text, overrides, vars) {
        Ok(p) => panic!("expected an error, loaded {p:?}"),
        Err(err) => err.to_string(),
    }
}

fn assert_contains(text: &str, wants: &[&str]) {
    for want in wants {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[test]
fn a_minimal_file_gets_the_defaults() {
    let p = load_text(MINIMAL, &[], &[]).unwrap();
    assert_eq!(p.name, "p");
    assert_eq!(p.seed, 42);
    assert_eq!(p.device, "cpu");
    assert_eq!(p.tokenizer.source, "models/tiny");
    assert_eq!(p.tokenizer.max_length, 128);
    assert_eq!(p.model.task, Task::SequenceClassification);
    assert_eq!(p.dataset.text_column, "text");
    assert_eq!(p.dataset.label_column, "label");
    assert_eq!(p.optimizer, OptimizerConfig::default());
    assert_eq!(p.schedule, ScheduleConfig::default());
    assert_eq!(p.train, TrainConfig::default());
    assert_eq!(p.evaluate.metrics, vec![Metric::Accuracy, Metric::F1]);
    assert_eq!(p.evaluate.batch_size, 64);
}

#[test]
fn an_explicit_tokenizer_source_wins_over_the_model_source() {
    let text = format!("{MINIMAL}[tokenizer]\nsource = \"tok\"\n");
    assert_eq!(load_text(&text, &[], &[]).unwrap().tokenizer.source, "tok");
}

#[test]
fn syntax_error_shows_file_line_and_column() {
    let text = format!("{MINIMAL}\n[train]\nepochs = = 3\n");
    let message = error_text(&text, &[], &[]);
    assert_contains(&message, &["p.toml:9:10: invalid TOML", "9 | epochs = = 3", "^"]);
}

#[test]
fn unknown_key_shows_the_line_with_a_caret_and_a_suggestion() {
    let text = format!("{MINIMAL}\n[train]\nepoch = 3\n");
    let message = error_text(&text, &[], &[]);
    assert_contains(
        &message,
        &[
            "p.toml:9:1: unknown key `epoch` in [train]; did you mean `epochs`?\n",
            "\n9 | epoch = 3\n  | ^^^^^\n",
            "help: valid keys in [train]: epochs, batch_size",
        ],
    );
}

#[test]
fn unknown_keys_are_found_at_the_top_level_and_in_every_section() {
    let cases = [
        ("seeed = 1\n", "p.toml:1:1: unknown key `seeed` at the top level; did you mean `seed`?"),
        ("lr = 1e-5\n", "p.toml:1:1: unknown key `lr` at the top level; did you mean `optimizer.lr`?"),
        (
            "[optimizer]\nweight_decai = 0.1\n",
            "p.toml:2:1: unknown key `weight_decai` in [optimizer]; did you mean `weight_decay`?",
        ),
        (
            "[schedule]\nkinds = \"linear\"\n",
            "p.toml:2:1: unknown key `kinds` in [schedule]; did you mean `kind`?",
        ),
        (
            "[evaluate]\nmetric = [\"f1\"]\n",
            "p.toml:2:1: unknown key `metric` in [evaluate]; did you mean `metrics`?",
        ),
        (
            "[tokenizer]\nmax_len = 3\n",
            "p.toml:2:1: unknown key `max_len` in [tokenizer]; did you mean `max_length`?",
        ),
    ];
    for (extra, want) in cases {
        let message = error_text(&format!("{extra}{MINIMAL}"), &[], &[]);
        assert_contains(&message, &[want]);
    }
    let message = error_text(&MINIMAL.replace("validation =", "validaton ="), &[], &[]);
    assert_contains(
        &message,
        &["p.toml:3:1: unknown key `validaton` in [dataset]; did you mean `validation`?"],
    );
}

#[test]
fn wrong_type_points_at_the_value() {
    let text = format!("{MINIMAL}\n[train]\nepochs = \"three\"\n");
    let message = error_text(&text, &[], &[]);
    assert_contains(
        &message,
        &[
            "p.toml:9:10: wrong value for `train.epochs`: invalid type: string \"three\", expected a non-negative integer",
            "9 | epochs = \"three\"\n  |          ^^^^^^^",
        ],
    );
    let message = error_text(&format!("{MINIMAL}[optimizer]\nlr = \"fast\"\n"), &[], &[]);
    assert_contains(&message, &["p.toml:8:6: wrong value for `optimizer.lr`", "expected a number"]);
    let message = error_text(&format!("{MINIMAL}[evaluate]\nmetrics = [\"acc\"]\n"), &[], &[]);
    assert_contains(&message, &["p.toml:8:11:", "unknown variant `acc`", "`accuracy`"]);
}

#[test]
fn invalid_values_point_at_the_value_in_the_file() {
    let cases = [
        ("[optimizer]\nlr = -1e-5\n", "p.toml:8:6: `optimizer.lr` must be a positive number, got -0.00001"),
        ("[train]\nbatch_size = 0\n", "p.toml:8:14: `train.batch_size` must be at least 1, got 0"),
        ("[tokenizer]\nmax_length = 1\n", "p.toml:8:14: `tokenizer.max_length` must be at least 2"),
        ("[model.x]\n", "unknown key `x` in [model]"),
        ("[schedule]\nwarmup_ratio = 1.0\n", "p.toml:8:16: `schedule.warmup_ratio` must be in [0, 1)"),
        (
            "[train]\nepochs = 2\nstop_after_epoch = 3\n",
            "p.toml:9:20: `train.stop_after_epoch` is 3, after the last of `train.epochs` = 2",
        ),
        ("[train]\nstop_after_epoch = 0\n", "p.toml:8:20: `train.stop_after_epoch` must be at least 1"),
        ("[train]\ndtype = \"bf16\"\n", "unknown key `dtype` in [train]"),
    ];
    for (extra, want) in cases {
        let message = error_text(&format!("{MINIMAL}{extra}"), &[], &[]);
        assert_contains(&message, &[want]);
    }
    let message = error_text(&format!("device = \"gpu\"\n{MINIMAL}"), &[], &[]);
    assert_contains(&message, &["p.toml:1:10: invalid device \"gpu\"", "\"cuda:N\""]);
    let message = error_text(&MINIMAL.replace("[model]", "dropout = 0.1\n[model]"), &[], &[]);
    assert_contains(
        &message,
        &["p.toml:5:1: unknown key `dropout` in [dataset]; did you mean `model.dropout`?"],
    );
    let message = error_text(&format!("{MINIMAL}dropout = 1.5\n"), &[], &[]);
    assert_contains(&message, &["p.toml:7:11: `model.dropout` must be in [0, 1), got 1.5"]);
}

#[test]
fn evaluation_early_stopping_and_class_weights_load() {
    let text = format!(
        "{MINIMAL}[train]\neval_every_steps = 50\nclass_weights = \"balanced\"\n\
         [train.early_stopping]\nmetric = \"f1\"\npatience = 2\n"
    );
    let p = load_text(&text, &[], &[]).unwrap();
    assert!(p.train.eval_every_epoch, "evaluating every epoch is the default");
    assert_eq!(p.train.eval_every_steps, Some(50));
    assert_eq!(p.train.class_weights, Some(ClassWeights::Balanced));
    let stopping = p.train.early_stopping.clone().unwrap();
    assert_eq!((stopping.metric, stopping.patience, stopping.min_delta), (Metric::F1, 2, 0.0));
    assert_eq!(load_text(&p.to_toml(), &[], &[]).unwrap(), p, "round trip:\n{}", p.to_toml());

    let overrides = ["train.class_weights=[1, 2.5]", "dataset.drop_duplicates=true"];
    let p = load_text(MINIMAL, &overrides, &[]).unwrap();
    assert_eq!(p.train.class_weights, Some(ClassWeights::Explicit(vec![1.0, 2.5])));
    assert!(p.dataset.drop_duplicates);
    assert!(!load_text(MINIMAL, &[], &[]).unwrap().dataset.drop_duplicates);
}

#[test]
fn early_stopping_and_class_weights_are_checked() {
    let stopping = |extra: &str| format!("{MINIMAL}[train.early_stopping]\n{extra}");
    let message = error_text(&stopping("metric = \"recall\"\n"), &[], &[]);
    assert_contains(
        &message,
        &["p.toml:8:10: `train.early_stopping.metric` is `recall`, which `evaluate.metrics` does not list"],
    );
    let message = error_text(&stopping("patience = 0\n"), &[], &[]);
    assert_contains(&message, &["p.toml:8:12: `train.early_stopping.patience` must be at least 1, got 0"]);
    let message = error_text(&stopping("patiense = 2\n"), &[], &[]);
    assert_contains(
        &message,
        &["unknown key `patiense` in [train.early_stopping]; did you mean `patience`?"],
    );
    let message = error_text(&stopping(""), &["train.eval_every_epoch=false"], &[]);
    assert_contains(&message, &["early stopping needs evaluations during training"]);
    assert!(
        load_text(&stopping(""), &["train.eval_every_epoch=false", "train.eval_every_steps=10"], &[]).is_ok()
    );

    let message = error_text(MINIMAL, &["train.class_weights=\"balance\""], &[]);
    assert_contains(
        &message,
        &[
            "wrong value for `train.class_weights`",
            "expected \"balanced\" or a list of numbers, one per class",
        ],
    );
    let message = error_text(MINIMAL, &["train.class_weights=[1, 0]"], &[]);
    assert_contains(&message, &["each of `train.class_weights` must be positive, got 0"]);
    let message = error_text(MINIMAL, &["train.eval_every_steps=0"], &[]);
    assert_contains(&message, &["`train.eval_every_steps` must be at least 1, got 0"]);
}

#[test]
fn dataset_needs_exactly_one_kind_of_validation_data() {
    let both = MINIMAL.replace("[model]", "validation_split = 0.1\n\n[model]");
    let message = error_text(&both, &[], &[]);
    assert_contains(&message, &["p.toml:5:20: `validation` and `validation_split` are both set", "keep one"]);

    let split_only = MINIMAL.replace("validation = \"data/validation.csv\"", "validation_split = 1.5");
    let message = error_text(&split_only, &[], &[]);
    assert_contains(&message, &["p.toml:3:20: `dataset.validation_split` must be between 0 and 1"]);
    let split_only = split_only.replace("1.5", "0.1");
    assert_eq!(load_text(&split_only, &[], &[]).unwrap().dataset.validation_split, Some(0.1));

    let neither = MINIMAL.replace("validation = \"data/validation.csv\"\n", "");
    let message = error_text(&neither, &[], &[]);
    assert_contains(&message, &["p.toml:1:1: [dataset] needs `validation` or `validation_split`"]);
}

#[test]
fn missing_required_keys_name_the_section() {
    let message = error_text("[dataset]\nvalidation = \"v.csv\"\n[model]\nsource = \"m\"\n", &[], &[]);
    assert_contains(&message, &["p.toml:1:2: missing required key `train` in [dataset]"]);
    let message = error_text("[dataset]\ntrain = \"t.csv\"\nvalidation = \"v.csv\"\n", &[], &[]);
    assert_contains(&message, &["p.toml: missing required section [model]"]);
}

#[test]
fn overrides_name_the_argument() {
    let message = error_text(MINIMAL, &["train.epoch=2"], &[]);
    assert_contains(
        &message,
        &["--set train.epoch=2: unknown key `epoch` in [train]; did you mean `epochs`?"],
    );
    let message = error_text(MINIMAL, &["train.epochs=three"], &[]);
    assert_contains(&message, &["--set train.epochs=three: wrong value for `train.epochs`", "integer"]);
    let message = error_text(MINIMAL, &["optimizer.lr=-3"], &[]);
    assert_contains(&message, &["--set optimizer.lr=-3: `optimizer.lr` must be a positive number"]);
    let message = error_text(MINIMAL, &["train.epochs"], &[]);
    assert_contains(&message, &["--set train.epochs: expected `key=value`"]);
}

#[test]
fn environment_errors_name_the_variable() {
    let message = error_text(MINIMAL, &[], &[("PIPE_TRAIN__EPOCH", "3")]);
    assert_contains(
        &message,
        &["environment variable PIPE_TRAIN__EPOCH=3: unknown key `epoch` in [train]; did you mean `epochs`?"],
    );
    let message = error_text(MINIMAL, &[], &[("PIPE_DEVICE", "tpu")]);
    assert_contains(&message, &["environment variable PIPE_DEVICE=tpu: invalid device \"tpu\""]);
    let message = error_text(MINIMAL, &[], &[("PIPE_TRAIN_EPOCHS", "3")]);
    assert_contains(&message, &["environment variable PIPE_TRAIN_EPOCHS=3: unknown key `train_epochs`"]);
}

#[test]
fn missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_with_env(&dir.path().join("absent.toml"), &[], &[]).unwrap_err();
    assert_contains(&err.to_string(), &["cannot read pipeline file", "absent.toml"]);

    let path = write(dir.path(), "p.toml", &format!("extends = \"nope/base.toml\"\n{MINIMAL}"));
    let message = load_with_env(&path, &[], &[]).unwrap_err().to_string();
    assert_contains(&message, &["p.toml:1:11: cannot read `", "nope/base.toml", "named by `extends`"]);
}

#[test]
fn extends_cycles_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.toml", "extends = \"b.toml\"\n");
    let b = write(dir.path(), "b.toml", "extends = \"a.toml\"\n");
    let message = load_with_env(&b, &[], &[]).unwrap_err().to_string();
    assert_contains(&message, &["a.toml:1:11: `extends` forms a cycle: `", "b.toml` -> `", "a.toml` -> `"]);
}

#[test]
fn layers_apply_in_order_file_env_set() {
    let text = format!("{MINIMAL}[train]\nepochs = 5\nbatch_size = 4\n[optimizer]\nlr = 1e-4\n");
    let p = load_text(&text, &[], &[]).unwrap();
    assert_eq!((p.train.epochs, p.train.batch_size, p.optimizer.lr), (5, 4, 1e-4));

    let vars = [
        ("PIPE_TRAIN__EPOCHS", "6"),
        ("PIPE_OPTIMIZER__LR", "2e-5"),
        ("PIPE_STORE", "/x"),
        ("PIPE_SEED", "7"),
    ];
    let p = load_text(&text, &[], &vars).unwrap();
    assert_eq!((p.train.epochs, p.train.batch_size, p.optimizer.lr, p.seed), (6, 4, 2e-5, 7));

    let overrides = ["train.epochs=7", "optimizer.lr=3e-5", "model.source=models/x", "device=cuda:1"];
    let p = load_text(&text, &overrides, &vars).unwrap();
    assert_eq!((p.train.epochs, p.optimizer.lr, p.seed), (7, 3e-5, 7));
    assert_eq!((p.model.source.as_str(), p.tokenizer.source.as_str()), ("models/x", "models/x"));
    assert_eq!(p.device, "cuda:1");

    // The last --set wins; values can be any TOML, arrays replace arrays.
    let overrides = ["train.epochs=1", "train.epochs=2", "evaluate.metrics=[\"loss\"]"];
    let p = load_text(&text, &overrides, &[]).unwrap();
    assert_eq!((p.train.epochs, p.evaluate.metrics.clone()), (2, vec![Metric::Loss]));
}

#[test]
fn extends_chains_resolve_relative_to_each_file() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "base/base.toml", &format!("seed = 1\n{MINIMAL}[train]\nepochs = 9\nbatch_size = 3\n"));
    write(dir.path(), "mid/mid.toml", "extends = \"../base/base.toml\"\nseed = 2\n[train]\nepochs = 8\n");
    let top = write(dir.path(), "top.toml", "extends = \"mid/mid.toml\"\n[schedule]\nkind = \"cosine\"\n");
    let p = load_with_env(&top, &[], &[]).unwrap();
    assert_eq!(p.name, "top");
    assert_eq!((p.seed, p.train.epochs, p.train.batch_size), (2, 8, 3));
    assert_eq!(p.schedule.kind, ScheduleKind::Cosine);
    assert_eq!(p.dataset.train, PathBuf::from("data/train.csv"));

    // An error in a base file points into the base file.
    write(dir.path(), "base/base.toml", &format!("{MINIMAL}[train]\nbatch_size = -1\n"));
    let message = load_with_env(&top, &[], &[]).unwrap_err().to_string();
    assert_contains(&message, &["base.toml:8:14: wrong value for `train.batch_size`"]);
}

#[test]
fn to_toml_round_trips() {
    let text = format!(
        "name = \"rt\"\nseed = 7\ndevice = \"cuda:0\"\n{MINIMAL}dropout = 0.2\nclassifier_dropout = 0.0\n\
         [tokenizer]\nsource = \"tok\"\nmax_length = 64\n\
         [optimizer]\nlr = 3e-5\nbetas = [0.8, 0.99]\n[schedule]\nkind = \"cosine\"\nwarmup_ratio = 0.1\n\
         [train]\nmax_grad_norm = 1.0\nmax_steps = 10\n[evaluate]\nmetrics = [\"loss\", \"recall\"]\n"
    );
    let p = load_text(&text, &[], &[]).unwrap();
    assert_eq!(p.model.dropout, Some(0.2));
    let resolved = p.to_toml();
    let again = load_text(&resolved, &[], &[]).unwrap();
    assert_eq!(again, p, "resolved TOML:\n{resolved}");
    assert_eq!(again.to_toml(), resolved);
}

#[test]
fn shipped_pipelines_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bert = load_with_env(&root.join("pipelines/bert.toml"), &[], &[]).unwrap();
    assert_eq!(bert.name, "bert");
    assert_eq!((bert.train.epochs, bert.train.batch_size, bert.tokenizer.max_length), (3, 16, 128));
    assert_eq!((bert.optimizer.lr, bert.optimizer.weight_decay), (5e-5, 0.01));
    assert_eq!(bert.schedule.kind, ScheduleKind::Linear);
    assert_eq!(bert.dataset.validation, Some(PathBuf::from("data/sst2/validation.csv")));

    let quick = load_with_env(&root.join("pipelines/quickstart.toml"), &[], &[]).unwrap();
    assert_eq!(quick.name, "quickstart");
    assert_eq!(quick.dataset.train, PathBuf::from("data/sst2/train-4000.csv"));
    assert_eq!((quick.train.epochs, quick.train.batch_size, quick.tokenizer.max_length), (1, 32, 64));
    assert_eq!(quick.model, bert.model);
    assert_eq!(quick.optimizer, bert.optimizer);
}

/// `schemas/pipeline.schema.json` is checked in for editors; it must match the types.
#[test]
fn schema_file_is_fresh() {
    schema::assert_checked_in(
        "schemas/pipeline.schema.json",
        &schema_json(),
        "PIPE_BLESS=1 cargo test --lib config::tests::schema_file_is_fresh",
    );
}

#[test]
fn schema_allows_extends_and_requires_nothing() {
    let schema: serde_json::Value = serde_json::from_str(&schema_json()).unwrap();
    assert!(schema["properties"]["extends"].is_object());
    assert!(schema["properties"]["train"].is_object());
    assert!(!schema_json().contains("\"required\""));
}
