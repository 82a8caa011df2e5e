//! The command line: what each subcommand takes (clap derive).

use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Fine-tune transformer models from declarative TOML pipelines, with cached, content-hashed
/// stages.
#[derive(Debug, Parser)]
#[command(name = "pipe", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a pipeline: reuse stored stages, run the rest, write the run record.
    Run {
        #[command(flatten)]
        pipeline: PipelineArgs,
        #[command(flatten)]
        store: StoreArgs,
        /// Print one JSON object (run, stages, metrics) instead of progress and a summary.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        executor: ExecutorArgs,
        /// Log to this MLflow tracking server (http://HOST:PORT, its REST API) [env:
        /// MLFLOW_TRACKING_URI]. A server that fails is a warning; the training goes on.
        #[arg(long, value_name = "URI")]
        mlflow: Option<String>,
        /// Run the stages up to this one and write no record (what an executor's job runs).
        #[arg(long, hide = true, value_parser = ["tokenize", "train", "evaluate"])]
        until: Option<String>,
    },
    /// Show each stage's key and whether it would run, and why.
    Plan {
        #[command(flatten)]
        pipeline: PipelineArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Show a run record (a unique prefix of the run id is enough).
    Show {
        /// Run id or unique prefix.
        run: String,
        /// Print the fully resolved pipeline as TOML (it runs again to the same run id).
        #[arg(long)]
        config: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Re-execute a recorded run from scratch and compare every output with the record.
    Reproduce {
        /// Run id or unique prefix (the record `<store>/<run>.toml`, e.g. from git).
        run: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Re-hash every stored stage and run record; set aside what is corrupt (into `corrupt/`) and
    /// clear what killed runs left behind. With a remote, also download and re-hash every stage
    /// in it and name the corrupt or incomplete ones. Exits 1 when something was corrupt.
    Verify {
        /// Also remove the checkpoints of interrupted runs (kept by default: the next run of
        /// their stage resumes from them).
        #[arg(long)]
        drop_checkpoints: bool,
        /// Upload a corrupt or missing remote blob again from a good local copy.
        #[arg(long, requires = "remote")]
        repair: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Push a run to the remote: its stages' outputs, then its record (what the remote has
    /// already is skipped).
    Push {
        /// Run id or unique prefix.
        run: String,
        /// Print one JSON object (run, record, stages) instead of lines.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Pull a run from the remote: its record and every stage output the local store lacks,
    /// each re-hashed; then `pipe show`, `pipe predict` and `pipe run` need no training.
    Pull {
        /// Run id or unique prefix (looked up locally, then in the remote).
        run: String,
        /// Print one JSON object (run, record, stages) instead of lines.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Delete stage outputs that no run record younger than `--older-than` refers to (never a
    /// stage being worked on).
    Gc {
        /// Delete stages finished longer ago than this that no run record created since refers
        /// to: `30d`, `12h`, `90m`, `0s`.
        #[arg(long, value_name = "AGE")]
        older_than: String,
        /// List what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Classify texts with a run's trained model: prints CSV with the predicted label and each
    /// class's probability (and the accuracy when the input has labels).
    Predict {
        /// Run id or unique prefix.
        run: String,
        /// A text to classify (repeatable).
        #[arg(
            long = "text",
            value_name = "TEXT",
            required_unless_present = "input",
            conflicts_with = "input"
        )]
        texts: Vec<String>,
        /// A data file of texts to classify (CSV with a header, JSON Lines or Parquet); when it has
        /// the label column, the accuracy is printed too.
        #[arg(long, value_name = "FILE")]
        input: Option<PathBuf>,
        /// The format of --input (csv, jsonl or parquet) [default: by its extension].
        #[arg(long, value_name = "FORMAT", requires = "input")]
        format: Option<pipe::data::Format>,
        /// Write the predictions to this CSV file instead of standard output.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// The text column of --input [default: the run's dataset.text_column].
        #[arg(long, value_name = "NAME", requires = "input")]
        text_column: Option<String>,
        /// The label column of --input [default: the run's dataset.label_column].
        #[arg(long, value_name = "NAME", requires = "input")]
        label_column: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Continue a prompt with a run's trained causal LM (greedy unless --temperature is given;
    /// seeded sampling gives the same text on every machine).
    Generate {
        /// Run id or unique prefix.
        run: String,
        /// The prompt (written through the chat template when the run trained that way).
        #[arg(long)]
        prompt: String,
        /// The most tokens to generate (fewer when the model ends its answer).
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Sample at this temperature instead of decoding greedily.
        #[arg(long)]
        temperature: Option<f64>,
        /// With --temperature: sample from the most probable tokens whose probabilities sum to P.
        #[arg(long, value_name = "P", default_value_t = 1.0, requires = "temperature")]
        top_p: f64,
        /// With --temperature: the seed of the draws.
        #[arg(long, default_value_t = 0, requires = "temperature")]
        seed: u64,
        /// Write the prompt through the chat template (the default when the run did).
        #[arg(long, conflicts_with = "no_chat")]
        chat: bool,
        /// Use the prompt as it is, without the chat template.
        #[arg(long)]
        no_chat: bool,
        /// Print one JSON object (prompt ids, generated ids, text) instead of the text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Show the parameter and metric differences between two runs.
    Diff {
        /// First run (id or unique prefix).
        a: String,
        /// Second run (id or unique prefix).
        b: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Run a hyperparameter sweep file: each trial is a pipeline run (cached and reproducible
    /// like any other); prints the trials best first and writes `<store>/sweeps/<id>.toml`.
    /// `pipe sweep plan FILE` lists its trials first; `pipe sweep show ID|FILE` and
    /// `pipe sweep best ID|FILE` read a sweep's record.
    #[command(args_conflicts_with_subcommands = true)]
    Sweep {
        #[command(subcommand)]
        action: Option<SweepAction>,
        /// The sweep file (TOML).
        file: Option<PathBuf>,
        /// Override a value of the swept pipeline for every trial, e.g. `--set train.epochs=2`
        /// (repeatable; part of the sweep's identity).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        #[command(flatten)]
        store: StoreArgs,
        /// Print one JSON object (sweep, record, best, trials) instead of progress and a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        executor: ExecutorArgs,
        /// Log to this MLflow tracking server (http://HOST:PORT, its REST API) [env:
        /// MLFLOW_TRACKING_URI]. A server that fails is a warning; the training goes on.
        #[arg(long, value_name = "URI")]
        mlflow: Option<String>,
    },
    /// List the runs in the store with their metrics (and, with a remote, the runs only it has).
    Ls {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print the JSON Schema of pipeline files (or of sweep files).
    Schema {
        /// The schema of sweep files instead.
        #[arg(long)]
        sweep: bool,
    },
}

/// A sweep's plan before it runs, or its record after.
#[derive(Debug, Subcommand)]
pub enum SweepAction {
    /// The trials the sweep will run, without running them (with what the store has of them).
    Plan {
        /// The sweep file (TOML).
        file: PathBuf,
        /// As for `pipe sweep FILE --set`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        #[command(flatten)]
        store: StoreArgs,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The sweep's trials, best first (from its record).
    Show {
        /// The sweep's id (or a unique prefix), or its sweep file.
        sweep: String,
        #[command(flatten)]
        store: StoreArgs,
        /// Print the record as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// One trial's first run (what an executor's job runs): trial `--trial K`, or the index of
    /// a Slurm array task.
    #[command(hide = true)]
    Trial {
        file: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        #[command(flatten)]
        store: StoreArgs,
        /// The trial's number [default: $SLURM_ARRAY_TASK_ID].
        #[arg(long)]
        trial: Option<u64>,
        /// Run its stages up to this one only.
        #[arg(long, value_parser = ["tokenize", "train", "evaluate"])]
        until: Option<String>,
    },
    /// The run id of the sweep's best trial (for `pipe reproduce`, `pipe predict`...).
    Best {
        /// The sweep's id (or a unique prefix), or its sweep file.
        sweep: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, Args)]
pub struct PipelineArgs {
    /// The pipeline file (TOML).
    pub file: PathBuf,
    /// Override a pipeline value, e.g. `--set train.epochs=2` (repeatable; last wins).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

/// Where `pipe run` runs its stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExecutorArg {
    /// Here, in this process.
    Local,
    /// As Slurm batch jobs, one per stage, chained by dependencies (the store must be on a file
    /// system every node sees); the run is then finished here from the store.
    Slurm,
}

#[derive(Debug, Args)]
pub struct ExecutorArgs {
    /// Where the stages run.
    #[arg(long, value_enum, default_value = "local")]
    pub executor: ExecutorArg,
    /// Slurm: the partition of the jobs.
    #[arg(long, help_heading = "Slurm executor")]
    pub partition: Option<String>,
    /// Slurm: CPUs per job.
    #[arg(long, help_heading = "Slurm executor")]
    pub cpus_per_task: Option<u32>,
    /// Slurm: memory per job (`16G`).
    #[arg(long, help_heading = "Slurm executor")]
    pub mem: Option<String>,
    /// Slurm: time limit per job (`2:00:00`).
    #[arg(long, help_heading = "Slurm executor")]
    pub time: Option<String>,
    /// Slurm: GPUs per job (`--gres=gpu:N`).
    #[arg(long, help_heading = "Slurm executor")]
    pub gpus: Option<u32>,
    /// Slurm: a further `sbatch` argument, e.g. `--sbatch-arg=--account=ml` (repeatable).
    #[arg(
        long = "sbatch-arg",
        value_name = "ARG",
        allow_hyphen_values = true,
        help_heading = "Slurm executor"
    )]
    pub sbatch_args: Vec<String>,
    /// Slurm: print the batch scripts that would be submitted, and submit nothing.
    #[arg(long, help_heading = "Slurm executor")]
    pub dry_run: bool,
    /// Slurm: how many times a sweep's trial is submitted again after its job was cancelled,
    /// pre-empted, out of time, lost its node, or failed on a node then excluded.
    #[arg(long, default_value_t = 2, help_heading = "Slurm executor")]
    pub retries: u32,
    /// Slurm: exclude a node from later submissions after this many failed jobs in a row.
    #[arg(long, default_value_t = 3, help_heading = "Slurm executor")]
    pub exclude_after: u32,
}

#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The store directory.
    #[arg(long, env = "PIPE_STORE", default_value = "runs")]
    pub store: PathBuf,
    /// A remote store shared by a team, behind the local one: `s3://BUCKET/PREFIX` (credentials,
    /// region and `AWS_ENDPOINT_URL` as for the AWS CLI) or `file:///SHARED/DIR`. Stages missing
    /// locally are pulled from it instead of computed. Never part of a key.
    #[arg(long, env = "PIPE_REMOTE", value_name = "URL")]
    pub remote: Option<String>,
    /// Push every stage a run finishes (or finds locally), and its record, to the remote.
    #[arg(long, env = "PIPE_PUSH", requires = "remote", value_parser = BoolishValueParser::new())]
    pub push: bool,
    /// Fail when a transfer with the remote fails, instead of warning and computing locally.
    #[arg(long, env = "PIPE_REMOTE_REQUIRED", requires = "remote", value_parser = BoolishValueParser::new())]
    pub remote_required: bool,
}
