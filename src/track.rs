//! `--mlflow URI` (or `MLFLOW_TRACKING_URI`): logging `pipe run` and `pipe sweep` to an MLflow
//! tracking server through [`pipe::mlflow`], with the credentials of MLflow's own variables
//! (`MLFLOW_TRACKING_TOKEN`, or `MLFLOW_TRACKING_USERNAME` and `MLFLOW_TRACKING_PASSWORD`). A run's
//! steps and evaluations are sent while it trains (every few seconds), the rest when it ends. The first failure is one warning and ends the logging
//! for the rest of the command: a tracking server never fails a training run.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pipe::config::Pipeline;
use pipe::engine::{EngineError, RunOutcome};
use pipe::mlflow::{
    Auth, Batch, Metric, Mlflow, MlflowError, MlflowRun, RunStatus, params, record_artifacts, record_batch,
};
use pipe::records::Record;
use pipe::stages::Event;
use pipe::store::Store;
use pipe::sweep::run::{Status, Trial};
use pipe::sweep::spec::SweepSpec;

use crate::Failure;

/// The environment variable MLflow's own clients read.
const TRACKING_URI_ENV: &str = "MLFLOW_TRACKING_URI";

/// How often metrics of a run in progress are sent.
const LIVE_INTERVAL: Duration = Duration::from_secs(5);

/// The server a command logs to, until it fails once.
pub struct Tracker {
    mlflow: Option<Mlflow>,
    /// Metrics of the run in progress not sent yet.
    pending: Vec<Metric>,
    /// `(key, step)` of the metrics sent while it ran, not to be sent again at its end.
    sent: BTreeSet<(String, u64)>,
    last_sent: Option<Instant>,
}

impl Tracker {
    /// The server `flag` names, else `MLFLOW_TRACKING_URI`'s, else none. A flag that is not an
    /// MLflow server's address is bad input (exit 2); the variable, which other tools share (and
    /// may set to a local `mlruns` directory), only warns.
    pub fn new(flag: Option<&str>) -> Result<Self, Failure> {
        let auth = Auth::from_env();
        let mlflow = match (flag, std::env::var(TRACKING_URI_ENV).ok().filter(|v| !v.is_empty())) {
            (Some(uri), _) => {
                Some(Mlflow::new(uri, auth).map_err(|e| Failure { code: 2, message: e.to_string() })?)
            }
            (None, Some(uri)) => match Mlflow::new(&uri, auth) {
                Ok(mlflow) => Some(mlflow),
                Err(e) => {
                    eprintln!("warning: {TRACKING_URI_ENV}: {e}; not logging to MLflow");
                    None
                }
            },
            (None, None) => None,
        };
        Ok(Self { mlflow, pending: Vec::new(), sent: BTreeSet::new(), last_sent: None })
    }

    /// `log(server)`, or nothing once the server failed; a failure warns and ends the logging.
    fn attempt<T>(&mut self, log: impl FnOnce(&Mlflow) -> Result<T, MlflowError>) -> Option<T> {
        let result = log(self.mlflow.as_ref()?);
        match result {
            Ok(value) => Some(value),
            Err(e) => {
                eprintln!("warning: {e}; the run goes on without logging to MLflow");
                self.mlflow = None;
                None
            }
        }
    }

    /// Starts the MLflow run of `pipe run`: named after the pipeline until its run id is known,
    /// with the resolved pipeline as params.
    pub fn start_run(&mut self, pipeline: &Pipeline) -> Option<MlflowRun> {
        let config: toml::Table = toml::from_str(&pipeline.to_toml()).ok()?;
        let batch = Batch { params: params(&config), ..Batch::default() };
        self.attempt(|m| m.start_run(&m.experiment(&pipeline.name)?, &pipeline.name, None, &batch))
    }

    /// Collects the metrics of a training step or evaluation of the run in progress, and sends
    /// them every [`LIVE_INTERVAL`], so that MLflow's charts follow the training.
    pub fn observe(&mut self, run: Option<&MlflowRun>, event: &Event<'_>) {
        let (Some(run), Some(_)) = (run, &self.mlflow) else { return };
        let scalars = match event {
            Event::Step(report) => pipe::train::logged_scalars(&[report.to_json()], &[]),
            Event::Evaluated(evaluation) => pipe::train::logged_scalars(&[], &[evaluation.to_json()]),
            _ => return,
        };
        for line in scalars {
            self.pending.extend(line.values.into_iter().map(|(key, value)| Metric {
                key,
                value,
                step: line.step,
            }));
        }
        if self.last_sent.is_none_or(|at| at.elapsed() >= LIVE_INTERVAL) {
            self.send_pending(run);
        }
    }

    fn send_pending(&mut self, run: &MlflowRun) {
        self.last_sent = Some(Instant::now());
        let batch = Batch { metrics: std::mem::take(&mut self.pending), ..Batch::default() };
        if !batch.metrics.is_empty() && self.attempt(|m| m.log(run, &batch)).is_some() {
            self.sent.extend(batch.metrics.into_iter().map(|m| (m.key, m.step)));
        }
    }

    /// Ends the MLflow run of `pipe run`: on success, the record's tags, metrics and artifacts
    /// (the model too) and the run id as its name; else FAILED (KILLED when interrupted) with
    /// the error as a tag.
    pub fn end_run(
        &mut self,
        run: Option<MlflowRun>,
        store: &Store,
        outcome: &Result<RunOutcome, EngineError>,
    ) {
        let Some(run) = run else { return };
        self.send_pending(&run);
        match outcome {
            Ok(outcome) => {
                let record = Record::read(store, &outcome.run).ok();
                let sent = std::mem::take(&mut self.sent);
                self.attempt(|m| {
                    if let Some(record) = &record {
                        // What was sent while it trained is not sent again (the same numbers).
                        let mut batch = record_batch(store, record)?;
                        batch.metrics.retain(|metric| !sent.contains(&(metric.key.clone(), metric.step)));
                        m.log(&run, &batch)?;
                        if m.upload_all(&run, &record_artifacts(store, record, true))? == 0 {
                            eprintln!(
                                "note: MLflow keeps this run's artifacts at {}, which pipe does not write to (only \
                                 through the server's artifact proxy, `mlflow server`'s default): params and \
                                 metrics are logged, the model and curves are not",
                                run.artifact_uri
                            );
                        }
                    }
                    m.end_run(&run, RunStatus::Finished, Some(&outcome.run))
                });
            }
            Err(error) => {
                let batch =
                    Batch { tags: vec![("pipe.error".into(), error.to_string())], ..Batch::default() };
                let interrupted = error.exit_code() == pipe::interrupt::EXIT_CODE;
                let status = if interrupted { RunStatus::Killed } else { RunStatus::Failed };
                self.attempt(|m| {
                    m.log(&run, &batch)?;
                    m.end_run(&run, status, None)
                });
            }
        }
    }

    /// Starts a sweep's parent run, named after the sweep, with the base pipeline and the
    /// sweep's own settings (`sweep.method`, `sweep.params.<key>`, ...) as params.
    pub fn start_sweep(&mut self, spec: &SweepSpec, id: &str) -> Option<MlflowRun> {
        let mut config: toml::Table = toml::from_str(&spec.base.to_toml()).ok()?;
        if let Some(sweep) = std::fs::read_to_string(&spec.path).ok().and_then(|t| toml::from_str(&t).ok()) {
            config.insert("sweep".into(), toml::Value::Table(sweep));
        }
        let batch = Batch {
            params: params(&config),
            tags: vec![("pipe.sweep_id".into(), id[..12].to_string())],
            ..Batch::default()
        };
        let name = format!("sweep {}", &id[..12]);
        self.attempt(|m| m.start_run(&m.experiment(&spec.base.name)?, &name, None, &batch))
    }

    /// Logs a finished trial as a child run of `parent`: its run's params, metrics and small
    /// artifacts (not the model: a sweep of N trials would upload N models), its number, status
    /// and objective as tags. A failed trial is a FAILED child with its error.
    pub fn trial(&mut self, parent: Option<&MlflowRun>, store: &Store, trial: &Trial) {
        let Some(parent) = parent else { return };
        let mut batch = Batch {
            tags: vec![
                ("pipe.trial".into(), trial.number.to_string()),
                ("pipe.trial.status".into(), trial.status.name().into()),
                ("pipe.trial.overrides".into(), trial.overrides.join(" ")),
            ],
            ..Batch::default()
        };
        let name = format!("trial {}", trial.number);
        let experiment = &parent.experiment_id;
        let record = match (&trial.status, trial.run.as_deref()) {
            (Status::Failed(error), _) => Err(error.clone()),
            (_, run) => run
                .and_then(|id| Record::read(store, id).ok())
                .ok_or_else(|| "the trial's run record is missing".to_string()),
        };
        match record {
            Err(error) => {
                batch.tags.push(("pipe.error".into(), error));
                self.attempt(|m| {
                    let child = m.start_run(experiment, &name, Some(parent), &batch)?;
                    m.end_run(&child, RunStatus::Failed, None)
                });
            }
            Ok(record) => {
                let config =
                    record.table.get("config").and_then(toml::Value::as_table).cloned().unwrap_or_default();
                batch.params = params(&config);
                self.attempt(|m| {
                    let child = m.start_run(experiment, &name, Some(parent), &batch)?;
                    m.log(&child, &record_batch(store, &record)?)?;
                    m.upload_all(&child, &record_artifacts(store, &record, false))?;
                    m.end_run(&child, RunStatus::Finished, None)
                });
            }
        }
    }

    /// Ends a sweep's parent run: the best trial's objective (`best/<metric>`) and run id.
    pub fn end_sweep(&mut self, parent: Option<MlflowRun>, best: Option<(&Trial, &str)>, failed: bool) {
        let Some(parent) = parent else { return };
        let mut batch = Batch::default();
        if let Some((trial, metric)) = best {
            if let Some(value) = trial.objective {
                batch.metrics.push(pipe::mlflow::Metric { key: format!("best/{metric}"), value, step: 0 });
            }
            batch.tags.push(("pipe.sweep.best_trial".into(), trial.number.to_string()));
            batch.tags.extend(trial.run.clone().map(|run| ("pipe.sweep.best_run".to_string(), run)));
        }
        let status = if failed { RunStatus::Failed } else { RunStatus::Finished };
        self.attempt(|m| {
            m.log(&parent, &batch)?;
            m.end_run(&parent, status, None)
        });
    }
}
