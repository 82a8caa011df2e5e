//! Runs a pipeline: resolves its inputs into stages, reuses what the store already has, runs the
//! rest in order, and writes the run record.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;

use crate::config::{ConfigError, Pipeline, Task, resolve_source};
use crate::data::Flavor;
use crate::device::Target;
use crate::plan::{KeyFields, StageKind, run_id};
use crate::share;
use crate::stages::{
    EvaluateStage, Event, Input, LmEvaluateStage, LmTokenizeStage, Observer, Stage, StageError,
    TEST_METRICS_FILE, TokenizeStage, TokenizerFile, TrainStage, Upstream, is_gguf,
};
use crate::store::remote::Pushed;
use crate::store::{Begin, Lookup, Store, StoreError, short};

/// Errors from planning or running a pipeline.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An input of the pipeline is missing, unreadable or unsupported (the user's to fix).
    #[error("{0}")]
    Input(String),
    #[error("{kind} stage: {source}")]
    Stage { kind: StageKind, source: StageError },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Remote(#[from] crate::store::RemoteError),
    #[error(transparent)]
    Record(#[from] crate::records::RecordError),
    /// An executor could not run the work elsewhere (a job failed, Slurm refused it).
    #[error(transparent)]
    Executor(Box<crate::executor::slurm::SlurmError>),
    /// Ctrl-C or SIGTERM arrived between stages; the finished stages are kept.
    #[error("interrupted before the {0} stage; finished stages are kept, the next run goes on from there")]
    Interrupted(StageKind),
}

impl From<crate::executor::slurm::SlurmError> for EngineError {
    fn from(e: crate::executor::slurm::SlurmError) -> Self {
        Self::Executor(Box::new(e))
    }
}

impl EngineError {
    /// Exit code for the CLI: 2 for bad configuration or input, 1 for a failure while working.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) | Self::Input(_) => 2,
            Self::Interrupted(_) | Self::Stage { source: StageError::Interrupted { .. }, .. } => {
                crate::interrupt::EXIT_CODE
            }
            Self::Stage { source, .. } if source.is_bad_input() => 2,
            Self::Remote(e) => i32::from(e.exit_code()),
            Self::Record(e) => i32::from(e.exit_code()),
            Self::Executor(e) => i32::from(e.exit_code()),
            _ => 1,
        }
    }
}

/// How one stage fared in a run.
#[derive(Debug, Clone, PartialEq)]
pub struct StageOutcome {
    pub kind: StageKind,
    pub key: String,
    /// The key of the complete computation it is a prefix of (see [`Store::begin`]).
    pub lineage: String,
    /// Reused from the store rather than run (found locally, or pulled).
    pub cached: bool,
    /// Downloaded from the remote (and verified) rather than run.
    pub pulled: bool,
    /// Pushed to the remote by this run (its manifest written by this process).
    pub pushed: bool,
    /// Wall-clock seconds this invocation spent on it.
    pub seconds: f64,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub run: String,
    pub record: PathBuf,
    pub stages: Vec<StageOutcome>,
    pub metrics: BTreeMap<String, f64>,
    /// The same metrics on the held-out test split (`dataset.test`; empty without one).
    pub test_metrics: BTreeMap<String, f64>,
}

/// A stage's state before a run, as `pipe plan` shows it.
#[derive(Debug, Clone)]
pub struct PlannedStage {
    pub kind: StageKind,
    /// Unknown while an upstream stage has yet to run (its outputs are part of the key).
    pub key: Option<String>,
    pub fresh: bool,
    /// Why the stage will run (empty when fresh).
    pub reasons: Vec<String>,
}

/// The stages of `pipeline`, with every input resolved and hashed.
///
/// The device is opened here, so that a pipeline for a GPU this machine lacks (or a build without
/// CUDA) is bad input before anything runs; the resolved device comes back for the run record.
pub(crate) fn build_stages(pipeline: &Pipeline) -> Result<(Vec<Box<dyn Stage>>, Target), EngineError> {
    let target = crate::device::resolve(&pipeline.device).map_err(|e| EngineError::Input(e.to_string()))?;
    let input =
        |path: PathBuf, what: &str| Input::hash(path, what).map_err(|e| EngineError::Input(e.to_string()));
    let d = &pipeline.dataset;
    let train_csv = input(d.train.clone(), "dataset.train")?;
    let validation_csv = d.validation.clone().map(|p| input(p, "dataset.validation")).transpose()?;
    let test_csv = d.test.clone().map(|p| input(p, "dataset.test")).transpose()?;
    let causal_lm = pipeline.model.task == Task::CausalLm;
    // A causal LM's model and tokenizer may come as one GGUF file.
    let tokenizer_source = resolve_source(&pipeline.tokenizer.source)?;
    let tokenizer = match is_gguf(&tokenizer_source) {
        true if causal_lm => input(tokenizer_source.clone(), "tokenizer.source")?,
        true => {
            return Err(EngineError::Input(format!(
                "tokenizer.source {}: a GGUF file's tokenizer is a causal LM's (set `model.task = \"causal-lm\"`)",
                tokenizer_source.display()
            )));
        }
        false => input(tokenizer_source.join("tokenizer.json"), "tokenizer.source")?,
    };
    // A causal LM's end-of-sequence token and chat template come from the files beside
    // `tokenizer.json`: they are inputs too.
    let mut tokenizer_files = BTreeMap::new();
    if causal_lm && !is_gguf(&tokenizer_source) {
        for name in ["tokenizer_config.json", "chat_template.jinja"] {
            let path = tokenizer_source.join(name);
            if path.is_file() {
                tokenizer_files.insert(format!("tokenizer/{name}"), input(path, "tokenizer.source")?.sha256);
            }
        }
    }
    let model_dir = resolve_source(&pipeline.model.source)?;
    let (model_config, model_weights) = match is_gguf(&model_dir) {
        true if causal_lm => {
            let file = input(model_dir.clone(), "model.source")?;
            (file.clone(), file)
        }
        true => {
            return Err(EngineError::Input(format!(
                "model.source {}: a GGUF file holds a causal LM (set `model.task = \"causal-lm\"`)",
                model_dir.display()
            )));
        }
        false => (
            input(model_dir.join("config.json"), "model.source")?,
            input(model_dir.join("model.safetensors"), "model.source")?,
        ),
    };
    let tokenize: Box<dyn Stage> = match causal_lm {
        true => Box::new(LmTokenizeStage {
            dataset: d.clone(),
            max_length: pipeline.tokenizer.max_length,
            chat_template: pipeline.tokenizer.chat_template,
            seed: pipeline.seed,
            train_csv,
            validation_csv,
            test_csv,
            tokenizer: tokenizer.clone(),
            tokenizer_files: tokenizer_files.clone(),
            prepared: None,
        }),
        false => {
            let flavor = Flavor::of_dir(&tokenizer_source).map_err(|e| EngineError::Input(e.to_string()))?;
            Box::new(TokenizeStage::new(
                d.clone(),
                pipeline.tokenizer.max_length,
                pipeline.seed,
                train_csv,
                validation_csv,
                test_csv,
                TokenizerFile { file: tokenizer.clone(), flavor },
            ))
        }
    };
    let evaluate: Box<dyn Stage> = match causal_lm {
        true => Box::new(LmEvaluateStage {
            evaluate: pipeline.evaluate.clone(),
            precision: pipeline.dtype,
            pretrained: pipeline.evaluate.baseline.then(|| (model_dir.clone(), model_weights.clone())),
        }),
        false => Box::new(EvaluateStage { evaluate: pipeline.evaluate.clone(), precision: pipeline.dtype }),
    };
    let stages: Vec<Box<dyn Stage>> = vec![
        tokenize,
        Box::new(TrainStage {
            seed: pipeline.seed,
            target: target.clone(),
            precision: pipeline.dtype,
            model: pipeline.model.clone(),
            optimizer: pipeline.optimizer.clone(),
            schedule: pipeline.schedule.clone(),
            train: pipeline.train.clone(),
            evaluate: pipeline.evaluate.clone(),
            model_dir,
            model_config,
            model_weights,
            tokenizer,
            tokenizer_files,
            max_length: pipeline.tokenizer.max_length,
        }),
        evaluate,
    ];
    Ok((stages, target))
}

/// Why a stage whose key is not in the store will run.
fn dirty_reasons(store: &Store, pipeline: &Pipeline, fields: &KeyFields, lookup: &Lookup) -> Vec<String> {
    if let Lookup::Corrupt(why) = lookup {
        return vec![format!("stored outputs failed verification ({why})")];
    }
    let previous = store
        .read_ref(&pipeline.name, fields.kind.name())
        .and_then(|v| serde_json::from_value::<KeyFields>(v).ok());
    match previous {
        Some(prev) => {
            let changes = fields.changes_from(&prev);
            if changes.is_empty() { vec!["outputs missing from the store".into()] } else { changes }
        }
        None => vec!["never run".into()],
    }
}

/// Each stage's key and whether it is fresh, without running anything.
pub fn plan(pipeline: &Pipeline, store: &Store) -> Result<Vec<PlannedStage>, EngineError> {
    let (stages, _) = build_stages(pipeline)?;
    let mut upstream = Upstream::new();
    let mut blocked_by: Option<StageKind> = None;
    let mut planned = Vec::new();
    for stage in &stages {
        let kind = stage.kind();
        if let Some(up) = blocked_by {
            planned.push(PlannedStage {
                kind,
                key: None,
                fresh: false,
                reasons: vec![format!("runs after {up}, whose outputs are part of its key")],
            });
            continue;
        }
        let fields = stage.key_fields(&upstream);
        let key = fields.key();
        let lookup = store.lookup(kind.name(), &key)?;
        if let Lookup::Hit(out) = lookup {
            upstream.insert(kind, out);
            planned.push(PlannedStage { kind, key: Some(key), fresh: true, reasons: Vec::new() });
        } else {
            let reasons = dirty_reasons(store, pipeline, &fields, &lookup);
            planned.push(PlannedStage { kind, key: Some(key), fresh: false, reasons });
            blocked_by = Some(kind);
        }
    }
    Ok(planned)
}

/// Runs every stage that is not already in the store and writes the run record.
pub fn run(pipeline: &Pipeline, store: &Store, observe: Observer<'_>) -> Result<RunOutcome, EngineError> {
    let Executed { target, outcomes, upstream, inputs } = execute(pipeline, store, None, observe)?;
    let metrics = selected_metrics(pipeline, &upstream, crate::stages::METRICS_FILE)?;
    let test_metrics = if upstream[&StageKind::Evaluate].manifest.files.contains_key(TEST_METRICS_FILE) {
        selected_metrics(pipeline, &upstream, TEST_METRICS_FILE)?
    } else {
        BTreeMap::new()
    };
    let keys: Vec<&str> = outcomes.iter().map(|o| o.key.as_str()).collect();
    let run = run_id(&keys);
    let record = store.record_path(&run);
    if !record.exists() {
        let text = record_toml(pipeline, &target, &run, &upstream, &inputs, &metrics, &test_metrics);
        store.write_record(&run, &text)?;
    }
    share::push_record(store, &run, observe)?;
    Ok(RunOutcome { run, record, stages: outcomes, metrics, test_metrics })
}

/// Runs the stages up to and including `until` (those before it from the store when done), and
/// writes no record: a batch job of an executor runs one stage this way.
pub fn run_until(
    pipeline: &Pipeline,
    store: &Store,
    until: StageKind,
    observe: Observer<'_>,
) -> Result<Vec<StageOutcome>, EngineError> {
    Ok(execute(pipeline, store, Some(until), observe)?.outcomes)
}

/// What [`execute`] leaves for the record.
struct Executed {
    target: Target,
    outcomes: Vec<StageOutcome>,
    upstream: Upstream,
    inputs: BTreeMap<StageKind, BTreeMap<String, String>>,
}

/// Runs (or reuses, or pulls) the stages in order, up to `until` or to the end.
fn execute(
    pipeline: &Pipeline,
    store: &Store,
    until: Option<StageKind>,
    observe: Observer<'_>,
) -> Result<Executed, EngineError> {
    let (mut stages, target) = build_stages(pipeline)?;
    // Every stage that will run is checked before the first one runs, so that bad input (a
    // max_length the model cannot take, say) exits before anything is written.
    let mut probe = Upstream::new();
    let mut checked = vec![false; stages.len()];
    for (i, stage) in stages.iter_mut().enumerate() {
        if checked[..i].iter().any(|&c| c) {
            stage.preflight().map_err(|source| EngineError::Stage { kind: stage.kind(), source })?;
            checked[i] = true;
            continue;
        }
        match store.lookup(stage.kind().name(), &stage.key_fields(&probe).key())? {
            Lookup::Hit(out) => drop(probe.insert(stage.kind(), out)),
            _ => {
                stage.preflight().map_err(|source| EngineError::Stage { kind: stage.kind(), source })?;
                checked[i] = true;
            }
        }
    }
    let mut upstream = Upstream::new();
    let mut outcomes = Vec::new();
    let mut inputs = BTreeMap::new();
    for (stage, checked) in stages.iter_mut().zip(checked) {
        let started = Instant::now();
        let kind = stage.kind();
        // Only the train stage checks for Ctrl-C inside (at step boundaries); the others are short,
        // so a stop request is honoured between stages.
        if crate::interrupt::requested() {
            return Err(EngineError::Interrupted(kind));
        }
        let fields = stage.key_fields(&upstream);
        let key = fields.key();
        let lineage = stage.lineage(&upstream);
        let stage_err = |source| EngineError::Stage { kind, source };
        // A stage the probe above found done is not hashed a second time.
        let mut pulled = false;
        let found = match probe.remove(&kind).filter(|out| out.manifest.key == key) {
            Some(out) => Lookup::Hit(out),
            None => store.lookup(kind.name(), &key)?,
        };
        let (output, cached) = match found {
            Lookup::Hit(out) => (out, true),
            lookup => {
                if let Lookup::Corrupt(why) = &lookup {
                    observe(Event::Warning(format!(
                        "{kind} {}: stored outputs failed verification ({why}); running it again",
                        short(&key)
                    )));
                }
                // Found done above but not now (removed meanwhile): check it before it runs.
                if !checked {
                    stage.preflight().map_err(stage_err)?;
                }
                match store.begin(kind.name(), &key, &lineage, || observe(Event::Waiting { kind }))? {
                    Begin::Done(out) => (out, true),
                    Begin::Work(work) => match share::pull_stage(store, kind, work, observe)? {
                        share::Pulled::Done(out) => {
                            pulled = true;
                            (out, true)
                        }
                        share::Pulled::Compute(work) => {
                            observe(Event::StageStart { kind, key: &key, cached: false });
                            let facts = stage.run(&work, &upstream, observe).map_err(stage_err)?;
                            (work.commit(facts)?, false)
                        }
                    },
                }
            }
        };
        // A pulled stage was shown by its transfer.
        if cached && !pulled {
            observe(Event::StageStart { kind, key: &key, cached: true });
        }
        let pushed = match pulled {
            true => false,
            false => share::push_stage(store, kind, &output, observe)? == Some(Pushed::Written),
        };
        store.write_ref(
            &pipeline.name,
            kind.name(),
            &serde_json::to_value(&fields).expect("key fields serialise"),
        )?;
        let seconds = started.elapsed().as_secs_f64();
        if !cached {
            observe(Event::StageEnd { kind, seconds, summary: summarize(kind, &output) });
        }
        outcomes.push(StageOutcome { kind, key, lineage, cached, pulled, pushed, seconds });
        upstream.insert(kind, output);
        inputs.insert(kind, fields.inputs);
        if until == Some(kind) {
            break;
        }
    }
    Ok(Executed { target, outcomes, upstream, inputs })
}

/// One line about a finished stage, from its outputs.
fn summarize(kind: StageKind, output: &crate::store::StageOutput) -> String {
    let facts = &output.manifest.facts;
    match kind {
        StageKind::Train => {
            let mut line = format!(
                "{:.0} samples/s, final loss {:.4}",
                facts["samples_per_second"].as_f64().unwrap_or(0.0),
                facts["final_loss"].as_f64().unwrap_or(f64::NAN)
            );
            let early = &facts["early_stopping"];
            if let Some(best) = early["best_epoch"].as_f64().map(|epoch| (epoch * 100.0).round() / 100.0) {
                let stopped =
                    if early["stopped_early"].as_bool() == Some(true) { "stopped early; " } else { "" };
                let metric = early["metric"].as_str().unwrap_or("metric");
                line.push_str(&format!(", {stopped}saved epoch {best} (best {metric})"));
            }
            line
        }
        _ => format!("{} files", output.manifest.files.len()),
    }
}

/// The metrics the pipeline asked for, from the evaluate stage's report `file`.
fn selected_metrics(
    pipeline: &Pipeline,
    upstream: &Upstream,
    file: &str,
) -> Result<BTreeMap<String, f64>, EngineError> {
    let out = &upstream[&StageKind::Evaluate];
    let path = out.file(file);
    let text =
        std::fs::read_to_string(&path).map_err(|source| StoreError::Io { path: path.clone(), source })?;
    let invalid = |e: serde_json::Error| EngineError::Stage {
        kind: StageKind::Evaluate,
        source: StageError::Invalid(format!("{}: {e}", path.display())),
    };
    let metrics = pipeline.evaluate.metrics.iter();
    Ok(match pipeline.model.task {
        Task::SequenceClassification => {
            let report: crate::evaluate::ClassificationReport =
                serde_json::from_str(&text).map_err(invalid)?;
            metrics.filter_map(|m| Some((m.name().to_string(), report.metric(*m)?))).collect()
        }
        // A causal LM's report is one object of numbers by metric name.
        Task::CausalLm => {
            let report: serde_json::Value = serde_json::from_str(&text).map_err(invalid)?;
            metrics.filter_map(|m| Some((m.name().to_string(), report.get(m.name())?.as_f64()?))).collect()
        }
    })
}

/// The run record: small, deterministic apart from `created` and timings, meant for git.
fn record_toml(
    pipeline: &Pipeline,
    target: &Target,
    run: &str,
    upstream: &Upstream,
    inputs: &BTreeMap<StageKind, BTreeMap<String, String>>,
    metrics: &BTreeMap<String, f64>,
    test_metrics: &BTreeMap<String, f64>,
) -> String {
    let stages: Vec<serde_json::Value> = StageKind::ALL
        .iter()
        .map(|kind| {
            let out = &upstream[kind];
            let files: BTreeMap<&String, &String> =
                out.manifest.files.iter().map(|(p, e)| (p, &e.sha256)).collect();
            json!({
                "name": kind.name(),
                "key": out.manifest.key,
                "digest": out.manifest.digest,
                "inputs": inputs[kind],
                "facts": out.manifest.facts,
                "files": files,
            })
        })
        .collect();
    let config: toml::Table = toml::from_str(&pipeline.to_toml()).expect("a resolved pipeline is valid TOML");
    let mut doc = json!({
        "run": run,
        "pipeline": pipeline.name,
        "created": now_rfc3339(),
        "metrics": metrics,
        "environment": crate::environment::current(target, pipeline.dtype),
        "stages": stages,
    });
    if !test_metrics.is_empty() {
        doc["test_metrics"] = json!(test_metrics);
    }
    // TOML has no null: a fact without a value (a metric that was NaN, say) is left out.
    let mut table: toml::Table =
        serde_json::from_value(without_nulls(doc)).expect("a JSON object without nulls is a TOML table");
    table.insert("config".into(), toml::Value::Table(config));
    // The checksum goes right after `created`, with the record's other plain fields.
    let sum = crate::records::checksum(&table);
    let mut with_sum = toml::Table::new();
    for (key, value) in table {
        let after_created = key == "created";
        with_sum.insert(key, value);
        if after_created {
            with_sum.insert("checksum".into(), toml::Value::String(sum.clone()));
        }
    }
    let table = with_sum;
    format!(
        "# pipe run record: `pipe show {run}`, `pipe reproduce {run}`.\n{}",
        toml::to_string(&table).expect("tables serialise")
    )
}

/// `value` with every null object entry and array item removed.
fn without_nulls(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k, without_nulls(v))).collect(),
        ),
        Value::Array(items) => {
            Value::Array(items.into_iter().filter(|v| !v.is_null()).map(without_nulls).collect())
        }
        other => other,
    }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
fn now_rfc3339() -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}
