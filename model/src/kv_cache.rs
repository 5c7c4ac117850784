//! Keys and values of past positions, preallocated per layer. Multi-query models store their one
//! K/V head once. Rolling back (speculative decoding) only moves the length.
use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::gpt_bigcode::decode_graph::DecodeGraph;

/// Per-layer K/V buffers `[batch, kv_heads, capacity, head_dim]` and how much of them is filled.
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: i64,
    capacity: i64,
    /// The sequence position of the first slot: 0, unless the cache holds only the newest
    /// positions of its sequence ([`restart_at`](Self::restart_at)).
    start: i64,
    /// The decode step recorded over these buffers (CUDA only).
    pub(crate) graph: Option<DecodeGraph>,
    /// Single-token steps taken on CUDA before the graph was recorded.
    pub(crate) single_steps: u32,
}

impl KvCache {
    pub(crate) fn new(config: &ModelConfig, batch: i64, capacity: i64, kind: Kind, device: Device) -> KvCache {
        let shape = [batch, config.kv_heads(), capacity, config.head_dim()];
        let zeros = || Tensor::zeros(shape, (kind, device));
        KvCache {
            keys: (0..config.n_layer).map(|_| zeros()).collect(),
            values: (0..config.n_layer).map(|_| zeros()).collect(),
            len: 0,
            capacity,
            start: 0,
            graph: None,
            single_steps: 0,
        }
    }

    /// Positions already held.
    pub fn len(&self) -> i64 {
        self.len
    }

    /// The sequence position of the first held one (0 unless [`restart_at`](Self::restart_at) moved it).
    pub fn start(&self) -> i64 {
        self.start
    }

    /// The sequence position the next token takes: after the newest held one.
    pub fn end(&self) -> i64 {
        self.start + self.len
    }

    /// Forgets everything and holds positions from `position` of the sequence on: a window of its
    /// newest tokens, which attend to nothing before it.
    pub fn restart_at(&mut self, position: i64) {
        (self.start, self.len) = (position.max(0), 0);
    }

    /// Whether nothing is held yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sequences held side by side.
    pub fn batch(&self) -> i64 {
        self.keys.first().map_or(0, |keys| keys.size()[0])
    }

    /// The most positions this cache can hold.
    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    /// Whether a decode step has been recorded over these buffers as a CUDA graph.
    pub fn decode_graph_recorded(&self) -> bool {
        self.graph.is_some()
    }

    /// Forgets every position of the sequence from `end` on; everything, back to a cache that
    /// starts at 0, when its window starts after `end`.
    pub fn truncate(&mut self, end: i64) {
        if end < self.start {
            (self.start, self.len) = (0, 0);
        } else {
            self.len = self.len.min(end - self.start);
        }
    }

    /// A copy with its own buffers (one prompt's prefill shared by several samples).
    pub fn duplicate(&self) -> KvCache {
        let copy = |tensors: &[Tensor]| tensors.iter().map(Tensor::copy).collect();
        KvCache {
            keys: copy(&self.keys),
            values: copy(&self.values),
            len: self.len,
            capacity: self.capacity,
            start: self.start,
            graph: None,
            single_steps: 0,
        }
    }

    /// Repeats every sequence `times` times along the batch (one prompt, many samples).
    pub fn repeat_batch(&mut self, times: i64) {
        for tensor in self.keys.iter_mut().chain(self.values.iter_mut()) {
            *tensor = tensor.repeat([times, 1, 1, 1]);
        }
        self.graph = None; // it was recorded over the old buffers
    }

    /// Writes the new keys and values of `layer` after the held positions and returns all of them.
    pub(crate) fn store(&mut self, layer: usize, keys: &Tensor, values: &Tensor) -> (Tensor, Tensor) {
        let new = keys.size()[2];
        assert!(self.len + new <= self.capacity, "KV cache overflow: {} + {new} > {}", self.len, self.capacity);
        self.keys[layer].narrow(2, self.len, new).copy_(keys);
        self.values[layer].narrow(2, self.len, new).copy_(values);
        (self.keys[layer].narrow(2, 0, self.len + new), self.values[layer].narrow(2, 0, self.len + new))
    }

    /// The whole `[batch, kv_heads, capacity, head_dim]` buffers of `layer`, for kernels that store
    /// and attend in one call (the caller then [`advance`](Self::advance)s).
    pub(crate) fn buffers(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.keys[layer], &self.values[layer])
    }

    /// What [`store`](Self::store) would return, without writing.
    pub(crate) fn peek_with(&self, layer: usize, keys: &Tensor, values: &Tensor) -> (Tensor, Tensor) {
        let past_keys = self.keys[layer].narrow(2, 0, self.len);
        let past_values = self.values[layer].narrow(2, 0, self.len);
        (Tensor::cat(&[past_keys, keys.shallow_clone()], 2), Tensor::cat(&[past_values, values.shallow_clone()], 2))
    }

    /// Marks `new` more positions as held, once every layer has stored them.
    pub(crate) fn advance(&mut self, new: i64) {
        self.len += new;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (window start, positions held, truncated at) -> (start, held) after.
    #[test]
    fn truncation_counts_sequence_positions() {
        let config = ModelConfig { n_embd: 8, n_layer: 1, n_head: 2, ..ModelConfig::default() };
        let check = |start: i64, held: i64, end: i64, expected: (i64, i64)| {
            let mut cache = KvCache::new(&config, 1, 16, Kind::Float, Device::Cpu);
            cache.restart_at(start);
            cache.advance(held);
            cache.truncate(end);
            assert_eq!((cache.start(), cache.len()), expected, "window {start}+{held} cut at {end}");
            assert_eq!(cache.end(), expected.0 + expected.1);
        };
        check(0, 10, 4, (0, 4));
        check(0, 10, 12, (0, 10));
        check(20, 10, 25, (20, 5));
        check(20, 10, 40, (20, 10));
        check(20, 10, 20, (20, 0));
        check(20, 10, 19, (0, 0)); // the window starts after the cut: nothing of it is the sequence's
    }

    /// A window's tokens take their sequence positions: the logits are those of a model whose
    /// position table starts at the window, in one pass or two, and not those of position 0.
    #[test]
    fn a_window_holds_its_tokens_at_their_positions() {
        use crate::gpt_bigcode::GptBigCode;
        let config = ModelConfig {
            vocab_size: 50,
            n_positions: 40,
            n_embd: 16,
            n_layer: 2,
            n_head: 2,
            bos_token_id: Some(0),
            eos_token_id: Some(0),
            ..ModelConfig::default()
        };
        let (start, len) = (12, 10);
        let tokens = Tensor::randint(50, [1, len], (Kind::Int64, Device::Cpu));
        let model = GptBigCode::new(config, Device::Cpu).unwrap();
        let shifted = model.reloaded();
        tch::no_grad(|| {
            let wpe = |model: &GptBigCode| model.vars().variables()["transformer.wpe.weight"].shallow_clone();
            wpe(&shifted).narrow(0, 0, 40 - start).copy_(&wpe(&model).narrow(0, start, 40 - start));
            let logits = |model: &GptBigCode, at: i64, chunks: &[i64]| {
                let mut cache = model.new_cache(1, len).unwrap();
                cache.restart_at(at);
                let mut from = 0;
                let mut last = None;
                for &chunk in chunks {
                    last = Some(model.forward_next(&tokens.narrow(1, from, chunk), &mut cache).unwrap());
                    from += chunk;
                }
                assert_eq!(cache.end(), at + len);
                last.unwrap()
            };
            let expected = logits(&shifted, 0, &[len]);
            for chunks in [&[len][..], &[4, 6], &[3, 1, 1, 5]] {
                let got = logits(&model, start, chunks);
                assert!(got.allclose(&expected, 1e-4, 1e-4, false), "window in chunks {chunks:?}");
            }
            assert!(!logits(&model, 0, &[len]).allclose(&expected, 1e-4, 1e-4, false), "position 0 is another");
        });
    }
}
