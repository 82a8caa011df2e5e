//! `model.task = "causal-lm"` end to end on a tiny project: the random Llama fixture with the
//! 128-word test tokenizer, SST-2-like rows as prompt/completion pairs (supervised fine-tuning) or
//! as plain text (packed language modelling); generation; reproducibility across thread counts;
//! and the refusals of what does not fit.

mod common;

use std::path::Path;

use pipe::plan::StageKind;

use common::{
    describe, fixture, pipe, pipe_ok, recorded_digest, run_json, run_json_env, tiny_csv, tiny_tokenizer_json,
};

/// The chat template of the tiny project: the user's words between [CLS] and [SEP], then a comma
/// that opens the answer.
const TEMPLATE: &str = "{% for m in messages %}[CLS] {{ m['content'] }} [SEP]{% endfor %}{% if add_generation_prompt %} ,{% endif %}";

const SFT_PIPELINE: &str = r#"
[dataset]
train = "data/train.csv"
validation = "data/validation.csv"
prompt_column = "prompt"
completion_column = "completion"

[tokenizer]
source = "model"
max_length = 24
chat_template = true

[model]
source = "model"
task = "causal-lm"

[optimizer]
lr = 3e-3

[train]
epochs = 3
batch_size = 8
"#;

/// Writes the tiny causal-LM project into `dir` with `pipeline` as `pipeline.toml`.
fn project(dir: &Path, pipeline: &str) {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("decoders/llama").join(file), model.join(file)).unwrap();
    }
    std::fs::write(model.join("tokenizer.json"), tiny_tokenizer_json()).unwrap();
    let config = serde_json::json!({ "eos_token": "[SEP]", "bos_token": "[CLS]", "chat_template": TEMPLATE });
    std::fs::write(model.join("tokenizer_config.json"), config.to_string()).unwrap();
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for (name, rows, seed) in [("train.csv", 64, 1), ("validation.csv", 16, 2)] {
        // tiny_csv's `text,label` rows as `prompt,completion`: the completion is a label word.
        let csv = tiny_csv(rows, seed, true)
            .replacen("text,label", "prompt,completion", 1)
            .replace(",pos\n", ",good\n")
            .replace(",neg\n", ",bad\n");
        std::fs::write(data.join(name), csv).unwrap();
    }
    std::fs::write(dir.join("pipeline.toml"), pipeline).unwrap();
}

#[test]
fn supervised_fine_tuning_learns_generates_and_reproduces_across_thread_counts() {
    let dir = tempfile::tempdir().unwrap();
    project(dir.path(), SFT_PIPELINE);
    let one = run_json_env(dir.path(), &["--store", "one"], &[("RAYON_NUM_THREADS", "1")]);
    let two = run_json_env(dir.path(), &["--store", "two"], &[("RAYON_NUM_THREADS", "2")]);
    assert_eq!(one.run, two.run);
    for stage in ["tokenize", "train", "evaluate"] {
        assert_eq!(
            recorded_digest(&dir.path().join("one"), &one.run, stage),
            recorded_digest(&dir.path().join("two"), &two.run, stage),
            "{stage}: the same bits with 1 and 2 threads"
        );
    }
    let metric =
        |name: &str| one.metrics[name].as_f64().unwrap_or_else(|| panic!("no {name} in {:?}", one.metrics));
    assert!((metric("perplexity") - libm::exp(metric("loss"))).abs() < 1e-9);
    // The completion is one of two label words (then [SEP]): after three epochs the model at
    // least knows the answer's shape, far below the uniform loss over 128 tokens (ln 128 = 4.85).
    assert!(metric("loss") < 2.0, "validation loss {}", metric("loss"));
    assert!((0.0..=1.0).contains(&metric("exact_match")));
    let store = dir.path().join("one");
    let log =
        std::fs::read_to_string(store.join("stages/train").join(one.key("train")).join("metrics.jsonl"))
            .unwrap();
    let losses: Vec<f64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["validation_loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 3, "one evaluation per epoch: {log}");
    assert!(losses[2] < losses[0], "the validation loss falls: {losses:?}");
    // The evaluate stage reads the last evaluation's loss (the saved weights') instead of
    // computing it again: the same number.
    assert_eq!(metric("loss"), losses[2]);
    assert!(store.join("stages/train").join(one.key("train")).join("validation_loss.json").is_file());
    let generations = std::fs::read_to_string(
        store.join("stages/evaluate").join(one.key("evaluate")).join("generations.csv"),
    )
    .unwrap();
    assert_eq!(generations.lines().count(), 17, "a header and the 16 validation rows:\n{generations}");

    // Greedy generation is the same from either store, and what the evaluate stage generated.
    let args = |store: &'static str| {
        ["generate", &one.run[..8], "--prompt", "the film was good w50", "--json", "--store", store]
            .map(String::from)
    };
    let generated: Vec<serde_json::Value> = ["one", "two"]
        .map(|store| {
            let args = args(store);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            serde_json::from_str(&pipe_ok(dir.path(), &args)).unwrap()
        })
        .to_vec();
    assert_eq!(generated[0], generated[1]);
    assert_eq!(
        generated[0]["prompt_ids"].as_array().unwrap().first(),
        Some(&serde_json::json!(2)),
        "[CLS] from the template"
    );
    // Seeded sampling: the same seed gives the same tokens.
    let sample = |seed: &str| {
        pipe_ok(
            dir.path(),
            &[
                "generate",
                &one.run,
                "--prompt",
                "a film",
                "--temperature",
                "1.5",
                "--seed",
                seed,
                "--store",
                "one",
                "--json",
            ],
        )
    };
    assert_eq!(sample("7"), sample("7"));

    // The run reproduces from its record, and a second run is all cached.
    pipe_ok(dir.path(), &["reproduce", &one.run, "--store", "one"]);
    let again = run_json(dir.path(), &["--store", "one"]);
    assert_eq!(again.statuses(), ["cached", "cached", "cached"]);
}

/// The tiny causal-LM pipelines' output digests (supervised fine-tuning through the chat template,
/// and packed plain text), pinned with the stage versions that produced them: see
/// `golden_digests_of_the_tiny_pipeline` in tests/determinism.rs for what to do when they change.
const GOLDEN: [(&str, &str, u32, &str); 4] = [
    ("sft", "train", 8, "f628ffaf12392a6a7dc4cba8f20b91e3f67f0f187db1729f55b1380d79674039"),
    ("sft", "evaluate", 4, "b191d484791a5274db75bb7d971fa7b95f20bf175d9ec58e135acf211c3c8312"),
    ("text", "train", 8, "a93a456bbe6195613b1c29762811cbbee7e9ca2fbd9717ba20ec9d9636a0a020"),
    ("text", "evaluate", 4, "3a22fd92eacd6719fcbff8ebad3f1f66c821c066067021e89b3a057b0f12b68d"),
];

/// [`SFT_PIPELINE`] on a text column: plain language modelling, one epoch.
fn text_pipeline() -> String {
    SFT_PIPELINE
        .replace(
            "prompt_column = \"prompt\"\ncompletion_column = \"completion\"\n",
            "text_column = \"prompt\"\n",
        )
        .replace("chat_template = true\n", "")
        .replace("epochs = 3", "epochs = 1")
}

#[test]
fn golden_digests_of_the_tiny_causal_lm_pipelines() {
    let mut failures = Vec::new();
    for (name, pipeline) in
        [("sft", SFT_PIPELINE.replace("epochs = 3", "epochs = 1")), ("text", text_pipeline())]
    {
        let dir = tempfile::tempdir().unwrap();
        project(dir.path(), &pipeline);
        let run = run_json(dir.path(), &[]);
        for &(_, stage, version, digest) in GOLDEN.iter().filter(|g| g.0 == name) {
            let kind = StageKind::ALL.into_iter().find(|k| k.name() == stage).unwrap();
            let got = recorded_digest(&dir.path().join("runs"), &run.run, stage);
            if got != digest || kind.version() != version {
                failures.push(format!(
                    "{name} {stage}: version {} with digest {got}; pinned: version {version} with digest {digest}",
                    kind.version()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "the tiny causal-LM pipelines' outputs changed:\n  {}\nIf the change is intended, bump the stage \
         version in StageKind::version (src/plan/mod.rs) in the same commit and pin the new pairs in GOLDEN \
         (tests/causal_lm.rs).",
        failures.join("\n  ")
    );
}

#[test]
fn plain_text_is_packed_into_blocks_and_scored_by_perplexity() {
    let dir = tempfile::tempdir().unwrap();
    project(dir.path(), &text_pipeline());
    let run = run_json(dir.path(), &["--set", "evaluate.baseline=true"]);
    let metrics: Vec<&str> = run.metrics.keys().map(String::as_str).collect();
    assert_eq!(metrics, ["loss", "perplexity"], "a text column's default metrics");
    let evaluated = dir.path().join("runs/stages/evaluate").join(run.key("evaluate")).join("metrics.json");
    let evaluated: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(evaluated).unwrap()).unwrap();
    let (before, after) =
        (evaluated["baseline"]["loss"].as_f64().unwrap(), evaluated["loss"].as_f64().unwrap());
    assert!(after < before, "the pretrained model scores {before}, the trained one {after}");
    let data: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            dir.path().join("runs/stages/tokenize").join(run.key("tokenize")).join("data.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let (tokens, sequences) =
        (data["train_tokens"].as_u64().unwrap(), data["train_sequences"].as_u64().unwrap());
    // Documents and their end-of-sequence ids fill blocks of 24, all but the last full.
    assert_eq!(sequences, tokens.div_ceil(24), "{data}");
    assert_eq!(
        data["train_predicted_tokens"].as_u64().unwrap(),
        tokens - sequences,
        "every token but each block's first"
    );
}

#[test]
fn what_does_not_fit_a_causal_lm_is_refused_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    project(dir.path(), SFT_PIPELINE);
    let cases: [(&[&str], &str); 5] = [
        (
            &["--set", "evaluate.metrics=[\"accuracy\"]"],
            "`evaluate.metrics` lists `accuracy`, which does not score a causal language model",
        ),
        (
            &["--set", "dataset.completion_column=prompt"],
            "`prompt_column` and `completion_column` name the same column",
        ),
        (
            &["--set", "train.class_weights=\"balanced\""],
            "`train.class_weights` does not apply to a causal LM",
        ),
        (&["--set", "dataset.completion_column=answer"], "no column `answer`"),
        (
            &["--set", "tokenizer.max_length=4"],
            "leaves no room for its completion within tokenizer.max_length = 4",
        ),
    ];
    for (extra, expect) in cases {
        let mut args = vec!["run", "pipeline.toml"];
        args.extend_from_slice(extra);
        let output = pipe(dir.path(), &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{}", describe(&args, &output));
        assert!(stderr.contains(expect), "expected {expect:?}:\n{stderr}");
    }
    // The too-long prompt names its file and line.
    let output = pipe(dir.path(), &["run", "pipeline.toml", "--set", "tokenizer.max_length=4"]);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("data/train.csv:2:"),
        "{}",
        describe(&[], &output)
    );
    assert!(
        !dir.path().join("runs/stages").exists()
            || std::fs::read_dir(dir.path().join("runs/stages/train")).is_err(),
        "nothing trained"
    );
}

#[test]
fn predict_and_generate_name_the_command_that_fits_the_run() {
    let dir = tempfile::tempdir().unwrap();
    project(dir.path(), &SFT_PIPELINE.replace("epochs = 3", "epochs = 1"));
    let run = run_json(dir.path(), &[]);
    let output = pipe(dir.path(), &["predict", &run.run, "--text", "a good film"]);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&[], &output));
    assert!(String::from_utf8_lossy(&output.stderr).contains("pipe generate"), "{}", describe(&[], &output));
    let long = "film ".repeat(70);
    let output = pipe(dir.path(), &["generate", &run.run, "--prompt", &long]);
    assert_eq!(
        output.status.code(),
        Some(2),
        "longer than the model's positions: {}",
        describe(&[], &output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("and the model's longest input is 64"), "{stderr}");
    let classifier = common::project();
    let run = run_json(classifier.path(), &[]);
    let output = pipe(classifier.path(), &["generate", &run.run, "--prompt", "a good film"]);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&[], &output));
    assert!(String::from_utf8_lossy(&output.stderr).contains("pipe predict"), "{}", describe(&[], &output));
}
