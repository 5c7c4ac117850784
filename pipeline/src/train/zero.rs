//! AdamW over flat fp32 buffers, sharded across data-parallel ranks as in ZeRO:
//! stage 0 all-reduces gradients and every rank updates everything; stage 1 all-reduces gradients
//! but each rank keeps optimizer state for, and updates, only its 1/N of the parameters, then the
//! updated shards are all-gathered; stage 2 reduce-scatters the gradients so each rank only ever
//! holds the summed gradient of its own shard. Collectives are c10d's (`kernels::collectives`).
use kernels::collectives::ProcessGroup;
use tch::{Device, Kind, Tensor};

use crate::{PipelineError, Result};

/// AdamW hyper-parameters (torch's defaults but the decay).
#[derive(Debug, Clone, Copy)]
pub struct AdamW {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay, applied where the decay mask is 1.
    pub weight_decay: f64,
}

/// Elements per all-reduce bucket (25 MB of fp32, like DDP's default bucket).
const BUCKET: i64 = 25 * 1024 * 1024 / 4;

/// The optimizer of one rank.
pub struct ZeroOptimizer {
    stage: u8,
    params: Vec<Tensor>,
    numels: Vec<i64>,
    padded: i64,
    start: i64,
    len: i64,
    decay_mask: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: i64,
    hp: AdamW,
}

/// Bytes per rank, as this run holds them and as ZeRO's formulas give them for bf16 mixed precision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryReport {
    /// Parameters (fp32, full on every rank in stages 0-2).
    pub params: i64,
    /// Gradient buffer after the collective (full for stages 0-1, one shard for stage 2).
    pub grads: i64,
    /// Optimizer state (two moments) for the rank's range.
    pub optimizer: i64,
    /// ZeRO paper formula for the same stage with bf16 weights and fp32 master copies, Adam (K = 12).
    pub mixed_precision_formula: i64,
}

impl ZeroOptimizer {
    /// `params` in a fixed order shared by all ranks; `decays[i]` says whether param i decays.
    pub fn new(
        params: Vec<Tensor>,
        decays: Vec<bool>,
        stage: u8,
        rank: usize,
        world: usize,
        hp: AdamW,
    ) -> Result<Self> {
        if stage > 2 {
            return Err(PipelineError::Invalid(format!(
                "--zero {stage}: stage 3 (parameter partitioning) is not implemented yet; use 0, 1 or 2"
            )));
        }
        let numels: Vec<i64> = params.iter().map(|p| p.numel() as i64).collect();
        let total: i64 = numels.iter().sum();
        let world_i = world as i64;
        let padded = (total + world_i - 1) / world_i * world_i;
        let (start, len) = if stage == 0 { (0, padded) } else { (rank as i64 * padded / world_i, padded / world_i) };
        let mask: Vec<Tensor> = numels
            .iter()
            .zip(&decays)
            .map(|(&n, &d)| Tensor::full([n], if d { 1.0 } else { 0.0 }, (Kind::Float, Device::Cpu)))
            .chain([Tensor::zeros([padded - total], (Kind::Float, Device::Cpu))])
            .collect();
        let decay_mask = Tensor::cat(&mask, 0).narrow(0, start, len).contiguous();
        let zeros = || Tensor::zeros([len], (Kind::Float, Device::Cpu));
        Ok(ZeroOptimizer {
            stage,
            params,
            numels,
            padded,
            start,
            len,
            decay_mask,
            exp_avg: zeros(),
            exp_avg_sq: zeros(),
            step: 0,
            hp,
        })
    }

    /// Steps taken.
    pub fn steps(&self) -> i64 {
        self.step
    }

    fn flat(&self, pieces: impl Iterator<Item = Tensor>) -> Tensor {
        let total: i64 = self.numels.iter().sum();
        let pad = Tensor::zeros([self.padded - total], (Kind::Float, Device::Cpu));
        let pieces: Vec<Tensor> = pieces.map(|t| t.to_kind(Kind::Float).reshape([-1])).chain([pad]).collect();
        Tensor::cat(&pieces, 0)
    }

    /// Combines gradients across ranks, clips them to `max_norm` (global norm), applies AdamW with
    /// learning rate `lr`, and writes the updated parameters back. Returns the gradient norm.
    pub fn step(&mut self, lr: f64, max_norm: f64, group: Option<&ProcessGroup>) -> Result<f64> {
        tch::no_grad(|| -> Result<f64> {
            let mut grads = self.flat(self.params.iter().zip(&self.numels).map(|(p, &n)| {
                let grad = p.grad();
                if grad.defined() {
                    grad
                } else {
                    Tensor::zeros([n], (Kind::Float, Device::Cpu))
                }
            }));
            let mut local = match (group, self.stage) {
                (None, _) => grads.narrow(0, self.start, self.len),
                (Some(group), 0 | 1) => {
                    for offset in (0..self.padded).step_by(BUCKET as usize) {
                        let mut bucket = grads.narrow(0, offset, BUCKET.min(self.padded - offset));
                        group.all_reduce_sum(&mut bucket)?;
                    }
                    grads.narrow(0, self.start, self.len)
                }
                (Some(group), _) => {
                    let mut shard = Tensor::zeros([self.len], (Kind::Float, Device::Cpu));
                    group.reduce_scatter_sum(&mut shard, &grads)?;
                    grads = Tensor::zeros([0], (Kind::Float, Device::Cpu)); // the full buffer is not kept
                    shard
                }
            };
            drop(grads);
            let mut norm_sq = local.square().sum(Kind::Double);
            // Stages 1 and 2 hold one shard each: the global norm sums the shards' squares.
            if let (Some(group), true) = (group, self.stage >= 1) {
                let mut shared = norm_sq.to_kind(Kind::Float).reshape([1]);
                group.all_reduce_sum(&mut shared)?;
                norm_sq = shared.to_kind(Kind::Double).squeeze();
            }
            let norm = norm_sq.double_value(&[]).sqrt();
            if max_norm > 0.0 && norm > max_norm {
                local *= max_norm / (norm + 1e-6);
            }

            self.step += 1;
            let (b1, b2) = (self.hp.beta1, self.hp.beta2);
            let mut params = self.flat(self.params.iter().map(|p| p.shallow_clone())).narrow(0, self.start, self.len);
            params *= (&self.decay_mask * (-lr * self.hp.weight_decay)) + 1.0;
            self.exp_avg *= b1;
            self.exp_avg += &local * (1.0 - b1);
            self.exp_avg_sq *= b2;
            self.exp_avg_sq += local.square() * (1.0 - b2);
            let bias1 = 1.0 - b1.powi(self.step as i32);
            let bias2 = 1.0 - b2.powi(self.step as i32);
            let denom = (&self.exp_avg_sq / bias2).sqrt() + self.hp.eps;
            params -= (&self.exp_avg / &denom) * (lr / bias1);

            let full = match (group, self.stage) {
                (Some(group), 1 | 2) => {
                    let mut gathered = Tensor::zeros([self.padded], (Kind::Float, Device::Cpu));
                    group.all_gather(&mut gathered, &params)?;
                    gathered
                }
                _ => params,
            };
            let mut offset = 0;
            for (param, &n) in self.params.iter().zip(&self.numels) {
                let kind = param.kind();
                param.shallow_clone().copy_(&full.narrow(0, offset, n).reshape(param.size()).to_kind(kind));
                let mut grad = param.grad();
                if grad.defined() {
                    let _ = grad.zero_();
                }
                offset += n;
            }
            Ok(norm)
        })
    }

    /// Bytes held per rank, and the ZeRO formula for bf16 mixed precision.
    pub fn memory(&self, world: usize) -> MemoryReport {
        let total: i64 = self.numels.iter().sum();
        let n = world as i64;
        let grads = if self.stage == 2 { self.len } else { self.padded };
        let formula = match self.stage {
            0 => 16 * total,
            1 => 4 * total + 12 * total / n,
            _ => 2 * total + 14 * total / n,
        };
        MemoryReport { params: 4 * total, grads: 4 * grads, optimizer: 8 * self.len, mixed_precision_formula: formula }
    }

    /// The rank's optimizer state, to be saved with a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        vec![
            ("exp_avg".into(), self.exp_avg.shallow_clone()),
            ("exp_avg_sq".into(), self.exp_avg_sq.shallow_clone()),
            ("step".into(), Tensor::from_slice(&[self.step])),
            ("range".into(), Tensor::from_slice(&[self.stage as i64, self.start, self.len, self.padded])),
        ]
    }

    /// Restores what [`state`](Self::state) saved; the stage and rank count must match.
    pub fn restore(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        let find = |name: &str| {
            state
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.shallow_clone())
                .ok_or_else(|| PipelineError::Invalid(format!("optimizer checkpoint has no `{name}`")))
        };
        let range = Vec::<i64>::try_from(find("range")?)?;
        let expected = vec![self.stage as i64, self.start, self.len, self.padded];
        if range != expected {
            return Err(PipelineError::Invalid(format!(
                "the optimizer checkpoint was saved with ZeRO stage {} and shard {}+{} of {}; this run has stage {} and \
                 shard {}+{} of {} (resume with the same --nproc and --zero)",
                range[0], range[1], range[2], range[3], expected[0], expected[1], expected[2], expected[3]
            )));
        }
        self.exp_avg = find("exp_avg")?.to_kind(Kind::Float);
        self.exp_avg_sq = find("exp_avg_sq")?.to_kind(Kind::Float);
        self.step = find("step")?.int64_value(&[0]);
        Ok(())
    }
}
