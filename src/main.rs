//! The `wizard` command line: parses arguments, sets up logging, and hands each subcommand to the
//! library crate that does the work. Errors become a message on stderr and a non-zero exit code.
mod doctor;
mod generate;
mod logging;
mod python;
mod tokenizer;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Evol-Instruct data, StarCoder-style training, pass@k evaluation and editor completions.
#[derive(Parser)]
#[command(name = "wizard", version, about)]
struct Cli {
    /// Write logs to this file instead of stderr (filter with WIZARD_LOG, e.g. `WIZARD_LOG=debug`).
    #[arg(long, global = true, value_name = "PATH")]
    log_file: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check the installation: libtorch, CUDA devices, threads and the Python peers.
    Doctor(doctor::Args),
    /// Complete a prompt with a model; prints only the completion.
    Generate(generate::Args),
    /// Train a byte-level BPE tokenizer with StarCoder's special tokens.
    #[command(subcommand)]
    Tokenizer(tokenizer::Command),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = logging::init(cli.log_file.as_deref()) {
        eprintln!("wizard: {error:#}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Doctor(args) => doctor::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Tokenizer(command) => tokenizer::run(command),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("wizard: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
