//! Reading the layers (files with their `extends` chain, `PIPE_*` variables, `--set` overrides)
//! into TOML tables, each key path remembered with the place that wrote it.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use toml::de::{DeTable, DeValue};

use super::error::{ConfigError, Origin, Snippet};

/// Environment variables with the `PIPE_` prefix that are not pipeline keys: they belong to the CLI
/// (the store and its remote) or to the process.
pub const RESERVED_ENV_VARS: &[&str] = &[
    "PIPE_STORE",
    "PIPE_REMOTE",
    "PIPE_PUSH",
    "PIPE_REMOTE_REQUIRED",
    crate::store::remote::MULTIPART_THRESHOLD_ENV,
    crate::store::remote::MULTIPART_CHUNKSIZE_ENV,
    crate::ops::cpu::KERNEL_ENV,
    crate::fault::FAULT_ENV,
    crate::fault::DELAYS_ENV,
];

const ENV_PREFIX: &str = "PIPE_";

/// A key path such as `["train", "epochs"]`.
pub(crate) type KeyPath = Vec<String>;

/// Which layer wrote each key path (tables included); later layers overwrite earlier entries.
pub(crate) type Provenance = BTreeMap<KeyPath, Written>;

/// One configuration layer.
pub(crate) struct Layer {
    pub table: toml::Table,
    pub provenance: Provenance,
}

/// A pipeline file's text, kept so that errors can quote it.
#[derive(Debug)]
pub(crate) struct SourceFile {
    pub path: PathBuf,
    pub text: String,
}

/// Where one key path was written.
#[derive(Debug, Clone)]
pub(crate) enum Written {
    File { file: Arc<SourceFile>, key: Range<usize>, value: Range<usize> },
    Env { var: String, value: String },
    Set { arg: String },
}

/// Which part of a `key = value` an error is about.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Part {
    Key,
    Value,
}

impl Written {
    pub fn origin(&self, part: Part) -> Origin {
        match self {
            Written::File { file, key, value } => {
                let span = match part {
                    Part::Key => key.clone(),
                    Part::Value => value.clone(),
                };
                Origin::File { path: file.path.clone(), snippet: Some(Snippet::new(&file.text, span)) }
            }
            Written::Env { var, value } => Origin::Env { var: var.clone(), value: value.clone() },
            Written::Set { arg } => Origin::Set { arg: arg.clone() },
        }
    }

    /// Position in the file, to report the first of several problems in a layer.
    pub fn position(&self) -> usize {
        match self {
            Written::File { key, .. } => key.start,
            _ => 0,
        }
    }
}

/// The origin of the value at `path`, or of the nearest enclosing table that has one.
pub(crate) fn origin_of(provenance: &Provenance, path: &[String], part: Part) -> Option<Origin> {
    (0..=path.len()).rev().find_map(|n| provenance.get(&path[..n]).map(|w| w.origin(part)))
}

/// The layers of the file at `path` and the files it extends, base first.
pub(crate) fn file_chain(path: &Path) -> Result<Vec<Layer>, ConfigError> {
    let mut layers = Vec::new();
    // A chain stays inside the project: under the first file's directory or the working directory
    // (a pipeline pulled from git must not read files elsewhere on the machine).
    let roots: Vec<PathBuf> = [
        std::fs::canonicalize(path).ok().and_then(|p| p.parent().map(Path::to_path_buf)),
        std::env::current_dir().ok().and_then(|d| std::fs::canonicalize(d).ok()),
    ]
    .into_iter()
    .flatten()
    .collect();
    read_file_chain(path, None, &roots, &mut Vec::new(), &mut layers)?;
    Ok(layers)
}

/// Reads `path`, after the file it extends (recursively). `extended_by` is the `extends` value
/// that named `path`, to point errors at it; `visiting` is the chain so far, to detect cycles.
fn read_file_chain(
    path: &Path,
    extended_by: Option<&Origin>,
    roots: &[PathBuf],
    visiting: &mut Vec<(PathBuf, PathBuf)>,
    layers: &mut Vec<Layer>,
) -> Result<(), ConfigError> {
    let read_error = |source: std::io::Error| match extended_by {
        None => ConfigError::Read { path: path.to_owned(), source },
        Some(origin) => ConfigError::Invalid {
            origin: origin.clone(),
            message: format!("cannot read `{}`, named by `extends`: {source}", path.display()),
            help: Some("`extends` is a path relative to the file that contains it".into()),
        },
    };
    let canonical = std::fs::canonicalize(path).map_err(read_error)?;
    if let Some(origin) = extended_by
        && !roots.iter().any(|root| canonical.starts_with(root))
    {
        return Err(ConfigError::Invalid {
            origin: origin.clone(),
            message: format!("`extends` points outside the project: {}", canonical.display()),
            help: Some("a pipeline may extend files under its own directory or the working directory".into()),
        });
    }
    if canonical.is_dir() {
        return Err(read_error(std::io::Error::other("it is a directory, not a pipeline file")));
    }
    if let Some(start) = visiting.iter().position(|(seen, _)| *seen == canonical) {
        let chain: Vec<String> = visiting[start..]
            .iter()
            .map(|(_, shown)| format!("`{}`", shown.display()))
            .chain([format!("`{}`", path.display())])
            .collect();
        return Err(ConfigError::Invalid {
            origin: extended_by.expect("the first file cannot close a cycle").clone(),
            message: format!("`extends` forms a cycle: {}", chain.join(" -> ")),
            help: Some("remove `extends` from one of these files".into()),
        });
    }
    visiting.push((canonical, path.to_owned()));

    let text = std::fs::read_to_string(path).map_err(read_error)?;
    let file = Arc::new(SourceFile { path: path.to_owned(), text });
    let syntax_error = |err: toml::de::Error| ConfigError::Invalid {
        origin: Origin::File {
            path: file.path.clone(),
            snippet: err.span().map(|span| Snippet::new(&file.text, span)),
        },
        message: format!("invalid TOML: {}", err.message().trim_end()),
        help: None,
    };
    // Parsed twice: once with spans for error positions, once into plain values for merging.
    let spanned = DeTable::parse(&file.text).map_err(syntax_error)?;
    let mut table: toml::Table = toml::from_str(&file.text).map_err(syntax_error)?;
    let mut provenance = Provenance::new();
    record_file(spanned.get_ref(), &mut Vec::new(), &file, &mut provenance);

    if let Some(extends) = table.remove("extends") {
        let written = provenance.remove(&vec!["extends".to_owned()]).expect("recorded above");
        let origin = written.origin(Part::Value);
        let Some(base) = extends.as_str() else {
            return Err(ConfigError::Invalid {
                origin,
                message: format!("`extends` must be a string, found {}", extends.type_str()),
                help: Some("`extends = \"base.toml\"` names the pipeline file to build on".into()),
            });
        };
        let base = path.parent().unwrap_or(Path::new("")).join(base);
        read_file_chain(&base, Some(&origin), roots, visiting, layers)?;
    }
    visiting.pop();
    layers.push(Layer { table, provenance });
    Ok(())
}

fn record_file(table: &DeTable<'_>, path: &mut KeyPath, file: &Arc<SourceFile>, out: &mut Provenance) {
    for (key, value) in table {
        path.push(key.get_ref().to_string());
        out.insert(path.clone(), Written::File { file: file.clone(), key: key.span(), value: value.span() });
        if let DeValue::Table(inner) = value.get_ref() {
            record_file(inner, path, file, out);
        }
        path.pop();
    }
}

/// One layer per `PIPE_*` variable, in name order so that the result never depends on the
/// environment's order. `PIPE_TRAIN__BATCH_SIZE=8` sets `train.batch_size`.
pub(crate) fn env_layers(env: &[(String, String)]) -> Result<Vec<Layer>, ConfigError> {
    let mut vars: Vec<&(String, String)> = env
        .iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX) && !RESERVED_ENV_VARS.contains(&name.as_str()))
        .collect();
    vars.sort();
    vars.into_iter()
        .map(|(var, value)| {
            let written = Written::Env { var: var.clone(), value: value.clone() };
            let path: KeyPath = var[ENV_PREFIX.len()..].split("__").map(str::to_ascii_lowercase).collect();
            if path.iter().any(String::is_empty) {
                return Err(ConfigError::Invalid {
                    origin: written.origin(Part::Key),
                    message: "not a pipeline key".into(),
                    help: Some(
                        "name keys as PIPE_<KEY> or PIPE_<SECTION>__<KEY>, e.g. PIPE_SEED or \
                         PIPE_TRAIN__BATCH_SIZE"
                            .into(),
                    ),
                });
            }
            Ok(layer_for(path, parse_value(value), written))
        })
        .collect()
}

/// One layer per `--set key=value`, in command-line order.
pub(crate) fn override_layers(overrides: &[String]) -> Result<Vec<Layer>, ConfigError> {
    overrides
        .iter()
        .map(|arg| {
            let written = Written::Set { arg: arg.clone() };
            let parsed = arg.split_once('=').and_then(|(key, value)| {
                let path: KeyPath = key.trim().split('.').map(|k| k.trim().to_owned()).collect();
                (!path.iter().any(String::is_empty)).then_some((path, value))
            });
            let Some((path, value)) = parsed else {
                return Err(ConfigError::Invalid {
                    origin: written.origin(Part::Key),
                    message: "expected `key=value` with a dotted key".into(),
                    help: Some("for example --set train.epochs=2 or --set optimizer.lr=3e-5".into()),
                });
            };
            Ok(layer_for(path, parse_value(value.trim()), written))
        })
        .collect()
}

/// A value from the command line or the environment: TOML when it parses (`2`, `3e-5`, `true`,
/// `["accuracy"]`, `"quoted"`), else the text itself as a string (`models/x`, `cuda:0`).
fn parse_value(raw: &str) -> toml::Value {
    raw.parse().unwrap_or_else(|_| toml::Value::String(raw.to_owned()))
}

/// A layer holding `value` at `path`, with every key path inside it blamed on `written`.
fn layer_for(path: KeyPath, value: toml::Value, written: Written) -> Layer {
    let mut provenance = Provenance::new();
    record_all(&value, &mut path.clone(), &written, &mut provenance);
    for n in 1..path.len() {
        provenance.insert(path[..n].to_vec(), written.clone());
    }
    let mut value = value;
    for key in path.iter().rev() {
        value = toml::Value::Table(toml::Table::from_iter([(key.clone(), value)]));
    }
    let toml::Value::Table(table) = value else { unreachable!("the path has at least one key") };
    Layer { table, provenance }
}

fn record_all(value: &toml::Value, path: &mut KeyPath, written: &Written, out: &mut Provenance) {
    out.insert(path.clone(), written.clone());
    if let toml::Value::Table(table) = value {
        for (key, inner) in table {
            path.push(key.clone());
            record_all(inner, path, written, out);
            path.pop();
        }
    }
}

/// Deep merge: tables merge key by key; any other value (arrays included) replaces the old one.
pub(crate) fn merge(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(old)), toml::Value::Table(new)) => merge(old, new),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_as_toml_or_fall_back_to_strings() {
        assert_eq!(parse_value("2"), toml::Value::Integer(2));
        assert_eq!(parse_value("3e-5"), toml::Value::Float(3e-5));
        assert_eq!(parse_value("models/x"), toml::Value::String("models/x".into()));
        assert_eq!(parse_value("cuda:0"), toml::Value::String("cuda:0".into()));
        assert_eq!(parse_value("\"123\""), toml::Value::String("123".into()));
    }

    #[test]
    fn merge_is_deep_for_tables_only() {
        let mut base: toml::Table = toml::from_str("[a]\nx = 1\ny = [1, 2]\n").unwrap();
        merge(&mut base, toml::from_str("[a]\ny = [3]\nz = 2\n").unwrap());
        assert_eq!(base, toml::from_str("[a]\nx = 1\ny = [3]\nz = 2\n").unwrap());
    }

    #[test]
    fn env_names_map_to_key_paths() {
        let env = [
            ("PIPE_TRAIN__BATCH_SIZE".to_owned(), "8".to_owned()),
            ("PIPE_STORE".to_owned(), "/tmp/store".to_owned()),
            ("HOME".to_owned(), "/root".to_owned()),
        ];
        let layers = env_layers(&env).unwrap();
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0].table, toml::from_str("[train]\nbatch_size = 8\n").unwrap());
    }
}
