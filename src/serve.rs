//! `wizard serve`: the language server, over stdio (the default) or TCP on loopback. stdout is the
//! protocol, so nothing else is ever printed to it: logs go to stderr or `--log-file`.
use std::path::PathBuf;
use std::process::ExitCode;

use tch::Device;

use crate::device::{parse_device, weight_kind};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory in Hugging Face format (config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// A smaller draft model with the same tokenizer, for speculative decoding (without it, drafts
    /// come from prompt lookup in the document).
    #[arg(long, value_name = "DIR")]
    draft: Option<PathBuf>,
    /// Serve over TCP on 127.0.0.1:PORT instead of stdio.
    #[arg(long)]
    port: Option<u16>,
    /// `cpu`, `cuda`, `cuda:N`, or `auto` (the first GPU if there is one).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Weight dtype: float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU).
    #[arg(long)]
    dtype: Option<String>,
    /// Most tokens per completion (clients can change it through initializationOptions).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Most prompt tokens.
    #[arg(long, default_value_t = 1024)]
    context_budget: usize,
    /// libtorch threads for inference (default: half the cores). An editor's machine is busy with
    /// other work, and OpenMP threads that wait for a descheduled peer make latency spike.
    #[arg(long)]
    threads: Option<usize>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let device = parse_device(&args.device)?;
    let kind = weight_kind(args.dtype.as_deref(), device)?;
    let device = match device {
        Device::Cuda(index) if (index as i64) >= tch::Cuda::device_count() => {
            tracing::warn!("--device cuda:{index} is not available; serving on the CPU");
            Device::Cpu
        }
        other => other,
    };
    let settings =
        lsp::Settings { max_tokens: args.max_tokens, context_budget: args.context_budget, ..lsp::Settings::default() };
    // The model loads on the inference thread; a failure is reported to the client, not fatal.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args.threads.unwrap_or((cores / 2).max(1));
    let paths = lsp::ModelPaths { model: args.model, draft: args.draft, device, kind, threads };
    let engine = lsp::start_engine(paths);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        match args.port {
            Some(port) => lsp::serve_tcp(engine, settings, port).await,
            None => {
                lsp::serve_stdio(engine, settings).await;
                Ok(())
            }
        }
    })?;
    // The inference thread may be mid-request; the process ends without waiting for it.
    Ok(ExitCode::SUCCESS)
}
