//! Training as dashboards see it: the train stage's TensorBoard event file read by TensorBoard's own
//! reader, and a run logged to a real MLflow tracking server read back through MLflow's client.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;

/// The JSON lines of a log file.
fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Every scalar the logs hold, as `tag -> [(step, value)]` with TensorBoard's tags
/// (`train/<field>`, `eval/<field>`); values as f32, which is how an event file keeps them.
fn logged(out: &Path) -> BTreeMap<String, Vec<(u64, f32)>> {
    let mut scalars: BTreeMap<String, Vec<(u64, f32)>> = BTreeMap::new();
    for (prefix, file) in [("train", "train_log.jsonl"), ("eval", "metrics.jsonl")] {
        for line in json_lines(&out.join(file)) {
            let step = line["step"].as_u64().unwrap();
            for (field, value) in line.as_object().unwrap() {
                if let (true, Some(value)) = (field != "step", value.as_f64()) {
                    scalars.entry(format!("{prefix}/{field}")).or_default().push((step, value as f32));
                }
            }
        }
    }
    scalars
}

#[test]
fn tensorboard_reads_every_logged_scalar_from_the_event_file() {
    let Some(python) = test_python() else { return };
    let dir = project();
    let run = run_json(dir.path(), &["--set", "train.epochs=2", "--set", "train.max_grad_norm=1.0"]);
    let out = dir.path().join("runs/stages/train").join(run.key("train"));
    // As `tensorboard --logdir runs/stages/train` finds runs: the multiplexer walks the directory.
    let read = python_ok(
        &python,
        "import json, sys\n\
         from tensorboard.backend.event_processing import event_accumulator as ea\n\
         from tensorboard.backend.event_processing import event_multiplexer as em\n\
         logdir = em.EventMultiplexer(size_guidance={ea.SCALARS: 0})\n\
         logdir.AddRunsFromDirectory(sys.argv[1])\n\
         logdir.Reload()\n\
         (run, tags), = logdir.Runs().items()\n\
         acc = logdir.GetAccumulator(run)\n\
         print(json.dumps({t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags['scalars']}))",
        &[dir.path().join("runs/stages/train").to_str().unwrap()],
    );
    let seen: BTreeMap<String, Vec<(u64, f64)>> = serde_json::from_str(&read).unwrap();
    let seen: BTreeMap<String, Vec<(u64, f32)>> = seen
        .into_iter()
        .map(|(tag, values)| (tag, values.into_iter().map(|(s, v)| (s, v as f32)).collect()))
        .collect();
    let logged = logged(&out);
    for tag in
        ["train/loss", "train/lr", "train/grad_norm", "train/epoch", "eval/validation_loss", "eval/accuracy"]
    {
        assert!(logged.contains_key(tag), "{tag} is logged: {:?}", logged.keys());
    }
    assert_eq!(seen, logged);
    assert!(logged["eval/accuracy"].len() == 2 && logged["train/loss"].len() > 2);
    // The file is a digested output: the same numbers give the same bytes.
    let again = project();
    let rerun = run_json(again.path(), &["--set", "train.epochs=2", "--set", "train.max_grad_norm=1.0"]);
    assert_eq!(
        std::fs::read(out.join("events.out.tfevents.pipe")).unwrap(),
        std::fs::read(
            again.path().join("runs/stages/train").join(rerun.key("train")).join("events.out.tfevents.pipe")
        )
        .unwrap()
    );
}
