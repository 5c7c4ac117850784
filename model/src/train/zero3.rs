//! ZeRO stage 3: every rank keeps only its 1/N shard of each unit's parameters (a unit is one
//! transformer block, or the embeddings with the final LayerNorm and head). A unit is all-gathered
//! just before its forward, released right after, gathered again before its backward, where the
//! block is recomputed from its saved input, and released again once its gradients have been
//! reduce-scattered to their owners. Dropout is reseeded per block so the recomputation matches.
//! The next block's all-gather runs on the engine's threads while the current block computes.
use kernels::collectives::{PendingCollective, ProcessGroup};
use kernels::optim::{fused_adamw, AdamWStep};
use tch::{Device, Kind, Reduction, Tensor};

use super::data::IGNORE;
use super::zero::{AdamW, MemoryReport};
use super::Compute;
use crate::gpt_bigcode::{Dropout, GptBigCode};
use crate::{ModelError, Result};

/// One partitioned group of parameters.
struct Unit {
    names: Vec<String>,
    params: Vec<Tensor>,
    shapes: Vec<Vec<i64>>,
    offsets: Vec<i64>,
    numels: Vec<i64>,
    padded: i64,
    decay_end: i64,
    device: Device,
    shard: Tensor,
    grad_shard: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

impl Unit {
    fn new(mut named: Vec<(String, Tensor, bool)>, device: Device, rank: usize, world: usize) -> Unit {
        named.sort_by_key(|(_, _, decays)| !*decays); // decayed first (stable)
        let numels: Vec<i64> = named.iter().map(|(_, t, _)| t.numel() as i64).collect();
        let offsets: Vec<i64> = numels.iter().scan(0, |acc, &n| Some(std::mem::replace(acc, *acc + n))).collect();
        let total: i64 = numels.iter().sum();
        let decay_end = named.iter().zip(&numels).filter(|((_, _, d), _)| *d).map(|(_, &n)| n).sum();
        let padded = (total + world as i64 - 1) / world as i64 * world as i64;
        let shard_len = padded / world as i64;
        let full = Tensor::zeros([padded], (Kind::Float, device));
        tch::no_grad(|| {
            for ((_, param, _), (&offset, &n)) in named.iter().zip(offsets.iter().zip(&numels)) {
                full.narrow(0, offset, n).copy_(&param.reshape([-1]));
            }
        });
        let zeros = || Tensor::zeros([shard_len], (Kind::Float, device));
        let mut unit = Unit {
            names: named.iter().map(|(n, _, _)| n.clone()).collect(),
            shapes: named.iter().map(|(_, t, _)| t.size()).collect(),
            params: named.into_iter().map(|(_, t, _)| t).collect(),
            offsets,
            numels,
            padded,
            decay_end,
            device,
            shard: full.narrow(0, rank as i64 * shard_len, shard_len).copy(),
            grad_shard: zeros(),
            exp_avg: zeros(),
            exp_avg_sq: zeros(),
        };
        unit.release();
        unit
    }

    fn shard_len(&self) -> i64 {
        self.shard.numel() as i64
    }

    /// Starts all-gathering the full parameters; [`Incoming::arrive`] waits for them.
    fn start_gather<'g>(&self, group: Option<&'g ProcessGroup>) -> Result<Incoming<'g>> {
        match group {
            Some(group) => {
                let full = Tensor::empty([self.padded], (Kind::Float, self.device));
                let pending = group.all_gather_start(&full, &self.shard)?;
                Ok(Incoming { full, pending: Some(pending) })
            }
            None => Ok(Incoming { full: self.shard.shallow_clone(), pending: None }),
        }
    }

    /// Points the model's variables at views of the gathered `full` parameters.
    fn point_at(&mut self, full: &Tensor) {
        tch::no_grad(|| {
            for (param, ((&offset, &n), shape)) in
                self.params.iter_mut().zip(self.offsets.iter().zip(&self.numels).zip(&self.shapes))
            {
                param.set_data(&full.narrow(0, offset, n).view(shape.as_slice()));
            }
        });
    }

    /// All-gathers the full parameters and points the model's variables at them.
    fn gather(&mut self, group: Option<&ProcessGroup>) -> Result<()> {
        let full = self.start_gather(group)?.arrive()?;
        self.point_at(&full);
        Ok(())
    }

    /// Frees the gathered parameters: the variables point at empty storage until the next gather.
    fn release(&mut self) {
        let empty = Tensor::zeros([0], (Kind::Float, self.device));
        tch::no_grad(|| {
            for param in self.params.iter_mut() {
                param.set_data(&empty);
            }
        });
    }

    /// Sums `grads` (one per parameter, undefined for unused ones) over ranks into this rank's shard.
    fn reduce_grads(&mut self, grads: &[(usize, Tensor)], group: Option<&ProcessGroup>) -> Result<()> {
        let flat = Tensor::zeros([self.padded], (Kind::Float, self.device));
        for (index, grad) in grads {
            if grad.defined() {
                let mut slot = flat.narrow(0, self.offsets[*index], self.numels[*index]);
                slot += grad.reshape([-1]);
            }
        }
        match group {
            Some(group) => {
                let mut mine = Tensor::zeros([self.shard_len()], (Kind::Float, self.device));
                group.reduce_scatter_sum(&mut mine, &flat)?;
                self.grad_shard += mine;
            }
            None => self.grad_shard += flat,
        }
        Ok(())
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }
}

/// The ZeRO-3 engine: forward and backward by unit, then AdamW on every unit's shard.
pub struct Zero3 {
    globals: Unit,
    blocks: Vec<Unit>,
    step: i64,
    hp: AdamW,
    compute: Compute,
    rank: usize,
    world: usize,
}

/// A unit's parameters on their way: gathered in the background while the block before computes.
struct Incoming<'g> {
    full: Tensor,
    pending: Option<PendingCollective<'g>>,
}

impl Incoming<'_> {
    fn arrive(self) -> Result<Tensor> {
        if let Some(pending) = self.pending {
            pending.wait()?;
        }
        Ok(self.full)
    }
}

/// Starts gathering `unit` when there is one.
fn prefetch<'g>(unit: Option<&Unit>, group: Option<&'g ProcessGroup>) -> Result<Option<Incoming<'g>>> {
    unit.map(|unit| unit.start_gather(group)).transpose()
}

fn seed_for(base: i64, unit: i64) {
    tch::manual_seed(base.wrapping_mul(1_000_003).wrapping_add(unit));
}

impl Zero3 {
    /// Partitions `model`'s weights; they stay released until a unit is gathered.
    pub fn new(
        model: &GptBigCode,
        compute: Compute,
        decays: impl Fn(&str) -> bool,
        rank: usize,
        world: usize,
        hp: AdamW,
    ) -> Zero3 {
        let layers = model.config().n_layer as usize;
        let mut per_block: Vec<Vec<(String, Tensor, bool)>> = (0..layers).map(|_| Vec::new()).collect();
        let mut globals = Vec::new();
        let mut named: Vec<(String, Tensor)> = model.vars().variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, tensor) in named {
            let decay = decays(&name);
            let layer =
                name.strip_prefix("transformer.h.").and_then(|rest| rest.split('.').next()?.parse::<usize>().ok());
            match layer {
                Some(layer) => per_block[layer].push((name, tensor, decay)),
                None => globals.push((name, tensor, decay)),
            }
        }
        Zero3 {
            globals: Unit::new(globals, compute.device, rank, world),
            blocks: per_block.into_iter().map(|unit| Unit::new(unit, compute.device, rank, world)).collect(),
            step: 0,
            hp,
            compute,
            rank,
            world,
        }
    }

    /// One micro-batch: forward block by block (gathering and releasing), the loss scaled by
    /// `1 / tokens`, and backward block by block with recomputation. Returns the unscaled loss sum.
    #[allow(clippy::too_many_arguments)]
    pub fn micro_step(
        &mut self,
        model: &GptBigCode,
        input: &Tensor,
        labels: &Tensor,
        tokens: usize,
        dropout: Dropout,
        seed: i64,
        group: Option<&ProcessGroup>,
    ) -> Result<f64> {
        let layers = self.blocks.len();
        let embed_unit = layers as i64;
        self.globals.gather(group)?;
        // Each block's gather runs while the block before it computes (ZeRO-3 prefetch).
        let mut incoming = prefetch(self.blocks.first(), group)?;
        seed_for(seed, embed_unit);
        let compute = self.compute;
        let mut saved = vec![tch::no_grad(|| compute.forward(|| model.embed_tokens(input, dropout)))??];
        for layer in 0..layers {
            let full = incoming.take().expect("prefetched").arrive()?;
            incoming = prefetch(self.blocks.get(layer + 1), group)?;
            self.blocks[layer].point_at(&full);
            seed_for(seed, layer as i64);
            let next = tch::no_grad(|| compute.forward(|| model.block_forward(layer, &saved[layer], dropout)))?;
            saved.push(next);
            self.blocks[layer].release();
        }

        incoming = prefetch(self.blocks.last(), group)?;
        let head_input = saved[layers].detach().set_requires_grad(true);
        let logits = compute.forward(|| model.training_logits(&head_input))?;
        let vocab = logits.size()[2];
        let loss = logits.view([-1, vocab]).to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
            &labels.view([-1]),
            None,
            Reduction::Sum,
            IGNORE,
            0.0,
        );
        let loss_sum = loss.double_value(&[]);
        let head_params =
            ["transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight", "transformer.wte.weight"];
        let (mut global_grads, mut upstream) =
            self.backward(&(loss / tokens.max(1) as f64), &head_input, &head_params)?;

        for layer in (0..layers).rev() {
            let full = incoming.take().expect("prefetched").arrive()?;
            incoming = prefetch(layer.checked_sub(1).and_then(|l| self.blocks.get(l)), group)?;
            self.blocks[layer].point_at(&full);
            let input = saved[layer].detach().set_requires_grad(true);
            seed_for(seed, layer as i64);
            let out = compute.forward(|| model.block_forward(layer, &input, dropout))?;
            let unit = &self.blocks[layer];
            let mut inputs = vec![input.shallow_clone()];
            inputs.extend(unit.params.iter().map(|p| p.shallow_clone()));
            let mut grads = Tensor::run_backward(&[(out * &upstream).sum(Kind::Float)], &inputs, false, false);
            upstream = grads.remove(0);
            let indexed: Vec<(usize, Tensor)> = grads.into_iter().enumerate().collect();
            self.blocks[layer].reduce_grads(&indexed, group)?;
            self.blocks[layer].release();
        }

        seed_for(seed, embed_unit);
        let embedded = compute.forward(|| model.embed_tokens(input, dropout))??;
        let embed_params = ["transformer.wte.weight", "transformer.wpe.weight"];
        let params: Vec<(usize, Tensor)> = embed_params
            .iter()
            .filter_map(|name| self.globals.index_of(name).map(|i| (i, self.globals.params[i].shallow_clone())))
            .collect();
        let inputs: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
        let grads = Tensor::run_backward(&[(embedded * &upstream).sum(Kind::Float)], &inputs, false, false);
        global_grads.extend(params.iter().map(|(i, _)| *i).zip(grads));
        self.globals.reduce_grads(&global_grads, group)?;
        self.globals.release();
        Ok(loss_sum)
    }

    /// Gradients of `root` with respect to `input` and the named global parameters that exist.
    fn backward(&self, root: &Tensor, input: &Tensor, names: &[&str]) -> Result<(Vec<(usize, Tensor)>, Tensor)> {
        let present: Vec<usize> = names.iter().filter_map(|name| self.globals.index_of(name)).collect();
        let mut inputs = vec![input.shallow_clone()];
        inputs.extend(present.iter().map(|&i| self.globals.params[i].shallow_clone()));
        let mut grads = Tensor::run_backward(&[root], &inputs, false, false);
        let upstream = grads.remove(0);
        Ok((present.into_iter().zip(grads).collect(), upstream))
    }

    fn units_mut(&mut self) -> impl Iterator<Item = &mut Unit> {
        std::iter::once(&mut self.globals).chain(self.blocks.iter_mut())
    }

    /// Clips by the global gradient norm and applies fused AdamW to every shard. Returns the norm.
    pub fn step(&mut self, lr: f64, max_norm: f64, group: Option<&ProcessGroup>) -> Result<f64> {
        tch::no_grad(|| {
            // Summed on the device, read once: a read per unit would wait for the GPU each time.
            let sums: Vec<Tensor> = self.units_mut().map(|u| u.grad_shard.square().sum(Kind::Double)).collect();
            let mut norm_sq = Tensor::stack(&sums, 0).sum(Kind::Double).to_kind(Kind::Float).reshape([1]);
            if let Some(group) = group {
                group.all_reduce_sum(&mut norm_sq)?;
            }
            let norm = norm_sq.double_value(&[0]).sqrt();
            let clip = if max_norm > 0.0 && norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 };
            self.step += 1;
            let step = Tensor::from_slice(&[self.step as f32]).to_device(self.compute.device);
            let (rank, hp) = (self.rank as i64, self.hp);
            for unit in self.units_mut() {
                unit.grad_shard *= clip;
                let len = unit.shard_len();
                let start = rank * len;
                for (from, to, weight_decay) in [
                    (start, (start + len).min(unit.decay_end), hp.weight_decay),
                    (start.max(unit.decay_end), start + len, 0.0),
                ] {
                    if from >= to {
                        continue;
                    }
                    let (at, n) = (from - start, to - from);
                    let step_hp = AdamWStep { lr, beta1: hp.beta1, beta2: hp.beta2, weight_decay, eps: hp.eps };
                    fused_adamw(
                        &unit.shard.narrow(0, at, n),
                        &unit.grad_shard.narrow(0, at, n),
                        &unit.exp_avg.narrow(0, at, n),
                        &unit.exp_avg_sq.narrow(0, at, n),
                        &step,
                        step_hp,
                    )?;
                }
                let _ = unit.grad_shard.zero_();
            }
            Ok(norm)
        })
    }

    /// Gathers every unit, so the whole model can be evaluated or saved.
    pub fn materialize(&mut self, group: Option<&ProcessGroup>) -> Result<()> {
        self.globals.gather(group)?;
        for block in &mut self.blocks {
            block.gather(group)?;
        }
        Ok(())
    }

    /// Releases every unit again after [`materialize`](Self::materialize).
    pub fn release(&mut self) {
        for unit in self.units_mut() {
            unit.release();
        }
    }

    /// Bytes per rank: one shard of parameters, gradients and moments; the formula is 16Ψ/N.
    pub fn memory(&mut self) -> MemoryReport {
        let (mut shard, mut total) = (0, 0);
        for unit in self.units_mut() {
            shard += unit.shard_len();
            total += unit.numels.iter().sum::<i64>();
        }
        let world = self.world as i64;
        MemoryReport {
            params: 4 * shard,
            grads: 4 * shard,
            optimizer: 8 * shard,
            mixed_precision_formula: 16 * total / world,
        }
    }

    /// Which parameter sits where in the units' flat buffers (checked on restore).
    fn layout(&self) -> i64 {
        let units = std::iter::once(&self.globals).chain(&self.blocks);
        let params = units.flat_map(|unit| unit.names.iter().zip(&unit.shapes));
        super::zero::layout_fingerprint(params.map(|(name, shape)| (name.as_str(), shape.as_slice())))
    }

    /// Optimizer state and parameter shards, per unit.
    pub fn state(&mut self) -> Vec<(String, Tensor)> {
        let mut state = vec![
            ("step".to_string(), Tensor::from_slice(&[self.step])),
            ("layout".to_string(), Tensor::from_slice(&[self.layout()])),
        ];
        for (i, unit) in self.units_mut().enumerate() {
            state.push((format!("unit{i}.shard"), unit.shard.shallow_clone()));
            state.push((format!("unit{i}.exp_avg"), unit.exp_avg.shallow_clone()));
            state.push((format!("unit{i}.exp_avg_sq"), unit.exp_avg_sq.shallow_clone()));
        }
        state
    }

    /// Restores [`state`](Self::state); shapes must match (same model and rank count).
    pub fn restore(&mut self, state: Vec<(String, Tensor)>) -> Result<()> {
        let find = |name: &str| {
            state.iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone()).ok_or_else(|| {
                ModelError::Invalid(format!("ZeRO-3 checkpoint has no `{name}` (saved with other settings?)"))
            })
        };
        super::zero::check_layout(find("layout").ok(), self.layout())?;
        self.step = find("step")?.int64_value(&[0]);
        let mut fields = Vec::new();
        for i in 0..=self.blocks.len() {
            fields.push((
                find(&format!("unit{i}.shard"))?,
                find(&format!("unit{i}.exp_avg"))?,
                find(&format!("unit{i}.exp_avg_sq"))?,
            ));
        }
        for (unit, (shard, m, v)) in self.units_mut().zip(fields) {
            if shard.size() != unit.shard.size() {
                return Err(ModelError::Invalid("ZeRO-3 checkpoint shards do not match this run's rank count".into()));
            }
            unit.shard = shard.to_device(unit.device);
            unit.exp_avg = m.to_device(unit.device);
            unit.exp_avg_sq = v.to_device(unit.device);
        }
        Ok(())
    }
}
