//! The training loop: micro-batches with gradient accumulation, loss normalised by the global count
//! of target tokens (so any rank count gives the same update), AdamW with ZeRO sharding, a cosine
//! schedule with warmup, gradient clipping, metrics, eval loss and atomic, resumable checkpoints.
pub mod data;
pub mod fim;
pub mod metrics;
pub mod zero;
pub mod zero3;

use std::path::{Path, PathBuf};
use std::time::Instant;

use kernels::collectives::ProcessGroup;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Reduction, Tensor};

use crate::gpt_bigcode::{Dropout, GptBigCode};
use crate::{files, ModelError, Result};
use data::{Dataset, Example, IGNORE};
use metrics::StepMetrics;
use zero::{AdamW, MemoryReport, ZeroOptimizer};
use zero3::Zero3;

/// Loop settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoopConfig {
    /// Optimizer steps in total.
    pub steps: usize,
    /// Sequences per micro-batch on each rank.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// The cosine decays to `lr * min_lr_ratio`.
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay (not on biases and LayerNorms).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
    /// Seeds dropout, per step.
    pub seed: u64,
    /// Save (and evaluate) every this many steps, and at the end.
    pub save_every: usize,
    /// ZeRO stage.
    pub zero: u8,
}

/// Learning rate at `step` (0-based): linear warmup, then cosine to `min_lr_ratio * lr`.
pub fn learning_rate(config: &LoopConfig, step: usize) -> f64 {
    if step < config.warmup_steps {
        return config.lr * (step + 1) as f64 / config.warmup_steps as f64;
    }
    let decay_steps = config.steps.saturating_sub(config.warmup_steps).max(1);
    let progress = ((step - config.warmup_steps) as f64 / decay_steps as f64).min(1.0);
    let floor = config.lr * config.min_lr_ratio;
    floor + (config.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Where the model computes, and in what precision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Compute {
    /// Device of the weights, optimizer state and batches.
    pub device: Device,
    /// Mixed precision: autocast to this dtype over fp32 master weights (None: fp32 throughout).
    pub autocast: Option<Kind>,
}

impl Compute {
    /// fp32 on the CPU.
    pub fn cpu() -> Compute {
        Compute { device: Device::Cpu, autocast: None }
    }

    /// Runs the forward computation `f` in this precision.
    pub fn forward<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        match self.autocast {
            Some(dtype) => Ok(kernels::precision::autocast(self.device, dtype, f)?),
            None => Ok(f()),
        }
    }

    /// Dense matmul throughput in this precision (the autocast dtype) on this device, for MFU.
    pub fn peak_flops(&self) -> f64 {
        let kind = self.autocast.unwrap_or(Kind::Float);
        let n = if self.device.is_cuda() { 8192 } else { 1024 };
        let sync = || {
            if let Device::Cuda(index) = self.device {
                tch::Cuda::synchronize(index as i64);
            }
        };
        tch::no_grad(|| {
            let a = Tensor::randn([n, n], (kind, self.device));
            let b = Tensor::randn([n, n], (kind, self.device));
            let _ = a.matmul(&b);
            sync();
            let start = Instant::now();
            let mut rounds = 0;
            while start.elapsed().as_secs_f64() < 0.3 {
                for _ in 0..4 {
                    let _ = a.matmul(&b);
                }
                sync();
                rounds += 4;
            }
            2.0 * (n * n * n) as f64 * rounds as f64 / start.elapsed().as_secs_f64()
        })
    }
}

/// Where this process sits in the data-parallel group.
pub struct Rank {
    /// The c10d group, absent when training alone.
    pub group: Option<ProcessGroup>,
    /// This rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
}

impl Rank {
    /// Training alone.
    pub fn single() -> Rank {
        Rank { group: None, rank: 0, world: 1 }
    }

    fn barrier(&self) -> Result<()> {
        match &self.group {
            Some(group) => Ok(group.barrier()?),
            None => Ok(()),
        }
    }
}

/// What the trainer saves beside the weights, to resume exactly.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Steps completed.
    pub step: usize,
    /// Ranks that wrote the checkpoint.
    pub world: usize,
    /// The loop settings.
    pub config: LoopConfig,
}

/// The newest complete checkpoint under `out`, if any.
pub fn latest_checkpoint(out: &Path) -> Result<Option<PathBuf>> {
    let pointer = out.join("latest");
    match std::fs::read_to_string(&pointer) {
        Ok(name) => Ok(Some(out.join("checkpoints").join(name.trim()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ModelError::io(pointer, e)),
    }
}

/// [`files::write_atomically`] with the error naming `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    files::write_atomically(path, bytes).map_err(|e| ModelError::io(path, e))
}

fn batch(examples: &[Example], start: usize, size: usize, device: Device) -> (Tensor, Tensor) {
    let picked: Vec<&Example> = (0..size).map(|i| &examples[(start + i) % examples.len()]).collect();
    let seq = picked[0].input.len() as i64;
    let input: Vec<i64> = picked.iter().flat_map(|e| e.input.iter().copied()).collect();
    let labels: Vec<i64> = picked.iter().flat_map(|e| e.labels.iter().copied()).collect();
    let shaped = |ids: &[i64]| Tensor::from_slice(ids).view([size as i64, seq]).to_device(device);
    (shaped(&input), shaped(&labels))
}

fn target_tokens(examples: &[Example], start: usize, size: usize) -> usize {
    (0..size).map(|i| examples[(start + i) % examples.len()].labels.iter().filter(|&&l| l != IGNORE).count()).sum()
}

/// Summed cross-entropy over the target tokens, in fp32 also when the logits come out in bf16.
fn loss_sum(
    model: &GptBigCode,
    compute: &Compute,
    input: &Tensor,
    labels: &Tensor,
    dropout: Dropout,
) -> Result<Tensor> {
    let logits = compute.forward(|| model.forward_full(input, dropout))??;
    let vocab = logits.size()[2];
    Ok(logits.view([-1, vocab]).to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
        &labels.view([-1]),
        None,
        Reduction::Sum,
        IGNORE,
        0.0,
    ))
}

/// Mean loss over the held-out sequences.
pub fn eval_loss(model: &GptBigCode, compute: &Compute, examples: &[Example], batch_size: usize) -> Result<f64> {
    tch::no_grad(|| {
        let (mut total, mut tokens) = (0.0, 0usize);
        for start in (0..examples.len()).step_by(batch_size) {
            let size = batch_size.min(examples.len() - start);
            let (input, labels) = batch(examples, start, size, compute.device);
            total += loss_sum(model, compute, &input, &labels, Dropout::Off)?.double_value(&[]);
            tokens += target_tokens(examples, start, size);
        }
        Ok(total / tokens.max(1) as f64)
    })
}

/// Does not decay: biases and LayerNorm parameters.
fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains(".ln_") || name.starts_with("transformer.ln_f"))
}

/// Where a variable is used in the forward pass: embeddings, then block by block, then the head.
fn forward_position(name: &str) -> usize {
    let block = name.strip_prefix("transformer.h.").and_then(|rest| rest.split('.').next()?.parse::<usize>().ok());
    match block {
        Some(layer) => 1 + layer,
        None if name.contains("wte") || name.contains("wpe") => 0,
        None => usize::MAX,
    }
}

/// What the loop reports while it runs.
pub enum TrainEvent<'a> {
    /// Per-rank memory of the optimizer, once at the start.
    Memory(MemoryReport),
    /// After every optimizer step.
    Step(&'a StepMetrics),
}

/// ZeRO 0-2 (parameters replicated) or ZeRO 3 (parameters partitioned).
enum Engine {
    Replicated(ZeroOptimizer),
    Partitioned(Zero3),
}

impl Engine {
    fn step(&mut self, lr: f64, max_norm: f64, group: Option<&ProcessGroup>) -> Result<f64> {
        match self {
            Engine::Replicated(optimizer) => optimizer.step(lr, max_norm, group),
            Engine::Partitioned(zero3) => zero3.step(lr, max_norm, group),
        }
    }

    fn state(&mut self) -> Vec<(String, Tensor)> {
        match self {
            Engine::Replicated(optimizer) => optimizer.state(),
            Engine::Partitioned(zero3) => zero3.state(),
        }
    }

    fn restore(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        match self {
            Engine::Replicated(optimizer) => optimizer.restore(state),
            Engine::Partitioned(zero3) => zero3.restore(state),
        }
    }

    /// Makes every weight present (ZeRO 3 gathers them) for evaluation or saving.
    fn materialize(&mut self, group: Option<&ProcessGroup>) -> Result<()> {
        match self {
            Engine::Replicated(_) => Ok(()),
            Engine::Partitioned(zero3) => zero3.materialize(group),
        }
    }

    fn release(&mut self) {
        if let Engine::Partitioned(zero3) = self {
            zero3.release();
        }
    }
}

/// Everything the loop needs besides the model.
pub struct Trainer<'a> {
    /// Loop settings.
    pub config: LoopConfig,
    /// Output directory: `metrics.jsonl`, `loss.svg`, `checkpoints/`, `latest`.
    pub out: &'a Path,
    /// Tokenizer files copied into every checkpoint.
    pub tokenizer_dir: &'a Path,
    /// The data (identical on every rank).
    pub data: &'a Dataset,
    /// Data-parallel membership.
    pub rank: Rank,
    /// Device and precision (the model is already on the device).
    pub compute: Compute,
    /// Resume from this checkpoint's trainer and optimizer state (the model was loaded from it).
    pub resume_from: Option<PathBuf>,
}

impl Trainer<'_> {
    fn engine(&self, model: &GptBigCode) -> Result<Engine> {
        let hp = AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: self.config.weight_decay };
        let (rank, world) = (self.rank.rank, self.rank.world);
        if self.config.zero == 3 {
            return Ok(Engine::Partitioned(Zero3::new(model, self.compute, decays, rank, world, hp)));
        }
        let mut named: Vec<(String, Tensor)> = model.vars().variables().into_iter().collect();
        // Backward's order (head first, embeddings last), so that the gradient buckets fill in turn
        // and each can be reduced while backward goes on (the optimizer puts the decayed weights
        // first: the biases and LayerNorms, a small tail, come in the last bucket).
        named.sort_by_key(|(name, _)| (std::cmp::Reverse(forward_position(name)), name.clone()));
        let decay: Vec<bool> = named.iter().map(|(name, _)| decays(name)).collect();
        Ok(Engine::Replicated(ZeroOptimizer::new(named, decay, self.config.zero, self.rank.group.as_ref(), hp)?))
    }

    /// Trains `model`, reporting memory once and every step (rank 0's view) to `on_event`.
    pub fn run(&self, model: &mut GptBigCode, on_event: &mut dyn FnMut(TrainEvent)) -> Result<Vec<StepMetrics>> {
        let config = &self.config;
        let world = self.rank.world;
        let params: i64 = model.vars().variables().values().map(|t| t.numel() as i64).sum();
        let mut engine = self.engine(model)?;
        on_event(TrainEvent::Memory(match &mut engine {
            Engine::Replicated(optimizer) => optimizer.memory(world),
            Engine::Partitioned(zero3) => zero3.memory(),
        }));
        let mut start_step = 0;
        if let Some(checkpoint) = &self.resume_from {
            start_step = self.restore(checkpoint, &mut engine)?;
        }
        std::fs::create_dir_all(self.out.join("checkpoints")).map_err(|e| ModelError::io(self.out, e))?;
        let peak = self.compute.peak_flops();
        let global = world * config.batch_size;
        let metrics_path = self.out.join("metrics.jsonl");
        let mut history = metrics::read(&metrics_path, Some(start_step))?;
        if self.rank.rank == 0 {
            // One writer: ranks replacing the same file at once would race on its temporary name.
            metrics::rewrite(&metrics_path, &history)?;
        }
        let train = &self.data.train;
        for step in start_step..config.steps {
            let started = Instant::now();
            tch::manual_seed((config.seed as i64).wrapping_mul(1_000_003).wrapping_add(step as i64));
            let lr = learning_rate(config, step);
            let first = step * config.grad_accum * global;
            let tokens = target_tokens(train, first, config.grad_accum * global);
            // Summed on the device: reading it per micro-batch would stall the queue of kernels.
            let mut local_loss = Tensor::zeros([1], (Kind::Double, self.compute.device));
            for micro in 0..config.grad_accum {
                let start = first + (micro * world + self.rank.rank) * config.batch_size;
                let (input, labels) = batch(train, start, config.batch_size, self.compute.device);
                match &mut engine {
                    Engine::Replicated(optimizer) => {
                        let loss = loss_sum(model, &self.compute, &input, &labels, Dropout::Active)?;
                        local_loss += loss.detach().to_kind(Kind::Double);
                        if micro + 1 == config.grad_accum {
                            optimizer.before_last_backward();
                        }
                        (loss / tokens.max(1) as f64).backward();
                    }
                    Engine::Partitioned(zero3) => {
                        let seed = ((config.seed * 1_000 + step as u64) * 1_000 + micro as u64) as i64;
                        let group = self.rank.group.as_ref();
                        local_loss += zero3.micro_step(model, &input, &labels, tokens, Dropout::Active, seed, group)?;
                    }
                }
            }
            let computed = started.elapsed().as_secs_f64();
            let grad_norm = engine.step(lr, config.max_grad_norm, self.rank.group.as_ref())?;
            tracing::debug!(
                "step {}: forward+backward {computed:.3} s, optimizer {:.3} s",
                step + 1,
                started.elapsed().as_secs_f64() - computed
            );
            let mut summed = local_loss.to_device(Device::Cpu);
            if let Some(group) = &self.rank.group {
                group.all_reduce_sum(&mut summed)?;
            }
            let seconds = started.elapsed().as_secs_f64();
            let tokens_per_s = (config.grad_accum * global * train[0].input.len()) as f64 / seconds;
            let mut metrics = StepMetrics {
                step: step + 1,
                loss: summed.double_value(&[0]) / tokens.max(1) as f64,
                lr,
                grad_norm,
                tokens_per_s,
                mfu: 6.0 * params as f64 * tokens_per_s / (peak * world as f64),
                eval_loss: None,
            };
            let saving = (step + 1) % config.save_every.max(1) == 0 || step + 1 == config.steps;
            if saving {
                engine.materialize(self.rank.group.as_ref())?;
                if self.rank.rank == 0 && !self.data.eval.is_empty() {
                    metrics.eval_loss = Some(eval_loss(model, &self.compute, &self.data.eval, config.batch_size)?);
                }
            }
            // Metrics before the checkpoint: a run killed in between resumes from the older
            // checkpoint, which drops the newer lines, so every step is logged exactly once.
            if self.rank.rank == 0 {
                metrics::append(&self.out.join("metrics.jsonl"), &metrics)?;
                history.push(metrics.clone());
            }
            if saving {
                self.save(model, &mut engine, step + 1)?;
                if step + 1 < config.steps {
                    engine.release();
                }
                if self.rank.rank == 0 {
                    write_atomically(&self.out.join("loss.svg"), metrics::loss_chart(&history).as_bytes())?;
                }
            }
            on_event(TrainEvent::Step(&metrics));
        }
        engine.materialize(self.rank.group.as_ref())?;
        Ok(history)
    }

    fn save(&self, model: &GptBigCode, engine: &mut Engine, step: usize) -> Result<()> {
        let name = format!("step-{step:06}");
        let checkpoints = self.out.join("checkpoints");
        let partial = checkpoints.join(format!(".{name}.partial"));
        if self.rank.rank == 0 {
            if partial.exists() {
                std::fs::remove_dir_all(&partial).map_err(|e| ModelError::io(&partial, e))?;
            }
            model.save(&partial, Kind::Float)?;
            for file in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
                let source = self.tokenizer_dir.join(file);
                if source.exists() {
                    std::fs::copy(&source, partial.join(file)).map_err(|e| ModelError::io(&source, e))?;
                }
            }
        }
        self.rank.barrier()?;
        let optimizer_file = partial.join(format!("optimizer-rank{}.safetensors", self.rank.rank));
        let state: Vec<(String, Tensor)> =
            engine.state().into_iter().map(|(name, t)| (name, t.to_device(Device::Cpu))).collect();
        Tensor::write_safetensors(&state, &optimizer_file)?;
        self.rank.barrier()?;
        if self.rank.rank == 0 {
            let state = TrainerState { step, world: self.rank.world, config: self.config.clone() };
            let json = serde_json::to_vec_pretty(&state).expect("state serializes");
            write_atomically(&partial.join("trainer_state.json"), &json)?;
            let done = checkpoints.join(&name);
            if done.exists() {
                std::fs::remove_dir_all(&done).map_err(|e| ModelError::io(&done, e))?;
            }
            std::fs::rename(&partial, &done).map_err(|e| ModelError::io(&done, e))?;
            // Only a complete checkpoint is ever named by `latest`.
            write_atomically(&self.out.join("latest"), name.as_bytes())?;
        }
        self.rank.barrier()
    }

    fn restore(&self, checkpoint: &Path, engine: &mut Engine) -> Result<usize> {
        let path = checkpoint.join("trainer_state.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let state: TrainerState =
            serde_json::from_str(&text).map_err(|e| ModelError::Json { path: path.clone(), message: e.to_string() })?;
        let mut expected = self.config.clone();
        expected.save_every = state.config.save_every;
        if state.world != self.rank.world || state.config != expected {
            return Err(ModelError::Invalid(format!(
                "{} was written by a run with {} rank(s) and {:?}; resume with the same settings",
                path.display(),
                state.world,
                state.config
            )));
        }
        let file = checkpoint.join(format!("optimizer-rank{}.safetensors", self.rank.rank));
        let device = self.compute.device;
        let tensors =
            Tensor::read_safetensors(&file)?.into_iter().map(|(name, t)| (name, t.to_device(device))).collect();
        engine.restore(tensors)?;
        Ok(state.step)
    }
}
