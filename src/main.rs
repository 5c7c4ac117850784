//! The `wizard` command line: parses arguments, sets up logging, and hands each subcommand to the
//! library crate that does the work. Errors become a message on stderr and a non-zero exit code.
#![forbid(unsafe_code)]
mod device;
mod doctor;
mod eval;
mod evolve;
mod generate;
mod logging;
mod python;
mod quantize;
mod quickstart;
mod serve;
mod stages;
mod tokenizer;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Evol-Instruct data, StarCoder-style training, pass@k evaluation and editor completions.
#[derive(Parser)]
#[command(name = "wizard", version, about)]
struct Cli {
    /// Write logs to this file instead of stderr (filter with WIZARD_LOG, e.g. `WIZARD_LOG=debug`);
    /// the stages `wizard pipeline` starts append to the same file.
    #[arg(long, global = true, value_name = "PATH", env = "WIZARD_LOG_FILE")]
    log_file: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check the installation: libtorch, CUDA devices, threads and the Python peers.
    Doctor(doctor::Args),
    /// HumanEval and MBPP pass@k: generate samples, execute them in a sandbox, score and report.
    #[command(subcommand)]
    Eval(eval::Command),
    /// Evol-Instruct: evolve code instructions over rounds into SQLite (`run`, the default), or read
    /// a run's `status`, an item's `lineage`, or `export` training JSONL.
    Evolve(evolve::Args),
    /// Complete a prompt with a model; prints only the completion.
    Generate(generate::Args),
    /// WizardCoder's whole procedure from a TOML config: tokenizer, FIM pretraining, rounds of
    /// evolve → SFT → pass@k while pass@1 rises, and a report. Resumable; re-runs only what changed.
    Pipeline(stages::Args),
    /// Write a model directory with int8 or int4 weights (blocks of 32, fp32 scales) and report each layer's error.
    Quantize(quantize::Args),
    /// The pipeline at toy scale, offline, in minutes on CPU, then how to attach `wizard serve` to editors.
    Quickstart(quickstart::Args),
    /// The language server (stdio or --port), and with --http the OpenAI-compatible HTTP API.
    Serve(serve::Args),
    /// Train a byte-level BPE tokenizer with StarCoder's special tokens.
    #[command(subcommand)]
    Tokenizer(tokenizer::Command),
    /// Pretrain with FIM or fine-tune on instructions, alone or data-parallel with ZeRO.
    Train(train::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = logging::init(cli.log_file.as_deref()) {
        eprintln!("wizard: {error:#}");
        return ExitCode::from(2);
    }
    if let kernels::runtime::CudaBackend::Failed(message) = kernels::runtime::cuda_backend() {
        tracing::warn!("libtorch's CUDA backend did not load, so only the CPU is usable: {message}");
    }
    let prints_a_report = match &cli.command {
        Command::Doctor(_) | Command::Generate(_) | Command::Quantize(_) => true,
        Command::Evolve(args) => args.only_reads(),
        _ => false,
    };
    if prints_a_report {
        kernels::process::end_quietly_when_stdout_closes();
    }
    let result = match cli.command {
        Command::Doctor(args) => doctor::run(args),
        Command::Eval(command) => eval::run(command),
        Command::Evolve(args) => evolve::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Pipeline(args) => stages::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Quickstart(args) => quickstart::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Tokenizer(command) => tokenizer::run(command),
        Command::Train(args) => train::run(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            // On a terminal the log is stderr too: the line below says it once.
            let text = error_text(&error);
            if logging::file().is_some() {
                tracing::error!("{text}");
            }
            eprintln!("wizard: error: {text}");
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes, each said once: a message that already quotes its cause (a
/// library error that wraps another and says it) is not followed by that cause again.
fn error_text(error: &anyhow::Error) -> String {
    let mut text = String::new();
    let mut outer = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if !outer.contains(&message) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&message);
        }
        outer = message;
    }
    text
}
