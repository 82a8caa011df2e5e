//! Logging runs to an MLflow tracking server (`pipe run --mlflow URI`, or `MLFLOW_TRACKING_URI`)
//! through its REST API (`/api/2.0/mlflow/...`), as Hugging Face's `report_to=["mlflow"]` would.
//!
//! A run is an MLflow run in the experiment named after its pipeline: the resolved pipeline as
//! params (flattened keys, `optimizer.lr`), the run id, stage keys and environment as tags, and
//! every number the train stage logged as metrics at its step (the same `train/<field>`,
//! `eval/<field>` names as the TensorBoard event file; `pipe run` sends them while it trains), then
//! the final metrics and the curves,
//! evaluation files, run record and model as artifacts where the server proxies them
//! (`mlflow-artifacts:`, `mlflow server`'s default). A sweep is a parent run with one child run per
//! trial. Everything is read back from pipe's record and stage outputs: logging never changes a
//! key or a result, and a server that fails is the caller's warning, never a failed run.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::records::{Record, leaves};
use crate::stages::{CURVES_PNG, CURVES_SVG, METRICS_LOG, MODEL_DIR, TRAIN_LOG};
use crate::store::Store;
use crate::train::logged_scalars;

/// How long to wait for a connection, and for an answer (an upload gets [`UPLOAD_TIMEOUT`]).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);
/// MLflow's limits on one `runs/log-batch` request.
const BATCH_METRICS: usize = 1000;
const BATCH_PARAMS: usize = 100;
const BATCH_TAGS: usize = 100;
/// The longest param value MLflow keeps (6000 characters since MLflow 2.7; longer is refused).
const PARAM_VALUE_MAX: usize = 6000;

/// Why logging to MLflow failed.
#[derive(Debug, thiserror::Error)]
pub enum MlflowError {
    /// The tracking URI is not a server pipe can talk to.
    #[error(
        "`{uri}` is not an MLflow tracking server: expected http://HOST:PORT[/PATH] or https://... (pipe logs through the REST API; a local `mlruns` directory is not supported)"
    )]
    BadUri { uri: String },
    /// The request did not get an answer (connection refused, timeout, TLS).
    #[error("MLflow at {uri}: {message}")]
    Unreachable { uri: String, message: String },
    /// The server answered with an error.
    #[error("MLflow at {uri} refused `{endpoint}`: {code}: {message}")]
    Refused { uri: String, endpoint: String, code: String, message: String },
    /// A file to log could not be read.
    #[error("cannot read `{}` to log it to MLflow: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
}

/// A client of one tracking server.
pub struct Mlflow {
    uri: String,
    auth: Auth,
    client: reqwest::Client,
    runtime: tokio::runtime::Runtime,
}

/// How requests prove who sends them, as MLflow's own clients do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Auth {
    /// No credentials.
    #[default]
    None,
    /// HTTP basic authentication (`mlflow server --app-name basic-auth`).
    Basic { username: String, password: String },
    /// A bearer token (Databricks and other hosted servers).
    Token(String),
}

impl Auth {
    /// The credentials in MLflow's variables: `MLFLOW_TRACKING_TOKEN`, else
    /// `MLFLOW_TRACKING_USERNAME` with `MLFLOW_TRACKING_PASSWORD`.
    pub fn from_env() -> Auth {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        match (var("MLFLOW_TRACKING_TOKEN"), var("MLFLOW_TRACKING_USERNAME")) {
            (Some(token), _) => Auth::Token(token),
            (None, Some(username)) => {
                Auth::Basic { username, password: var("MLFLOW_TRACKING_PASSWORD").unwrap_or_default() }
            }
            (None, None) => Auth::None,
        }
    }

    fn apply(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Auth::None => request,
            Auth::Basic { username, password } => request.basic_auth(username, Some(password)),
            Auth::Token(token) => request.bearer_auth(token),
        }
    }
}

/// A run on the server.
#[derive(Debug, Clone)]
pub struct MlflowRun {
    /// MLflow's run id.
    pub id: String,
    /// The experiment it is in.
    pub experiment_id: String,
    /// Where its artifacts go (`mlflow-artifacts:/...` when the server proxies them).
    pub artifact_uri: String,
}

/// How a run ended, in MLflow's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Finished,
    Failed,
    Killed,
}

/// A metric value at a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub key: String,
    pub value: f64,
    pub step: u64,
}

/// What one `runs/log-batch` call (or several, within MLflow's limits) logs.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub params: Vec<(String, String)>,
    pub metrics: Vec<Metric>,
    pub tags: Vec<(String, String)>,
}

impl Mlflow {
    /// A client of the server at `uri` (`http://HOST:PORT`, with a path prefix if the server has
    /// one), sending `auth` with every request. Nothing is sent yet.
    pub fn new(uri: &str, auth: Auth) -> Result<Self, MlflowError> {
        let bad = || MlflowError::BadUri { uri: uri.into() };
        let url = reqwest::Url::parse(uri).map_err(|_| bad())?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(bad());
        }
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| MlflowError::Unreachable { uri: uri.into(), message: e.to_string() })?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| MlflowError::Unreachable { uri: uri.into(), message: e.to_string() })?;
        Ok(Self { uri: uri.trim_end_matches('/').to_string(), auth, client, runtime })
    }

    /// The server's address.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Calls `endpoint` of the REST API (`experiments/create`) with a JSON body (POST) or a query
    /// (GET, `body` None), and returns the answer.
    fn call(
        &self,
        endpoint: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Value, MlflowError> {
        let url = format!("{}/api/2.0/mlflow/{endpoint}", self.uri);
        let request = match body {
            Some(body) => self
                .client
                .post(&url)
                .header("content-type", "application/json")
                .body(serde_json::to_vec(body).expect("JSON serialises")),
            None => {
                let url = reqwest::Url::parse_with_params(&url, query).map_err(|e| {
                    MlflowError::Unreachable { uri: self.uri.clone(), message: e.to_string() }
                })?;
                self.client.get(url)
            }
        };
        self.send(endpoint, request)
    }

    fn send(&self, endpoint: &str, request: reqwest::RequestBuilder) -> Result<Value, MlflowError> {
        let request = self.auth.apply(request);
        let unreachable = |e: reqwest::Error| {
            // The cause is at the end of the chain ("Connection refused"), not in reqwest's words.
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message = format!("{message}: {cause}");
                source = cause.source();
            }
            MlflowError::Unreachable { uri: self.uri.clone(), message }
        };
        let (status, text) = self
            .runtime
            .block_on(async {
                let response = request.send().await?;
                let status = response.status();
                Ok((status, response.text().await?))
            })
            .map_err(unreachable)?;
        let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(answer);
        }
        let snippet: String = text.chars().take(200).collect();
        Err(MlflowError::Refused {
            uri: self.uri.clone(),
            endpoint: endpoint.into(),
            code: answer["error_code"].as_str().map_or_else(|| format!("HTTP {status}"), str::to_string),
            message: answer["message"].as_str().map_or(snippet, str::to_string),
        })
    }

    /// The id of the experiment called `name`, created if there is none.
    pub fn experiment(&self, name: &str) -> Result<String, MlflowError> {
        let find = || self.call("experiments/get-by-name", &[("experiment_name", name)], None);
        match find() {
            Ok(found) => {
                return Ok(found["experiment"]["experiment_id"].as_str().unwrap_or_default().to_string());
            }
            Err(MlflowError::Refused { code, .. }) if code == "RESOURCE_DOES_NOT_EXIST" => {}
            Err(e) => return Err(e),
        }
        match self.call("experiments/create", &[], Some(&json!({ "name": name }))) {
            Ok(created) => Ok(created["experiment_id"].as_str().unwrap_or_default().to_string()),
            // Another process created it in between.
            Err(MlflowError::Refused { code, .. }) if code == "RESOURCE_ALREADY_EXISTS" => {
                Ok(find()?["experiment"]["experiment_id"].as_str().unwrap_or_default().to_string())
            }
            Err(e) => Err(e),
        }
    }

    /// Starts a run called `name` in the experiment `experiment_id` ([`Mlflow::experiment`]), a
    /// child of `parent` when given, and logs `batch` into it.
    pub fn start_run(
        &self,
        experiment_id: &str,
        name: &str,
        parent: Option<&MlflowRun>,
        batch: &Batch,
    ) -> Result<MlflowRun, MlflowError> {
        let mut tags = vec![
            ("mlflow.runName".to_string(), name.to_string()),
            ("mlflow.source.name".into(), "pipe".into()),
            ("mlflow.source.type".into(), "LOCAL".into()),
        ];
        if let Ok(user) = std::env::var("USER") {
            tags.push(("mlflow.user".into(), user));
        }
        if let Some(parent) = parent {
            tags.push(("mlflow.parentRunId".into(), parent.id.clone()));
        }
        let body = json!({
            "experiment_id": experiment_id,
            "run_name": name,
            "start_time": now_ms(),
            "tags": key_values(&tags),
        });
        let created = self.call("runs/create", &[], Some(&body))?;
        let info = &created["run"]["info"];
        let run = MlflowRun {
            id: info["run_id"].as_str().unwrap_or_default().to_string(),
            experiment_id: experiment_id.to_string(),
            artifact_uri: info["artifact_uri"].as_str().unwrap_or_default().to_string(),
        };
        self.log(&run, batch)?;
        Ok(run)
    }

    /// Logs `batch` into `run`, in as many requests as MLflow's limits need.
    pub fn log(&self, run: &MlflowRun, batch: &Batch) -> Result<(), MlflowError> {
        let timestamp = now_ms();
        let params: Vec<(String, String)> = batch
            .params
            .iter()
            .map(|(k, v)| (k.clone(), v.chars().take(PARAM_VALUE_MAX).collect()))
            .collect();
        // JSON has no NaN or infinity, and MLflow would refuse the request for one.
        let metrics: Vec<Value> = batch
            .metrics
            .iter()
            .filter(|m| m.value.is_finite())
            .map(|m| json!({ "key": m.key, "value": m.value, "timestamp": timestamp, "step": m.step }))
            .collect();
        let requests = params
            .len()
            .div_ceil(BATCH_PARAMS)
            .max(metrics.len().div_ceil(BATCH_METRICS))
            .max(batch.tags.len().div_ceil(BATCH_TAGS));
        for i in 0..requests {
            let part = |len: usize, size: usize| (i * size).min(len)..((i + 1) * size).min(len);
            let body = json!({
                "run_id": run.id,
                "params": key_values(&params[part(params.len(), BATCH_PARAMS)]),
                "metrics": metrics[part(metrics.len(), BATCH_METRICS)],
                "tags": key_values(&batch.tags[part(batch.tags.len(), BATCH_TAGS)]),
            });
            self.call("runs/log-batch", &[], Some(&body))?;
        }
        Ok(())
    }

    /// Uploads `file` as the artifact `path` of `run`; false when the server keeps artifacts
    /// somewhere pipe does not write to (an `s3://` or `file:` artifact root of its own).
    pub fn upload(&self, run: &MlflowRun, path: &str, file: &Path) -> Result<bool, MlflowError> {
        // `mlflow-artifacts:/1/<run>/artifacts`, or with the server's address after the colon.
        let Some(rest) = run.artifact_uri.strip_prefix("mlflow-artifacts:") else { return Ok(false) };
        let rest = match rest.strip_prefix("//") {
            Some(with_host) => with_host.split_once('/').map_or("", |(_, p)| p),
            None => rest,
        };
        let bytes = std::fs::read(file).map_err(|source| MlflowError::Read { path: file.into(), source })?;
        let url =
            format!("{}/api/2.0/mlflow-artifacts/artifacts/{}/{path}", self.uri, rest.trim_matches('/'));
        let request = self.client.put(url).timeout(UPLOAD_TIMEOUT).body(bytes);
        self.send("mlflow-artifacts/artifacts", request)?;
        Ok(true)
    }

    /// Ends `run` with `status`, renamed to `name` when given (a pipe run is named by its id,
    /// known only once its stages ran).
    pub fn end_run(&self, run: &MlflowRun, status: RunStatus, name: Option<&str>) -> Result<(), MlflowError> {
        let status = match status {
            RunStatus::Finished => "FINISHED",
            RunStatus::Failed => "FAILED",
            RunStatus::Killed => "KILLED",
        };
        let mut body = json!({ "run_id": run.id, "status": status, "end_time": now_ms() });
        if let Some(name) = name {
            body["run_name"] = json!(name);
        }
        self.call("runs/update", &[], Some(&body)).map(drop)
    }

    /// Uploads `artifacts` (`(artifact path, file)`) into `run`; returns how many were uploaded
    /// (none when the server keeps artifacts where pipe does not write, see [`Mlflow::upload`]).
    pub fn upload_all(&self, run: &MlflowRun, artifacts: &[(String, PathBuf)]) -> Result<usize, MlflowError> {
        let mut uploaded = 0;
        for (path, file) in artifacts {
            if !self.upload(run, path, file)? {
                break;
            }
            uploaded += 1;
        }
        Ok(uploaded)
    }
}

/// A pipeline's configuration as MLflow params: every leaf under its dotted key, strings as they
/// are, other values as TOML writes them (`[0.9, 0.999]`).
pub fn params(config: &toml::Table) -> Vec<(String, String)> {
    leaves(config)
        .into_iter()
        .map(|(key, value)| (key, value.as_str().map_or_else(|| value.to_string(), str::to_string)))
        .collect()
}

/// What a finished run logs besides its params: tags naming it (run id, stage keys and versions,
/// pipe's version, the environment) and metrics: every number its train stage logged at its step,
/// the final validation metrics (and `test/<metric>`) at the last step, and the stages' numeric
/// facts (`stage/train/seconds`).
pub fn record_batch(store: &Store, record: &Record) -> Result<Batch, MlflowError> {
    let mut batch = Batch::default();
    batch.tags.push(("pipe.run_id".into(), record.id.clone()));
    let environment = record.table.get("environment").and_then(toml::Value::as_table);
    for (key, value) in environment.map(leaves).unwrap_or_default() {
        let value = value.as_str().map_or_else(|| value.to_string(), str::to_string);
        batch.tags.push((format!("pipe.environment.{key}"), value));
    }
    let mut last_step = 0;
    for stage in record.stages().iter().filter_map(toml::Value::as_table) {
        let text = |field: &str| stage.get(field).and_then(toml::Value::as_str).unwrap_or_default();
        let name = text("name");
        batch.tags.push((format!("pipe.stage.{name}"), text("key").to_string()));
        for (fact, value) in stage.get("facts").and_then(toml::Value::as_table).into_iter().flatten() {
            if let Some(value) = value.as_float().or_else(|| value.as_integer().map(|i| i as f64)) {
                batch.metrics.push(Metric { key: format!("stage/{name}/{fact}"), value, step: 0 });
            }
        }
        if name == "train" {
            let dir = store.stage_dir(name, text("key"));
            let steps = json_lines(&dir.join(TRAIN_LOG))?;
            let evaluations = json_lines(&dir.join(METRICS_LOG))?;
            for scalars in logged_scalars(&steps, &evaluations) {
                last_step = last_step.max(scalars.step);
                for (key, value) in scalars.values {
                    batch.metrics.push(Metric { key, value, step: scalars.step });
                }
            }
        }
    }
    for (key, value) in record.metrics() {
        batch.metrics.push(Metric { key, value, step: last_step });
    }
    for (key, value) in record.test_metrics() {
        batch.metrics.push(Metric { key: format!("test/{key}"), value, step: last_step });
    }
    Ok(batch)
}

/// The files a run logs as artifacts, as `(artifact path, file)`: its record (`pipe/<run>.toml`),
/// the train stage's curves and (`with_model`) model directory, and the evaluate stage's files.
pub fn record_artifacts(store: &Store, record: &Record, with_model: bool) -> Vec<(String, PathBuf)> {
    let mut artifacts = vec![(format!("pipe/{}.toml", record.id), store.record_path(&record.id))];
    for stage in record.stages().iter().filter_map(toml::Value::as_table) {
        let text = |field: &str| stage.get(field).and_then(toml::Value::as_str).unwrap_or_default();
        let (name, dir) = (text("name"), store.stage_dir(text("name"), text("key")));
        for file in stage.get("files").and_then(toml::Value::as_table).into_iter().flatten().map(|(f, _)| f) {
            let wanted = match name {
                "train" => {
                    file == CURVES_PNG
                        || file == CURVES_SVG
                        || (with_model && file.starts_with(&format!("{MODEL_DIR}/")))
                }
                "evaluate" => true,
                _ => false,
            };
            if wanted {
                artifacts.push((format!("{name}/{file}"), dir.join(file)));
            }
        }
    }
    artifacts
}

/// The JSON objects of a JSON Lines log (none when the file does not exist: no evaluations).
fn json_lines(path: &Path) -> Result<Vec<Value>, MlflowError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(MlflowError::Read { path: path.into(), source }),
    };
    Ok(text.lines().filter_map(|line| serde_json::from_str(line).ok()).collect())
}

fn key_values(pairs: &[(String, String)]) -> Vec<Value> {
    pairs.iter().map(|(key, value)| json!({ "key": key, "value": value })).collect()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
