//! AdamW over flat fp32 buffers, sharded across data-parallel ranks as in ZeRO:
//! stage 0 all-reduces gradients and every rank updates everything; stage 1 all-reduces gradients
//! but each rank keeps optimizer state for, and updates, only its 1/N of the parameters, then the
//! updated shards are all-gathered; stage 2 reduce-scatters the gradients so each rank only ever
//! holds the summed gradient of its own shard. Collectives are c10d's (`kernels::collectives`); with a
//! group, gradients are reduced by buckets while backward runs (`kernels::reducer`).
use kernels::collectives::ProcessGroup;
use kernels::optim::{fused_adamw, AdamWStep};
use kernels::reducer::{Bucket, GradientReducer};
use tch::{Device, Kind, Tensor};

use crate::{ModelError, Result};

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

/// The optimizer of one rank. Parameters live in one flat fp32 buffer (the model's variables are
/// re-pointed at views of it), decayed parameters first, so the fused AdamW kernel updates a rank's
/// range in at most two calls and all-gathers land directly in the model.
pub struct ZeroOptimizer {
    stage: u8,
    params: Vec<Tensor>,
    numels: Vec<i64>,
    offsets: Vec<i64>,
    padded: i64,
    decay_end: i64,
    start: i64,
    len: i64,
    flat_params: Tensor,
    flat_grads: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: i64,
    hp: AdamW,
    /// Which parameter sits where in the flat buffers (checked on restore).
    layout: i64,
    /// Reduces gradients during the last micro-batch's backward (absent alone, or when the
    /// engine works elsewhere than the model and every collective must be staged).
    reducer: Option<GradientReducer>,
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

/// FNV-1a over the parameters' names and shapes in flat-buffer order: stable across builds.
pub(super) fn layout_fingerprint<'a>(params: impl Iterator<Item = (&'a str, &'a [i64])>) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, shape) in params {
        let dims = shape.iter().flat_map(|dim| dim.to_le_bytes());
        for byte in name.bytes().chain([0]).chain(dims).chain([0xff]) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash as i64
}

/// Refuses optimizer state whose saved `layout` (absent before it was recorded) is not `expected`.
pub(super) fn check_layout(saved: Option<Tensor>, expected: i64) -> Result<()> {
    let advice = "start a new run from its model instead of resuming";
    match saved {
        None => Err(ModelError::Invalid(format!(
            "the optimizer checkpoint does not say how its parameters are laid out (written by an older wizard): \
             {advice}"
        ))),
        Some(layout) if layout.int64_value(&[0]) != expected => Err(ModelError::Invalid(format!(
            "the optimizer checkpoint lays its parameters out differently from this model (another model, or an \
             older wizard): {advice}"
        ))),
        Some(_) => Ok(()),
    }
}

/// Buckets of at most [`BUCKET`] elements over `0..padded`; with `shard` (ZeRO-2) they also split
/// at shard boundaries and each is reduced to its shard's rank only.
fn buckets(padded: i64, shard: Option<i64>) -> Vec<Bucket> {
    let mut buckets = Vec::new();
    let mut start = 0;
    while start < padded {
        let shard_end = shard.map_or(padded, |shard| (start / shard + 1) * shard);
        let len = BUCKET.min(shard_end - start);
        let owner = shard.map(|shard| (start / shard) as usize);
        buckets.push(Bucket { start, len, owner });
        start += len;
    }
    buckets
}

impl ZeroOptimizer {
    /// `named` parameters in a fixed order shared by all ranks (backward's order lets buckets start
    /// early); `decays[i]` says whether parameter i decays.
    pub fn new(
        named: Vec<(String, Tensor)>,
        decays: Vec<bool>,
        stage: u8,
        group: Option<&ProcessGroup>,
        hp: AdamW,
    ) -> Result<Self> {
        let (rank, world) = group.map_or((0, 1), |g| (g.rank(), g.size()));
        if stage > 2 {
            return Err(ModelError::Invalid(format!("--zero {stage}: stages are 0, 1, 2 and 3 (zero3.rs)")));
        }
        // Decayed parameters first, each group in the given order.
        let order: Vec<usize> =
            (0..named.len()).filter(|&i| decays[i]).chain((0..named.len()).filter(|&i| !decays[i])).collect();
        let mut params: Vec<Tensor> = order.iter().map(|&i| named[i].1.shallow_clone()).collect();
        let shapes: Vec<Vec<i64>> = params.iter().map(|p| p.size()).collect();
        let numels: Vec<i64> = shapes.iter().map(|shape| shape.iter().product()).collect();
        let layout =
            layout_fingerprint(order.iter().map(|&i| named[i].0.as_str()).zip(shapes.iter().map(Vec::as_slice)));
        let offsets: Vec<i64> = numels.iter().scan(0, |acc, &n| Some(std::mem::replace(acc, *acc + n))).collect();
        let total: i64 = numels.iter().sum();
        let decay_end: i64 = order.iter().zip(&numels).filter(|(&i, _)| decays[i]).map(|(_, &n)| n).sum();
        let world_i = world as i64;
        let padded = (total + world_i - 1) / world_i * world_i;
        let (start, len) = if stage == 0 { (0, padded) } else { (rank as i64 * padded / world_i, padded / world_i) };
        let device = params.first().map_or(Device::Cpu, |p| p.device());
        let zeros = |n: i64| Tensor::zeros([n], (Kind::Float, device));
        let flat_params = zeros(padded);
        tch::no_grad(|| {
            for ((param, &offset), &n) in params.iter_mut().zip(&offsets).zip(&numels) {
                let slot = flat_params.narrow(0, offset, n);
                slot.shallow_clone().copy_(&param.reshape([-1]));
                param.set_data(&slot.view(param.size().as_slice()));
            }
        });
        let flat_grads = zeros(padded);
        let reducer = match group {
            Some(group) if group.home() == device => {
                let shard = padded / world_i;
                let buckets = buckets(padded, if stage == 2 { Some(shard) } else { None });
                Some(GradientReducer::new(group, &params, &offsets, &flat_grads, &buckets)?)
            }
            _ => None,
        };
        Ok(ZeroOptimizer {
            stage,
            params,
            numels,
            offsets,
            padded,
            decay_end,
            start,
            len,
            flat_params,
            flat_grads,
            exp_avg: zeros(len),
            exp_avg_sq: zeros(len),
            step: 0,
            hp,
            layout,
            reducer,
        })
    }

    /// Call before the backward of a step's last micro-batch: its gradients are then reduced as
    /// autograd produces them, overlapping the rest of backward.
    pub fn before_last_backward(&self) {
        if let Some(reducer) = &self.reducer {
            reducer.arm();
        }
    }

    /// Steps taken.
    pub fn steps(&self) -> i64 {
        self.step
    }

    /// Combines gradients across ranks, clips them to `max_norm` (global norm), applies AdamW with
    /// learning rate `lr` (libtorch's fused kernel), and shares the updated parameters. Returns the
    /// gradient norm before clipping.
    pub fn step(&mut self, lr: f64, max_norm: f64, group: Option<&ProcessGroup>) -> Result<f64> {
        tch::no_grad(|| -> Result<f64> {
            let mut local = match &self.reducer {
                Some(reducer) => {
                    let early = reducer.finish()?;
                    tracing::debug!("{early} of {} gradient buckets started during backward", reducer.buckets());
                    self.flat_grads.narrow(0, self.start, self.len)
                }
                None => self.reduce_after_backward(group)?,
            };
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
            let step = Tensor::from_slice(&[self.step as f32]).to_device(self.flat_params.device());
            let end = self.start + self.len;
            // The rank's range splits at the end of the decayed parameters.
            for (from, to, weight_decay) in [
                (self.start, end.min(self.decay_end), self.hp.weight_decay),
                (self.start.max(self.decay_end), end, 0.0),
            ] {
                if from >= to {
                    continue;
                }
                let (at, n) = (from - self.start, to - from);
                let hp = AdamWStep { lr, beta1: self.hp.beta1, beta2: self.hp.beta2, weight_decay, eps: self.hp.eps };
                fused_adamw(
                    &self.flat_params.narrow(0, from, n),
                    &local.narrow(0, at, n),
                    &self.exp_avg.narrow(0, at, n),
                    &self.exp_avg_sq.narrow(0, at, n),
                    &step,
                    hp,
                )?;
            }
            if let (Some(group), 1 | 2) = (group, self.stage) {
                let mine = self.flat_params.narrow(0, self.start, self.len).copy();
                group.all_gather(&mut self.flat_params, &mine)?;
            }
            Ok(norm)
        })
    }

    /// Moves the gradients into the flat buffer and reduces it in one go (no group, or one whose
    /// engine works on another device); returns this rank's range of the summed gradients.
    fn reduce_after_backward(&self, group: Option<&ProcessGroup>) -> Result<Tensor> {
        for ((param, &offset), &n) in self.params.iter().zip(&self.offsets).zip(&self.numels) {
            let mut slot = self.flat_grads.narrow(0, offset, n);
            let mut grad = param.grad();
            if grad.defined() {
                slot.copy_(&grad.reshape([-1]));
                let _ = grad.zero_();
            } else {
                let _ = slot.zero_();
            }
        }
        Ok(match (group, self.stage) {
            (None, _) => self.flat_grads.narrow(0, self.start, self.len),
            (Some(group), 0 | 1) => {
                for bucket in buckets(self.padded, None) {
                    group.all_reduce_sum(&mut self.flat_grads.narrow(0, bucket.start, bucket.len))?;
                }
                self.flat_grads.narrow(0, self.start, self.len)
            }
            (Some(group), _) => {
                let mut shard = Tensor::zeros([self.len], (Kind::Float, self.flat_params.device()));
                group.reduce_scatter_sum(&mut shard, &self.flat_grads)?;
                shard
            }
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
            ("layout".into(), Tensor::from_slice(&[self.layout])),
        ]
    }

    /// Restores what [`state`](Self::state) saved; the stage and rank count must match.
    pub fn restore(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        let find = |name: &str| {
            state
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.shallow_clone())
                .ok_or_else(|| ModelError::Invalid(format!("optimizer checkpoint has no `{name}`")))
        };
        let range = Vec::<i64>::try_from(find("range")?)?;
        let expected = vec![self.stage as i64, self.start, self.len, self.padded];
        if range != expected {
            return Err(ModelError::Invalid(format!(
                "the optimizer checkpoint was saved with ZeRO stage {} and shard {}+{} of {}; this run has stage {} and \
                 shard {}+{} of {} (resume with the same --nproc and --zero)",
                range[0], range[1], range[2], range[3], expected[0], expected[1], expected[2], expected[3]
            )));
        }
        check_layout(find("layout").ok(), self.layout)?;
        let device = self.flat_params.device();
        self.exp_avg = find("exp_avg")?.to_kind(Kind::Float).to_device(device);
        self.exp_avg_sq = find("exp_avg_sq")?.to_kind(Kind::Float).to_device(device);
        self.step = find("step")?.int64_value(&[0]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn optimizer(names: &[&str]) -> ZeroOptimizer {
        optimizer_with_shape(names, &[2, 3])
    }

    fn optimizer_with_shape(names: &[&str], shape: &[i64]) -> ZeroOptimizer {
        let named =
            names.iter().map(|name| (name.to_string(), Tensor::ones(shape, (Kind::Float, Device::Cpu)))).collect();
        let hp = AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        ZeroOptimizer::new(named, vec![true; names.len()], 1, None, hp).unwrap()
    }

    /// Optimizer state only goes back onto the parameters it was saved for.
    #[test]
    fn restore_checks_the_layout() {
        let saved = || optimizer(&["h.0.w", "h.1.w"]).state();
        optimizer(&["h.0.w", "h.1.w"]).restore(saved()).unwrap();
        let error = optimizer(&["h.1.w", "h.0.w"]).restore(saved()).unwrap_err().to_string();
        assert!(error.contains("lays its parameters out differently"), "{error}");
        // Same sizes, transposed shapes (as dense layers were stored before): refused too.
        let error = optimizer_with_shape(&["h.0.w", "h.1.w"], &[3, 2]).restore(saved()).unwrap_err().to_string();
        assert!(error.contains("lays its parameters out differently"), "{error}");
        let old: Vec<_> = saved().into_iter().filter(|(name, _)| name != "layout").collect();
        let error = optimizer(&["h.0.w", "h.1.w"]).restore(old).unwrap_err().to_string();
        assert!(error.contains("older wizard"), "{error}");
    }
}
