//! Everything the binary shows: live progress while a pipeline runs, and the text and JSON forms
//! of its results. Progress arrives as [`Event`]s from the engine; nothing in the library prints.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use pipe::engine::{PlannedStage, RunOutcome};
use pipe::records::Record;
use pipe::reproduce::Reproduction;
use pipe::stages::Event;
use pipe::store::{Store, short};
use pipe::sweep::run::{Status, SweepEvent, SweepOutcome, Trial};
use pipe::sweep::sampler::Value;
use pipe::sweep::spec::SweepSpec;

/// Renders engine events: a progress bar on a terminal, occasional plain lines otherwise, and
/// nothing but warnings in `--json` mode.
pub struct Progress {
    terminal: bool,
    quiet: bool,
    bar: Option<ProgressBar>,
    train_started: Option<Instant>,
    last_line: Option<Instant>,
    rows: usize,
    /// When the transfer being shown started.
    transfer_started: Option<Instant>,
}

impl Progress {
    pub fn new(terminal: bool, quiet: bool) -> Self {
        Self {
            terminal,
            quiet,
            bar: None,
            train_started: None,
            last_line: None,
            rows: 0,
            transfer_started: None,
        }
    }

    pub fn event(&mut self, event: Event<'_>) {
        match event {
            Event::Warning(message) => self.line(&format!("warning: {message}"), true),
            Event::Waiting { kind } => {
                self.line(&format!("  {kind:<9} waiting for another run of this stage"), false)
            }
            Event::StageStart { kind, key, cached } => {
                let status = if cached { "cached" } else { "running" };
                self.train_started = Some(Instant::now());
                self.line(&format!("  {kind:<9} {}  {status}", short(key)), false);
            }
            Event::Resumed { kind, step, total } => {
                self.train_started = Some(Instant::now());
                self.line(&format!("  {kind:<9} resuming from checkpoint at step {step}/{total}"), false)
            }
            Event::Step(report) => {
                let started = *self.train_started.get_or_insert_with(Instant::now);
                self.rows += report.rows;
                let rate = self.rows as f64 / started.elapsed().as_secs_f64().max(1e-9);
                let message =
                    format!("epoch {}  loss {:.4}  {:.0} samples/s", report.epoch + 1, report.loss, rate);
                if self.quiet {
                } else if self.terminal {
                    let bar = self.bar.get_or_insert_with(|| {
                        let bar = ProgressBar::new(report.total_steps);
                        bar.set_style(
                            ProgressStyle::with_template(
                                "  train     [{bar:30}] step {pos}/{len}  {msg}  eta {eta}",
                            )
                            .expect("valid template")
                            .progress_chars("=> "),
                        );
                        bar
                    });
                    bar.set_position(report.step);
                    bar.set_message(message);
                } else if report.step == report.total_steps
                    || self.last_line.is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
                {
                    self.last_line = Some(Instant::now());
                    eprintln!("  train     step {}/{}  {message}", report.step, report.total_steps);
                }
            }
            Event::Evaluated(evaluation) => {
                let mut text = format!(
                    "  train     epoch {}  step {}  train loss {:.4}  validation loss {:.4}",
                    (evaluation.epoch * 100.0).round() / 100.0,
                    evaluation.step,
                    evaluation.train_loss,
                    evaluation.validation_loss
                );
                for (metric, value) in &evaluation.metrics {
                    let _ = write!(text, "  {metric} {value:.4}");
                }
                self.line(&text, false);
            }
            Event::StageEnd { kind, seconds, summary } => {
                self.finish();
                self.line(&format!("  {kind:<9} done in {seconds:.1}s  ({summary})"), false);
            }
            Event::Transfer { kind, direction, done, total } => self.transfer(kind, direction, done, total),
        }
    }

    /// Bytes moving to or from the remote: a bar on a terminal, one line when done.
    fn transfer(
        &mut self,
        kind: pipe::plan::StageKind,
        direction: pipe::share::Direction,
        done: u64,
        total: u64,
    ) {
        let started = *self.transfer_started.get_or_insert_with(Instant::now);
        if self.quiet {
        } else if self.terminal && done < total {
            let bar = self.bar.get_or_insert_with(|| {
                let bar = ProgressBar::new(total);
                bar.set_style(
                    ProgressStyle::with_template(
                        "  {msg:<9} [{bar:30}] {bytes}/{total_bytes}  {bytes_per_sec}  eta {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                bar
            });
            bar.set_message(kind.name());
            bar.set_position(done);
        }
        if done >= total {
            self.finish();
            let seconds = started.elapsed().as_secs_f64();
            let rate = total as f64 / seconds.max(1e-9) / 1e6;
            self.line(
                &format!(
                    "  {kind:<9} {} {:.1} MB in {seconds:.2}s ({rate:.0} MB/s)",
                    direction.past(),
                    total as f64 / 1e6
                ),
                false,
            );
            self.transfer_started = None;
        }
    }

    /// Clears a progress bar that is still drawn.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.train_started = None;
        self.rows = 0;
    }

    fn line(&self, text: &str, always: bool) {
        if self.quiet && !always {
            return;
        }
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }
}

/// The `--json` object of `pipe run`.
pub fn run_json(outcome: &RunOutcome) -> String {
    let stages: Vec<_> = outcome
        .stages
        .iter()
        .map(|s| {
            serde_json::json!({
                "name": s.kind.name(),
                "key": s.key,
                "status": if s.pulled { "pulled" } else if s.cached { "cached" } else { "ran" },
                "pushed": s.pushed,
                "seconds": s.seconds,
            })
        })
        .collect();
    let mut json = serde_json::json!({ "run": outcome.run, "stages": stages, "metrics": outcome.metrics, "record": outcome.record });
    if !outcome.test_metrics.is_empty() {
        json["test_metrics"] = serde_json::json!(outcome.test_metrics);
    }
    json.to_string()
}

/// The closing lines of `pipe run`.
pub fn run_summary(outcome: &RunOutcome) -> String {
    let mut out = String::new();
    let mut metrics: Vec<String> = outcome.metrics.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
    metrics.extend(outcome.test_metrics.iter().map(|(k, v)| format!("test {k} {v:.4}")));
    let names = |keep: &dyn Fn(&pipe::engine::StageOutcome) -> bool| -> Vec<&str> {
        outcome.stages.iter().filter(|s| keep(s)).map(|s| s.kind.name()).collect()
    };
    let (ran, pulled, pushed) = (names(&|s| !s.cached), names(&|s| s.pulled), names(&|s| s.pushed));
    let mut done = Vec::new();
    if !ran.is_empty() {
        done.push(format!("ran {}", ran.join(", ")));
    }
    if !pulled.is_empty() {
        done.push(format!("pulled {}", pulled.join(", ")));
    }
    if ran.is_empty() && pulled.is_empty() {
        done.push("all stages cached".into());
    }
    if !pushed.is_empty() {
        done.push(format!("pushed {}", pushed.join(", ")));
    }
    let ran = done.join("; ");
    let _ = writeln!(
        out,
        "run {}  {}  ({ran}; record: {})",
        outcome.run,
        metrics.join("  "),
        outcome.record.display()
    );
    out
}

/// `pipe plan`'s table.
pub fn plan(planned: &[PlannedStage]) -> String {
    let mut out = String::new();
    for stage in planned {
        let key = stage.key.as_deref().map_or("(pending)", short);
        let status = if stage.fresh { "fresh" } else { "dirty" };
        let _ = writeln!(out, "{:<9} {key:<12}  {status}", stage.kind.name());
        for reason in &stage.reasons {
            let _ = writeln!(out, "          - {reason}");
        }
    }
    out
}

/// `pipe show`: a run record for people.
pub fn record(store: &Store, record: &Record) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "run       {}\npipeline  {}\ncreated   {}",
        record.id,
        record.text("pipeline"),
        record.text("created")
    );
    for (k, v) in record.metrics() {
        let _ = writeln!(out, "{k:<9} {v:.4}");
    }
    for (k, v) in record.test_metrics() {
        let _ = writeln!(out, "{:<9} {v:.4}  (held-out test split)", format!("test {k}"));
    }
    for stage in record.stages().iter().filter_map(toml::Value::as_table) {
        let text = |k: &str| stage.get(k).and_then(toml::Value::as_str).unwrap_or("");
        let (name, key) = (text("name"), text("key"));
        let seconds =
            stage.get("facts").and_then(|f| f.get("seconds")).and_then(|s| s.as_float()).unwrap_or(0.0);
        let dir = store.stage_dir(name, key);
        let here = if dir.exists() { dir.display().to_string() } else { "(not in this store)".into() };
        let _ = writeln!(out, "{name:<9} {}  {seconds:>8.1}s  {here}", short(key));
    }
    let early = record.stage("train").and_then(|s| s.get("facts")?.get("early_stopping")?.as_table());
    if let Some(early) = early {
        let number = |k: &str| early.get(k).and_then(|v| v.as_float().or(v.as_integer().map(|i| i as f64)));
        let stopped = match early.get("stopped_early").and_then(toml::Value::as_bool) {
            Some(true) => "stopped early",
            _ => "ran to the end",
        };
        let metric = early.get("metric").and_then(toml::Value::as_str).unwrap_or("metric");
        let best = number("best_value").map_or(String::new(), |v| format!(" {v:.4}"));
        let epoch = number("best_epoch").map_or(f64::NAN, |epoch| (epoch * 100.0).round() / 100.0);
        let _ = writeln!(out, "early     {stopped}; saved epoch {epoch} (best {metric}{best})");
    }
    if let Some(key) = record.stage("train").and_then(|s| s.get("key")).and_then(toml::Value::as_str) {
        let dir = store.stage_dir("train", key);
        for name in [pipe::stages::CURVES_PNG, pipe::stages::CURVES_SVG] {
            let path = dir.join(name);
            if path.is_file() {
                let _ = writeln!(out, "curves    {}", path.display());
            }
        }
    }
    let _ = writeln!(out, "record    {}", store.record_path(&record.id).display());
    out
}

/// `pipe reproduce`'s verdict, stage by stage.
pub fn reproduction(id: &str, r: &Reproduction) -> String {
    let mut out = String::new();
    if !r.changed_inputs.is_empty() {
        let _ = writeln!(out, "inputs differ from the record of {id}; nothing was run:");
        for line in &r.changed_inputs {
            let _ = writeln!(out, "  {line}");
        }
    }
    for stage in &r.stages {
        if stage.differences.is_empty() {
            let _ = writeln!(out, "  {:<9} identical", stage.kind.name());
        } else {
            let _ = writeln!(out, "  {:<9} DIFFERS", stage.kind.name());
            for d in &stage.differences {
                let _ = writeln!(out, "            {d}");
            }
        }
    }
    for line in &r.stored_copies {
        let _ = writeln!(out, "  stored copy: {line}");
    }
    if r.remote_matches > 0 {
        let _ = writeln!(out, "  remote copy: {} stage(s) identical to the record", r.remote_matches);
    }
    if !r.environment.is_empty() {
        let heading = if r.identical() {
            "environment differences (the bits did not depend on them):"
        } else {
            "environment differences (possible explanations):"
        };
        let _ = writeln!(out, "{heading}");
        for line in &r.environment {
            let _ = writeln!(out, "  {line}");
        }
    }
    if r.identical() {
        let _ = writeln!(out, "-> run {id} reproduced bit for bit");
    }
    out
}

/// `pipe verify`: what was checked, what was corrupt, what was cleared.
pub fn verification(store: &pipe::store::Store, v: &pipe::verify::Verification) -> String {
    let mut out = String::new();
    for line in &v.corrupt {
        let _ = writeln!(out, "CORRUPT  {line}");
    }
    for line in &v.cleaned {
        let _ = writeln!(out, "cleared  {line}");
    }
    let _ = writeln!(
        out,
        "{}: {} stage(s) and {} record(s) verified, {} corrupt",
        store.root().display(),
        v.stages_ok,
        v.records_ok,
        v.corrupt.len()
    );
    out
}

/// What `pipe verify` found in the remote.
pub fn remote_verification(
    remote: &pipe::store::Remote,
    v: &pipe::store::remote::RemoteVerification,
) -> String {
    let mut out = String::new();
    for p in &v.problems {
        let _ = writeln!(out, "CORRUPT  remote {}: {}", p.stage, p.problem);
    }
    for blob in &v.repaired {
        let _ = writeln!(out, "repaired remote blob {} from a good local copy", short(blob));
    }
    let _ = writeln!(
        out,
        "{}: {} stage(s) verified, {} problem(s), {} blob(s) repaired",
        remote.url(),
        v.good,
        v.problems.len(),
        v.repaired.len()
    );
    out
}

/// What `pipe push` or `pipe pull` did.
pub fn run_transfer(t: &pipe::share::RunTransfer, json: bool) -> String {
    if json {
        let stages: Vec<_> = t
            .stages
            .iter()
            .map(|(kind, status)| serde_json::json!({"name": kind.name(), "status": status}))
            .collect();
        return format!("{}\n", serde_json::json!({"run": t.run, "record": t.record, "stages": stages}));
    }
    let mut out = String::new();
    for (kind, status) in &t.stages {
        let _ = writeln!(out, "  {:<9} {status}", kind.name());
    }
    let _ = writeln!(out, "run {}  record {}", t.run, t.record);
    out
}

/// What `pipe gc` deleted.
pub fn collection(c: &pipe::gc::Collection, dry_run: bool) -> String {
    let verb = if dry_run { "would delete" } else { "deleted" };
    let mut out = String::new();
    for (kind, key, bytes) in &c.deleted {
        let _ = writeln!(out, "{verb} {kind:<9} {}  {:.1} MB", short(key), *bytes as f64 / 1e6);
    }
    for (kind, key) in &c.locked {
        let _ = writeln!(out, "kept   {kind:<9} {}  (a run holds its lock)", short(key));
    }
    let _ = writeln!(
        out,
        "{verb} {} stage(s), {:.1} MB; kept {}",
        c.deleted.len(),
        c.bytes() as f64 / 1e6,
        c.kept + c.locked.len()
    );
    out
}

/// `pipe ls`: one line per run.
pub fn runs_table(records: &[Record]) -> String {
    let mut names: Vec<String> = Vec::new();
    for r in records {
        for k in r.metrics().into_keys() {
            if !names.contains(&k) {
                names.push(k);
            }
        }
    }
    let mut out = String::new();
    let _ = write!(out, "{:<12}  {:<20}  {:<20}", "run", "pipeline", "created");
    for n in &names {
        let _ = write!(out, "  {n:>9}");
    }
    out.push('\n');
    for r in records {
        let _ = write!(out, "{:<12}  {:<20}  {:<20}", r.id, r.text("pipeline"), r.text("created"));
        let metrics = r.metrics();
        for n in &names {
            let v = metrics.get(n);
            let _ = write!(out, "  {:>9}", v.map_or("-".into(), |v| format!("{v:.4}")));
        }
        out.push('\n');
    }
    out
}

/// A sweep's progress: a line per trial start and end (unless `--json`), the trials' stage events
/// through `progress`.
pub fn sweep_event(progress: &mut Progress, spec: &SweepSpec, event: SweepEvent<'_>, json: bool) {
    match event {
        SweepEvent::TrialStarted { number, of, overrides, stop_after_epoch } if !json => {
            let to = stop_after_epoch.map(|e| format!("  (to epoch {e})")).unwrap_or_default();
            eprintln!("trial {}/{of}  {}{to}", number + 1, overrides.join(" "));
        }
        // Several trials' step progress would interleave: with `parallel > 1`, trial lines (and
        // warnings) only.
        SweepEvent::Stage { event, .. } if spec.parallel == 1 => progress.event(event),
        SweepEvent::Stage { trial, event: Event::Warning(message) } => {
            eprintln!("warning: trial {}: {message}", trial + 1)
        }
        SweepEvent::TrialDone { trial, best } if !json => {
            let metric = &spec.objective.metric;
            let this = match (&trial.status, trial.objective) {
                (Status::Complete, Some(y)) => format!("{metric} {y:.4}"),
                (Status::Pruned { epoch }, Some(y)) => {
                    format!("pruned after epoch {epoch} ({metric} {y:.4})")
                }
                (Status::Complete | Status::Pruned { .. }, None) => format!("no {metric}"),
                (Status::Failed(why), _) => format!("failed: {why}"),
            };
            let best = best
                .and_then(|b| {
                    Some(format!("best so far: trial {} ({metric} {:.4})", b.number + 1, b.objective?))
                })
                .unwrap_or_default();
            eprintln!("trial {}  {this}  {:.1}s  {best}", trial.number + 1, trial.seconds);
        }
        _ => {}
    }
}

/// A sweep's trials, best first by `metric` (larger is better when `maximize`): complete trials,
/// then pruned ones (their values are from earlier epochs), then failed ones.
pub fn sweep_table(metric: &str, maximize: bool, outcome: &SweepOutcome) -> String {
    let mut trials: Vec<&Trial> = outcome.trials.iter().collect();
    let rank = |t: &Trial| match t.status {
        Status::Complete => 0,
        Status::Pruned { .. } => 1,
        Status::Failed(_) => 2,
    };
    let score = |t: &Trial| t.objective.map(|y| if maximize { -y } else { y }).unwrap_or(f64::INFINITY);
    trials.sort_by(|a, b| {
        rank(a).cmp(&rank(b)).then(score(a).total_cmp(&score(b))).then(a.number.cmp(&b.number))
    });
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>5}  {:>10}  {:<10}  {:>6}  {:<12}  set",
        "trial", metric, "status", "epochs", "run"
    );
    for t in trials {
        let objective = t.objective.map_or_else(|| "-".into(), |y| format!("{y:.4}"));
        let run = t.run.as_deref().unwrap_or("-");
        let _ = writeln!(
            out,
            "{:>5}  {objective:>10}  {:<10}  {:>6}  {run:<12}  {}",
            t.number + 1,
            t.status.name(),
            t.epochs,
            t.overrides.join(" ")
        );
    }
    if let Some(best) = outcome.best(maximize) {
        let _ = writeln!(
            out,
            "sweep {}  best: trial {}, run {}  (record: {})",
            short(&outcome.id),
            best.number + 1,
            best.run.as_deref().unwrap_or("-"),
            outcome.record.display()
        );
        // Selected on validation, so its validation value is optimistic; the test split is not.
        if let (Some(y), Some(test)) = (best.objective, best.test.get(metric)) {
            let _ = writeln!(
                out,
                "  validation {metric} {y:.4} (selected on)  test {metric} {test:.4} (held out)"
            );
        }
    }
    let plots = outcome.plots();
    if plots.join("history.png").is_file() {
        let _ = writeln!(out, "plots: {0}/history.png, {0}/parallel.png (and .svg)", plots.display());
    }
    out
}

/// A planned trial as shown: what the record says of it, or what the sweep will try.
struct PlanRow {
    number: u64,
    status: &'static str,
    run: Option<String>,
    /// `None`: TPE chooses it from earlier results.
    set: Option<Vec<String>>,
}

fn plan_rows(spec: &SweepSpec, planned: &[Option<Vec<Value>>], recorded: &[Trial]) -> Vec<PlanRow> {
    let rows =
        planned.iter().enumerate().map(|(k, values)| match recorded.iter().find(|t| t.number == k as u64) {
            Some(t) => PlanRow {
                number: t.number,
                status: t.status.name(),
                run: t.run.clone(),
                set: Some(t.overrides.clone()),
            },
            None => PlanRow {
                number: k as u64,
                status: "to run",
                run: None,
                set: values.as_ref().map(|v| spec.overrides(v)),
            },
        });
    rows.collect()
}

/// `pipe sweep plan`: the trials a sweep will run, and what the store has of them.
pub fn sweep_plan(spec: &SweepSpec, id: &str, planned: &[Option<Vec<Value>>], recorded: &[Trial]) -> String {
    let mut out = String::new();
    let known = planned.iter().filter(|p| p.is_some()).count();
    let pruner = spec.pruner.describe();
    let _ = writeln!(
        out,
        "sweep {}  {}, {} trials ({known} known before it runs), pruner {}",
        short(id),
        spec.method.name(),
        planned.len(),
        pruner["method"].as_str().unwrap_or("none")
    );
    let _ = writeln!(out, "{:>5}  {:<10}  {:<12}  set", "trial", "status", "run");
    for row in plan_rows(spec, planned, recorded) {
        let set = row.set.map_or_else(
            || format!("(chosen by TPE from the results of trials 1-{})", row.number),
            |set| set.join(" "),
        );
        let run = row.run.as_deref().unwrap_or("-");
        let _ = writeln!(out, "{:>5}  {:<10}  {run:<12}  {set}", row.number + 1, row.status);
    }
    out
}

/// `pipe sweep plan --json`.
pub fn sweep_plan_json(
    spec: &SweepSpec,
    id: &str,
    planned: &[Option<Vec<Value>>],
    recorded: &[Trial],
) -> String {
    let trials: Vec<_> = plan_rows(spec, planned, recorded)
        .into_iter()
        .map(|r| serde_json::json!({ "number": r.number, "status": r.status, "run": r.run, "set": r.set }))
        .collect();
    serde_json::json!({ "sweep": short(id), "method": spec.method.name(), "trials": trials }).to_string()
}

/// `pipe sweep --json` and `pipe sweep show --json`.
pub fn sweep_json(metric: &str, maximize: bool, outcome: &SweepOutcome) -> String {
    let trials: Vec<_> = outcome
        .trials
        .iter()
        .map(|t| {
            let mut trial = serde_json::json!({
                "number": t.number,
                "set": t.overrides,
                "status": t.status.name(),
                "epochs": t.epochs,
                "run": t.run,
                "objective": t.objective,
            });
            if let Status::Failed(why) = &t.status {
                trial["error"] = serde_json::json!(why);
            }
            trial
        })
        .collect();
    let best = outcome.best(maximize);
    let mut json = serde_json::json!({
        "sweep": short(&outcome.id),
        "record": outcome.record,
        "metric": metric,
        "best": best.map(|b| b.number),
        "trials": trials,
    });
    if let Some(best) = best.filter(|b| !b.test.is_empty()) {
        json["best_test_metrics"] = serde_json::json!(best.test);
    }
    json.to_string()
}
