//! `wizard train`: pretraining with FIM or instruction fine-tuning, alone or data-parallel over
//! c10d with ZeRO. `--nproc N` starts N local ranks; ranks started by other means (torchrun-style
//! MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK) join the same way.
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode};
use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use kernels::collectives::ProcessGroup;
use model::config::ModelConfig;
use model::corpus::DEFAULT_EXTENSIONS;
use model::gpt_bigcode::GptBigCode;
use model::tokenizer::Tokenizer;
use model::train::data::{self, DataConfig, Mode};
use model::train::fim::FimConfig;
use model::train::{latest_checkpoint, Compute, LoopConfig, Rank, TrainEvent, Trainer};
use tch::{Device, Kind};

use crate::device::checked_device;

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Start from this Hugging Face checkpoint (fine-tuning).
    #[arg(long, value_name = "DIR", group = "start")]
    model: Option<PathBuf>,
    /// Start from random weights with this config.json.
    #[arg(long, value_name = "FILE", group = "start")]
    model_config: Option<PathBuf>,
    /// Start from random weights with a size preset: tiny, 30m, 125m.
    #[arg(long, group = "start")]
    preset: Option<String>,
    /// Tokenizer directory (default: the --model directory).
    #[arg(long, value_name = "DIR")]
    tokenizer: Option<PathBuf>,
    /// Corpus files or directories (pretrain), or instruction JSONL files (sft).
    #[arg(long, value_name = "PATH", num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// Output directory: checkpoints/, latest, metrics.jsonl, loss.svg.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// pretrain (next token + FIM) or sft (instruction tuning).
    #[arg(long, default_value = "pretrain")]
    mode: String,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Sequences per micro-batch, per rank.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    /// Warmup steps (default: 5% of --steps).
    #[arg(long)]
    warmup_steps: Option<usize>,
    /// AdamW weight decay (not on biases and LayerNorms).
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Seed of initialisation, data order, FIM and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// FIM probability per document (pretrain).
    #[arg(long, default_value_t = 0.5)]
    fim_rate: f64,
    /// Probability of the SPM layout for a FIM document.
    #[arg(long, default_value_t = 0.5)]
    fim_spm_rate: f64,
    /// Share of sequences held out for eval loss.
    #[arg(long, default_value_t = 0.02)]
    eval_fraction: f64,
    /// Local ranks to start.
    #[arg(long, default_value_t = 1)]
    nproc: usize,
    /// ZeRO stage: 0 replicated, 1 optimizer state sharded, 2 gradients too, 3 parameters too.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=3))]
    zero: u8,
    /// Save and evaluate every N steps (and at the end).
    #[arg(long, default_value_t = 100)]
    save_every: usize,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// Count and skip JSONL lines that do not parse (the default stops at the first, naming it).
    #[arg(long)]
    skip_bad_lines: bool,
    /// cpu, cuda, cuda:N, or auto (GPU LOCAL_RANK when CUDA is available, else the CPU).
    #[arg(long, default_value = "auto")]
    device: String,
    /// fp32, or bf16 (autocast over fp32 master weights); auto is bf16 on CUDA and fp32 on the CPU.
    #[arg(long, default_value = "auto")]
    precision: String,
    /// Collective engine: gloo, nccl, or auto (NCCL when every local rank has a GPU of its own).
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Seconds a collective may wait for a peer before the rank gives up.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

fn preset(name: &str, vocab_size: i64, eos: i64) -> anyhow::Result<ModelConfig> {
    let (n_embd, n_layer, n_head, n_positions) = match name {
        "tiny" => (64, 2, 4, 512),
        "30m" => (384, 6, 6, 2048),
        "125m" => (768, 12, 12, 2048),
        other => bail!("--preset {other:?}: use tiny, 30m or 125m"),
    };
    Ok(ModelConfig {
        vocab_size,
        n_positions,
        n_embd,
        n_layer,
        n_head,
        bos_token_id: Some(eos),
        eos_token_id: Some(eos),
        ..Default::default()
    })
}

/// This process's place in the group, from torchrun's variables (absent: alone).
fn rank_from_env() -> anyhow::Result<Option<(usize, usize, String, u16)>> {
    let Ok(rank) = std::env::var("RANK") else { return Ok(None) };
    let get = |name: &str| std::env::var(name).with_context(|| format!("RANK is set but {name} is not"));
    let world: usize = get("WORLD_SIZE")?.parse().context("WORLD_SIZE is not a number")?;
    let rank: usize = rank.parse().context("RANK is not a number")?;
    anyhow::ensure!(rank < world, "RANK {rank} is not below WORLD_SIZE {world}");
    let port: u16 = get("MASTER_PORT")?.parse().context("MASTER_PORT is not a port number")?;
    Ok(Some((rank, world, get("MASTER_ADDR")?, port)))
}

/// The device and precision `--device` and `--precision` ask for, checked against this machine.
fn compute(device: &str, precision: &str) -> anyhow::Result<Compute> {
    let device = checked_device(device)?;
    let autocast = match (precision, device) {
        ("auto", Device::Cuda(_)) | ("bf16", _) => Some(Kind::BFloat16),
        ("auto" | "fp32", _) => None,
        (other, _) => bail!("--precision {other:?}: use auto, fp32 or bf16"),
    };
    Ok(Compute { device, autocast })
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.nproc > 1 && std::env::var_os("RANK").is_none() {
        return launch(&args);
    }
    if let Some(parent) = std::env::var("WIZARD_LAUNCHER_PID").ok().and_then(|p| p.parse().ok()) {
        kernels::process::die_with_parent(parent);
    }
    let compute = compute(&args.device, &args.precision)?;
    anyhow::ensure!(
        ["auto", "gloo", "nccl"].contains(&args.backend.as_str()),
        "--backend {:?}: use auto, gloo or nccl",
        args.backend
    );
    let rank = match rank_from_env()? {
        Some((rank, world, host, port)) => {
            let timeout = Duration::from_secs(args.timeout);
            let group = match (args.backend.as_str(), compute.device) {
                ("nccl" | "auto", Device::Cuda(gpu)) if args.backend == "nccl" || gpu_per_rank(&args.device) => {
                    ProcessGroup::nccl(&host, port, rank, world, timeout, gpu)
                }
                ("nccl", Device::Cpu) => bail!("--backend nccl needs a GPU per rank (--device cuda)"),
                _ => ProcessGroup::gloo(&host, port, rank, world, timeout),
            }
            .with_context(|| format!("rank {rank} of {world} could not join the group at {host}:{port}"))?;
            Rank { group: Some(group), rank, world }
        }
        None => Rank::single(),
    };
    train(args, rank, compute)
}

/// Whether NCCL can serve these ranks: each took its GPU from LOCAL_RANK (`--device auto` or
/// `cuda`), and this machine has a GPU for every local rank (LOCAL_WORLD_SIZE, as torchrun and
/// `--nproc` set it). Otherwise ranks may share a GPU, which NCCL refuses.
fn gpu_per_rank(device_flag: &str) -> bool {
    let local = |name: &str| std::env::var(name).ok().and_then(|n| n.parse::<usize>().ok());
    let (Some(_), Some(local_world)) = (local("LOCAL_RANK"), local("LOCAL_WORLD_SIZE")) else { return false };
    ["auto", "cuda"].contains(&device_flag) && kernels::runtime::cuda_device_count() >= local_world
}

/// Starts `--nproc` ranks of this same command on this machine and waits for all of them; if one
/// fails, the others are stopped and the error names it.
fn launch(args: &Args) -> anyhow::Result<ExitCode> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let exe = std::env::current_exe()?;
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut children: Vec<(usize, Child)> = (0..args.nproc)
        .map(|rank| {
            let child = Command::new(&exe)
                .args(&argv)
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", args.nproc.to_string())
                .env("LOCAL_WORLD_SIZE", args.nproc.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("WIZARD_LAUNCHER_PID", std::process::id().to_string())
                .spawn()
                .with_context(|| format!("cannot start rank {rank}"))?;
            Ok((rank, child))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut failure = None;
    while !children.is_empty() {
        let mut still_running = Vec::new();
        for (rank, mut child) in children {
            match child.try_wait()? {
                Some(status) if !status.success() && failure.is_none() => failure = Some((rank, status)),
                Some(_) => {}
                None => still_running.push((rank, child)),
            }
        }
        children = still_running;
        if failure.is_some() {
            for (_, child) in &mut children {
                let _ = child.kill();
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match failure {
        Some((rank, status)) => bail!("rank {rank} failed ({status}); the other ranks were stopped"),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// Writes `line` to stderr in one write, so the lines of ranks sharing a terminal do not interleave.
fn say_whole_line(line: String) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

fn train(args: Args, rank: Rank, compute: Compute) -> anyhow::Result<ExitCode> {
    kernels::process::keep_freed_memory();
    let lead = rank.rank == 0;
    let mode = match args.mode.as_str() {
        "pretrain" => Mode::Pretrain,
        "sft" => Mode::Sft,
        other => bail!("--mode {other:?}: use pretrain or sft"),
    };
    let tokenizer_dir = args.tokenizer.clone().or_else(|| args.model.clone()).context(
        "--tokenizer DIR is needed when starting from --model-config or --preset (train one with `wizard tokenizer train`)",
    )?;
    let tokenizer = Tokenizer::from_dir(&tokenizer_dir)?;
    let eos = i64::from(tokenizer.eos_id());
    let resume_from = if args.resume { latest_checkpoint(&args.out)? } else { None };
    let device = compute.device;
    tch::manual_seed(args.seed as i64); // every rank draws the same initial weights
    let mut model = match (&resume_from, &args.model, &args.model_config, &args.preset) {
        (Some(checkpoint), ..) => GptBigCode::load(checkpoint, Kind::Float, device)?,
        (None, Some(dir), ..) => GptBigCode::load(dir, Kind::Float, device)?,
        (None, None, Some(path), _) => GptBigCode::new(ModelConfig::from_file(path)?, device)?,
        (None, None, None, Some(name)) => GptBigCode::new(preset(name, tokenizer.vocab_size() as i64, eos)?, device)?,
        (None, None, None, None) => bail!("give one of --model, --model-config or --preset"),
    };
    let n_positions = model.config().n_positions as usize;
    anyhow::ensure!(
        args.seq_len <= n_positions,
        "--seq-len {} is longer than the model's context (n_positions = {n_positions})",
        args.seq_len
    );
    anyhow::ensure!(
        tokenizer.vocab_size() as i64 <= model.config().vocab_size,
        "the tokenizer has {} tokens but the model's vocab_size is {}",
        tokenizer.vocab_size(),
        model.config().vocab_size
    );
    let data_config = DataConfig {
        inputs: args.data.clone(),
        mode,
        seq_len: args.seq_len,
        fim: FimConfig { rate: args.fim_rate, spm_rate: args.fim_spm_rate },
        seed: args.seed,
        eval_fraction: args.eval_fraction,
        extensions: DEFAULT_EXTENSIONS.iter().map(|e| e.to_string()).collect(),
        skip_bad_lines: args.skip_bad_lines,
    };
    let dataset = data::build(&data_config, &tokenizer)?;
    let config = LoopConfig {
        steps: args.steps,
        batch_size: args.batch_size.max(1),
        grad_accum: args.grad_accum.max(1),
        lr: args.lr,
        warmup_steps: args.warmup_steps.unwrap_or(args.steps / 20),
        min_lr_ratio: 0.1,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        seed: args.seed,
        save_every: args.save_every,
        zero: args.zero,
    };
    let world = rank.world;
    let this_rank = rank.rank;
    let trainer =
        Trainer { config, out: &args.out, tokenizer_dir: &tokenizer_dir, data: &dataset, rank, compute, resume_from };
    let mib = |bytes: i64| bytes as f64 / (1 << 20) as f64;
    if lead {
        let s = &dataset.stats;
        eprintln!(
            "data: {} documents, {} tokens, {} FIM-transformed, {} dropped as longer than {}, {} bad lines skipped, \
             {} train / {} held-out sequences",
            s.documents, s.tokens, s.fim_documents, s.dropped_too_long, args.seq_len, s.skipped_lines, s.train, s.eval
        );
        let precision =
            compute.autocast.map_or("fp32".to_string(), |kind| format!("{kind:?} autocast, fp32 master weights"));
        eprintln!("compute: {device:?}, {precision}");
        if let Some(checkpoint) = &trainer.resume_from {
            eprintln!("resuming from {}", checkpoint.display());
        }
    }
    let bar = if lead { ProgressBar::new(args.steps as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]")
            .expect("static template"),
    );
    let zero = args.zero;
    let mut on_event = |event: TrainEvent| {
        match event {
        TrainEvent::Memory(memory) => say_whole_line(format!(
            "rank {this_rank}/{world} zero {zero}: params {:.1} MiB, grads {:.1} MiB, optimizer state {:.1} MiB (fp32); \
             ZeRO formula for bf16 mixed precision: {:.1} MiB",
            mib(memory.params),
            mib(memory.grads),
            mib(memory.optimizer),
            mib(memory.mixed_precision_formula)
        )),
        TrainEvent::Step(m) => {
            bar.set_position(m.step as u64);
            bar.set_message(format!(
                "loss {:.4} lr {:.2e} {:.0} tok/s MFU {:.1}%",
                m.loss,
                m.lr,
                m.tokens_per_s,
                100.0 * m.mfu
            ));
            tracing::info!(step = m.step, loss = m.loss, lr = m.lr, grad_norm = m.grad_norm, "step");
        }
    }
    };
    trainer.run(&mut model, &mut on_event)?;
    bar.finish_and_clear();
    if let Device::Cuda(index) = device {
        let memory = kernels::precision::cuda_memory(index)?;
        say_whole_line(format!(
            "rank {this_rank}/{world} zero {zero}: peak CUDA memory {:.1} MiB allocated, {:.1} MiB reserved",
            mib(memory.peak_allocated),
            mib(memory.reserved)
        ));
    }
    if lead {
        if let Some(checkpoint) = latest_checkpoint(&args.out)? {
            println!("{}", checkpoint.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
