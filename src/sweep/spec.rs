//! Sweep files: which pipeline, how to search, what to optimise, and the search space, read and
//! checked with the same located errors as pipeline files (exit 2 in the CLI).
//!
//! ```toml
//! pipeline = "../pipelines/quickstart.toml"   # relative to this file
//! method = "tpe"                              # "grid" | "random" | "tpe"
//! n_trials = 12
//! seed = 0                                    # the search's own seed (training keeps its own)
//! timeout = 3600                              # seconds, optional: no trial starts after it
//! parallel = 1                                # trials at a time
//!
//! [objective]
//! metric = "accuracy"                         # default: the first of evaluate.metrics
//! direction = "maximize"                      # default: minimise loss and perplexity, maximise the rest
//!
//! [pruner]                                    # optional: stop poor trials early
//! method = "asha"                             # "none" | "median" | "asha"
//! min_epochs = 1                              # asha: the first rung (default 1)
//! reduction = 4                               # asha: keep the best 1/reduction (default 4)
//! # median: startup = 5, warmup = 0, min_trials = 1 (Optuna's defaults)
//!
//! [params]                                    # keys as `--set` takes them
//! "optimizer.lr" = { log_uniform = [1e-5, 2e-4] }
//! "optimizer.weight_decay" = { uniform = [0.0, 0.1] }
//! "train.epochs" = { int = [1, 3] }
//! "train.batch_size" = { choice = [16, 32] }
//! ```
//!
//! Every parameter key is checked against the pipeline by loading it with that key set (so the
//! pipeline's own messages and suggestions apply), pointed at the sweep file's line.

use std::path::{Path, PathBuf};

use crate::config::{self, ConfigError, Origin, Pipeline};
use crate::sweep::pruner::Pruner;
use crate::sweep::sampler::{Domain, Value};

/// How trials are proposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Grid,
    Random,
    Tpe,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Self::Grid => "grid",
            Self::Random => "random",
            Self::Tpe => "tpe",
        }
    }
}

/// What the sweep optimises: a metric the pipeline computes, and which way.
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    pub metric: String,
    pub maximize: bool,
}

/// One searched parameter: its `--set` key and its space.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub key: String,
    pub space: Space,
}

/// A parameter's space, as written.
#[derive(Debug, Clone, PartialEq)]
pub enum Space {
    Uniform { low: f64, high: f64 },
    LogUniform { low: f64, high: f64 },
    Int { low: i64, high: i64 },
    Choice(Vec<toml::Value>),
    Grid(Vec<toml::Value>),
}

/// A checked sweep file.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepSpec {
    pub path: PathBuf,
    /// The pipeline file, resolved against the sweep file's directory.
    pub pipeline: PathBuf,
    /// `--set`s given with the sweep, under every trial's own.
    pub sets: Vec<String>,
    /// The pipeline as loaded with them (every trial layers its `--set`s on it).
    pub base: Pipeline,
    pub method: Method,
    pub n_trials: u64,
    /// Seconds after which no new trial starts.
    pub timeout: Option<u64>,
    pub parallel: u64,
    pub seed: u64,
    pub objective: Objective,
    pub pruner: Pruner,
    pub params: Vec<Param>,
}

/// Every top-level key of a sweep file (besides `extends`).
pub(crate) const TOP_KEYS: &[&str] =
    &["pipeline", "method", "n_trials", "timeout", "parallel", "seed", "objective", "pruner", "params"];
/// The spaces a parameter may have.
pub(crate) const SPACES: &[&str] = &["uniform", "log_uniform", "int", "choice", "grid"];

impl SweepSpec {
    /// Reads and checks the sweep file at `path` and the pipeline it names (with the process's
    /// `PIPE_*` variables, as its trials will run).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
            .collect();
        Self::load_with_env(path, &[], &env)
    }

    /// [`SweepSpec::load`] with `--set`s for the pipeline and the environment given as
    /// `(name, value)` pairs.
    pub fn load_with_env(
        path: &Path,
        sets: &[String],
        env: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let mut layers = config::layers::file_chain(path)?;
        let layer = layers.pop().expect("a file chain has at least the file itself");
        let (table, provenance) = (layer.table, layer.provenance);
        let at = |key_path: &[&str], part| {
            let key_path: Vec<String> = key_path.iter().map(|s| s.to_string()).collect();
            config::layers::origin_of(&provenance, &key_path, part)
                .unwrap_or_else(|| Origin::File { path: path.to_owned(), snippet: None })
        };
        let invalid = |origin: Origin, message: String, help: Option<String>| ConfigError::Invalid {
            origin,
            message,
            help,
        };
        use config::layers::Part::{Key, Value as Val};

        if let Some(key) = table.keys().find(|k| !TOP_KEYS.contains(&k.as_str()) && k.as_str() != "extends") {
            let suggestion =
                closest(key, TOP_KEYS).map(|s| format!("; did you mean `{s}`?")).unwrap_or_default();
            return Err(invalid(
                at(&[key], Key),
                format!("unknown key `{key}` in a sweep file{suggestion}"),
                Some(format!("valid keys: {}", TOP_KEYS.join(", "))),
            ));
        }
        let string = |key: &str| -> Result<Option<String>, ConfigError> {
            match table.get(key) {
                None => Ok(None),
                Some(toml::Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(invalid(at(&[key], Val), format!("`{key}` must be a string"), None)),
            }
        };
        let count = |key: &str, default: u64| -> Result<u64, ConfigError> {
            match table.get(key) {
                None => Ok(default),
                Some(toml::Value::Integer(n)) if *n >= 1 => Ok(*n as u64),
                Some(_) => {
                    Err(invalid(at(&[key], Val), format!("`{key}` must be an integer of at least 1"), None))
                }
            }
        };
        let Some(pipeline) = string("pipeline")? else {
            return Err(invalid(
                at(&[], Key),
                "missing key `pipeline` (the pipeline file to sweep)".into(),
                None,
            ));
        };
        let pipeline = path.parent().unwrap_or(Path::new(".")).join(pipeline);
        let method = match string("method")?.as_deref() {
            None | Some("tpe") => Method::Tpe,
            Some("random") => Method::Random,
            Some("grid") => Method::Grid,
            Some(other) => {
                return Err(invalid(
                    at(&["method"], Val),
                    format!("unknown method `{other}`"),
                    Some("expected \"grid\", \"random\" or \"tpe\"".into()),
                ));
            }
        };
        let (n_trials, parallel) = (count("n_trials", 10)?, count("parallel", 1)?);
        let timeout = table.contains_key("timeout").then(|| count("timeout", 0)).transpose()?;
        let seed = match table.get("seed") {
            None => 0,
            Some(toml::Value::Integer(n)) if *n >= 0 => *n as u64,
            Some(_) => {
                return Err(invalid(
                    at(&["seed"], Val),
                    "`seed` must be a non-negative integer".into(),
                    None,
                ));
            }
        };
        let base = config::load_with_env(&pipeline, sets, env).map_err(|e| match e {
            ConfigError::Read { source, .. } => invalid(
                at(&["pipeline"], Val),
                format!("cannot read the pipeline `{}`: {source}", pipeline.display()),
                Some("`pipeline` is a path relative to the sweep file".into()),
            ),
            other => other,
        })?;

        let objective = objective(&table, &base, &at)?;
        let pruner = pruner(&table, &at)?;
        let Some(toml::Value::Table(raw_params)) = table.get("params") else {
            return Err(invalid(
                at(&["params"], Key),
                "a sweep needs a [params] table with at least one parameter".into(),
                None,
            ));
        };
        let mut params = Vec::new();
        for (key, raw) in raw_params {
            let space = space(key, raw, method, &at)?;
            check_key(&pipeline, sets, env, key, &space, &at(&["params", key], Key))?;
            params.push(Param { key: key.clone(), space });
        }
        if params.is_empty() {
            return Err(invalid(at(&["params"], Key), "[params] names no parameter".into(), None));
        }
        Ok(Self {
            path: path.to_owned(),
            pipeline,
            sets: sets.to_vec(),
            base,
            method,
            n_trials,
            timeout,
            parallel,
            seed,
            objective,
            pruner,
            params,
        })
    }

    /// The sampler's domains, in parameter order (grid spaces are choices among their values).
    pub fn domains(&self) -> Vec<Domain> {
        self.params
            .iter()
            .map(|p| match &p.space {
                Space::Uniform { low, high } => Domain::Float { low: *low, high: *high, log: false },
                Space::LogUniform { low, high } => Domain::Float { low: *low, high: *high, log: true },
                Space::Int { low, high } => Domain::Int { low: *low, high: *high, log: false },
                Space::Choice(v) | Space::Grid(v) => Domain::Choice { n: v.len() },
            })
            .collect()
    }

    /// A trial's pipeline: the sweep's `--set`s, then the trial's `overrides`.
    pub fn trial_pipeline(
        &self,
        overrides: &[String],
        env: &[(String, String)],
    ) -> Result<Pipeline, ConfigError> {
        config::load_with_env(&self.pipeline, &[self.sets.as_slice(), overrides].concat(), env)
    }

    /// The `--set` arguments for sampled values.
    pub fn overrides(&self, values: &[Value]) -> Vec<String> {
        self.params
            .iter()
            .zip(values)
            .map(|(p, v)| {
                let text = match (v, &p.space) {
                    (Value::Float(x), _) => format!("{x:?}"),
                    (Value::Int(i), _) => i.to_string(),
                    (Value::Choice(c), Space::Choice(options) | Space::Grid(options)) => {
                        options[*c].to_string()
                    }
                    (Value::Choice(c), _) => c.to_string(),
                };
                format!("{}={text}", p.key)
            })
            .collect()
    }
}

/// `[objective]`: the metric must be one the pipeline reports (one of its `evaluate.metrics`).
fn objective(
    table: &toml::Table,
    pipeline: &Pipeline,
    at: &dyn Fn(&[&str], config::layers::Part) -> Origin,
) -> Result<Objective, ConfigError> {
    use config::layers::Part::{Key, Value as Val};
    // A run reports the metrics its pipeline's `evaluate.metrics` lists (never empty).
    let computed: Vec<&str> = pipeline.evaluate.metrics.iter().map(|m| m.name()).collect();
    let default_metric = computed[0].to_owned();
    let Some(raw) = table.get("objective") else {
        let maximize = default_metric != "loss";
        return Ok(Objective { metric: default_metric, maximize });
    };
    let Some(raw) = raw.as_table() else {
        return Err(ConfigError::Invalid {
            origin: at(&["objective"], Val),
            message: "`objective` must be a table".into(),
            help: None,
        });
    };
    if let Some(key) = raw.keys().find(|k| !["metric", "direction"].contains(&k.as_str())) {
        let suggestion = closest(key, &["metric", "direction"])
            .map(|s| format!("; did you mean `{s}`?"))
            .unwrap_or_default();
        return Err(ConfigError::Invalid {
            origin: at(&["objective", key], Key),
            message: format!("unknown key `{key}` in [objective]{suggestion}"),
            help: None,
        });
    }
    let metric = raw.get("metric").and_then(toml::Value::as_str).map_or(default_metric, str::to_owned);
    if !computed.contains(&metric.as_str()) {
        return Err(ConfigError::Invalid {
            origin: at(&["objective", "metric"], Val),
            message: format!("the pipeline does not compute `{metric}`"),
            help: Some(format!(
                "it reports {} (add the metric to the pipeline's evaluate.metrics to sweep on it)",
                computed.join(", ")
            )),
        });
    }
    let maximize = match raw.get("direction").map(|d| d.as_str()) {
        None => !toml::Value::String(metric.clone())
            .try_into::<crate::config::Metric>()
            .is_ok_and(crate::config::Metric::lower_is_better),
        Some(Some("maximize")) => true,
        Some(Some("minimize")) => false,
        Some(_) => {
            return Err(ConfigError::Invalid {
                origin: at(&["objective", "direction"], Val),
                message: "`direction` must be \"maximize\" or \"minimize\"".into(),
                help: None,
            });
        }
    };
    Ok(Objective { metric, maximize })
}

/// `[pruner]`: which rule stops trials early, with Optuna's defaults for what is left out.
fn pruner(
    table: &toml::Table,
    at: &dyn Fn(&[&str], config::layers::Part) -> Origin,
) -> Result<Pruner, ConfigError> {
    use config::layers::Part::{Key, Value as Val};
    let Some(raw) = table.get("pruner") else { return Ok(Pruner::None) };
    let Some(raw) = raw.as_table() else {
        return Err(ConfigError::Invalid {
            origin: at(&["pruner"], Val),
            message: "`pruner` must be a table".into(),
            help: None,
        });
    };
    let method = match raw.get("method").map(toml::Value::as_str) {
        None | Some(Some("none")) => "none",
        Some(Some(m @ ("median" | "asha"))) => m,
        Some(_) => {
            return Err(ConfigError::Invalid {
                origin: at(&["pruner", "method"], Val),
                message: "unknown pruner method".into(),
                help: Some("expected \"none\", \"median\" or \"asha\"".into()),
            });
        }
    };
    let keys: &[&str] = match method {
        "median" => &["method", "startup", "warmup", "min_trials"],
        "asha" => &["method", "min_epochs", "reduction"],
        _ => &["method"],
    };
    if let Some(key) = raw.keys().find(|k| !keys.contains(&k.as_str())) {
        let suggestion = closest(key, keys).map(|s| format!("; did you mean `{s}`?")).unwrap_or_default();
        return Err(ConfigError::Invalid {
            origin: at(&["pruner", key], Key),
            message: format!("unknown key `{key}` for the {method} pruner{suggestion}"),
            help: Some(format!("its keys: {}", keys.join(", "))),
        });
    }
    let number = |key: &str, default: usize, least: i64| -> Result<usize, ConfigError> {
        match raw.get(key) {
            None => Ok(default),
            Some(toml::Value::Integer(n)) if *n >= least => Ok(*n as usize),
            Some(_) => Err(ConfigError::Invalid {
                origin: at(&["pruner", key], Val),
                message: format!("`{key}` must be an integer of at least {least}"),
                help: None,
            }),
        }
    };
    Ok(match method {
        "median" => Pruner::Median {
            startup: number("startup", 5, 0)?,
            warmup: number("warmup", 0, 0)?,
            min_trials: number("min_trials", 1, 1)?,
        },
        "asha" => {
            Pruner::Asha { min_epochs: number("min_epochs", 1, 1)?, reduction: number("reduction", 4, 2)? }
        }
        _ => Pruner::None,
    })
}

/// One `[params]` entry's space.
fn space(
    key: &str,
    raw: &toml::Value,
    method: Method,
    at: &dyn Fn(&[&str], config::layers::Part) -> Origin,
) -> Result<Space, ConfigError> {
    use config::layers::Part::{Key, Value as Val};
    let bad = |path: &[&str], message: String, help: Option<&str>| ConfigError::Invalid {
        origin: at(path, Val),
        message,
        help: help.map(str::to_owned),
    };
    let Some(table) = raw.as_table().filter(|t| t.len() == 1) else {
        return Err(bad(
            &["params", key],
            format!("`{key}` needs exactly one space, e.g. {{ uniform = [0.0, 0.1] }}"),
            Some("spaces: uniform, log_uniform, int, choice, grid"),
        ));
    };
    let (kind, value) = table.iter().next().expect("one entry");
    let path = ["params", key, kind.as_str()];
    if !SPACES.contains(&kind.as_str()) {
        let suggestion = closest(kind, SPACES).map(|s| format!("; did you mean `{s}`?")).unwrap_or_default();
        return Err(ConfigError::Invalid {
            origin: at(&path, Key),
            message: format!("unknown space `{kind}`{suggestion}"),
            help: Some(format!("spaces: {}", SPACES.join(", "))),
        });
    }
    let list = value
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| bad(&path, format!("`{kind}` takes a list"), None))?;
    let bounds = || -> Result<(f64, f64), ConfigError> {
        let number = |v: &toml::Value| v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
        match (list.len(), list.first().and_then(number), list.get(1).and_then(number)) {
            (2, Some(low), Some(high)) if low < high => Ok((low, high)),
            _ => Err(bad(&path, format!("`{kind}` takes [low, high] with low < high"), None)),
        }
    };
    let space = match kind.as_str() {
        "uniform" => {
            let (low, high) = bounds()?;
            Space::Uniform { low, high }
        }
        "log_uniform" => {
            let (low, high) = bounds()?;
            if low <= 0.0 {
                return Err(bad(&path, format!("a log scale needs positive bounds, got low = {low}"), None));
            }
            Space::LogUniform { low, high }
        }
        "int" => match (list.len(), list[0].as_integer(), list.get(1).and_then(toml::Value::as_integer)) {
            (2, Some(low), Some(high)) if low < high => Space::Int { low, high },
            _ => return Err(bad(&path, "`int` takes [low, high], integers with low < high".into(), None)),
        },
        "choice" => Space::Choice(list.clone()),
        _ => {
            if method != Method::Grid {
                return Err(bad(
                    &path,
                    format!(
                        "`grid` spaces need method = \"grid\"; this sweep's method is \"{}\"",
                        method.name()
                    ),
                    Some("write { choice = [...] } to let random search or TPE pick among the values"),
                ));
            }
            Space::Grid(list.clone())
        }
    };
    if method == Method::Grid && !matches!(space, Space::Grid(_) | Space::Choice(_)) {
        return Err(bad(
            &path,
            "method = \"grid\" needs every space to be a list (grid or choice)".into(),
            None,
        ));
    }
    Ok(space)
}

/// Loads the pipeline with `key` set to a value of its space, so that an unknown key or a value
/// of the wrong type is reported with the pipeline's own message, at the sweep file's line.
fn check_key(
    pipeline: &Path,
    sets: &[String],
    env: &[(String, String)],
    key: &str,
    space: &Space,
    origin: &Origin,
) -> Result<(), ConfigError> {
    let probe = match space {
        Space::Uniform { low, high } | Space::LogUniform { low, high } => format!("{:?}", 0.5 * (low + high)),
        Space::Int { low, .. } => low.to_string(),
        Space::Choice(v) | Space::Grid(v) => v[0].to_string(),
    };
    let probe = [sets, &[format!("{key}={probe}")]].concat();
    match config::load_with_env(pipeline, &probe, env) {
        Ok(_) => Ok(()),
        Err(ConfigError::Invalid { origin: Origin::Set { .. }, message, help }) => {
            let float_on_integer = matches!(space, Space::Uniform { .. } | Space::LogUniform { .. })
                && message.contains("integer");
            let message = if float_on_integer {
                format!("`{key}` takes integers, but its space is continuous: write {{ int = [low, high] }}")
            } else {
                format!("`{key}`: {message}")
            };
            Err(ConfigError::Invalid { origin: origin.clone(), message, help })
        }
        Err(other) => Err(other),
    }
}

/// The candidate within edit distance 2 of `key`, if any.
fn closest<'a>(key: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::osa_distance(key, c), *c))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIPELINE: &str = "[dataset]\ntrain = \"train.csv\"\nvalidation = \"validation.csv\"\n\n\
        [model]\nsource = \"model\"\n\n[evaluate]\nmetrics = [\"accuracy\"]\n";

    /// The error of loading `sweep` (a sweep file next to a minimal pipeline), or the spec.
    fn load(sweep: &str) -> Result<SweepSpec, String> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.toml"), PIPELINE).unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, sweep).unwrap();
        SweepSpec::load_with_env(&path, &[], &[])
            .map_err(|e| e.to_string().replace(&format!("{}/", dir.path().display()), ""))
    }

    fn error(sweep: &str) -> String {
        load(sweep).expect_err("a bad sweep file")
    }

    const HEAD: &str = "pipeline = \"p.toml\"\nmethod = \"tpe\"\nn_trials = 4\n";

    #[test]
    fn a_good_sweep_file_loads_in_file_order() {
        let spec = load(&format!(
            "{HEAD}[objective]\nmetric = \"accuracy\"\n[params]\n\
             \"optimizer.lr\" = {{ log_uniform = [1e-5, 2e-4] }}\n\
             \"train.epochs\" = {{ int = [1, 3] }}\n\
             \"train.batch_size\" = {{ choice = [16, 32] }}\n"
        ))
        .unwrap();
        assert_eq!(spec.objective, Objective { metric: "accuracy".into(), maximize: true });
        let keys: Vec<&str> = spec.params.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["optimizer.lr", "train.epochs", "train.batch_size"]);
        let values = [Value::Float(1e-4), Value::Int(2), Value::Choice(1)];
        assert_eq!(spec.overrides(&values), ["optimizer.lr=0.0001", "train.epochs=2", "train.batch_size=32"]);
        assert_eq!(spec.domains()[0], Domain::Float { low: 1e-5, high: 2e-4, log: true });
    }

    /// Acceptance 7 of issue 12: each bad sweep file is refused with its position and, for keys,
    /// a suggestion.
    #[test]
    fn bad_sweep_files_are_refused_with_their_position() {
        let cases = [
            (
                format!("{HEAD}n_trail = 3\n[params]\n\"optimizer.lr\" = {{ uniform = [0.0, 1.0] }}\n"),
                vec!["s.toml:4:1: unknown key `n_trail` in a sweep file; did you mean `n_trials`?"],
            ),
            (
                format!("{HEAD}[params]\n\"optimizer.lrr\" = {{ uniform = [0.0, 1.0] }}\n"),
                vec!["s.toml:5:1:", "unknown key `lrr`", "did you mean `lr`?"],
            ),
            (
                format!("{HEAD}[params]\n\"optimizer.lr\" = {{ log_uniform = [0.0, 1e-3] }}\n"),
                vec!["s.toml:5:", "a log scale needs positive bounds, got low = 0"],
            ),
            (
                format!("{HEAD}[params]\n\"train.epochs\" = {{ uniform = [1.0, 3.0] }}\n"),
                vec!["s.toml:5:1:", "`train.epochs` takes integers, but its space is continuous"],
            ),
            (
                format!("{HEAD}[params]\n\"train.epochs\" = {{ grid = [1, 2] }}\n"),
                vec!["s.toml:5:", "`grid` spaces need method = \"grid\""],
            ),
            (
                format!(
                    "{HEAD}[objective]\nmetric = \"f1\"\n[params]\n\"optimizer.lr\" = {{ uniform = [0.0, 1.0] }}\n"
                ),
                vec!["s.toml:5:10: the pipeline does not compute `f1`", "it reports accuracy"],
            ),
            (
                format!("{HEAD}[params]\n\"optimizer.lr\" = {{ uniforn = [0.0, 1.0] }}\n"),
                vec!["unknown space `uniforn`; did you mean `uniform`?"],
            ),
            (
                "method = \"tpe\"\n[params]\n\"optimizer.lr\" = { uniform = [0.0, 1.0] }\n".to_string(),
                vec!["missing key `pipeline`"],
            ),
        ];
        for (sweep, fragments) in cases {
            let message = error(&sweep);
            println!("{message}\n");
            for fragment in fragments {
                assert!(message.contains(fragment), "{fragment:?} not in:\n{message}\nfor:\n{sweep}");
            }
        }
    }
}
