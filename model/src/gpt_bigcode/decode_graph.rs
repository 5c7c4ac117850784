//! Decode steps on CUDA as one CUDA graph. A step of one token per row is a few hundred small
//! kernels, and their launches, not the GPU, set its time (a 1B model's bf16 step streams 2.3 GB,
//! 0.5 ms on an H200, and took 4-6 ms). The step is written in shapes that do not change with the
//! position: keys and values are stored at a position held on the device, attention reads the
//! cache's whole capacity with the positions after it masked. A cache's second such step runs
//! eagerly and is then recorded over the cache's own buffers; each later step fills the token and
//! position in place and replays it.
use std::sync::atomic::Ordering;

use kernels::cuda_graph::CudaGraph;
use tch::{Device, Kind, Tensor};

use super::GptBigCode;
use crate::kv_cache::KvCache;
use crate::{ModelError, Result};

/// A cache's recorded step: the graph and the tensors it reads and writes.
pub(crate) struct DecodeGraph {
    graph: CudaGraph,
    /// `[batch, 1]` token ids, filled before each replay.
    ids: Tensor,
    /// `[1]`: how many positions the cache held before the step.
    position: Tensor,
    /// `[batch, vocab]` fp32, written by each replay.
    logits: Tensor,
    /// The model whose weights the graph reads.
    model: u64,
}

/// Whether decode steps on CUDA may be recorded as graphs: `WIZARD_CUDA_GRAPHS=0` turns them off,
/// for this process, and a model whose capture failed turns them off for itself.
pub(super) fn enabled_by_environment() -> bool {
    std::env::var("WIZARD_CUDA_GRAPHS").map_or(true, |value| value != "0")
}

impl GptBigCode {
    /// Whether this model's single-token steps on CUDA run as CUDA graphs (on unless turned off).
    pub fn set_cuda_graphs(&self, on: bool) {
        self.cuda_graphs.store(on, Ordering::Relaxed);
    }

    /// The logits of one new token per row through the cache's graph, or None where a graph does not
    /// apply: not on CUDA, more than one new position, a full cache, a cache holding a window (its
    /// slots are not its positions), graphs turned off, the cache stepped by another model, or its
    /// first such step (one step, such as the last token of a
    /// prompt, is not worth a capture). The second step runs eagerly, loading every kernel the graph
    /// will hold, and is then recorded; later steps replay it.
    pub(super) fn graph_step(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Option<Tensor>> {
        let Device::Cuda(device) = self.device() else { return Ok(None) };
        let batch = cache.batch();
        let applies = self.cuda_graphs.load(Ordering::Relaxed)
            && input_ids.size() == [batch, 1]
            && cache.len() < cache.capacity()
            && cache.start() == 0
            && cache.graph.as_ref().is_none_or(|graph| graph.model == self.id);
        if !applies {
            return Ok(None);
        }
        let position = cache.len();
        tch::no_grad(|| {
            if let Some(graph) = cache.graph.as_mut() {
                graph.ids.copy_(input_ids);
                let _ = graph.position.fill_(position);
                graph.graph.replay()?;
                let logits = graph.logits.copy();
                cache.advance(1);
                return Ok(Some(logits));
            }
            cache.single_steps += 1;
            if cache.single_steps < 2 {
                return Ok(None);
            }
            let ids = input_ids.to_device(self.device()).to_kind(Kind::Int64);
            let positions = Tensor::full([1], position, (Kind::Int64, self.device()));
            let logits = self.static_step(&ids, &positions, cache);
            match CudaGraph::capture(device, || Ok::<_, ModelError>(self.static_step(&ids, &positions, cache))) {
                Ok((graph, out)) => {
                    cache.graph = Some(DecodeGraph { graph, ids, position: positions, logits: out, model: self.id })
                }
                Err(error) => {
                    tracing::warn!("decoding op by op: no CUDA graph for this model ({error})");
                    self.set_cuda_graphs(false);
                }
            }
            cache.advance(1);
            Ok(Some(logits))
        })
    }

    /// Logits `[batch, vocab]` (fp32) of token `ids` `[batch, 1]` after `position` (`[1]`, on the
    /// device) positions of `cache`, storing its keys and values there. No shape depends on the
    /// position, and nothing waits on the device: what a graph can record. Does not advance `cache`.
    fn static_step(&self, ids: &Tensor, position: &Tensor, cache: &KvCache) -> Tensor {
        let (batch, capacity) = (cache.batch(), cache.capacity());
        let mut hidden = self.token_rows(ids) + Tensor::embedding(&self.wpe, position, -1, false, false);
        // Positions after the new one are neither written nor meant to be read.
        let hidden_after = Tensor::arange(capacity, (Kind::Int64, self.device())).gt_tensor(position);
        for (layer, block) in self.blocks.iter().enumerate() {
            let attn = &block.attn;
            let (q, k, v) = attn.qkv(&block.ln_1.forward(&hidden));
            let (keys, values) = cache.buffers(layer);
            let _ = keys.shallow_clone().index_copy_(2, position, &k);
            let _ = values.shallow_clone().index_copy_(2, position, &v);
            // A K/V head's group of query heads as the rows of one product: [batch, kv, group, hd].
            // Scaled before the product, as SDPA does: fp16 products of unscaled queries can overflow.
            let group = attn.n_head / attn.kv_heads;
            let q = q.reshape([batch, attn.kv_heads, group, attn.head_dim]) * attn.scale;
            let scores = q.matmul(&keys.transpose(2, 3)).to_kind(Kind::Float);
            let probabilities = scores.masked_fill(&hidden_after, f64::NEG_INFINITY).softmax(-1, Kind::Float);
            let out = probabilities.to_kind(values.kind()).matmul(values);
            let out = out.reshape([batch, 1, attn.n_head * attn.head_dim]);
            hidden = &hidden + attn.c_proj.forward(&out);
            hidden = &hidden + block.mlp.forward(&block.ln_2.forward(&hidden), super::Dropout::Off);
        }
        self.head(&hidden.select(1, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    /// Steps `steps` tokens after a prompt of `prompt` tokens through the static step and through
    /// `forward_next`, rolling back `rollback` positions halfway, and returns the largest logit
    /// difference.
    fn check(multi_query: bool, prompt: i64, steps: i64, rollback: i64) -> f64 {
        tch::manual_seed(7);
        let config = ModelConfig {
            vocab_size: 97,
            n_positions: 64,
            n_embd: 32,
            n_layer: 2,
            n_head: 4,
            multi_query,
            bos_token_id: None,
            eos_token_id: None,
            ..ModelConfig::default()
        };
        let model = GptBigCode::new(config, Device::Cpu).unwrap();
        let tokens = Tensor::randint(97, [2, prompt + steps], (Kind::Int64, Device::Cpu));
        let (mut eager, mut fixed) = (model.new_cache(2, 48).unwrap(), model.new_cache(2, 48).unwrap());
        tch::no_grad(|| {
            let prompt_ids = tokens.narrow(1, 0, prompt);
            let _ = model.forward_next(&prompt_ids, &mut eager).unwrap();
            let _ = model.forward_next(&prompt_ids, &mut fixed).unwrap();
            let mut worst = 0f64;
            for step in 0..steps {
                if step == steps / 2 && rollback > 0 {
                    eager.truncate(eager.len() - rollback);
                    fixed.truncate(fixed.len() - rollback);
                }
                let ids = tokens.narrow(1, eager.len(), 1);
                let expected = model.forward_next(&ids, &mut eager).unwrap();
                let position = Tensor::full([1], fixed.len(), (Kind::Int64, Device::Cpu));
                let got = model.static_step(&ids, &position, &fixed);
                fixed.advance(1);
                worst = worst.max((got - expected).abs().max().double_value(&[]));
            }
            worst
        })
    }

    #[test]
    fn the_static_step_gives_the_logits_of_a_decode_step() {
        for (multi_query, prompt, steps, rollback) in [(true, 5, 12, 0), (false, 5, 12, 0), (true, 9, 10, 4)] {
            let worst = check(multi_query, prompt, steps, rollback);
            assert!(worst < 1e-5, "multi_query {multi_query}, prompt {prompt}: logits differ by {worst}");
        }
    }
}
