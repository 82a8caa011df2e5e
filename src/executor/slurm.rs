//! The Slurm executor: batch jobs submitted with `sbatch --parsable`, chained with
//! `--dependency=afterok:`, watched with `scontrol show job`, each running `pipe` itself on its
//! node.
//!
//! A pipeline becomes three jobs, one per stage: the tokenize job runs the pipeline up to
//! tokenize, the train job (after it) up to train, the evaluate job (after that) to the end; each
//! finds the stages before its own in the store, which must be a path every node sees (or a
//! shared remote). When the last job has finished, the driver runs the pipeline here, which finds
//! every stage done and writes the run record, exactly as a local run would. A job that fails,
//! is cancelled, times out or loses its node fails the run with its state and the path of its
//! log, and the jobs still waiting on it are cancelled.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Errors from Slurm.
#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    /// A Slurm command is missing, or refused what it was given (the user's to fix).
    #[error("`{command}`: {message}")]
    Command { command: String, message: String },
    /// A job ended without success.
    #[error("{what} (Slurm job {job}) ended {state}; its log: {}", log.display())]
    JobFailed { what: String, job: String, state: String, log: PathBuf },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

impl SlurmError {
    /// Exit code for the CLI: 2 when Slurm is missing or refuses a submission, 1 when a job failed.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Command { .. } => 2,
            Self::JobFailed { .. } | Self::Io { .. } => 1,
        }
    }
}

/// The resources every job asks for (`sbatch` flags).
#[derive(Debug, Clone, Default)]
pub struct Resources {
    pub partition: Option<String>,
    pub cpus_per_task: Option<u32>,
    /// As `--mem` takes it: `4G`, `500M`.
    pub mem: Option<String>,
    /// As `--time` takes it: `30`, `2:00:00`, `1-0`.
    pub time: Option<String>,
    /// GPUs per job (`--gres=gpu:N`).
    pub gpus: Option<u32>,
    /// Further `sbatch` arguments, as they are (`--account=ml`, `--qos=high`).
    pub extra: Vec<String>,
}

/// One job: its name (also its log's), the command it runs, the jobs it waits for, and, for a
/// job array, its indices (`0-5%2`: `$SLURM_ARRAY_TASK_ID` tells each task its index).
#[derive(Debug, Clone, Default)]
pub struct Job {
    pub name: String,
    pub command: Vec<String>,
    pub after: Vec<String>,
    pub array: Option<String>,
    /// Nodes it must not run on.
    pub exclude: Vec<String>,
}

/// One job (or task of an array) as `scontrol show job` describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskState {
    /// The id to cancel or to read the log of: `12` or `12_3`.
    pub id: String,
    /// The array index, for an array's task (a range such as `2-5` while they wait).
    pub index: Option<String>,
    pub state: String,
    /// Where it ran (empty while pending).
    pub node: String,
}

impl TaskState {
    /// Whether it ended without success.
    pub fn failed(&self) -> bool {
        FAILED.contains(&self.state.as_str())
    }

    /// Whether it ended because of the cluster rather than itself: cancelled, pre-empted, out of
    /// time, its node lost. Such a job is worth submitting again.
    pub fn interrupted(&self) -> bool {
        ["CANCELLED", "PREEMPTED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"]
            .contains(&self.state.as_str())
    }

    pub fn completed(&self) -> bool {
        self.state == "COMPLETED"
    }
}

/// A cluster reached through Slurm's client commands.
#[derive(Debug, Clone)]
pub struct Slurm {
    resources: Resources,
    /// Where the jobs' logs go (`<name>-<job id>.out`).
    logs: PathBuf,
    /// How often job states are read.
    poll: Duration,
}

/// States in which a job is queued or under way.
const ACTIVE: [&str; 7] =
    ["PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"];

/// States in which a job is over without success (`scontrol`'s names).
const FAILED: [&str; 9] = [
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "REVOKED",
];

impl Slurm {
    /// Jobs with `resources`, their logs in `logs` (created here; it must be visible to the nodes).
    pub fn new(resources: Resources, logs: PathBuf) -> Self {
        Self { resources, logs, poll: Duration::from_millis(500) }
    }

    /// The batch script of `job`: `#SBATCH` lines for its name, log and resources, then the
    /// command.
    pub fn script(&self, job: &Job) -> String {
        let mut s = String::from("#!/bin/sh\n");
        let mut directive = |flag: String| s.push_str(&format!("#SBATCH {flag}\n"));
        directive(format!("--job-name=pipe-{}", job.name));
        let pattern = if job.array.is_some() {
            format!("{}-%A_%a.out", job.name)
        } else {
            format!("{}-%j.out", job.name)
        };
        directive(format!("--output={}", self.logs.join(pattern).display()));
        if let Some(array) = &job.array {
            directive(format!("--array={array}"));
        }
        if !job.exclude.is_empty() {
            directive(format!("--exclude={}", job.exclude.join(",")));
        }
        let r = &self.resources;
        if let Some(p) = &r.partition {
            directive(format!("--partition={p}"));
        }
        if let Some(n) = r.cpus_per_task {
            directive(format!("--cpus-per-task={n}"));
        }
        if let Some(m) = &r.mem {
            directive(format!("--mem={m}"));
        }
        if let Some(t) = &r.time {
            directive(format!("--time={t}"));
        }
        if let Some(g) = r.gpus {
            directive(format!("--gres=gpu:{g}"));
        }
        for extra in &r.extra {
            directive(extra.clone());
        }
        s.push_str("set -e\nexec");
        for word in &job.command {
            s.push(' ');
            s.push_str(&shell_quote(word));
        }
        s.push('\n');
        s
    }

    /// The log of job (or array task) `id` named `name`.
    pub fn log(&self, name: &str, id: &str) -> PathBuf {
        self.logs.join(format!("{name}-{id}.out"))
    }

    /// Submits `job` (after the jobs it waits for): its id.
    pub fn submit(&self, job: &Job) -> Result<String, SlurmError> {
        std::fs::create_dir_all(&self.logs)
            .map_err(|source| SlurmError::Io { path: self.logs.clone(), source })?;
        let mut command = Command::new("sbatch");
        command.arg("--parsable");
        if !job.after.is_empty() {
            // Jobs whose dependency failed are cancelled by Slurm, not left pending forever.
            command.arg(format!("--dependency=afterok:{}", job.after.join(":")));
            command.arg("--kill-on-invalid-dep=yes");
        }
        let script = self.script(job);
        let output = run(command.stdin(Stdio::piped()), "sbatch", Some(script.as_bytes()))?;
        // `--parsable` prints `id` or `id;cluster`.
        let id = output.split(';').next().unwrap_or("").trim().to_string();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit() || b == b'_') {
            return Err(SlurmError::Command {
                command: "sbatch --parsable".into(),
                message: format!("printed `{}`, not a job id", output.trim()),
            });
        }
        Ok(id)
    }

    /// The state of job `id` as `scontrol` names it (`PENDING`, `RUNNING`, `COMPLETED`, ...).
    pub fn state(&self, id: &str) -> Result<String, SlurmError> {
        let tasks = self.tasks(id)?;
        tasks.first().map(|t| t.state.clone()).ok_or_else(|| SlurmError::Command {
            command: format!("scontrol show job -o {id}"),
            message: "printed no job".into(),
        })
    }

    /// Job `id`, or every task of array `id`, as `scontrol show job -o` lists them; empty when
    /// Slurm no longer knows the job.
    pub fn tasks(&self, id: &str) -> Result<Vec<TaskState>, SlurmError> {
        let mut command = Command::new("scontrol");
        let output = match run(command.args(["show", "job", "-o", id]), "scontrol show job", None) {
            Ok(output) => output,
            // Purged after MinJobAge: what it did is in the store.
            Err(SlurmError::Command { message, .. }) if message.contains("Invalid job id") => {
                return Ok(Vec::new());
            }
            Err(e) => return Err(e),
        };
        let mut tasks = Vec::new();
        for line in output.lines().filter(|l| !l.trim().is_empty()) {
            let field =
                |name: &str| line.split_whitespace().find_map(|f| f.strip_prefix(name)).map(str::to_string);
            let (Some(job), Some(state)) = (field("JobId="), field("JobState=")) else {
                return Err(SlurmError::Command {
                    command: format!("scontrol show job -o {id}"),
                    message: format!("no JobId or JobState in `{line}`"),
                });
            };
            let index = field("ArrayTaskId=");
            let id = match (&index, field("ArrayJobId=")) {
                (Some(index), Some(array)) if !index.contains(['-', ',', '%']) => format!("{array}_{index}"),
                _ => job,
            };
            let node = field("NodeList=").filter(|n| n != "(null)").unwrap_or_default();
            tasks.push(TaskState { id, index, state, node });
        }
        Ok(tasks)
    }

    /// The job named `pipe-<name>` that is still queued or running (an array by its array id), if
    /// there is one: what a driver killed right after submitting it looks for.
    pub fn find_named(&self, name: &str) -> Result<Option<String>, SlurmError> {
        let output = run(Command::new("scontrol").args(["show", "jobs", "-o"]), "scontrol show jobs", None)?;
        let full = format!("JobName=pipe-{name}");
        Ok(output.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let field = |key: &str| fields.iter().find_map(|f| f.strip_prefix(key));
            let named = fields.contains(&full.as_str());
            let active = field("JobState=").is_some_and(|s| ACTIVE.contains(&s));
            if named && active { field("ArrayJobId=").or(field("JobId=")).map(str::to_string) } else { None }
        }))
    }

    /// Cancels jobs (best effort: a job that already ended is no error).
    pub fn cancel(&self, ids: &[&str]) {
        let _ = Command::new("scancel").args(ids).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }

    /// Waits until every job of `jobs` (`(name, id)`) completed: the first one that ends without
    /// success is an error, and the others are cancelled.
    pub fn wait(
        &self,
        jobs: &[(String, String)],
        on_change: &mut dyn FnMut(&str, &str, &str),
    ) -> Result<(), SlurmError> {
        let mut last: Vec<String> = vec![String::new(); jobs.len()];
        loop {
            let mut all_done = true;
            for (i, (name, id)) in jobs.iter().enumerate() {
                let state = self.state(id)?;
                if state != last[i] {
                    on_change(name, id, &state);
                    last[i] = state.clone();
                }
                if FAILED.contains(&state.as_str()) {
                    self.cancel(&jobs.iter().map(|(_, id)| id.as_str()).collect::<Vec<_>>());
                    return Err(SlurmError::JobFailed {
                        what: format!("the {name} job"),
                        job: id.clone(),
                        state,
                        log: self.log(name, id),
                    });
                }
                all_done &= state == "COMPLETED";
            }
            if all_done {
                return Ok(());
            }
            std::thread::sleep(self.poll);
        }
    }
}

/// The jobs of a pipeline run: one per stage, each running `command` (`pipe run FILE ...`) up to
/// its stage (`--until`), each after the one before.
fn pipeline_jobs(command: &[String]) -> Vec<Job> {
    crate::plan::StageKind::ALL
        .iter()
        .map(|kind| {
            let mut command = command.to_vec();
            command.extend(["--until".into(), kind.name().into()]);
            Job { name: kind.name().into(), command, ..Job::default() }
        })
        .collect()
}

/// The batch scripts [`run_pipeline`] would submit, with how each is submitted (`--dry-run`).
pub fn pipeline_scripts(slurm: &Slurm, command: &[String]) -> String {
    let mut out = String::new();
    for (i, job) in pipeline_jobs(command).iter().enumerate() {
        let after =
            if i == 0 { "" } else { " --dependency=afterok:<the previous job> --kill-on-invalid-dep=yes" };
        out.push_str(&format!("# sbatch --parsable{after}\n{}", slurm.script(job)));
    }
    out
}

/// Runs a pipeline as chained jobs (see the module doc) and returns once the last one completed;
/// `say` hears each submission and state change.
pub fn run_pipeline(
    slurm: &Slurm,
    command: &[String],
    say: &mut dyn FnMut(String),
) -> Result<(), SlurmError> {
    let mut submitted: Vec<(String, String)> = Vec::new();
    for mut job in pipeline_jobs(command) {
        job.after = submitted.last().map(|(_, id)| id.clone()).into_iter().collect();
        let id = slurm.submit(&job)?;
        say(format!(
            "{:<9} submitted as Slurm job {id} (log: {})",
            job.name,
            slurm.log(&job.name, &id).display()
        ));
        submitted.push((job.name, id));
    }
    slurm.wait(&submitted, &mut |name, id, state| say(format!("{name:<9} job {id} {}", state.to_lowercase())))
}

/// Runs `command` as one job named `name` and returns once it completed; `say` hears its
/// submission. A job of that name still queued or running (a killed driver's) is waited for
/// instead of submitted again, so `name` must say what the job computes.
pub fn run_one(
    slurm: &Slurm,
    name: &str,
    command: Vec<String>,
    say: &mut dyn FnMut(String),
) -> Result<(), SlurmError> {
    let id = match slurm.find_named(name)? {
        Some(id) => {
            say(format!("re-attached to Slurm job {id}"));
            id
        }
        None => {
            let id = slurm.submit(&Job { name: name.into(), command, ..Job::default() })?;
            say(format!("submitted as Slurm job {id} (log: {})", slurm.log(name, &id).display()));
            id
        }
    };
    slurm.wait(&[(name.into(), id)], &mut |_, _, _| {})
}

/// Runs a Slurm client command: its standard output, or an error naming it with Slurm's message.
fn run(command: &mut Command, name: &str, input: Option<&[u8]>) -> Result<String, SlurmError> {
    let failed = |message: String| SlurmError::Command { command: name.into(), message };
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => failed(
            "not found on PATH: the Slurm executor needs Slurm's client commands (sbatch, scontrol, scancel)".into(),
        ),
        _ => failed(e.to_string()),
    })?;
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin.write_all(input).map_err(|e| failed(e.to_string()))?;
    }
    let output = child.wait_with_output().map_err(|e| failed(e.to_string()))?;
    if !output.status.success() {
        let said = String::from_utf8_lossy(&output.stderr).trim().to_string();
        return Err(failed(format!(
            "{} ({})",
            if said.is_empty() { "no message" } else { &said },
            output.status
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `word` quoted for `sh` (left as it is when it needs no quotes).
fn shell_quote(word: &str) -> String {
    let plain =
        !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if plain { word.to_string() } else { format!("'{}'", word.replace('\'', r"'\''")) }
}

/// An absolute form of `path` (jobs run in whatever directory Slurm gives them).
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_for_the_shell_only_when_needed() {
        assert_eq!(shell_quote("train.epochs=2"), "train.epochs=2");
        assert_eq!(shell_quote("/a b/c"), "'/a b/c'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$(rm -rf /)"), "'$(rm -rf /)'");
    }

    #[test]
    fn a_script_carries_the_resources_and_the_command() {
        let resources = Resources {
            partition: Some("gpu".into()),
            cpus_per_task: Some(8),
            mem: Some("16G".into()),
            time: Some("2:00:00".into()),
            gpus: Some(1),
            extra: vec!["--account=ml".into()],
        };
        let slurm = Slurm::new(resources, PathBuf::from("/shared/runs/slurm"));
        let command = vec!["/bin/pipe".into(), "run".into(), "a b.toml".into()];
        let job = Job { name: "train".into(), command, ..Job::default() };
        let script = slurm.script(&job);
        for line in [
            "#SBATCH --job-name=pipe-train",
            "#SBATCH --output=/shared/runs/slurm/train-%j.out",
            "#SBATCH --partition=gpu",
            "#SBATCH --cpus-per-task=8",
            "#SBATCH --mem=16G",
            "#SBATCH --time=2:00:00",
            "#SBATCH --gres=gpu:1",
            "#SBATCH --account=ml",
            "exec /bin/pipe run 'a b.toml'",
        ] {
            assert!(script.lines().any(|l| l == line), "`{line}` missing from:\n{script}");
        }
        assert!(script.starts_with("#!/bin/sh\n"));
    }
}
