//! The `pipe` binary: parses the command line, calls the library, renders progress and results,
//! and maps errors to exit codes (0 ok, 1 a stage failed, 2 bad configuration, input or usage).

mod cli;
mod cluster;
mod render;
mod track;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use pipe::config::{self, ConfigError};
use pipe::engine::{self, EngineError};
use pipe::predict::{Generator, PredictError, Predictor};
use pipe::records::{self, Record, RecordError};
use pipe::reproduce;
use pipe::store::remote::RemoteOptions;
use pipe::store::{Remote, RemoteError, Store, StoreError, short};

use cli::{Cli, Command, StoreArgs, SweepAction};

/// The store the arguments name, with its remote when one is given (checked to answer).
fn open(args: &StoreArgs) -> Result<Store, Failure> {
    let store = Store::new(&args.store);
    Ok(match args.remote.as_deref().filter(|url| !url.is_empty()) {
        Some(url) => {
            let options = RemoteOptions { push: args.push, required: args.remote_required };
            store.with_remote(Remote::open(url, options)?)
        }
        None => store,
    })
}

/// With a remote, makes sure the run's trained model is in the local store (pulling it when not).
fn pull_model(store: &Store, record: &Record) -> Result<(), Failure> {
    if store.remote().is_some() {
        let mut renderer = render::Progress::new(std::io::stderr().is_terminal(), false);
        let pulled = pipe::share::pull_stages(store, record, &[pipe::plan::StageKind::Train], &mut |e| {
            renderer.event(e)
        });
        renderer.finish();
        pulled?;
    }
    Ok(())
}

/// The end of `pipe push` or `pipe pull`: progress cleared, then the report.
fn report_transfer(
    mut renderer: render::Progress,
    result: Result<pipe::share::RunTransfer, EngineError>,
    json: bool,
) -> Result<(), Failure> {
    renderer.finish();
    print!("{}", render::run_transfer(&result?, json));
    Ok(())
}

/// The stage named `name`.
fn stage_named(name: &str) -> Option<pipe::plan::StageKind> {
    pipe::plan::StageKind::ALL.into_iter().find(|k| k.name() == name)
}

/// The local store the arguments name, for commands that never touch the remote.
fn local(args: &StoreArgs) -> Store {
    Store::new(&args.store)
}

/// A failure, with the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

impl From<EngineError> for Failure {
    fn from(e: EngineError) -> Self {
        Self { code: e.exit_code() as u8, message: e.to_string() }
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Self { code: 2, message: e.to_string() }
    }
}

impl From<RecordError> for Failure {
    fn from(e: RecordError) -> Self {
        Self { code: e.exit_code(), message: e.to_string() }
    }
}

impl From<PredictError> for Failure {
    fn from(e: PredictError) -> Self {
        Self { code: e.exit_code(), message: e.to_string() }
    }
}

impl From<RemoteError> for Failure {
    fn from(e: RemoteError) -> Self {
        Self { code: e.exit_code(), message: e.to_string() }
    }
}

impl From<pipe::executor::slurm::SlurmError> for Failure {
    fn from(e: pipe::executor::slurm::SlurmError) -> Self {
        Self { code: e.exit_code(), message: e.to_string() }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Self { code: 1, message: e.to_string() }
    }
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any other thread exists.
    if let Err(e) = unsafe { pipe::runtime::configure() } {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    if let Err(e) = pipe::interrupt::install() {
        eprintln!("warning: cannot handle Ctrl-C gracefully: {e}");
    }
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn dispatch(command: Command) -> Result<(), Failure> {
    match command {
        Command::Run { pipeline, store: store_args, json, executor, mlflow, until } => {
            let p = config::load(&pipeline.file, &pipeline.overrides)?;
            let mut tracker = track::Tracker::new(mlflow.as_deref())?;
            let store = open(&store_args)?;
            if let Some(until) = until {
                // One stage's job for an executor: the pipeline up to that stage, no record.
                let kind = stage_named(&until).expect("clap allows stage names only");
                let mut renderer = render::Progress::new(std::io::stderr().is_terminal(), false);
                let done = engine::run_until(&p, &store, kind, &mut |e| renderer.event(e));
                renderer.finish();
                done?;
                return Ok(());
            }
            if executor.executor == cli::ExecutorArg::Slurm
                && !cluster::run_on_slurm(&pipeline, &store_args, &executor)?
            {
                return Ok(()); // a dry run
            }
            let tracked = tracker.start_run(&p);
            let mut renderer = render::Progress::new(!json && std::io::stderr().is_terminal(), json);
            let outcome = engine::run(&p, &store, &mut |e| {
                tracker.observe(tracked.as_ref(), &e);
                renderer.event(e)
            });
            renderer.finish();
            tracker.end_run(tracked, &store, &outcome);
            let outcome = outcome?;
            if json {
                println!("{}", render::run_json(&outcome));
            } else {
                print!("{}", render::run_summary(&outcome));
            }
            Ok(())
        }
        Command::Sweep { action, file, sets, store, json, executor, mlflow } => {
            let env: Vec<(String, String)> = std::env::vars_os()
                .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
                .collect();
            let sweep_failure = |e: pipe::sweep::run::SweepError| Failure {
                code: e.exit_code() as u8,
                message: e.to_string(),
            };
            match action {
                Some(SweepAction::Show { sweep, store, json }) => {
                    let record =
                        pipe::sweep::run::read_record(&local(&store), &sweep, &env).map_err(sweep_failure)?;
                    let (metric, maximize, outcome) = (&record.metric, record.maximize, &record.outcome);
                    if json {
                        println!("{}", render::sweep_json(metric, maximize, outcome));
                    } else {
                        print!("{}", render::sweep_table(metric, maximize, outcome));
                    }
                    return Ok(());
                }
                Some(SweepAction::Plan { file, sets, store, json }) => {
                    let spec = pipe::sweep::spec::SweepSpec::load_with_env(&file, &sets, &env)?;
                    let id = pipe::sweep::trials::sweep_id(&spec);
                    // What the store has of the sweep so far, if it ran.
                    let store = local(&store);
                    let recorded = pipe::sweep::run::read_record(&store, &id[..12], &env).ok();
                    let planned = pipe::sweep::trials::plan(&spec);
                    let recorded = recorded.map(|r| r.outcome.trials).unwrap_or_default();
                    if json {
                        println!("{}", render::sweep_plan_json(&spec, &id, &planned, &recorded));
                    } else {
                        print!("{}", render::sweep_plan(&spec, &id, &planned, &recorded));
                    }
                    return Ok(());
                }
                Some(SweepAction::Best { sweep, store }) => {
                    let record =
                        pipe::sweep::run::read_record(&local(&store), &sweep, &env).map_err(sweep_failure)?;
                    let best = record.outcome.best(record.maximize).and_then(|t| t.run.clone());
                    let best = best.ok_or_else(|| Failure {
                        code: 1,
                        message: format!("sweep {} has no completed trial", short(&record.outcome.id)),
                    })?;
                    println!("{best}");
                    return Ok(());
                }
                Some(SweepAction::Trial { file, sets, store, trial, until }) => {
                    let spec = pipe::sweep::spec::SweepSpec::load_with_env(&file, &sets, &env)?;
                    let k = match trial {
                        Some(k) => k,
                        None => std::env::var("SLURM_ARRAY_TASK_ID")
                            .ok()
                            .and_then(|v| v.parse().ok())
                            .ok_or_else(|| Failure {
                                code: 2,
                                message: "no --trial, and no SLURM_ARRAY_TASK_ID to read it from".into(),
                            })?,
                    };
                    let runs = pipe::sweep::run::first_runs(&spec, &env)?;
                    let Some((_, overrides)) = runs.into_iter().find(|(n, _)| *n == k) else {
                        return Err(Failure {
                            code: 2,
                            message: format!(
                                "trial {k} has no values before the sweep's results (it runs in the sweep)"
                            ),
                        });
                    };
                    std::thread::sleep(pipe::fault::trial_delay(k));
                    let pipeline = spec.trial_pipeline(&overrides, &env)?;
                    let store = open(&store)?;
                    let mut renderer = render::Progress::new(std::io::stderr().is_terminal(), false);
                    let done = match until.as_deref().and_then(stage_named) {
                        Some(kind) => {
                            engine::run_until(&pipeline, &store, kind, &mut |e| renderer.event(e)).map(drop)
                        }
                        None => engine::run(&pipeline, &store, &mut |e| renderer.event(e)).map(drop),
                    };
                    renderer.finish();
                    done?;
                    return Ok(());
                }
                None => {}
            }
            let Some(file) = file else {
                return Err(Failure {
                    code: 2,
                    message: "pipe sweep needs a sweep file (or: plan FILE, show ID|FILE, best ID|FILE)"
                        .into(),
                });
            };
            let spec = pipe::sweep::spec::SweepSpec::load_with_env(&file, &sets, &env)?;
            let mut tracker = track::Tracker::new(mlflow.as_deref())?;
            let on_slurm = executor.executor == cli::ExecutorArg::Slurm;
            if on_slurm && !cluster::sweep_on_slurm(&spec, &file, &sets, &store, &executor, &env)? {
                return Ok(()); // a dry run
            }
            let store_args = store;
            let store = open(&store_args)?;
            // On Slurm, a trial's run that is not yet in the store (TPE's trials after its start-up
            // ones, pruned trials going on to their next rung) is a job too; the sweep here then
            // finds it done.
            let base = match on_slurm {
                true => Some(cluster::job_command(&["run"], &spec.pipeline, &spec.sets, &store_args)?),
                false => None,
            };
            let slurm = cluster::slurm_for(&executor, &store_args);
            // It returns what `engine::run` returns, error type included.
            #[allow(clippy::result_large_err)]
            let runner = |k: u64,
                          pipeline: &config::Pipeline,
                          overrides: &[String],
                          observe: pipe::stages::Observer<'_>| {
                if let Some(base) = &base
                    && !engine::plan(pipeline, &store)?.iter().all(|stage| stage.fresh)
                {
                    let mut command = base.clone();
                    for o in overrides {
                        command.extend(["--set".into(), o.clone()]);
                    }
                    // Named by what it computes: the sweep, the store, the trial and its stop epoch.
                    let stop = overrides.iter().find_map(|o| o.strip_prefix("train.stop_after_epoch="));
                    let name = format!(
                        "{}-trial{k}-to{}",
                        cluster::sweep_job_name(&spec, &store_args),
                        stop.unwrap_or("end")
                    );
                    pipe::executor::slurm::run_one(&slurm, &name, command, &mut |line| {
                        eprintln!("  trial {k}: {line}")
                    })?;
                }
                engine::run(pipeline, &store, observe)
            };
            let parent = tracker.start_sweep(&spec, &pipe::sweep::trials::sweep_id(&spec));
            let mut renderer = render::Progress::new(!json && std::io::stderr().is_terminal(), json);
            let result = pipe::sweep::run::run_with(
                &spec,
                &store,
                &env,
                &mut |event| {
                    if let pipe::sweep::run::SweepEvent::TrialDone { trial, .. } = &event {
                        tracker.trial(parent.as_ref(), &store, trial);
                    }
                    render::sweep_event(&mut renderer, &spec, event, json);
                },
                &runner,
            );
            renderer.finish();
            let (metric, maximize) = (&spec.objective.metric, spec.objective.maximize);
            let best = result.as_ref().ok().and_then(|o| o.best(maximize));
            tracker.end_sweep(parent, best.map(|t| (t, metric.as_str())), result.is_err());
            let outcome = result.map_err(sweep_failure)?;
            if json {
                println!("{}", render::sweep_json(metric, maximize, &outcome));
            } else {
                print!("{}", render::sweep_table(metric, maximize, &outcome));
            }
            Ok(())
        }
        Command::Plan { pipeline, store } => {
            let p = config::load(&pipeline.file, &pipeline.overrides)?;
            let planned = engine::plan(&p, &local(&store))?;
            print!("{}", render::plan(&planned));
            Ok(())
        }
        Command::Show { run, config, store } => {
            let store = open(&store)?;
            let record = Record::find(&store, &run)?;
            if config {
                print!("{}", record.config_toml());
            } else {
                print!("{}", render::record(&store, &record));
            }
            Ok(())
        }
        Command::Reproduce { run, store } => {
            let store = open(&store)?;
            let record = Record::find(&store, &run)?;
            let mut renderer = render::Progress::new(std::io::stderr().is_terminal(), false);
            let result = reproduce::reproduce(&store, &record, &mut |e| renderer.event(e));
            renderer.finish();
            let result = result?;
            print!("{}", render::reproduction(&record.id, &result));
            if result.identical() {
                Ok(())
            } else {
                Err(Failure { code: 1, message: format!("run {} did not reproduce", record.id) })
            }
        }
        Command::Verify { drop_checkpoints, repair, store } => {
            let store = open(&store)?;
            let v = pipe::verify::verify(&store, drop_checkpoints)?;
            print!("{}", render::verification(&store, &v));
            let remote = match store.remote() {
                Some(remote) => {
                    let checked = remote.verify(repair.then_some(&store), &mut |_, _| {})?;
                    print!("{}", render::remote_verification(remote, &checked));
                    Some(checked)
                }
                None => None,
            };
            let remote_bad = remote.map_or(0, |r| {
                let repaired: std::collections::BTreeSet<_> = r.repaired.iter().collect();
                r.problems.iter().filter(|p| p.blob.as_ref().is_none_or(|b| !repaired.contains(b))).count()
            });
            if v.clean() && remote_bad == 0 {
                Ok(())
            } else {
                let message = match remote_bad {
                    0 => format!("{} corrupt item(s) set aside", v.corrupt.len()),
                    n => format!("{} corrupt item(s) set aside, {n} remote problem(s) left", v.corrupt.len()),
                };
                Err(Failure { code: 1, message })
            }
        }
        Command::Push { run, json, store } => {
            let store = open(&store)?;
            let record = Record::find(&store, &run)?;
            let mut renderer = render::Progress::new(!json && std::io::stderr().is_terminal(), json);
            let result = pipe::share::push_run(&store, &record, &mut |e| renderer.event(e));
            report_transfer(renderer, result, json)
        }
        Command::Pull { run, json, store } => {
            let store = open(&store)?;
            let mut renderer = render::Progress::new(!json && std::io::stderr().is_terminal(), json);
            let result = pipe::share::pull_run(&store, &run, &mut |e| renderer.event(e));
            report_transfer(renderer, result, json)
        }
        Command::Gc { older_than, dry_run, store } => {
            let age = pipe::gc::parse_age(&older_than).map_err(|message| Failure { code: 2, message })?;
            let store = local(&store);
            let collection = pipe::gc::collect(&store, age, dry_run)?;
            print!("{}", render::collection(&collection, dry_run));
            Ok(())
        }
        Command::Predict { run, texts, input, format, output, text_column, label_column, store } => {
            let store = open(&store)?;
            let record = Record::find(&store, &run)?;
            pull_model(&store, &record)?;
            let predictor = Predictor::for_run(&store, &record)?;
            let (texts, predictions) = match &input {
                Some(path) => predictor.predict_file(
                    path,
                    format,
                    text_column.as_deref().unwrap_or(predictor.text_column()),
                    label_column.as_deref().unwrap_or(predictor.label_column()),
                )?,
                None => {
                    let predictions = predictor.predict(&texts, None)?;
                    (texts, predictions)
                }
            };
            match &output {
                Some(path) => {
                    let file = std::fs::File::create(path)
                        .map_err(|e| Failure { code: 1, message: format!("{}: {e}", path.display()) })?;
                    predictor.write_csv(std::io::BufWriter::new(file), path, &texts, &predictions)?;
                    eprintln!("wrote {} predictions to {}", texts.len(), path.display());
                }
                None => predictor.write_csv(
                    std::io::stdout().lock(),
                    std::path::Path::new("standard output"),
                    &texts,
                    &predictions,
                )?,
            }
            if let Some(report) = &predictions.report {
                let correct: u64 = (0..report.confusion.len()).map(|c| report.confusion[c][c]).sum();
                eprintln!("accuracy {:.4} ({correct} of {} rows)", report.accuracy, report.rows);
            }
            Ok(())
        }
        Command::Generate {
            run,
            prompt,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            chat,
            no_chat,
            json,
            store,
        } => {
            let sampling = match temperature {
                Some(t) if !(t > 0.0 && t.is_finite() && top_p > 0.0 && top_p <= 1.0) => {
                    return Err(Failure {
                        code: 2,
                        message: format!(
                            "--temperature must be a positive number and --top-p in (0, 1]; got {t} and {top_p}"
                        ),
                    });
                }
                Some(temperature) => pipe::evaluate::Sampling::Sample { temperature, top_p, seed },
                None => pipe::evaluate::Sampling::Greedy,
            };
            let store = open(&store)?;
            let record = Record::find(&store, &run)?;
            pull_model(&store, &record)?;
            let generator = Generator::for_run(&store, &record)?;
            let chat = (generator.chat_template() || chat) && !no_chat;
            let generation = generator.generate(&prompt, chat, max_new_tokens, sampling)?;
            if json {
                let doc = serde_json::json!({
                    "run": record.id,
                    "prompt_ids": generation.prompt_ids,
                    "ids": generation.ids,
                    "text": generation.text,
                });
                println!("{doc}");
            } else {
                println!("{}", generation.text);
            }
            Ok(())
        }
        Command::Diff { a, b, store } => {
            let store = open(&store)?;
            let (a, b) = (Record::find(&store, &a)?, Record::find(&store, &b)?);
            println!("{} -> {}", a.id, b.id);
            for line in records::diff(&a, &b) {
                println!("  {line}");
            }
            Ok(())
        }
        Command::Ls { store } => {
            let store = open(&store)?;
            let local = store.record_ids()?;
            let records = local.iter().filter_map(|id| Record::read(&store, id).ok()).collect::<Vec<_>>();
            print!("{}", render::runs_table(&records));
            if let Some(remote) = store.remote() {
                // The team's runs this store lacks: `pipe pull ID` fetches one.
                let mut others = Vec::new();
                for id in remote.record_ids("")?.into_iter().filter(|id| !local.contains(id)) {
                    let origin = format!("{}/records/{id}.toml", remote.url());
                    if let Some(text) = remote.record(&id)? {
                        others.extend(Record::parse(&id, &text, &origin).ok());
                    }
                }
                println!(
                    "\nin the remote {} only ({}; `pipe pull ID` fetches one):",
                    remote.url(),
                    others.len()
                );
                print!("{}", render::runs_table(&others));
            }
            Ok(())
        }
        Command::Schema { sweep } => {
            print!("{}", if sweep { pipe::sweep::schema::schema_json() } else { config::schema_json() });
            Ok(())
        }
    }
}
