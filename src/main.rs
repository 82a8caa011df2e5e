//! The `pipe` binary: parses the command line, calls the library, renders progress and results,
//! and maps errors to exit codes (0 ok, 1 a stage failed, 2 bad configuration, input or usage).

mod cli;
mod render;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use pipe::config::{self, ConfigError};
use pipe::engine::{self, EngineError};
use pipe::store::{Store, StoreError};

use cli::{Cli, Command};

/// A failure, with the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Self { code: 2, message: message.into() }
    }
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

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Self { code: 1, message: e.to_string() }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
        Command::Run { pipeline, store, json } => {
            let p = config::load(&pipeline.file, &pipeline.overrides)?;
            let store = Store::new(store.store);
            let mut renderer = render::Progress::new(!json && std::io::stderr().is_terminal(), json);
            let outcome = engine::run(&p, &store, &mut |e| renderer.event(e));
            renderer.finish();
            let outcome = outcome?;
            if json {
                println!("{}", render::run_json(&outcome));
            } else {
                print!("{}", render::run_summary(&outcome));
            }
            Ok(())
        }
        Command::Plan { pipeline, store } => {
            let p = config::load(&pipeline.file, &pipeline.overrides)?;
            let planned = engine::plan(&p, &Store::new(store.store))?;
            print!("{}", render::plan(&planned));
            Ok(())
        }
        Command::Show { run, config, store } => {
            let store = Store::new(store.store);
            let id = find_run(&store, &run)?;
            let text = std::fs::read_to_string(store.record_path(&id)).map_err(|e| Failure {
                code: 1,
                message: format!("{}: {e}", store.record_path(&id).display()),
            })?;
            let record: toml::Table = toml::from_str(&text).map_err(|e| Failure {
                code: 1,
                message: format!("{}: {e}", store.record_path(&id).display()),
            })?;
            if config {
                let table = record.get("config").and_then(|c| c.as_table()).cloned().unwrap_or_default();
                print!("{}", toml::to_string(&table).expect("tables serialise"));
            } else {
                print!("{}", render::record(&store, &id, &record));
            }
            Ok(())
        }
        Command::Ls { store } => {
            let store = Store::new(store.store);
            let mut records = Vec::new();
            for id in store.record_ids()? {
                let text = std::fs::read_to_string(store.record_path(&id)).unwrap_or_default();
                if let Ok(table) = toml::from_str::<toml::Table>(&text) {
                    records.push((id, table));
                }
            }
            print!("{}", render::runs_table(&records));
            Ok(())
        }
        Command::Schema => {
            print!("{}", config::schema_json());
            Ok(())
        }
    }
}

/// The one run id that starts with `prefix`.
fn find_run(store: &Store, prefix: &str) -> Result<String, Failure> {
    let ids: Vec<String> = store.record_ids()?.into_iter().filter(|id| id.starts_with(prefix)).collect();
    match ids.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Failure::usage(format!(
            "no run in {} starts with `{prefix}` (see `pipe ls`)",
            store.root().display()
        ))),
        many => Err(Failure::usage(format!("`{prefix}` is ambiguous: {}", many.join(", ")))),
    }
}
