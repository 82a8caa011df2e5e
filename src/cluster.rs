//! The binary's side of the Slurm executor: from the command line's options to the jobs the
//! library submits (`pipe run --executor slurm`, `pipe sweep --executor slurm`).

use crate::Failure;
use crate::cli::{ExecutorArgs, PipelineArgs, StoreArgs};

/// `pipe run --executor slurm`: one batch job per stage, chained by dependencies, each running
/// this binary on the shared store; returns once the last one completed (false for a dry run,
/// which only prints the scripts). The caller then finishes the run here, every stage done.
pub fn run_on_slurm(
    pipeline: &PipelineArgs,
    store: &StoreArgs,
    executor: &ExecutorArgs,
) -> Result<bool, Failure> {
    let command = job_command(&["run"], &pipeline.file, &pipeline.overrides, store)?;
    let slurm = slurm_for(executor, store);
    if executor.dry_run {
        print!("{}", pipe::executor::slurm::pipeline_scripts(&slurm, &command));
        return Ok(false);
    }
    pipe::executor::slurm::run_pipeline(&slurm, &command, &mut |line| eprintln!("  {line}"))?;
    Ok(true)
}

/// `pipe sweep --executor slurm`: the trials whose values are fixed before any result run as a
/// Slurm job array (after one tokenize job); returns when they ended (false for a dry run). The
/// caller then runs the sweep here, which finds them in the store.
pub fn sweep_on_slurm(
    spec: &pipe::sweep::spec::SweepSpec,
    file: &std::path::Path,
    sets: &[String],
    store: &StoreArgs,
    executor: &ExecutorArgs,
    env: &[(String, String)],
) -> Result<bool, Failure> {
    use pipe::executor::trials::{Retries, run_trials, state_path};
    let id = pipe::sweep::trials::sweep_id(spec);
    let runs: Vec<u64> = pipe::sweep::run::first_runs(spec, env)?.into_iter().map(|(k, _)| k).collect();
    let command = job_command(&["sweep", "trial"], file, sets, store)?;
    let slurm = slurm_for(executor, store);
    let store_dir = pipe::executor::slurm::absolute(&store.store);
    let name = sweep_job_name(spec, store);
    if executor.dry_run {
        print!("{}", pipe::executor::trials::trial_scripts(&slurm, &name, &command, &runs, spec.parallel));
        return Ok(false);
    }
    let retries = Retries { retries: executor.retries, exclude_after: executor.exclude_after.max(1) };
    let state = state_path(&store_dir.join("slurm"), &id[..12]);
    run_trials(&slurm, &name, &command, &runs, spec.parallel, retries, &state, &mut |line| {
        eprintln!("  {line}")
    })?;
    Ok(true)
}

/// The prefix of a sweep's job names: the sweep and the store, so that a restarted driver finds
/// its own jobs, not another store's run of the same sweep.
pub fn sweep_job_name(spec: &pipe::sweep::spec::SweepSpec, store: &StoreArgs) -> String {
    let id = pipe::sweep::trials::sweep_id(spec);
    let store_dir = pipe::executor::slurm::absolute(&store.store);
    let store_digest = pipe::digest::bytes(store_dir.display().to_string().as_bytes());
    format!("sweep-{}-{}", &id[..12], &store_digest[..8])
}

/// The command a job runs: this binary, `subcommand`, the file (absolute), the overrides, and
/// the store (absolute) with its remote.
pub fn job_command(
    subcommand: &[&str],
    file: &std::path::Path,
    overrides: &[String],
    store: &StoreArgs,
) -> Result<Vec<String>, Failure> {
    use pipe::executor::slurm::absolute;
    let exe = std::env::current_exe()
        .map_err(|e| Failure { code: 1, message: format!("cannot find pipe's own path: {e}") })?;
    let mut command = vec![exe.display().to_string()];
    command.extend(subcommand.iter().map(|s| s.to_string()));
    command.push(absolute(file).display().to_string());
    for o in overrides {
        command.extend(["--set".into(), o.clone()]);
    }
    command.extend(["--store".into(), absolute(&store.store).display().to_string()]);
    if let Some(url) = &store.remote {
        command.extend(["--remote".into(), url.clone()]);
    }
    if store.push {
        command.push("--push".into());
    }
    if store.remote_required {
        command.push("--remote-required".into());
    }
    Ok(command)
}

/// The cluster the executor options describe, its logs under `<store>/slurm/`.
pub fn slurm_for(executor: &ExecutorArgs, store: &StoreArgs) -> pipe::executor::slurm::Slurm {
    let resources = pipe::executor::slurm::Resources {
        partition: executor.partition.clone(),
        cpus_per_task: executor.cpus_per_task,
        mem: executor.mem.clone(),
        time: executor.time.clone(),
        gpus: executor.gpus,
        extra: executor.sbatch_args.clone(),
    };
    pipe::executor::slurm::Slurm::new(resources, pipe::executor::slurm::absolute(&store.store).join("slurm"))
}
