//! Run records (`<store>/<run>.toml`): finding them by prefix, reading them, comparing two.

use std::collections::BTreeMap;

use crate::store::{Store, StoreError};

/// Errors finding or reading a record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("no run in {store} starts with `{prefix}` (see `pipe ls`)")]
    NotFound { store: String, prefix: String },
    #[error("`{prefix}` is ambiguous: it starts {}", candidates.join(", "))]
    Ambiguous { prefix: String, candidates: Vec<String> },
    #[error("`{0}` is not a run id: expected 1 to 12 lowercase hexadecimal digits (see `pipe ls`)")]
    BadPrefix(String),
    #[error("{path}: not a valid run record: {message}")]
    Invalid { path: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Remote(#[from] crate::store::RemoteError),
}

impl RecordError {
    /// Exit code for the CLI: 1 when the store or the remote failed, 2 for a missing or bad
    /// record (or a misconfigured remote).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Store(_) => 1,
            Self::Remote(e) => e.exit_code(),
            _ => 2,
        }
    }
}

/// A run record, parsed.
#[derive(Debug, Clone)]
pub struct Record {
    pub id: String,
    pub table: toml::Table,
}

impl Record {
    /// The record whose id starts with `prefix` (it must be the only one).
    pub fn find(store: &Store, prefix: &str) -> Result<Self, RecordError> {
        if prefix.is_empty() || prefix.len() > RUN_ID_LEN || !is_lower_hex(prefix) {
            return Err(RecordError::BadPrefix(prefix.into()));
        }
        let ids: Vec<String> = store.record_ids()?.into_iter().filter(|id| id.starts_with(prefix)).collect();
        match ids.as_slice() {
            [id] => Self::read(store, id),
            [] if store.remote().is_some() => Self::fetch(store, prefix),
            [] => Err(RecordError::NotFound {
                store: store.root().display().to_string(),
                prefix: prefix.into(),
            }),
            many => Err(RecordError::Ambiguous { prefix: prefix.into(), candidates: many.to_vec() }),
        }
    }

    /// The record whose id starts with `prefix` from the store's remote, checked and then kept
    /// in the local store.
    fn fetch(store: &Store, prefix: &str) -> Result<Self, RecordError> {
        let remote = store.remote().expect("called with a remote");
        let ids = remote.record_ids(prefix)?;
        let id = match ids.as_slice() {
            [id] => id,
            [] => {
                return Err(RecordError::NotFound {
                    store: format!("{} or the remote {}", store.root().display(), remote.url()),
                    prefix: prefix.into(),
                });
            }
            many => return Err(RecordError::Ambiguous { prefix: prefix.into(), candidates: many.to_vec() }),
        };
        let origin = format!("{}/records/{id}.toml", remote.url());
        let text = remote.record(id)?.ok_or_else(|| RecordError::Invalid {
            path: origin.clone(),
            message: "deleted while read".into(),
        })?;
        let record = Self::parse(id, &text, &origin)?;
        store.write_record(id, &text)?;
        Ok(record)
    }

    /// Reads the record of run `id`.
    pub fn read(store: &Store, id: &str) -> Result<Self, RecordError> {
        let path = store.record_path(id);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| RecordError::Invalid { path: path.display().to_string(), message: e.to_string() })?;
        Self::parse(id, &text, &path.display().to_string())
    }

    /// Parses and checks the text of record `id`, read from `origin` (for messages).
    pub fn parse(id: &str, text: &str, origin: &str) -> Result<Self, RecordError> {
        let invalid = |message: String| RecordError::Invalid { path: origin.to_string(), message };
        let table: toml::Table = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if !table.get("config").is_some_and(toml::Value::is_table) {
            return Err(invalid("it has no [config] table".into()));
        }
        if table.get("run").and_then(toml::Value::as_str) != Some(id) {
            return Err(invalid(format!("its `run` is not {id}, the id in its file name")));
        }
        check_digests(&table).map_err(invalid)?;
        if let Some(sum) = table.get("checksum")
            && sum.as_str() != Some(checksum(&table).as_str())
        {
            return Err(invalid("its checksum does not match its content (edited by hand?)".into()));
        }
        Ok(Self { id: id.to_string(), table })
    }

    /// The resolved pipeline configuration as TOML text (it runs again to the same run id).
    pub fn config_toml(&self) -> String {
        let config = self.table.get("config").and_then(toml::Value::as_table).cloned().unwrap_or_default();
        toml::to_string(&config).expect("tables serialise")
    }

    /// The resolved pipeline the run was made with.
    pub fn pipeline(&self) -> Result<crate::config::Pipeline, RecordError> {
        let config = self.table.get("config").cloned().unwrap_or(toml::Value::Table(Default::default()));
        config.try_into().map_err(|e: toml::de::Error| RecordError::Invalid {
            path: format!("run {}", self.id),
            message: format!("its [config] is not a pipeline: {e}"),
        })
    }

    /// The recorded metrics (on the validation split).
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        self.numbers("metrics")
    }

    /// The recorded metrics on the held-out test split (empty without `dataset.test`).
    pub fn test_metrics(&self) -> BTreeMap<String, f64> {
        self.numbers("test_metrics")
    }

    fn numbers(&self, table: &str) -> BTreeMap<String, f64> {
        self.table
            .get(table)
            .and_then(toml::Value::as_table)
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_float()?))).collect())
            .unwrap_or_default()
    }

    /// The `[[stages]]` entries.
    pub fn stages(&self) -> &[toml::Value] {
        self.table.get("stages").and_then(toml::Value::as_array).map_or(&[], Vec::as_slice)
    }

    /// One stage entry by name.
    pub fn stage(&self, name: &str) -> Option<&toml::Table> {
        self.stages()
            .iter()
            .filter_map(toml::Value::as_table)
            .find(|s| s.get("name").and_then(toml::Value::as_str) == Some(name))
    }

    /// A string field of the record's top level (`pipeline`, `created`).
    pub fn text(&self, key: &str) -> &str {
        self.table.get(key).and_then(toml::Value::as_str).unwrap_or("?")
    }
}

/// A record's checksum: SHA-256 of the record as TOML without its `checksum` field. pipe writes
/// it into every record, so that an edit anywhere (a metric, the configuration) is found by
/// `pipe verify` and `pipe show`; records written before it existed have none and are accepted.
pub fn checksum(table: &toml::Table) -> String {
    let mut content = table.clone();
    content.remove("checksum");
    crate::digest::bytes(toml::to_string(&content).expect("tables serialise").as_bytes())
}

/// Characters in a run id.
pub const RUN_ID_LEN: usize = 12;

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether a file name stem is a run id (what `pipe` names its records).
pub fn is_run_id(s: &str) -> bool {
    s.len() == RUN_ID_LEN && is_lower_hex(s)
}

/// Every key, digest and output path a record holds is well formed: they become paths and keys
/// when the record is reproduced, so an edited record must not point anywhere else.
fn check_digests(table: &toml::Table) -> Result<(), String> {
    let Some(stages) = table.get("stages") else { return Ok(()) };
    let stages = stages.as_array().ok_or("`stages` is not an array of tables")?;
    for stage in stages {
        let stage = stage.as_table().ok_or("`stages` holds something other than tables")?;
        let name = stage.get("name").and_then(toml::Value::as_str).unwrap_or("?");
        for field in ["key", "digest"] {
            if let Some(v) = stage.get(field)
                && !v.as_str().is_some_and(crate::store::is_digest)
            {
                return Err(format!("stage {name}: `{field}` is not a SHA-256 digest"));
            }
        }
        for table_name in ["inputs", "files"] {
            let Some(entries) = stage.get(table_name) else { continue };
            let entries =
                entries.as_table().ok_or_else(|| format!("stage {name}: `{table_name}` is not a table"))?;
            for (entry, v) in entries {
                if !v.as_str().is_some_and(crate::store::is_digest) {
                    return Err(format!("stage {name}: {table_name}.{entry:?} is not a SHA-256 digest"));
                }
            }
        }
    }
    Ok(())
}

/// `dotted.key -> value` for every leaf of a table, the values as TOML writes them.
pub fn flatten(table: &toml::Table) -> BTreeMap<String, String> {
    leaves(table).into_iter().map(|(k, v)| (k, v.to_string())).collect()
}

/// `dotted.key -> value` for every leaf of a table (arrays are leaves).
pub fn leaves(table: &toml::Table) -> BTreeMap<String, &toml::Value> {
    fn walk<'a>(prefix: &str, value: &'a toml::Value, out: &mut BTreeMap<String, &'a toml::Value>) {
        match value {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    walk(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other);
            }
        }
    }
    let mut out = BTreeMap::new();
    for (k, v) in table {
        walk(k, v, &mut out);
    }
    out
}

/// The differences between two runs: configuration values, then metrics (`b - a`).
pub fn diff(a: &Record, b: &Record) -> Vec<String> {
    let empty = toml::Table::new();
    let config =
        |r: &Record| flatten(r.table.get("config").and_then(toml::Value::as_table).unwrap_or(&empty));
    let (ca, cb) = (config(a), config(b));
    let mut lines = Vec::new();
    let keys: std::collections::BTreeSet<&String> = ca.keys().chain(cb.keys()).collect();
    for key in keys {
        let (va, vb) = (ca.get(key), cb.get(key));
        if va != vb {
            let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(unset)".into());
            lines.push(format!("{key}: {} -> {}", show(va), show(vb)));
        }
    }
    let (ma, mb) = (a.metrics(), b.metrics());
    let names: std::collections::BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
    for name in names {
        match (ma.get(name), mb.get(name)) {
            (Some(x), Some(y)) => lines.push(format!("metric {name}: {x:.4} -> {y:.4} ({:+.4})", y - x)),
            (x, y) => lines.push(format!("metric {name}: {x:?} -> {y:?}")),
        }
    }
    lines
}
