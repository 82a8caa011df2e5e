//! Running a sweep: each trial is an ordinary pipeline run with the trial's values as `--set`
//! overrides, so trials share every stage their keys share (tokenize, once), a repeated
//! proposal is a cache hit, an interrupted sweep resumes from the store (the interrupted trial
//! from its training checkpoint), and `pipe reproduce` works on any trial's run.
//!
//! **Pruning.** A trial that a pruner may stop runs in pieces: to each rung with
//! `train.stop_after_epoch` (an ordinary run, whose objective is the rung's value), then on; the
//! longer run resumes from the shorter one's checkpoint (they share a lineage, see
//! [`Store::begin`]), so a continued trial has the bits of one uninterrupted run. A pruned
//! trial's run is the rung's run: `pipe run` with its `--set`s and its stop epoch.
//!
//! **Determinism.** Trials run as if one after another: trial `k` is proposed from trials
//! `0..k` as they ended, and decided at a rung from them too. `parallel` runs trials at the same
//! time only where that changes nothing: a trial starts early when its proposal does not read
//! the earlier trials' results (grid, random, TPE's random start-up trials), and waits at a rung
//! until the earlier trials have told what the decision reads. So the trial list, every run and
//! the record are the same for any `parallel`, thread count or timing. Each running trial gets
//! its own thread pool (the machine's threads divided among them).
//!
//! After every trial the sweep record `<store>/sweeps/<id>.toml` is rewritten, so a killed sweep
//! leaves the trials it finished.
//!
//! [`Store::begin`]: crate::store::Store::begin

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, mpsc};
use std::time::Instant;

use serde_json::json;

use super::pruner::Seen;
use super::sampler::{Observation, Tpe, Value};
use super::spec::{Method, SweepSpec};
use super::trials::{propose, sweep_id};
use crate::config::ConfigError;
use crate::engine::{self, EngineError, RunOutcome};
use crate::plan::StageKind;
use crate::stages::Event;
use crate::store::{Store, StoreError};

/// How a trial ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Complete,
    /// Stopped by the pruner after this epoch; its run is the one that stops there.
    Pruned {
        epoch: u64,
    },
    /// The run failed (its error); the sweep goes on without it.
    Failed(String),
}

impl Status {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::Pruned { .. } => "pruned",
            Self::Failed(_) => "failed",
        }
    }
}

/// One trial of a sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    pub number: u64,
    /// The trial's values as `--set` arguments.
    pub overrides: Vec<String>,
    pub status: Status,
    /// The run id: the last run of the trial (for a pruned trial, the one that stopped).
    pub run: Option<String>,
    /// The objective's value after the last epoch the trial trained.
    pub objective: Option<f64>,
    /// Epochs trained.
    pub epochs: u64,
    /// The run's metrics on the held-out test split (`dataset.test`): shown for the best trial,
    /// never read by a sampler or pruner.
    pub test: BTreeMap<String, f64>,
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
    /// Where the sweep's plots are (beside its record).
    pub fn plots(&self) -> PathBuf {
        self.record.with_extension("")
    }

    /// The best complete trial (pruned trials stopped early because they were not).
    pub fn best(&self, maximize: bool) -> Option<&Trial> {
        let score = |t: &Trial| t.objective.map(|y| if maximize { -y } else { y });
        self.trials
            .iter()
            .filter(|t| t.status == Status::Complete && score(t).is_some_and(|s| !s.is_nan()))
            .min_by(|a, b| score(a).unwrap().total_cmp(&score(b).unwrap()).then(a.number.cmp(&b.number)))
    }
}

/// Why a sweep could not run.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Bad input: an unknown sweep, a damaged record.
    #[error("{0}")]
    Invalid(String),
    /// A trial was interrupted (Ctrl-C); finished trials are recorded, and running the sweep
    /// again resumes.
    #[error(transparent)]
    Interrupted(Box<EngineError>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Plot(#[from] crate::plot::PlotError),
    #[error(transparent)]
    Remote(#[from] crate::store::RemoteError),
    #[error("cannot start the trials' thread pools: {0}")]
    Threads(String),
    #[error("no trial of sweep {id} completed (first failure: {first})")]
    NothingCompleted { id: String, first: String },
}

impl SweepError {
    /// 2 for bad input, 130 for an interrupt, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) | Self::Invalid(_) => 2,
            Self::Remote(e) => i32::from(e.exit_code()),
            Self::Interrupted(e) => e.exit_code(),
            Self::Store(_) | Self::Plot(_) | Self::Threads(_) | Self::NothingCompleted { .. } => 1,
        }
    }
}

/// What a running sweep reports.
pub enum SweepEvent<'a> {
    /// Trial `number` of `of` starts (or goes on to `stop_after_epoch`) with these overrides.
    TrialStarted { number: u64, of: u64, overrides: &'a [String], stop_after_epoch: Option<u64> },
    /// A stage event of a trial's run.
    Stage { trial: u64, event: Event<'a> },
    /// A trial ended.
    TrialDone { trial: &'a Trial, best: Option<&'a Trial> },
}

/// A trial while the sweep runs.
struct Running {
    values: Vec<Value>,
    overrides: Vec<String>,
    /// `train.epochs` of its pipeline.
    epochs: u64,
    /// Epochs after which the pruner decides, in order.
    rungs: Vec<u64>,
    /// How many rungs are passed (the next run stops at `rungs[passed]`, or at the end).
    passed: usize,
    /// The objective after each epoch it ran to (minimised; NaN where not measured).
    curve: Vec<f64>,
    /// A run of it is under way.
    busy: bool,
    /// It stopped at `rungs[passed]` and waits for the pruner's decision.
    deciding: bool,
    last_run: Option<RunOutcome>,
    seconds: f64,
    ended: Option<Trial>,
}

impl Running {
    /// A new trial with these values, its rungs from its pipeline's epochs.
    fn new(spec: &SweepSpec, values: Vec<Value>, env: &[(String, String)]) -> Result<Self, ConfigError> {
        let overrides = spec.overrides(&values);
        let train = spec.trial_pipeline(&overrides, env)?.train;
        let rungs = spec.pruner.rungs(train.epochs as usize).into_iter().map(|e| e as u64);
        // A trial that already stops early (`train.stop_after_epoch` swept) decides before that.
        let rungs = rungs.filter(|&e| train.stop_after_epoch.is_none_or(|s| e < s)).collect();
        Ok(Self {
            values,
            overrides,
            epochs: train.epochs,
            rungs,
            passed: 0,
            curve: Vec::new(),
            busy: false,
            deciding: false,
            last_run: None,
            seconds: 0.0,
            ended: None,
        })
    }

    /// The epoch the next run stops after (`None`: the end).
    fn next_stop(&self) -> Option<u64> {
        self.rungs.get(self.passed).copied()
    }

    fn overrides_to(&self, stop: Option<u64>) -> Vec<String> {
        let mut overrides = self.overrides.clone();
        overrides.extend(stop.map(|e| format!("train.stop_after_epoch={e}")));
        overrides
    }

    fn end(&mut self, number: u64, status: Status, objective: Option<f64>, epochs: u64) {
        let run = self.last_run.as_ref().map(|r| r.run.clone());
        let test = self.last_run.as_ref().map(|r| r.test_metrics.clone()).unwrap_or_default();
        let overrides = self.overrides.clone();
        self.ended =
            Some(Trial { number, overrides, status, run, objective, epochs, test, seconds: self.seconds });
    }
}

/// The first run of every trial whose values do not depend on results (grid, random, TPE's
/// start-up trials), as the sweep would start it (to its first rung under a pruner): `(trial
/// number, the overrides of its pipeline)`. An executor may run these anywhere ahead of the
/// sweep, which then finds them done in the store.
pub fn first_runs(
    spec: &SweepSpec,
    env: &[(String, String)],
) -> Result<Vec<(u64, Vec<String>)>, ConfigError> {
    let mut runs = Vec::new();
    for (k, values) in super::trials::plan(spec).into_iter().enumerate() {
        let Some(values) = values else { break };
        let trial = Running::new(spec, values, env)?;
        runs.push((k as u64, trial.overrides_to(trial.next_stop())));
    }
    Ok(runs)
}

/// What a worker sends back: a trial's run to a stop epoch, and how it went.
type Report = (usize, usize, Option<u64>, f64, Result<RunOutcome, EngineError>);

/// Runs one run of trial `k`: its pipeline, and the overrides that made it (after the sweep's
/// `--set`s). The local executor is [`engine::run`]; another may run it elsewhere, as long as it
/// returns what `engine::run` returns (the run is then found in the shared store).
pub type TrialRunner<'a> = dyn Fn(
        u64,
        &crate::config::Pipeline,
        &[String],
        crate::stages::Observer<'_>,
    ) -> Result<RunOutcome, EngineError>
    + Sync
    + 'a;

/// Runs (or resumes) the sweep `spec` in `store`; `env` are the `PIPE_*` variables every trial's
/// pipeline is loaded with.
pub fn run(
    spec: &SweepSpec,
    store: &Store,
    env: &[(String, String)],
    observe: &mut (dyn FnMut(SweepEvent<'_>) + Send),
) -> Result<SweepOutcome, SweepError> {
    run_with(spec, store, env, observe, &|_, pipeline, _, observe| engine::run(pipeline, store, observe))
}

/// [`run`], with each trial's runs made by `runner`.
pub fn run_with(
    spec: &SweepSpec,
    store: &Store,
    env: &[(String, String)],
    observe: &mut (dyn FnMut(SweepEvent<'_>) + Send),
    runner: &TrialRunner<'_>,
) -> Result<SweepOutcome, SweepError> {
    let id = sweep_id(spec);
    let started = Instant::now();
    let parallel = spec.parallel as usize;
    // No trial may take every core: the machine's threads are shared out among the slots.
    let threads = (rayon::current_num_threads() / parallel).max(1);
    let pools = (0..parallel)
        .map(|_| rayon::ThreadPoolBuilder::new().num_threads(threads).build())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SweepError::Threads(e.to_string()))?;
    let observe = Mutex::new(observe);
    let emit = |event: SweepEvent<'_>| (observe.lock().unwrap_or_else(|p| p.into_inner()))(event);
    let mut trials: Vec<Running> = Vec::new();
    let mut free: Vec<usize> = (0..parallel).rev().collect();
    let mut interrupted: Option<EngineError> = None;
    let mut record = store.root().join("sweeps");
    let (reports, inbox) = mpsc::channel::<Report>();

    // After a trial ends: the record and plots are rewritten, and the trial reported.
    let publish = |trials: &[Running], k: usize, record: &mut PathBuf| -> Result<(), SweepError> {
        let outcome = outcome_of(&id, trials, record);
        *record = write_record(spec, store, &outcome)?;
        super::plots::draw(spec, &outcome, &outcome.plots())?;
        let ended = trials[k].ended.as_ref().expect("an ended trial");
        emit(SweepEvent::TrialDone { trial: ended, best: outcome.best(spec.objective.maximize) });
        Ok(())
    };
    std::thread::scope(|scope| -> Result<(), SweepError> {
        loop {
            for k in decide(spec, store, &mut trials) {
                publish(&trials, k, &mut record)?;
            }
            if interrupted.is_none() {
                // Start what can start, earliest trial first: continuations, then a new trial.
                while let Some(&slot) = free.last() {
                    let ready = trials.iter().position(|t| t.ended.is_none() && !t.busy && !t.deciding);
                    let k = match ready {
                        Some(k) => k,
                        None => {
                            let k = trials.len();
                            let timed_out = spec.timeout.is_some_and(|t| started.elapsed().as_secs() >= t);
                            if k as u64 >= spec.n_trials || timed_out || !can_propose(spec, &trials) {
                                break;
                            }
                            let history = observations(&trials);
                            let Some(values) = propose(spec, &id, k as u64, &history) else { break };
                            trials.push(Running::new(spec, values, env)?);
                            k
                        }
                    };
                    free.pop();
                    let trial = &mut trials[k];
                    trial.busy = true;
                    let stop = trial.next_stop();
                    let overrides = trial.overrides_to(stop);
                    emit(SweepEvent::TrialStarted {
                        number: k as u64,
                        of: spec.n_trials,
                        overrides: &trial.overrides,
                        stop_after_epoch: stop,
                    });
                    let (pool, reports, emit) = (&pools[slot], reports.clone(), &emit);
                    scope.spawn(move || {
                        std::thread::sleep(crate::fault::trial_delay(k as u64));
                        let begun = Instant::now();
                        let result = pool.install(|| {
                            let pipeline =
                                spec.trial_pipeline(&overrides, env).map_err(EngineError::Config)?;
                            runner(k as u64, &pipeline, &overrides, &mut |event| {
                                emit(SweepEvent::Stage { trial: k as u64, event })
                            })
                        });
                        let _ = reports.send((k, slot, stop, begun.elapsed().as_secs_f64(), result));
                    });
                }
            }
            if free.len() == parallel {
                break; // nothing runs, and nothing more can start
            }
            let (k, slot, stop, seconds, result) = inbox.recv().expect("a worker reports before it ends");
            free.push(slot);
            let trial = &mut trials[k];
            trial.busy = false;
            trial.seconds += seconds;
            let epoch = stop.unwrap_or(trial.epochs);
            match result {
                Ok(run) => {
                    let objective = run.metrics.get(&spec.objective.metric).copied();
                    let minimised =
                        objective.map_or(f64::NAN, |y| if spec.objective.maximize { -y } else { y });
                    trial.curve.resize(epoch as usize, f64::NAN);
                    trial.curve[epoch as usize - 1] = minimised;
                    trial.last_run = Some(run);
                    if stop.is_some() {
                        trial.deciding = true;
                    } else {
                        trial.end(k as u64, Status::Complete, objective, epoch);
                    }
                }
                Err(e) if e.exit_code() == 130 => interrupted = interrupted.take().or(Some(e)),
                Err(e) => trial.end(k as u64, Status::Failed(e.to_string()), None, 0),
            }
            if trials[k].ended.is_some() {
                publish(&trials, k, &mut record)?;
            }
        }
        Ok(())
    })?;
    let outcome = outcome_of(&id, &trials, &record);
    let outcome = SweepOutcome { record: write_record(spec, store, &outcome)?, ..outcome };
    super::plots::draw(spec, &outcome, &outcome.plots())?;
    if let Some(e) = interrupted {
        return Err(SweepError::Interrupted(Box::new(e)));
    }
    if outcome.best(spec.objective.maximize).is_none() {
        let first = outcome.trials.iter().find_map(|t| match &t.status {
            Status::Failed(why) => Some(why.clone()),
            _ => None,
        });
        return Err(SweepError::NothingCompleted {
            id: id[..12].to_string(),
            first: first.unwrap_or_else(|| "no objective value".into()),
        });
    }
    push_record(store, &id, &outcome, &emit)?;
    Ok(outcome)
}

/// Pushes the sweep's record when the store's remote is set to push and no trial failed (a
/// rerun could still change the record; the remote keeps the first one pushed).
fn push_record(
    store: &Store,
    id: &str,
    outcome: &SweepOutcome,
    emit: &dyn Fn(SweepEvent<'_>),
) -> Result<(), SweepError> {
    let Some(remote) = store.remote().filter(|r| r.push()) else { return Ok(()) };
    if outcome.trials.iter().any(|t| matches!(t.status, Status::Failed(_))) {
        return Ok(());
    }
    let text = std::fs::read_to_string(&outcome.record)
        .map_err(|source| StoreError::Io { path: outcome.record.clone(), source })?;
    match remote.push_sweep_record(&id[..12], &text) {
        Ok(_) => Ok(()),
        Err(e) if remote.required() => Err(SweepError::Remote(e)),
        Err(e) => {
            let warning = Event::Warning(format!("{e}; the sweep record stays local only"));
            emit(SweepEvent::Stage { trial: 0, event: warning });
            Ok(())
        }
    }
}

/// Whether the next trial's proposal can be made now: its sampler reads earlier trials'
/// results only once TPE is past its random start-up trials, and then every earlier trial must
/// have ended (as it would have, run one after another).
fn can_propose(spec: &SweepSpec, trials: &[Running]) -> bool {
    let reads_results = spec.method == Method::Tpe && trials.len() >= Tpe::default().startup;
    !reads_results || trials.iter().all(|t| t.ended.is_some())
}

/// The trials as the samplers see them: values, and the objective of those that ended.
fn observations(trials: &[Running]) -> Vec<Observation> {
    trials
        .iter()
        .map(|t| {
            // A pruned trial counts with its value where it stopped; a failed one tells nothing.
            let objective = t.ended.as_ref().and_then(|e| match e.status {
                Status::Failed(_) => None,
                _ => t.curve.last().copied(),
            });
            Observation { values: t.values.clone(), objective }
        })
        .collect()
}

/// Takes the pruner's decision for every trial waiting at a rung whose decision the earlier
/// trials already determine; earliest first, since one decision can settle the next. Returns the
/// trials it pruned.
fn decide(spec: &SweepSpec, store: &Store, trials: &mut [Running]) -> Vec<usize> {
    let mut pruned = Vec::new();
    for k in 0..trials.len() {
        if !trials[k].deciding {
            continue;
        }
        let epoch = trials[k].rungs[trials[k].passed] as usize;
        let (before, rest) = trials.split_at_mut(k);
        let trial = &mut rest[0];
        let settled = before.iter().all(|t| t.ended.is_some() || spec.pruner.decided_by(epoch, &t.curve));
        if !settled {
            continue;
        }
        let seen: Vec<Seen<'_>> = before
            .iter()
            .map(|t| Seen {
                curve: &t.curve,
                complete: t.ended.as_ref().is_some_and(|e| e.status == Status::Complete),
            })
            .collect();
        trial.deciding = false;
        if spec.pruner.stops(&trial.curve, epoch, &seen) {
            let objective =
                trial.last_run.as_ref().and_then(|r| r.metrics.get(&spec.objective.metric).copied());
            trial.end(k as u64, Status::Pruned { epoch: epoch as u64 }, objective, epoch as u64);
            // Its checkpoints would let a longer run resume; no longer run will come.
            if let Some(train) =
                trial.last_run.as_ref().and_then(|r| r.stages.iter().find(|s| s.kind == StageKind::Train))
            {
                // Best effort: a leftover checkpoint costs disk, never a result.
                let _ = store.discard_checkpoints(StageKind::Train.name(), &train.lineage);
            }
            pruned.push(k);
        } else {
            trial.passed += 1;
        }
    }
    pruned
}

/// The sweep so far: its ended trials, in trial order.
fn outcome_of(id: &str, trials: &[Running], record: &std::path::Path) -> SweepOutcome {
    let trials = trials.iter().filter_map(|t| t.ended.clone()).collect();
    SweepOutcome { id: id.to_string(), trials, record: record.to_owned() }
}

/// The sweep record: the spec in short and every trial, as TOML (for git, like run records).
fn write_record(spec: &SweepSpec, store: &Store, outcome: &SweepOutcome) -> Result<PathBuf, StoreError> {
    let trials: Vec<serde_json::Value> = outcome
        .trials
        .iter()
        .map(|t| {
            // No timings: the record is the same bytes whenever the sweep runs again.
            let mut trial =
                json!({ "number": t.number, "set": t.overrides, "status": t.status.name(), "epochs": t.epochs });
            if let Status::Failed(why) = &t.status {
                trial["error"] = json!(why);
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
    let mut doc = json!({
        "sweep": outcome.id[..12],
        "pipeline": spec.pipeline.to_string_lossy(),
        "method": spec.method.name(),
        "seed": spec.seed,
        "n_trials": spec.n_trials,
        "objective": { "metric": spec.objective.metric, "direction": if spec.objective.maximize { "maximize" } else { "minimize" } },
        "pruner": spec.pruner.describe(),
        "params": spec.params.iter().map(|p| p.key.clone()).collect::<Vec<_>>(),
        "trials": trials,
    });
    if !spec.sets.is_empty() {
        doc["pipeline_set"] = json!(spec.sets);
    }
    // The best trial's test metrics, beside its validation objective: the honest estimate of
    // what the selection is worth (no other trial's, so that nobody selects on them).
    if let Some(best) = outcome.best(spec.objective.maximize).filter(|b| !b.test.is_empty()) {
        doc["best"] = json!({ "trial": best.number, "run": best.run, "test_metrics": best.test });
    }
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
        sweep_id(&SweepSpec::load_with_env(std::path::Path::new(sweep), &[], env)?)[..12].to_string()
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
        let epochs = t.get("epochs").and_then(toml::Value::as_integer).unwrap_or(0) as u64;
        let status = match t.get("status").and_then(toml::Value::as_str) {
            Some("complete") => Status::Complete,
            Some("pruned") => Status::Pruned { epoch: epochs },
            _ => Status::Failed(t.get("error").and_then(toml::Value::as_str).unwrap_or("failed").to_owned()),
        };
        let run = t.get("run").and_then(toml::Value::as_str).map(str::to_owned);
        let objective = t.get("objective").and_then(toml::Value::as_float);
        let test = BTreeMap::new();
        trials.push(Trial {
            number: number as u64,
            overrides,
            status,
            run,
            objective,
            epochs,
            test,
            seconds: 0.0,
        });
    }
    let best = table.get("best").and_then(toml::Value::as_table);
    let best_number = best.and_then(|b| b.get("trial")).and_then(toml::Value::as_integer);
    let test = best.and_then(|b| b.get("test_metrics")).and_then(toml::Value::as_table);
    if let (Some(number), Some(test)) = (best_number, test)
        && let Some(trial) = trials.iter_mut().find(|t| t.number as i64 == number)
    {
        trial.test = test.iter().filter_map(|(k, v)| Some((k.clone(), v.as_float()?))).collect();
    }
    let outcome = SweepOutcome { id, trials, record: path };
    Ok(SweepRecord { outcome, metric: metric.to_owned(), maximize })
}
