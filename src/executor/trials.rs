//! A sweep's trials as Slurm jobs: one job for the tokenize stage the trials share, then a job
//! array of every trial whose values are fixed before any result (grid, random, TPE's start-up
//! trials), `%parallel` at a time, each task running `pipe sweep trial` for its index. The sweep
//! itself then runs here and finds those trials done in the shared store, so its trial list, run
//! ids, record and `--json` are the local executor's; the runs it still needs (trials whose values
//! depend on results, pruned trials' continuations) are jobs of their own
//! ([`super::slurm::run_one`], through [`crate::sweep::run::run_with`]).
//!
//! Faults are normal on a cluster:
//!
//! - a task that is cancelled, pre-empted, out of time or loses its node is submitted again as a
//!   single job (up to `retries` times); it resumes from the trial's checkpoint in the store;
//! - a node where `exclude_after` jobs in a row failed is excluded (`--exclude`) from every later
//!   submission, and the failed trials are submitted again elsewhere (up to `retries` times);
//! - the driver itself may be killed and started again: the job ids it submitted are in
//!   `<store>/slurm/sweep-<id>.json`, written as soon as Slurm accepted each job (and removed once
//!   every trial ended), and a restarted driver re-attaches to them instead of submitting
//!   duplicates; one killed between a submission and that write finds the job by its name, which
//!   names the sweep and the store.
//!
//! A trial counts as done only when the sweep finds its run in the store; what Slurm says decides
//! only whether to wait or to submit again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::slurm::{Job, Slurm, SlurmError, TaskState};

/// How the trials' jobs are retried.
#[derive(Debug, Clone, Copy)]
pub struct Retries {
    /// Submissions of a trial after its first.
    pub retries: u32,
    /// Failures in a row after which a node is excluded.
    pub exclude_after: u32,
}

/// What the driver has submitted, kept in the store so that a restarted driver re-attaches.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Submitted {
    pub tokenize: Option<String>,
    pub array: Option<String>,
    /// Trial number -> the jobs it was submitted again as, in order.
    pub again: BTreeMap<u64, Vec<String>>,
    pub excluded: Vec<String>,
}

impl Submitted {
    fn load(path: &Path) -> Result<Self, SlurmError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| SlurmError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other(format!("not the driver's state: {e}")),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(SlurmError::Io { path: path.to_path_buf(), source }),
        }
    }

    fn save(&self, path: &Path) -> Result<(), SlurmError> {
        let text = serde_json::to_string_pretty(self).expect("state serialises");
        crate::store::write_atomic(path, text.as_bytes()).map_err(|e| SlurmError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })
    }
}

/// Runs the trials `runs` (their numbers) as jobs: `command` is `pipe sweep trial ...` without the
/// trial, to which the tokenize job adds `--trial K --until tokenize` and a resubmission
/// `--trial K` (an array task reads its index from `$SLURM_ARRAY_TASK_ID`). Returns when every
/// trial's last job has ended (completed, or given up on); `say` hears what happens.
#[allow(clippy::too_many_arguments)]
pub fn run_trials(
    slurm: &Slurm,
    name: &str,
    command: &[String],
    runs: &[u64],
    parallel: u64,
    retries: Retries,
    state_path: &Path,
    say: &mut dyn FnMut(String),
) -> Result<(), SlurmError> {
    if runs.is_empty() {
        return Ok(());
    }
    let mut state = Submitted::load(state_path)?;
    let with = |extra: &[&str]| -> Vec<String> {
        command.iter().cloned().chain(extra.iter().map(|s| s.to_string())).collect()
    };
    let (tokenize_job, mut array_job) = jobs(name, command, runs, parallel, &state.excluded);
    let (tokenize_name, trials_name) = (tokenize_job.name.clone(), array_job.name.clone());
    // A driver killed between a submission and saving its id finds the job by its name (which
    // names the sweep and the store).
    if state.tokenize.is_none() {
        state.tokenize = slurm.find_named(&tokenize_name)?;
    }
    match &state.tokenize {
        Some(id) => say(format!("re-attached to the tokenize job {id}")),
        None => {
            let id = slurm.submit(&tokenize_job)?;
            state.tokenize = Some(id.clone());
            state.save(state_path)?;
            let log = slurm.log(&tokenize_name, &id);
            say(format!("tokenize submitted as Slurm job {id} (log: {})", log.display()));
        }
    }
    if state.array.is_none() {
        state.array = slurm.find_named(&trials_name)?;
    }
    match &state.array {
        Some(id) => say(format!("re-attached to the trials' job array {id}")),
        None => {
            array_job.after = state.tokenize.iter().cloned().collect();
            let id = slurm.submit(&array_job)?;
            state.array = Some(id.clone());
            state.save(state_path)?;
            let logs = slurm.log(&trials_name, &format!("{id}_<trial>"));
            say(format!(
                "{} trial(s) submitted as Slurm job array {id} (logs: {})",
                runs.len(),
                logs.display()
            ));
        }
    }
    let array = state.array.clone().expect("submitted above");
    let tokenize = state.tokenize.clone().expect("submitted above");
    // Consecutive failures per node, and the ended jobs already counted.
    let mut failures: BTreeMap<String, u32> = BTreeMap::new();
    let mut counted: BTreeSet<String> = BTreeSet::new();
    let mut given_up: BTreeSet<u64> = BTreeSet::new();
    loop {
        let tokenize_tasks = slurm.tasks(&tokenize)?;
        if let Some(t) = tokenize_tasks.first().filter(|t| t.failed()) {
            let log = slurm.log(&tokenize_name, &t.id);
            slurm.cancel(&[&array]);
            return Err(SlurmError::JobFailed {
                what: "the tokenize job".into(),
                job: t.id.clone(),
                state: t.state.clone(),
                log,
            });
        }
        let array_tasks = slurm.tasks(&array)?;
        let mut waiting = false;
        for &k in runs {
            if given_up.contains(&k) {
                continue;
            }
            let attempts = state.again.get(&k).map_or(0, Vec::len);
            // The trial's latest job: its last resubmission, or its array task.
            let latest: Option<TaskState> = match state.again.get(&k).and_then(|ids| ids.last()) {
                Some(id) => slurm.tasks(id)?.into_iter().next(),
                None => array_task(&array_tasks, &array, k),
            };
            let Some(task) = latest else {
                // Pending inside the array's range, or purged after it ended: the store decides.
                waiting |= array_tasks.iter().any(|t| t.index.as_deref().is_some_and(|r| in_range(r, k)));
                continue;
            };
            if task.completed() {
                if counted.insert(task.id.clone()) && !task.node.is_empty() {
                    failures.insert(task.node.clone(), 0);
                }
                continue;
            }
            if !task.failed() {
                waiting = true;
                continue;
            }
            let log_name = if attempts == 0 { &trials_name } else { &format!("{name}-trial{k}") };
            if counted.insert(task.id.clone()) && !task.interrupted() && !task.node.is_empty() {
                let n = failures.entry(task.node.clone()).or_default();
                *n += 1;
                if *n >= retries.exclude_after && !state.excluded.contains(&task.node) {
                    state.excluded.push(task.node.clone());
                    state.save(state_path)?;
                    say(format!(
                        "node {} failed {n} jobs in a row: excluded from the next submissions",
                        task.node
                    ));
                }
            }
            if attempts as u32 >= retries.retries {
                say(format!(
                    "trial {k}: job {} ended {} and was tried {} time(s); its log: {}",
                    task.id,
                    task.state,
                    attempts + 1,
                    slurm.log(log_name, &task.id).display()
                ));
                given_up.insert(k);
                continue;
            }
            let again_name = format!("{name}-trial{k}");
            let job = Job {
                name: again_name.clone(),
                command: with(&["--trial", &k.to_string()]),
                exclude: state.excluded.clone(),
                ..Job::default()
            };
            // Nowhere left to run it (every node excluded, say): the sweep's other jobs stop too.
            let id = slurm.submit(&job).inspect_err(|_| slurm.cancel(&[&array])).map_err(|e| match e {
                SlurmError::Command { command, message } if !state.excluded.is_empty() => {
                    SlurmError::Command {
                        command,
                        message: format!("{message} (excluded nodes: {})", state.excluded.join(", ")),
                    }
                }
                e => e,
            })?;
            state.again.entry(k).or_default().push(id.clone());
            state.save(state_path)?;
            say(format!(
                "trial {k}: job {} ended {}; submitted again as job {id} (log: {})",
                task.id,
                task.state,
                slurm.log(&again_name, &id).display()
            ));
            waiting = true;
        }
        if !waiting {
            // Done with: a later run of the sweep submits afresh (and finds its trials stored).
            std::fs::remove_file(state_path)
                .map_err(|source| SlurmError::Io { path: state_path.to_path_buf(), source })?;
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// The tokenize job and the trials' array (see [`run_trials`]).
fn jobs(name: &str, command: &[String], runs: &[u64], parallel: u64, excluded: &[String]) -> (Job, Job) {
    let first = runs.first().map_or("0".to_string(), u64::to_string);
    let mut tokenize = command.to_vec();
    tokenize.extend(["--trial".into(), first, "--until".into(), "tokenize".into()]);
    let indices: Vec<String> = runs.iter().map(u64::to_string).collect();
    let tokenize = Job {
        name: format!("{name}-tokenize"),
        command: tokenize,
        exclude: excluded.to_vec(),
        ..Job::default()
    };
    let array = Job {
        name: format!("{name}-trial"),
        command: command.to_vec(),
        array: Some(format!("{}%{}", indices.join(","), parallel.max(1))),
        exclude: excluded.to_vec(),
        ..Job::default()
    };
    (tokenize, array)
}

/// The batch scripts [`run_trials`] would submit first, with how each is submitted (`--dry-run`).
pub fn trial_scripts(slurm: &Slurm, name: &str, command: &[String], runs: &[u64], parallel: u64) -> String {
    let (tokenize, array) = jobs(name, command, runs, parallel, &[]);
    format!(
        "# sbatch --parsable\n{}# sbatch --parsable --dependency=afterok:<the tokenize job> --kill-on-invalid-dep=yes\n{}",
        slurm.script(&tokenize),
        slurm.script(&array)
    )
}

/// Task `k` of array `array`, when `scontrol` lists it on its own line.
fn array_task(tasks: &[TaskState], array: &str, k: u64) -> Option<TaskState> {
    let id = format!("{array}_{k}");
    tasks.iter().find(|t| t.id == id).cloned()
}

/// Whether index `k` is in `range`, as `scontrol` prints a pending array's indices
/// (`2-5`, `0,3,7-9`, `1-9:2`, with an optional `%limit`).
fn in_range(range: &str, k: u64) -> bool {
    let range = range.split('%').next().unwrap_or("");
    range.split(',').any(|part| {
        let (span, step) = part.split_once(':').unwrap_or((part, "1"));
        let step: u64 = step.parse().unwrap_or(1).max(1);
        match span.split_once('-') {
            Some((lo, hi)) => match (lo.parse::<u64>(), hi.parse::<u64>()) {
                (Ok(lo), Ok(hi)) => (lo..=hi).contains(&k) && (k - lo).is_multiple_of(step),
                _ => false,
            },
            None => span.parse() == Ok(k),
        }
    })
}

/// Where the driver of sweep `id` keeps what it submitted.
pub fn state_path(logs: &Path, id: &str) -> PathBuf {
    logs.join(format!("sweep-{id}.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_array_ranges_are_read_as_scontrol_prints_them() {
        assert!(in_range("2-5", 4));
        assert!(!in_range("2-5", 6));
        assert!(in_range("0,3,7-9%2", 8));
        assert!(!in_range("0,3,7-9%2", 5));
        assert!(in_range("1-9:2", 5));
        assert!(!in_range("1-9:2", 4));
        assert!(in_range("3", 3));
        assert!(!in_range("", 0));
    }

    #[test]
    fn the_drivers_state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sweep-x.json");
        assert_eq!(Submitted::load(&path).unwrap(), Submitted::default());
        let state = Submitted {
            tokenize: Some("7".into()),
            array: Some("8".into()),
            again: BTreeMap::from([(3, vec!["12".into()])]),
            excluded: vec!["node1".into()],
        };
        state.save(&path).unwrap();
        assert_eq!(Submitted::load(&path).unwrap(), state);
        std::fs::write(&path, b"{").unwrap();
        assert!(Submitted::load(&path).is_err());
    }
}
