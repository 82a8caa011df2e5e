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

/// Every scalar the logs hold, as `tag -> [(step, value)]` with TensorBoard's and MLflow's tags
/// (`train/<field>`, `eval/<field>`).
fn logged_scalars(out: &Path) -> BTreeMap<String, Vec<(u64, f64)>> {
    let mut scalars: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for (prefix, file) in [("train", "train_log.jsonl"), ("eval", "metrics.jsonl")] {
        for line in json_lines(&out.join(file)) {
            let step = line["step"].as_u64().unwrap();
            for (field, value) in line.as_object().unwrap() {
                if let (true, Some(value)) = (field != "step", value.as_f64()) {
                    scalars.entry(format!("{prefix}/{field}")).or_default().push((step, value));
                }
            }
        }
    }
    scalars
}

/// The same with values as f32, which is how an event file keeps them.
fn as_f32(scalars: BTreeMap<String, Vec<(u64, f64)>>) -> BTreeMap<String, Vec<(u64, f32)>> {
    scalars
        .into_iter()
        .map(|(tag, values)| (tag, values.into_iter().map(|(s, v)| (s, v as f32)).collect()))
        .collect()
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
    let seen = as_f32(serde_json::from_str(&read).unwrap());
    let logged = as_f32(logged_scalars(&out));
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

/// The tracking server the tests log to (scripts/mlflow-server.sh), with the Python holding
/// MLflow's client; as [`test_python`], its absence fails under CI and skips visibly elsewhere.
fn mlflow_server() -> Option<(String, std::path::PathBuf)> {
    let python = test_python()?;
    match std::env::var("TEST_MLFLOW_URI") {
        Ok(uri) => Some((uri, python)),
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!(
                "CI runs the MLflow tests, but TEST_MLFLOW_URI is not set (scripts/test.sh starts the server)"
            )
        }
        Err(_) => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: no TEST_MLFLOW_URI (scripts/mlflow-server.sh starts one)"
            );
            None
        }
    }
}

/// Every MLflow run tagged with `tag = value`, read back through MLflow's own client: its info,
/// params, tags, each metric's whole history and its artifact paths (recursively).
fn mlflow_runs(python: &Path, uri: &str, tag: &str, value: &str) -> Vec<serde_json::Value> {
    let read = python_ok(
        python,
        "import json, sys\n\
         from mlflow.tracking import MlflowClient\n\
         client = MlflowClient(sys.argv[1])\n\
         experiments = [e.experiment_id for e in client.search_experiments()]\n\
         runs = client.search_runs(experiments, f\"tags.`{sys.argv[2]}` = '{sys.argv[3]}'\")\n\
         def artifacts(run, path=None):\n\
         \x20   for f in client.list_artifacts(run, path):\n\
         \x20       yield from artifacts(run, f.path) if f.is_dir else [f.path]\n\
         print(json.dumps([{\n\
         \x20   'id': r.info.run_id, 'name': r.info.run_name, 'status': r.info.status,\n\
         \x20   'experiment': client.get_experiment(r.info.experiment_id).name,\n\
         \x20   'params': r.data.params, 'tags': r.data.tags,\n\
         \x20   'metrics': {k: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, k)] for k in r.data.metrics},\n\
         \x20   'artifacts': sorted(artifacts(r.info.run_id)),\n\
         } for r in runs]))",
        &[uri, tag, value],
    );
    serde_json::from_str(&read).unwrap()
}

/// The run record's `[config]` flattened as MLflow params: dotted keys, strings bare.
fn config_params(record: &Path) -> BTreeMap<String, String> {
    fn walk(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
        match value {
            toml::Value::Table(t) => t.iter().for_each(|(k, v)| walk(&format!("{prefix}{k}."), v, out)),
            toml::Value::String(s) => drop(out.insert(prefix.trim_end_matches('.').into(), s.clone())),
            other => drop(out.insert(prefix.trim_end_matches('.').into(), other.to_string())),
        }
    }
    let record: toml::Table = toml::from_str(&std::fs::read_to_string(record).unwrap()).unwrap();
    let mut params = BTreeMap::new();
    walk("", &record["config"], &mut params);
    params
}

#[test]
fn mlflow_sees_the_run_with_its_params_per_step_metrics_tags_and_artifacts() {
    let Some((uri, python)) = mlflow_server() else { return };
    let dir = project();
    let args = ["--set", "train.epochs=2", "--set", "train.max_grad_norm=1.0", "--mlflow", uri.as_str()];
    let run = run_json(dir.path(), &args);
    let runs = mlflow_runs(&python, &uri, "pipe.run_id", &run.run);
    assert_eq!(runs.len(), 1, "{runs:#?}");
    let logged = &runs[0];
    assert_eq!(logged["name"], run.run.as_str());
    assert_eq!(logged["status"], "FINISHED");
    assert_eq!(logged["experiment"], "pipeline", "named after the pipeline");
    let params: BTreeMap<String, String> = serde_json::from_value(logged["params"].clone()).unwrap();
    let record = dir.path().join("runs").join(format!("{}.toml", run.run));
    assert_eq!(params, config_params(&record));
    assert_eq!(params["optimizer.lr"], "0.001");
    for stage in STAGES {
        assert_eq!(logged["tags"][format!("pipe.stage.{stage}")], run.key(stage), "{stage}");
    }
    assert_eq!(logged["tags"]["pipe.environment.stage_versions.train"], "8");
    // Every number the train stage logged, at its step, as TensorBoard sees them; values exact.
    let out = dir.path().join("runs/stages/train").join(run.key("train"));
    let metrics: BTreeMap<String, Vec<(u64, f64)>> =
        serde_json::from_value(logged["metrics"].clone()).unwrap();
    for (tag, values) in logged_scalars(&out) {
        assert_eq!(metrics[&tag], values, "{tag}");
    }
    assert!(metrics["train/loss"].len() > 2 && metrics["eval/accuracy"].len() == 2, "{metrics:?}");
    let last_step = metrics["train/loss"].last().unwrap().0;
    for (metric, value) in &run.metrics {
        assert_eq!(metrics[metric], vec![(last_step, value.as_f64().unwrap())], "{metric}");
    }
    // The server requires its credentials (scripts/mlflow-server.sh): wrong ones are one warning.
    let mut command = pipe_command(dir.path(), &["run", "pipeline.toml", "--mlflow", &uri]);
    let output = command.env("MLFLOW_TRACKING_PASSWORD", "wrong").output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("warning")).collect();
    assert!(warnings.len() == 1 && warnings[0].contains("401"), "{stderr}");
    let artifacts: Vec<String> = serde_json::from_value(logged["artifacts"].clone()).unwrap();
    for artifact in [
        format!("pipe/{}.toml", run.run),
        "train/curves.png".into(),
        "train/model/model.safetensors".into(),
        "train/model/config.json".into(),
        "evaluate/metrics.json".into(),
    ] {
        assert!(artifacts.contains(&artifact), "{artifact} in {artifacts:?}");
    }
}

#[test]
fn with_the_server_down_the_run_succeeds_and_warns_once() {
    let dir = project();
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port())
    };
    let quiet = run_json(dir.path(), &[]);
    for by_env in [false, true] {
        let store = format!("runs-{by_env}");
        let mut command = pipe_command(dir.path(), &["run", "pipeline.toml", "--json", "--store", &store]);
        if by_env {
            command.env("MLFLOW_TRACKING_URI", &closed);
        } else {
            command.args(["--mlflow", &closed]);
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "{}", describe(&["run"], &output));
        let stderr = String::from_utf8_lossy(&output.stderr);
        let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("warning")).collect();
        assert_eq!(warnings.len(), 1, "{stderr}");
        assert!(warnings[0].contains(&closed) && warnings[0].contains("MLflow"), "{stderr}");
        let logged = RunJson::parse(&String::from_utf8_lossy(&output.stdout));
        assert_eq!((logged.run.as_str(), &logged.metrics), (quiet.run.as_str(), &quiet.metrics));
    }
    // A flag that is no server's address is bad input, before anything runs.
    let output = pipe(dir.path(), &["run", "pipeline.toml", "--store", "runs-bad", "--mlflow", "./mlruns"]);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&["run"], &output));
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not an MLflow tracking server"));
    assert!(!dir.path().join("runs-bad").exists());
}

#[test]
fn a_sweep_logs_each_trial_as_a_child_of_its_parent_run() {
    let Some((uri, python)) = mlflow_server() else { return };
    let dir = project();
    std::fs::write(
        dir.path().join("sweep.toml"),
        "pipeline = \"pipeline.toml\"\nmethod = \"grid\"\n\n[params]\n\"optimizer.lr\" = { grid = [1e-3, 3e-3, 1e-2] }\n",
    )
    .unwrap();
    let sweep: serde_json::Value =
        serde_json::from_str(&pipe_ok(dir.path(), &["sweep", "sweep.toml", "--json", "--mlflow", &uri]))
            .unwrap();
    let id = sweep["sweep"].as_str().unwrap();
    let parents = mlflow_runs(&python, &uri, "pipe.sweep_id", id);
    assert_eq!(parents.len(), 1, "{parents:#?}");
    let parent = &parents[0];
    assert_eq!(parent["status"], "FINISHED");
    assert_eq!(parent["params"]["sweep.method"], "grid");
    let best = sweep["trials"].as_array().unwrap().iter().find(|t| t["number"] == sweep["best"]).unwrap();
    let best = best["run"].as_str().unwrap();
    assert_eq!(parent["tags"]["pipe.sweep.best_run"], best);
    let children = mlflow_runs(&python, &uri, "mlflow.parentRunId", parent["id"].as_str().unwrap());
    let mut logged: Vec<(String, String)> = children
        .iter()
        .map(|c| {
            (
                c["tags"]["pipe.run_id"].as_str().unwrap().into(),
                c["params"]["optimizer.lr"].as_str().unwrap().into(),
            )
        })
        .collect();
    logged.sort();
    let mut trials: Vec<(String, String)> = sweep["trials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let run = t["run"].as_str().unwrap().to_string();
            let record = dir.path().join("runs").join(format!("{run}.toml"));
            (run, config_params(&record)["optimizer.lr"].clone())
        })
        .collect();
    trials.sort();
    assert_eq!(logged, trials);
    assert!(children.iter().all(|c| c["metrics"]["train/loss"].as_array().is_some_and(|l| !l.is_empty())));
}
