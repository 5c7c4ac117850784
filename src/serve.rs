//! `wizard serve`: the language server, over stdio (the default) or TCP on loopback, or with
//! `--http` the OpenAI-compatible HTTP API over the batching engine. stdout may be the protocol, so
//! nothing else is ever printed to it: logs go to stderr or `--log-file`.
use std::path::PathBuf;
use std::process::ExitCode;

use tch::Device;

use crate::device::{model_and_draft_precisions, parse_device};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory in Hugging Face format (config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// A smaller draft model with the same tokenizer, for speculative decoding (without it, drafts
    /// come from prompt lookup in the document).
    #[arg(long, value_name = "DIR")]
    draft: Option<PathBuf>,
    /// Weight dtype of the draft (default: what a quantized draft directory holds, else the
    /// target's). `--draft` naming the model's own directory with `--draft-dtype int8` (or int4)
    /// is self-speculation: the quantized copy drafts over the target's cache.
    #[arg(long, requires = "draft", value_parser = crate::device::known_dtype)]
    draft_dtype: Option<String>,
    /// Serve over TCP on 127.0.0.1:PORT instead of stdio.
    #[arg(long)]
    port: Option<u16>,
    /// `cpu`, `cuda`, `cuda:N`, or `auto` (the first GPU if there is one).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Weight dtype: float32, bfloat16, float16, int8 or int4 (default: what a directory from
    /// `wizard quantize` holds, else bfloat16 on GPU, float32 on CPU).
    #[arg(long, value_parser = crate::device::known_dtype)]
    dtype: Option<String>,
    /// Most tokens per completion (clients can change it through initializationOptions).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Most prompt tokens.
    #[arg(long, default_value_t = 1024)]
    context_budget: usize,
    /// Serve the OpenAI-compatible HTTP API on [ADDR:]PORT (default address 127.0.0.1); with --port
    /// the language server runs beside it over TCP, on the same engine.
    #[arg(long, value_name = "[ADDR:]PORT")]
    http: Option<String>,
    /// Name of an environment variable holding the API key HTTP clients must send as a bearer token.
    #[arg(long, value_name = "NAME")]
    api_key_env: Option<String>,
    /// Sequences decoding together (HTTP).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Requests waiting for a place in the batch before new ones get 429 (HTTP).
    #[arg(long, default_value_t = 64)]
    max_waiting: usize,
    /// Largest HTTP request body in bytes.
    #[arg(long, default_value_t = 8 << 20)]
    max_body_bytes: usize,
    /// Seconds an HTTP client may take to send a request's headers (an idle connection's too), and
    /// again its body; past them the connection is closed (the body's answered 408).
    #[arg(long, default_value_t = 30)]
    read_timeout: u64,
    /// An origin (`scheme://host[:port]`) whose web pages may call the HTTP API from a browser;
    /// repeat it for more, or `*` for any. Without it browsers refuse other origins' pages.
    #[arg(long, value_name = "ORIGIN", requires = "http")]
    cors_origin: Vec<String>,
    /// Most new tokens one HTTP request may ask for (default: the model's context).
    #[arg(long)]
    max_tokens_limit: Option<usize>,
    /// libtorch threads for inference (default: half the cores). An editor's machine is busy with
    /// other work, and OpenMP threads that wait for a descheduled peer make latency spike.
    #[arg(long)]
    threads: Option<usize>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.http.is_some() {
        return run_http(args);
    }
    let device = parse_device(&args.device)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut paths = model_paths(&args, device, args.threads.unwrap_or((cores / 2).max(1)))?;
    paths.device = match device {
        Device::Cuda(index) if index >= kernels::runtime::cuda_device_count() => {
            tracing::warn!("--device cuda:{index} is not available; serving on the CPU");
            Device::Cpu
        }
        other => other,
    };
    let settings =
        lsp::Settings { max_tokens: args.max_tokens, context_budget: args.context_budget, ..lsp::Settings::default() };
    // The model loads on the inference thread; a failure is reported to the client, not fatal.
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

/// The models to load, in the weight formats `--dtype` and `--draft-dtype` name for `device`.
fn model_paths(args: &Args, device: Device, threads: usize) -> anyhow::Result<lsp::ModelPaths> {
    let (precision, draft_precision) = model_and_draft_precisions(
        args.dtype.as_deref(),
        args.draft_dtype.as_deref(),
        device,
        &args.model,
        args.draft.as_deref(),
    )?;
    if let Some(draft) = &args.draft {
        crate::device::check_draft_tokenizer(&args.model, draft)?;
    }
    Ok(lsp::ModelPaths {
        model: args.model.clone(),
        draft: args.draft.clone(),
        device,
        precision,
        draft_precision,
        threads,
    })
}

/// `--http`: the model loads before the port opens, so `/health` answering means ready.
fn run_http(args: Args) -> anyhow::Result<ExitCode> {
    let address = http_address(args.http.as_deref().unwrap_or_default())?;
    let api_key = match &args.api_key_env {
        Some(name) => match std::env::var(name) {
            Ok(key) if !key.trim().is_empty() => Some(key.trim().to_string()),
            _ => anyhow::bail!("--api-key-env {name}: the environment variable is unset or empty"),
        },
        None => None,
    };
    anyhow::ensure!(args.max_batch >= 1, "--max-batch must be at least 1");
    anyhow::ensure!(args.max_tokens_limit != Some(0), "--max-tokens-limit must be at least 1");
    anyhow::ensure!(args.max_body_bytes >= 1, "--max-body-bytes must be at least 1");
    anyhow::ensure!((1..=86_400).contains(&args.read_timeout), "--read-timeout must be 1 to 86400 seconds");
    let cors = api::Cors::parse(&args.cors_origin).map_err(|e| anyhow::anyhow!("--cors-origin {e}"))?;
    if api_key.is_none() && cors.as_ref().is_some_and(api::Cors::allows_any) {
        tracing::warn!(
            "--cors-origin * without --api-key-env: any web page this machine's browser opens can use the server"
        );
    }
    let device = crate::device::checked_device(&args.device)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let paths = model_paths(&args, device, args.threads.unwrap_or(cores))?;
    let tokenizer = std::sync::Arc::new(model::tokenizer::Tokenizer::from_dir(&args.model)?);
    let config = model::engine::EngineConfig {
        max_batch: args.max_batch,
        max_waiting: args.max_waiting,
        ..model::engine::EngineConfig::default()
    };
    let engine = model::engine::Engine::start_with_draft(config, move || paths.load_models())?;
    let max_tokens = args.max_tokens_limit.unwrap_or(engine.context());
    let server = api::ServerConfig {
        model_name: args.model.file_name().map_or("wizard".into(), |n| n.to_string_lossy().into_owned()),
        api_key,
        max_body_bytes: args.max_body_bytes,
        read_timeout: std::time::Duration::from_secs(args.read_timeout),
        chat_template: api::chat_template(&args.model).map_err(anyhow::Error::msg)?,
        cors,
        limits: api::Limits {
            max_tokens,
            // A request that names no max_tokens gets --max-tokens, within the limit.
            default_max_tokens: args.max_tokens.min(max_tokens),
        },
    };
    // With --port, editors' language-server sessions share the engine (and the batch) with HTTP.
    let language_server = args.port.map(|port| {
        let backend = lsp::ModelBackend::new(engine.clone(), tokenizer.clone());
        let settings = lsp::Settings {
            max_tokens: args.max_tokens,
            context_budget: args.context_budget,
            ..lsp::Settings::default()
        };
        (lsp::Engine::with_model(std::sync::Arc::new(backend)), settings, port)
    });
    let app = api::App::new(engine, tokenizer, server);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|e| anyhow::anyhow!("--http {address}: cannot listen: {e}"))?;
        tracing::info!("serving the HTTP API on http://{}", listener.local_addr()?);
        match language_server {
            // A stopped HTTP server stops the process, language-server sessions with it.
            Some((engine, settings, port)) => tokio::select! {
                served = api::serve(listener, app) => served?,
                served = lsp::serve_tcp(engine, settings, port) => served?,
            },
            None => api::serve(listener, app).await?,
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `PORT` (on loopback) or `ADDR:PORT`.
fn http_address(text: &str) -> anyhow::Result<std::net::SocketAddr> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse().map_err(|_| anyhow::anyhow!("--http {text:?}: use PORT or ADDR:PORT, e.g. 8080 or 0.0.0.0:8080"))
}
