//! `wizard generate`: one completion of a prompt, printed alone on stdout.
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use model::complete::{complete, complete_speculative};
use model::generate::{Finish, GenerateConfig};
use model::sampling::Sampling;
use model::speculative::{self, Drafter, SpeculativeConfig, MAX_GAMMA};
use model::tokenizer::Tokenizer;
use tch::{Kind, Tensor};

use crate::device::{checked_device, load_model, model_and_draft_precisions};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory in Hugging Face format (config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// The prompt text.
    #[arg(long, conflicts_with = "prompt_file", required_unless_present = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from this file.
    #[arg(long, value_name = "FILE")]
    prompt_file: Option<PathBuf>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long)]
    top_p: Option<f64>,
    /// Keep only the K most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Seed for sampling; the same seed gives the same completion.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop before this text (repeatable).
    #[arg(long = "stop", value_name = "STR")]
    stops: Vec<String>,
    /// `cpu`, `cuda`, `cuda:N`, or `auto` (the first GPU if there is one).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Weight dtype: float32, bfloat16, float16, int8 or int4 (default: what a directory from
    /// `wizard quantize` holds, else bfloat16 on GPU, float32 on CPU).
    #[arg(long, value_parser = crate::device::known_dtype)]
    dtype: Option<String>,
    /// Speculative decoding with this smaller model (same tokenizer) as the drafter; `--model`'s own
    /// directory with `--draft-dtype int8` (or int4) is self-speculation (the quantized copy drafts).
    #[arg(long, value_name = "DIR", conflicts_with = "prompt_lookup")]
    draft: Option<PathBuf>,
    /// The drafter's weight dtype (default: what a quantized draft directory holds, else the target's).
    #[arg(long, requires = "draft", value_parser = crate::device::known_dtype)]
    draft_dtype: Option<String>,
    /// Speculative decoding with drafts looked up in the prompt (n-gram match).
    #[arg(long)]
    prompt_lookup: bool,
    /// Every draft has this many tokens (1-63); by default each draft's length is chosen by a cost
    /// model measured for the pair on this machine, none where drafting would not pay.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=MAX_GAMMA as i64))]
    gamma: Option<u16>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.gamma.is_some() && args.draft.is_none() && !args.prompt_lookup {
        anyhow::bail!("--gamma needs --draft or --prompt-lookup: it is the length of each draft");
    }
    let prompt = match (&args.prompt, &args.prompt_file) {
        (Some(text), _) => text.clone(),
        (None, Some(path)) => {
            std::fs::read_to_string(path).with_context(|| format!("cannot read --prompt-file {}", path.display()))?
        }
        (None, None) => unreachable!("clap requires one of them"),
    };
    let sampling = Sampling { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed };
    sampling.validate()?;
    let device = checked_device(&args.device)?;
    let (precision, draft_precision) = model_and_draft_precisions(
        args.dtype.as_deref(),
        args.draft_dtype.as_deref(),
        device,
        &args.model,
        args.draft.as_deref(),
    )?;
    let tokenizer = Tokenizer::from_dir(&args.model)?;
    if let Some(draft) = &args.draft {
        crate::device::check_draft_tokenizer(&args.model, draft)?;
    }
    let model = load_model(&args.model, precision, device)?;
    if tracing::enabled!(tracing::Level::INFO) {
        let probe = Tensor::zeros([1, 8], (Kind::Int64, device));
        let cache = model.new_cache(1, 8)?;
        tracing::info!("prefill attention backend: {}", model.attention_backend(&probe, &cache)?);
    }
    let config = GenerateConfig {
        max_new_tokens: args.max_new_tokens,
        num_samples: 1,
        sampling,
        eos_token_id: model.config().eos_token_id.or(Some(i64::from(tokenizer.eos_id()))),
    };
    let completion = if args.draft.is_some() || args.prompt_lookup {
        let draft = args.draft.as_ref().map(|dir| load_model(dir, draft_precision, device)).transpose()?;
        if let (Some(draft), Some(dir)) = (&draft, &args.draft) {
            speculative::check_draft(&model, draft).with_context(|| format!("--draft {}", dir.display()))?;
        }
        let drafter = match &draft {
            Some(model) => Drafter::Model(model),
            None => Drafter::PromptLookup { max_ngram: 3 },
        };
        let speculative = SpeculativeConfig {
            max_new_tokens: config.max_new_tokens,
            sampling: config.sampling.clone(),
            eos_token_id: config.eos_token_id,
            ..SpeculativeConfig::default()
        };
        let speculative = match args.gamma {
            Some(gamma) => {
                let gamma = usize::from(gamma);
                SpeculativeConfig { gamma, max_gamma: gamma, adaptive: false, ..speculative }
            }
            None => speculative,
        };
        let (completion, stats) =
            complete_speculative(&model, &drafter, &tokenizer, &prompt, &speculative, &args.stops)?;
        tracing::info!(
            target_passes = stats.target_passes,
            drafted = stats.drafted,
            accepted = stats.accepted,
            "speculative decoding"
        );
        completion
    } else {
        complete(&model, &tokenizer, &prompt, &config, &args.stops)?.remove(0)
    };
    tracing::info!(tokens = completion.tokens, finish = ?completion.finish, "generated");
    if completion.finish == Finish::Length && completion.tokens < args.max_new_tokens {
        eprintln!(
            "warning: stopped after {} of the {} new tokens asked for: the model's context (n_positions = {}) is full",
            completion.tokens,
            args.max_new_tokens,
            model.config().n_positions
        );
    }
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(completion.text.as_bytes())?;
    stdout.flush()?;
    Ok(ExitCode::SUCCESS)
}
