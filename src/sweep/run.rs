//! Running a sweep: each trial is an ordinary pipeline run with the trial's values as `--set`
//! overrides, so trials share every stage their keys share (tokenize, once), a repeated
//! proposal is a cache hit, an interrupted sweep resumes from the store (the interrupted trial
//! from its training checkpoint), and `pipe reproduce` works on any trial's run.
//!
//! This first driver runs trials one after another and does not prune; `parallel > 1` is refused
//! rather than silently serialised. After every trial the sweep record
//! `<store>/sweeps/<id>.toml` is rewritten, so a killed sweep leaves the trials it finished.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;

use super::sampler::Observation;
use super::spec::SweepSpec;
use super::trials::{propose, sweep_id};
use crate::config::{self, ConfigError};
use crate::engine::{self, EngineError};
use crate::stages::Event;
use crate::store::{Store, StoreError};

/// How a trial ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Complete,
    /// The run failed (its error); the sweep goes on without it.
    Failed(String),
}

/// One trial of a sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    pub number: u64,
    /// The trial's values as `--set` arguments.
    pub overrides: Vec<String>,
    pub status: Status,
    /// The run id, when the run completed.
    pub run: Option<String>,
    /// The objective's value, when the run completed.
    pub objective: Option<f64>,
    /// Wall seconds (near zero for a trial found in the store).
    pub seconds: f64,
}

/// A finished sweep.
#[derive(Debug, Clone)]
pub struct SweepOutcome {
    pub id: String,
    pub trials: Vec<Trial>,
    pub record: PathBuf,
}

impl SweepOutcome {
    /// The best completed trial.
    pub fn best(&self, maximize: bool) -> Option<&Trial> {
        let score = |t: &Trial| t.objective.map(|y| if maximize { -y } else { y });
        self.trials
            .iter()
            .filter(|t| score(t).is_some_and(|s| !s.is_nan()))
            .min_by(|a, b| score(a).unwrap().total_cmp(&score(b).unwrap()).then(a.number.cmp(&b.number)))
    }
}

/// Why a sweep could not run.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Bad input: a sweep this version cannot run (`parallel > 1`), an unknown sweep, a damaged
    /// record.
    #[error("{0}")]
    Invalid(String),
    /// A trial was interrupted (Ctrl-C); finished trials are recorded, and running the sweep
    /// again resumes.
    #[error(transparent)]
    Interrupted(Box<EngineError>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no trial of sweep {id} completed (first failure: {first})")]
    NothingCompleted { id: String, first: String },
}

impl SweepError {
    /// 2 for bad input, 130 for an interrupt, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) | Self::Invalid(_) => 2,
            Self::Interrupted(e) => e.exit_code(),
            Self::Store(_) | Self::NothingCompleted { .. } => 1,
        }
    }
}

/// What a running sweep reports.
pub enum SweepEvent<'a> {
    /// Trial `number` of `of` starts with these overrides.
    TrialStarted { number: u64, of: u64, overrides: &'a [String] },
    /// A stage event of the trial's run.
    Stage(Event<'a>),
    /// A trial ended.
    TrialDone { trial: &'a Trial, best: Option<&'a Trial> },
}

/// Runs (or resumes) the sweep `spec` in `store`; `env` are the `PIPE_*` variables every trial's
/// pipeline is loaded with.
pub fn run(
    spec: &SweepSpec,
    store: &Store,
    env: &[(String, String)],
    observe: &mut dyn FnMut(SweepEvent<'_>),
) -> Result<SweepOutcome, SweepError> {
    if spec.parallel > 1 {
        return Err(SweepError::Invalid(format!(
            "{}: parallel = {}: this version of pipe runs one trial at a time (set parallel = 1)",
            spec.path.display(),
            spec.parallel
        )));
    }
    let id = sweep_id(spec);
    let started = Instant::now();
    let mut outcome =
        SweepOutcome { id: id.clone(), trials: Vec::new(), record: store.root().join("sweeps") };
    let mut history: Vec<Observation> = Vec::new();
    for number in 0..spec.n_trials {
        if spec.timeout.is_some_and(|t| started.elapsed().as_secs() >= t) {
            break;
        }
        let Some(values) = propose(spec, &id, number, &history) else { break };
        let overrides = spec.overrides(&values);
        observe(SweepEvent::TrialStarted { number, of: spec.n_trials, overrides: &overrides });
        let trial_start = Instant::now();
        let pipeline = config::load_with_env(&spec.pipeline, &overrides, env)?;
        let result = engine::run(&pipeline, store, &mut |e| observe(SweepEvent::Stage(e)));
        let seconds = trial_start.elapsed().as_secs_f64();
        let trial = match result {
            Ok(run) => {
                let objective = run.metrics.get(&spec.objective.metric).copied();
                Trial { number, overrides, status: Status::Complete, run: Some(run.run), objective, seconds }
            }
            Err(e) if e.exit_code() == 130 => {
                outcome.record = write_record(spec, store, &outcome)?;
                return Err(SweepError::Interrupted(Box::new(e)));
            }
            Err(e) => Trial {
                number,
                overrides,
                status: Status::Failed(e.to_string()),
                run: None,
                objective: None,
                seconds,
            },
        };
        // The samplers minimise; a failed trial tells them nothing.
        let objective = trial.objective.map(|y| if spec.objective.maximize { -y } else { y });
        history.push(Observation { values, objective });
        outcome.trials.push(trial);
        outcome.record = write_record(spec, store, &outcome)?;
        let last = outcome.trials.last().expect("just pushed");
        observe(SweepEvent::TrialDone { trial: last, best: outcome.best(spec.objective.maximize) });
    }
    if outcome.best(spec.objective.maximize).is_none() {
        let first = outcome.trials.iter().find_map(|t| match &t.status {
            Status::Failed(why) => Some(why.clone()),
            Status::Complete => None,
        });
        return Err(SweepError::NothingCompleted {
            id: id[..12].to_string(),
            first: first.unwrap_or_else(|| "no objective value".into()),
        });
    }
    Ok(outcome)
}

/// The sweep record: the spec in short and every trial, as TOML (for git, like run records).
fn write_record(spec: &SweepSpec, store: &Store, outcome: &SweepOutcome) -> Result<PathBuf, StoreError> {
    let trials: Vec<serde_json::Value> = outcome
        .trials
        .iter()
        .map(|t| {
            // No timings: the record is the same bytes whenever the sweep runs again.
            let mut trial = json!({ "number": t.number, "set": t.overrides });
            match &t.status {
                Status::Complete => trial["status"] = json!("complete"),
                Status::Failed(why) => {
                    trial["status"] = json!("failed");
                    trial["error"] = json!(why);
                }
            }
            if let Some(run) = &t.run {
                trial["run"] = json!(run);
            }
            if let Some(y) = t.objective.filter(|y| y.is_finite()) {
                trial["objective"] = json!(y);
            }
            trial
        })
        .collect();
    let doc = json!({
        "sweep": outcome.id[..12],
        "pipeline": spec.pipeline.to_string_lossy(),
        "method": spec.method.name(),
        "seed": spec.seed,
        "n_trials": spec.n_trials,
        "objective": { "metric": spec.objective.metric, "direction": if spec.objective.maximize { "maximize" } else { "minimize" } },
        "params": spec.params.iter().map(|p| p.key.clone()).collect::<Vec<_>>(),
        "trials": trials,
    });
    let table: toml::Table =
        serde_json::from_value(doc).expect("a JSON object without nulls is a TOML table");
    let text = format!(
        "# pipe sweep record: trials of {}\n{}",
        spec.path.display(),
        toml::to_string(&table).expect("TOML")
    );
    store.write_sweep_record(&outcome.id[..12], &text)
}

/// A sweep as its record tells it.
#[derive(Debug, Clone)]
pub struct SweepRecord {
    pub outcome: SweepOutcome,
    pub metric: String,
    pub maximize: bool,
}

/// Reads the record of the sweep named by `sweep`: a sweep file (its id is computed) or an id or
/// unique prefix of one in `<store>/sweeps/`.
pub fn read_record(store: &Store, sweep: &str, env: &[(String, String)]) -> Result<SweepRecord, SweepError> {
    let dir = store.root().join("sweeps");
    let wanted = if std::path::Path::new(sweep).is_file() {
        sweep_id(&SweepSpec::load_with_env(std::path::Path::new(sweep), env)?)[..12].to_string()
    } else {
        sweep.to_string()
    };
    let not_found = || SweepError::Invalid(format!("no sweep `{sweep}` in {}", dir.display()));
    if wanted.is_empty() || !wanted.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(not_found());
    }
    let mut matches: Vec<String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter_map(|name| name.strip_suffix(".toml").map(str::to_owned))
                .filter(|id| id.starts_with(&wanted))
                .collect()
        })
        .unwrap_or_default();
    matches.sort();
    let id = match matches.as_slice() {
        [one] => one.clone(),
        [] => return Err(not_found()),
        many => {
            return Err(SweepError::Invalid(format!("`{sweep}` names several sweeps: {}", many.join(", "))));
        }
    };
    let path = dir.join(format!("{id}.toml"));
    let text =
        std::fs::read_to_string(&path).map_err(|source| StoreError::Io { path: path.clone(), source })?;
    let bad = |why: &str| SweepError::Invalid(format!("{}: not a sweep record ({why})", path.display()));
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| bad(&e.to_string()))?;
    let objective =
        table.get("objective").and_then(toml::Value::as_table).ok_or_else(|| bad("no [objective]"))?;
    let metric = objective.get("metric").and_then(toml::Value::as_str).ok_or_else(|| bad("no metric"))?;
    let maximize = objective.get("direction").and_then(toml::Value::as_str) == Some("maximize");
    let mut trials = Vec::new();
    for t in table.get("trials").and_then(toml::Value::as_array).into_iter().flatten() {
        let number = t
            .get("number")
            .and_then(toml::Value::as_integer)
            .ok_or_else(|| bad("a trial without a number"))?;
        let overrides = t
            .get("set")
            .and_then(toml::Value::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        let status = match t.get("status").and_then(toml::Value::as_str) {
            Some("complete") => Status::Complete,
            _ => Status::Failed(t.get("error").and_then(toml::Value::as_str).unwrap_or("failed").to_owned()),
        };
        let run = t.get("run").and_then(toml::Value::as_str).map(str::to_owned);
        let objective = t.get("objective").and_then(toml::Value::as_float);
        trials.push(Trial { number: number as u64, overrides, status, run, objective, seconds: 0.0 });
    }
    let outcome = SweepOutcome { id, trials, record: path };
    Ok(SweepRecord { outcome, metric: metric.to_owned(), maximize })
}
