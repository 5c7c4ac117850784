//! `wizard tokenizer train`: learns a byte-level BPE vocabulary with StarCoder's special tokens from
//! source trees and JSONL corpora, and writes a Hugging Face tokenizer directory that
//! `transformers.AutoTokenizer.from_pretrained` loads.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use indicatif::{HumanBytes, ProgressBar};
use model::tokenizer::{self, TrainConfig, TrainEvent, DEFAULT_MODEL_MAX_LENGTH, MIN_VOCAB_SIZE, SPECIAL_TOKENS};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Train on source files and JSONL corpora; write tokenizer.json, tokenizer_config.json and
    /// special_tokens_map.json.
    Train(TrainArgs),
}

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Source files, JSONL files (one document per line, in `content` or `text`), or directories, which
    /// are walked for code files and .jsonl files.
    #[arg(long = "input", value_name = "PATH", required = true, num_args = 1..)]
    inputs: Vec<PathBuf>,

    /// Vocabulary size, counting the 19 special tokens and the 256 byte tokens.
    #[arg(long, value_name = "N", value_parser = parse_vocab_size)]
    vocab_size: usize,

    /// Directory to write the tokenizer into (created if missing; its tokenizer files are replaced).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    /// Merge only pairs that occur at least this often.
    #[arg(long, value_name = "F", default_value_t = 2)]
    min_frequency: u64,

    /// Take files with this extension from directories (repeatable) instead of the default code extensions.
    #[arg(long = "extension", value_name = "EXT")]
    extensions: Vec<String>,

    /// Context length written to tokenizer_config.json as `model_max_length`.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MODEL_MAX_LENGTH)]
    model_max_length: usize,
}

fn parse_vocab_size(value: &str) -> Result<usize, String> {
    let size: usize = value.parse().map_err(|e| format!("{e}"))?;
    if size < MIN_VOCAB_SIZE {
        return Err(format!(
            "must be at least {MIN_VOCAB_SIZE}: {} special tokens + 256 byte tokens",
            SPECIAL_TOKENS.len()
        ));
    }
    Ok(size)
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Train(args) => train(args),
    }
}

fn train(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let mut config = TrainConfig::new(args.inputs, args.vocab_size);
    config.min_frequency = args.min_frequency;
    config.model_max_length = args.model_max_length;
    if !args.extensions.is_empty() {
        config.extensions = args.extensions;
    }

    let spinner = ProgressBar::new_spinner().with_message("looking for source files");
    spinner.enable_steady_tick(Duration::from_millis(100));
    let progress = spinner.clone();
    let report = tokenizer::train_with_progress(&config, &args.out, &mut |event| match event {
        TrainEvent::Found { files } => progress.set_message(format!("reading {files} files")),
        TrainEvent::Read { path, documents, bytes } => {
            progress.set_message(format!("read {documents} documents ({}), {}", HumanBytes(bytes), path.display()))
        }
        TrainEvent::Merging { documents } => {
            progress.set_message(format!("learning merges from {documents} documents"))
        }
        TrainEvent::Writing { dir } => progress.set_message(format!("writing {}", dir.display())),
    });
    spinner.finish_and_clear();
    // The message, not the error: `ModelError::Io` already prints its source, which `{:#}` would repeat.
    let report = report.map_err(|error| anyhow::anyhow!("cannot train the tokenizer: {error}"))?;

    let skipped = match report.skipped_non_utf8 {
        0 => String::new(),
        1 => " (1 non-UTF-8 file skipped)".into(),
        n => format!(" ({n} non-UTF-8 files skipped)"),
    };
    println!("documents       {} from {} files{skipped}", report.documents, report.files);
    println!("bytes           {}", HumanBytes(report.bytes));
    println!(
        "vocab size      {} ({} special tokens, 256 bytes, {} merges)",
        report.vocab_size,
        SPECIAL_TOKENS.len(),
        report.vocab_size.saturating_sub(MIN_VOCAB_SIZE)
    );
    println!("written to      {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}
