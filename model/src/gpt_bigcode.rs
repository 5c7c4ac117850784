//! GPTBigCode, the StarCoder architecture, exactly as Hugging Face `transformers` computes it:
//! learned absolute positions, pre-LayerNorm blocks, multi-query (one shared K/V head) or multi-head
//! attention, a GELU MLP, and an `lm_head` that is tied to `wte` unless the config says otherwise.
//! Variable names mirror the checkpoint (`transformer.h.0.attn.c_attn.weight`, ...), so loading and
//! saving (in `load.rs`) are name-for-name copies.
use kernels::attention::{self, SdpaBackend};
use kernels::block::DecodeBlock;
use kernels::quantized::{Format, QuantizedWeight};
use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::kv_cache::KvCache;
use crate::{ModelError, Result};

pub(crate) mod decode_graph;

/// Whether dropout layers drop (training) or pass everything through (evaluation, generation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropout {
    /// Training: each dropout layer drops with its configured probability.
    Active,
    /// Evaluation and generation.
    Off,
}

impl Dropout {
    fn active(self) -> bool {
        self == Dropout::Active
    }

    /// `x` with dropout `p` when active; otherwise `x` itself (no op: a decode step is ~100 small ops).
    fn apply(self, x: Tensor, p: f64) -> Tensor {
        if self.active() {
            x.dropout(p, true)
        } else {
            x
        }
    }
}

/// A dense layer in the checkpoint's `[out, in]` layout; see [`kernels::linear`] for decoding. An
/// quantized layer ([`Precision::Quantized`]) keeps only its blocks and scales: the fp32 weight is
/// emptied.
struct Linear {
    weight: Tensor,
    bias: Tensor,
    quantized: Option<QuantizedWeight>,
}

impl Linear {
    fn new(path: nn::Path, in_dim: i64, out_dim: i64, std: f64, weights: Weights) -> Linear {
        let weight = match weights {
            Weights::ZerosBf16Dense => unwritten_var(&path, "weight", &[out_dim, in_dim], Some(Kind::BFloat16)),
            // Its quantized records come later; the fp32 weight stays empty.
            Weights::ZerosQuantizedDense(_) => unwritten_var(&path, "weight", &[0], None),
            Weights::Random | Weights::Zeros => new_var(&path, "weight", &[out_dim, in_dim], std, weights),
        };
        Linear { weight, bias: path.var("bias", &[out_dim], Init::Const(0.0)), quantized: None }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match &self.quantized {
            Some(weight) => kernels::quantized::linear(x, weight, Some(&self.bias)),
            None => kernels::linear::linear(x, &self.weight, Some(&self.bias)),
        }
    }

    /// The weight as the fused decode block takes it: quantized records, or the fp32 or bf16 weight.
    fn fused_weight(&self) -> &Tensor {
        self.quantized.as_ref().map_or(&self.weight, QuantizedWeight::packed)
    }

    /// Replaces the fp32 weight by `quantized` (the fp32 storage is freed).
    fn set_quantized(&mut self, quantized: QuantizedWeight) {
        self.weight.set_data(&empty_weight());
        self.quantized = Some(quantized);
    }
}

/// How a new model's weights start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Weights {
    /// `transformers`' initialisation, for a model to train from scratch.
    Random,
    /// Zeros, for weights about to be loaded.
    Zeros,
    /// Zeros with the dense layers' weights in bf16, for a checkpoint about to be loaded into bf16
    /// dense weights over fp32 activations ([`GptBigCode::narrow_dense_weights`]).
    ZerosBf16Dense,
    /// Zeros with the dense layers' weights empty, for a checkpoint whose dense layers are
    /// quantized (int8 or int4) as they are read: peak memory is the quantized model, not fp32's.
    ZerosQuantizedDense(Format),
}

/// What a dense weight holds once it lives elsewhere (quantized blocks, a bf16 copy of the head).
fn empty_weight() -> Tensor {
    Tensor::zeros([0], (Kind::Float, Device::Cpu))
}

/// A weight as `weights` says it starts: `transformers`' normal(0, std) for a fresh model; for a
/// checkpoint about to be read, allocated but not written.
fn new_var(path: &nn::Path, name: &str, shape: &[i64], std: f64, weights: Weights) -> Tensor {
    match weights {
        Weights::Random => path.var(name, shape, Init::Randn { mean: 0.0, stdev: std }),
        Weights::Zeros | Weights::ZerosBf16Dense | Weights::ZerosQuantizedDense(_) => {
            unwritten_var(path, name, shape, None)
        }
    }
}

/// A variable of `shape` (in `kind`, else the store's) whose memory is not written: the loader reads
/// every value into it, or fails. Zeros would write a 1B model's 4 GB once for nothing.
fn unwritten_var(path: &nn::Path, name: &str, shape: &[i64], kind: Option<Kind>) -> Tensor {
    let var = path.var(name, &[0], Init::Const(0.0));
    let options = (kind.unwrap_or(var.kind()), var.device());
    tch::no_grad(|| var.shallow_clone().set_data(&Tensor::empty(shape, options)));
    var
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(path: nn::Path, dim: i64, eps: f64) -> LayerNorm {
        LayerNorm {
            weight: path.var("weight", &[dim], Init::Const(1.0)),
            bias: path.var("bias", &[dim], Init::Const(0.0)),
            eps,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let dim = x.size().last().copied().unwrap_or(0);
        x.layer_norm([dim], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

struct Attention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: i64,
    kv_heads: i64,
    head_dim: i64,
    scale: f64,
    attn_pdrop: f64,
    resid_pdrop: f64,
}

impl Attention {
    fn new(path: nn::Path, config: &ModelConfig, weights: Weights) -> Attention {
        let (d, head_dim, kv_heads) = (config.n_embd, config.head_dim(), config.kv_heads());
        let proj_std = config.initializer_range / (2.0 * config.n_layer as f64).sqrt();
        let qkv_dim = d + 2 * kv_heads * head_dim;
        Attention {
            c_attn: Linear::new(&path / "c_attn", d, qkv_dim, config.initializer_range, weights),
            c_proj: Linear::new(&path / "c_proj", d, d, proj_std, weights),
            n_head: config.n_head,
            kv_heads,
            head_dim,
            scale: if config.scale_attn_weights { 1.0 / (head_dim as f64).sqrt() } else { 1.0 },
            attn_pdrop: config.attn_pdrop,
            resid_pdrop: config.resid_pdrop,
        }
    }

    /// Splits `c_attn`'s output into `[batch, heads, len, head_dim]` queries and keys/values.
    fn qkv(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (batch, len, d) = x.size3().expect("hidden states are [batch, len, d]");
        let (heads, hd) = (self.n_head, self.head_dim);
        let qkv = self.c_attn.forward(x);
        if self.kv_heads == 1 {
            // Layout [q (d) | k (hd) | v (hd)].
            let q = qkv.narrow(2, 0, d).view([batch, len, heads, hd]).transpose(1, 2);
            let k = qkv.narrow(2, d, hd).view([batch, 1, len, hd]);
            let v = qkv.narrow(2, d + hd, hd).view([batch, 1, len, hd]);
            (q, k, v)
        } else {
            // Layout per head [q | k | v], as transformers views it.
            let qkv = qkv.view([batch, len, heads, 3 * hd]).transpose(1, 2);
            (qkv.narrow(3, 0, hd), qkv.narrow(3, hd, hd), qkv.narrow(3, 2 * hd, hd))
        }
    }

    fn forward(&self, x: &Tensor, cache: Option<(&mut KvCache, usize)>, dropout: Dropout) -> Tensor {
        let (batch, len, d) = x.size3().expect("hidden states are [batch, len, d]");
        let (q, k, v) = self.qkv(x);
        if let Some((cache, layer)) = cache.as_ref().filter(|_| attention::decode_kernel_applies(&q)) {
            // The batched engine's kernel, so that a position gets the same bits alone, in a batch,
            // and in a verification pass of any width.
            let out = self.decode_attention(&q, &k, &v, &[&**cache], *layer);
            return self.c_proj.forward(&out);
        }
        let (k, v) = match cache {
            Some((cache, layer)) => cache.store(layer, &k, &v),
            None => (k, v),
        };
        let attn_dropout = if dropout.active() { self.attn_pdrop } else { 0.0 };
        // Inference with bf16 weights and fp32 activations: attention in the weights' precision too.
        let narrow = self.c_attn.weight.kind() == Kind::BFloat16 && q.kind() == Kind::Float && !dropout.active();
        let heads_last = |out: Tensor| out.transpose(1, 2).reshape([batch, len, d]);
        let out = match narrow.then(|| attention::causal_attention_bf16(&q, &k, &v, self.scale)).flatten() {
            Some(out) => heads_last(out),
            None => match (!dropout.active()).then(|| attention::prompt_attention(&q, &k, &v, self.scale)).flatten() {
                Some(out) => out,
                None => heads_last(attention::causal_attention(&q, &k, &v, self.scale, attn_dropout)),
            },
        };
        dropout.apply(self.c_proj.forward(&out), self.resid_pdrop)
    }

    /// One new position per sequence, each with its own cache: the projections run for all rows
    /// at once, attention per sequence (their lengths differ).
    fn forward_ragged(&self, x: &Tensor, caches: &mut [&mut KvCache], layer: usize) -> Tensor {
        let (batch, _, d) = x.size3().expect("hidden states are [batch, 1, d]");
        let (q, k, v) = self.qkv(x);
        if attention::decode_kernel_applies(&q) {
            let caches: Vec<&KvCache> = caches.iter().map(|cache| &**cache).collect();
            return self.c_proj.forward(&self.decode_attention(&q, &k, &v, &caches, layer));
        }
        let outs: Vec<Tensor> = caches
            .iter_mut()
            .enumerate()
            .map(|(row, cache)| {
                let row = row as i64;
                let (keys, values) = cache.store(layer, &k.narrow(0, row, 1), &v.narrow(0, row, 1));
                attention::causal_attention(&q.narrow(0, row, 1), &keys, &values, self.scale, 0.0)
            })
            .collect();
        let out = Tensor::cat(&outs, 0).transpose(1, 2).reshape([batch, 1, d]);
        self.c_proj.forward(&out)
    }

    /// New positions through the fused decode kernel: stores them in `caches` (each then holds
    /// more positions of `layer` than its length says) and attends, `[batch, new, d]`.
    fn decode_attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, caches: &[&KvCache], layer: usize) -> Tensor {
        let (keys, values): (Vec<&Tensor>, Vec<&Tensor>) = caches.iter().map(|cache| cache.buffers(layer)).unzip();
        let lens: Vec<i64> = caches.iter().map(|cache| cache.len()).collect();
        attention::decode_attention(q, k, v, &keys, &values, &lens, self.scale)
    }

    fn backend(&self, x: &Tensor, past: Option<(&KvCache, usize)>) -> SdpaBackend {
        let (q, k, v) = self.qkv(x);
        let (k, v) = match past {
            Some((cache, layer)) => cache.peek_with(layer, &k, &v),
            None => (k, v),
        };
        attention::backend_for(&q, &k, &v, self.scale)
    }
}

struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
    approximate: &'static str,
    resid_pdrop: f64,
}

impl Mlp {
    fn new(path: nn::Path, config: &ModelConfig, weights: Weights) -> Mlp {
        let proj_std = config.initializer_range / (2.0 * config.n_layer as f64).sqrt();
        let (d, inner) = (config.n_embd, config.inner_dim());
        Mlp {
            c_fc: Linear::new(&path / "c_fc", d, inner, config.initializer_range, weights),
            c_proj: Linear::new(&path / "c_proj", inner, d, proj_std, weights),
            approximate: config.activation_function.approximate(),
            resid_pdrop: config.resid_pdrop,
        }
    }

    fn forward(&self, x: &Tensor, dropout: Dropout) -> Tensor {
        dropout.apply(
            self.c_proj.forward(&kernels::block::gelu(&self.c_fc.forward(x), self.approximate)),
            self.resid_pdrop,
        )
    }
}

/// A block's dense layers under the block's checkpoint prefix, in [`Block::linears`]' order.
const DENSE_LAYERS: [&str; 4] = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"];

struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    /// New positions over `caches` through the fused decode block (one call for the whole block),
    /// where it applies: fp32 activations on CPU, a decode step or verification.
    fn forward_fused(&self, x: &Tensor, caches: &[&KvCache], layer: usize) -> Option<Tensor> {
        let [c_attn, attn_proj, c_fc, mlp_proj] = self.linears().map(Linear::fused_weight);
        let block = DecodeBlock {
            parameters: [
                &self.ln_1.weight,
                &self.ln_1.bias,
                c_attn,
                &self.attn.c_attn.bias,
                attn_proj,
                &self.attn.c_proj.bias,
                &self.ln_2.weight,
                &self.ln_2.bias,
                c_fc,
                &self.mlp.c_fc.bias,
                mlp_proj,
                &self.mlp.c_proj.bias,
            ],
            heads: self.attn.n_head,
            layer_norm_eps: self.ln_1.eps,
            scale: self.attn.scale,
            exact_gelu: self.mlp.approximate == "none",
        };
        if !block.applies(x) {
            return None;
        }
        let (keys, values): (Vec<&Tensor>, Vec<&Tensor>) = caches.iter().map(|cache| cache.buffers(layer)).unzip();
        let lens: Vec<i64> = caches.iter().map(|cache| cache.len()).collect();
        Some(block.forward(x, &keys, &values, &lens))
    }

    /// The dense layers, in checkpoint order (named as [`DENSE_LAYERS`]).
    fn linears(&self) -> [&Linear; 4] {
        [&self.attn.c_attn, &self.attn.c_proj, &self.mlp.c_fc, &self.mlp.c_proj]
    }

    fn linears_mut(&mut self) -> [&mut Linear; 4] {
        [&mut self.attn.c_attn, &mut self.attn.c_proj, &mut self.mlp.c_fc, &mut self.mlp.c_proj]
    }

    fn new(path: nn::Path, config: &ModelConfig, weights: Weights) -> Block {
        let eps = config.layer_norm_epsilon;
        Block {
            ln_1: LayerNorm::new(&path / "ln_1", config.n_embd, eps),
            attn: Attention::new(&path / "attn", config, weights),
            ln_2: LayerNorm::new(&path / "ln_2", config.n_embd, eps),
            mlp: Mlp::new(&path / "mlp", config, weights),
        }
    }

    fn forward_ragged(&self, x: &Tensor, caches: &mut [&mut KvCache], layer: usize) -> Tensor {
        let cached: Vec<&KvCache> = caches.iter().map(|cache| &**cache).collect();
        if let Some(out) = self.forward_fused(x, &cached, layer) {
            return out;
        }
        let x = x + self.attn.forward_ragged(&self.ln_1.forward(x), caches, layer);
        &x + self.mlp.forward(&self.ln_2.forward(&x), Dropout::Off)
    }

    fn forward(&self, x: &Tensor, cache: Option<(&mut KvCache, usize)>, dropout: Dropout) -> Tensor {
        if let (Some((cache, layer)), Dropout::Off) = (cache.as_ref(), dropout) {
            if let Some(out) = self.forward_fused(x, &[&**cache], *layer) {
                return out;
            }
        }
        let x = x + self.attn.forward(&self.ln_1.forward(x), cache, dropout);
        &x + self.mlp.forward(&self.ln_2.forward(&x), dropout)
    }
}

/// A GPTBigCode causal language model whose weights live in a tch `VarStore`.
pub struct GptBigCode {
    config: ModelConfig,
    vars: nn::VarStore,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    /// The untied head's `[vocab, n_embd]` weight; `None` when tied to `wte`.
    lm_head: Option<Tensor>,
    /// The head quantized ([`Precision::Quantized`]). Tied to `wte`, it is the token table too: `wte` is
    /// emptied and tokens are embedded from its rows (an fp32 copy of 1B's table is 400 MB).
    head_quantized: Option<QuantizedWeight>,
    /// The head in bf16 over fp32 activations ([`narrow_dense_weights`](Self::narrow_dense_weights));
    /// tied, the token table too, as `head_quantized`.
    head_bf16: Option<Tensor>,
    embd_pdrop: f64,
    /// Unique per instance in the process: tells which model filled a kept cache (weights changed in
    /// place keep the id; callers that train must not keep caches across steps).
    id: u64,
    /// Whether single-token steps on CUDA run as CUDA graphs ([`decode_graph`]).
    cuda_graphs: std::sync::atomic::AtomicBool,
}

static NEXT_MODEL_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl GptBigCode {
    /// A model with freshly initialised weights (`transformers`' initialisation), in fp32.
    pub fn new(config: ModelConfig, device: Device) -> Result<GptBigCode> {
        GptBigCode::build(config, device, Kind::Float, Weights::Random)
    }

    pub(crate) fn build(config: ModelConfig, device: Device, kind: Kind, weights: Weights) -> Result<GptBigCode> {
        config.validate().map_err(|(field, message)| ModelError::Config {
            path: "<model config>".into(),
            field: field.into(),
            message,
        })?;
        let mut vars = nn::VarStore::new(device);
        vars.set_kind(kind); // before any variable exists: every one is created in `kind`
        let root = vars.root();
        let transformer = &root / "transformer";
        let std = config.initializer_range;
        let table = [config.vocab_size, config.n_embd];
        let wte = new_var(&(&transformer / "wte"), "weight", &table, std, weights);
        let narrowed_head = matches!(weights, Weights::ZerosBf16Dense | Weights::ZerosQuantizedDense(_));
        if narrowed_head && config.tie_word_embeddings {
            // The table will live in the narrowed head (`token_rows`).
            tch::no_grad(|| wte.shallow_clone().set_data(&empty_weight()));
        }
        let wpe = new_var(&(&transformer / "wpe"), "weight", &[config.n_positions, config.n_embd], std, weights);
        let blocks = (0..config.n_layer).map(|i| Block::new(&transformer / "h" / i, &config, weights)).collect();
        let ln_f = LayerNorm::new(&transformer / "ln_f", config.n_embd, config.layer_norm_epsilon);
        let lm_head = (!config.tie_word_embeddings).then(|| {
            let lm_head = new_var(&(&root / "lm_head"), "weight", &table, std, weights);
            if narrowed_head {
                tch::no_grad(|| lm_head.shallow_clone().set_data(&empty_weight()));
            }
            lm_head
        });
        let embd_pdrop = config.embd_pdrop;
        let id = NEXT_MODEL_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(GptBigCode {
            config,
            vars,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            head_quantized: None,
            head_bf16: None,
            embd_pdrop,
            id,
            cuda_graphs: decode_graph::enabled_by_environment().into(),
        })
    }

    /// This model's identity in the process (never reused).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// What a pass's speed depends on besides the machine: the shapes, how the weights are held
    /// (dtype, quantized format, how many layers are packed in panels) and the device. Two
    /// checkpoints that agree here run equally fast, whatever their weights.
    pub fn speed_key(&self) -> String {
        let c = &self.config;
        let weights = match self.quantized_format() {
            Some(format) => format!("{format:?}"),
            None if self.has_narrow_dense_weights() => "bf16 over fp32".into(),
            None => format!("{:?}", self.kind()),
        };
        let panels = self
            .blocks
            .iter()
            .flat_map(Block::linears)
            .filter(|linear| linear.quantized.is_none() && kernels::linear::is_panels(&linear.weight))
            .count();
        format!(
            "d{} L{} H{} kv{} inner{} V{} ctx{} {weights} panels{panels} {:?}",
            c.n_embd,
            c.n_layer,
            c.n_head,
            c.kv_heads(),
            c.inner_dim(),
            c.vocab_size,
            c.n_positions,
            self.device()
        )
    }

    /// [`speed_key`](Self::speed_key) and a digest of what the weights make of a fixed input (the
    /// first 64 logits after 4 tokens, to 7 bits of mantissa, so that a change of kernel does not
    /// change it): what tells one checkpoint from another, whichever of its weights differ (a
    /// fine-tune that froze the embeddings, a merged adapter).
    pub fn content_key(&self) -> Result<String> {
        let vocab = self.config.vocab_size;
        let logits = tch::no_grad(|| -> Result<Vec<f32>> {
            let ids: Vec<i64> = (1..=4).map(|id| id % vocab).collect();
            let mut cache = self.new_cache(1, 4)?;
            let input = Tensor::from_slice(&ids).to_device(self.device()).unsqueeze(0);
            let logits = self.forward_next(&input, &mut cache)?.reshape([-1]).narrow(0, 0, vocab.min(64));
            Ok(Vec::<f32>::try_from(logits.to_kind(Kind::Float).to_device(Device::Cpu))?)
        })?;
        let digest = kernels::calibrate::digest(logits.iter().flat_map(|l| (l.to_bits() & 0xffff_0000).to_le_bytes()));
        Ok(format!("{} weights {digest:016x}", self.speed_key()))
    }

    /// The same checkpoint made anew (another [`id`](Self::id)), as a later process loads it.
    #[cfg(test)]
    pub(crate) fn reloaded(&self) -> GptBigCode {
        let copy = GptBigCode::new(self.config.clone(), self.device()).unwrap();
        let weights = self.vars.variables();
        tch::no_grad(|| {
            for (name, mut var) in copy.vars.variables() {
                var.copy_(&weights[&name]);
            }
        });
        copy
    }

    /// Whether `other` is this model in another weight precision (a quantized or bf16 copy of the same
    /// checkpoint), so that it can attend to this model's keys and values: the same layer, head,
    /// embedding and context sizes, caches of the same dtype on the same device, and the same embeddings (which
    /// every precision keeps as they are: position embeddings and the final LayerNorm are compared).
    pub fn is_copy_of(&self, other: &GptBigCode) -> bool {
        let (a, b) = (&self.config, &other.config);
        let rows = a.n_positions.min(16);
        (a.n_layer, a.kv_heads(), a.head_dim(), a.n_embd, a.vocab_size, a.n_positions)
            == (b.n_layer, b.kv_heads(), b.head_dim(), b.n_embd, b.vocab_size, b.n_positions)
            && self.kind() == other.kind()
            && self.device() == other.device()
            && self.wpe.narrow(0, 0, rows).equal(&other.wpe.narrow(0, 0, rows))
            && self.ln_f.weight.equal(&other.ln_f.weight)
            && self.ln_f.bias.equal(&other.ln_f.bias)
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the weights are on.
    pub fn device(&self) -> Device {
        self.vars.device()
    }

    /// The dtype of the weights.
    pub fn kind(&self) -> Kind {
        self.wte.kind()
    }

    /// The trainable variables, by checkpoint name.
    pub fn vars(&self) -> &nn::VarStore {
        &self.vars
    }

    /// Logits `[batch, len, vocab]` (fp32) for `input_ids` `[batch, len]`, continuing after what
    /// `cache` holds and appending the new keys and values to it.
    pub fn forward(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        Ok(self.head(&self.decode(input_ids, cache)?))
    }

    /// Logits `[batch, vocab]` of the last position only: what the next token is drawn from.
    /// Skips the vocabulary projection of every earlier position, the bulk of a prefill's cost.
    pub fn forward_next(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        if let Some(logits) = self.graph_step(input_ids, cache)? {
            return Ok(logits);
        }
        Ok(self.head(&self.decode(input_ids, cache)?.select(1, -1)))
    }

    /// Logits `[batch, len, vocab]` of every position (to score a prompt) and `[batch, vocab]` of the
    /// last computed as [`forward_next`](Self::forward_next) computes them, so that scoring a prompt
    /// does not change what is drawn after it.
    pub fn forward_scored(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<(Tensor, Tensor)> {
        let hidden = self.decode(input_ids, cache)?;
        Ok((self.head(&hidden), self.head(&hidden.select(1, -1))))
    }

    /// Logits `[rows, vocab]` of one new token per sequence, each continuing its own cache (which
    /// may hold a different length): the continuous-batching step. Row i's logits do not depend on
    /// the other rows where the dense layers take the dense kernel and attention the fused decode
    /// kernel (fp32 activations on CPU).
    pub fn forward_batch(&self, tokens: &[i64], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        if tokens.len() != caches.len() || tokens.is_empty() {
            return Err(ModelError::Invalid(format!("{} tokens for {} caches", tokens.len(), caches.len())));
        }
        let mut positions = Vec::with_capacity(caches.len());
        for cache in caches.iter() {
            if cache.end() >= self.config.n_positions || cache.len() >= cache.capacity() {
                return Err(ModelError::Invalid(format!(
                    "a sequence of {} tokens is full (context {}, cache {})",
                    cache.end(),
                    self.config.n_positions,
                    cache.capacity()
                )));
            }
            positions.push(cache.end());
        }
        let rows = tokens.len() as i64;
        let device = self.device();
        let ids = Tensor::from_slice(tokens).to_device(device).view([rows, 1]);
        if let [cache] = caches {
            // One sequence alone (an editor's completion) takes its cache's CUDA graph.
            if let Some(logits) = self.graph_step(&ids, cache)? {
                return Ok(logits);
            }
        }
        let positions = Tensor::from_slice(&positions).to_device(device).view([rows, 1]);
        let mut hidden = self.token_rows(&ids) + Tensor::embedding(&self.wpe, &positions, -1, false, false);
        for (layer, block) in self.blocks.iter().enumerate() {
            hidden = block.forward_ragged(&hidden, caches, layer);
        }
        for cache in caches.iter_mut() {
            cache.advance(1);
        }
        Ok(self.head(&hidden.select(1, 0)))
    }

    fn decode(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let mut hidden = self.embed(input_ids, cache.end(), Dropout::Off)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            hidden = block.forward(&hidden, Some((&mut *cache, layer)), Dropout::Off);
        }
        cache.advance(input_ids.size()[1]);
        Ok(hidden)
    }

    /// Logits for whole sequences without a cache.
    pub fn forward_full(&self, input_ids: &Tensor, dropout: Dropout) -> Result<Tensor> {
        let mut hidden = self.embed_tokens(input_ids, dropout)?;
        for layer in 0..self.blocks.len() {
            hidden = self.block_forward(layer, &hidden, dropout);
        }
        Ok(self.training_logits(&hidden))
    }

    /// The pieces of [`forward_full`](Self::forward_full), for trainers that run (and recompute)
    /// one block at a time: token plus position embeddings...
    pub fn embed_tokens(&self, input_ids: &Tensor, dropout: Dropout) -> Result<Tensor> {
        self.embed(input_ids, 0, dropout)
    }

    /// ...one transformer block...
    pub fn block_forward(&self, layer: usize, hidden: &Tensor, dropout: Dropout) -> Tensor {
        self.blocks[layer].forward(hidden, None, dropout)
    }

    /// ...and the final LayerNorm with the vocabulary projection (through `wte` itself when tied).
    pub fn training_logits(&self, hidden: &Tensor) -> Tensor {
        self.head(hidden)
    }

    /// The SDPA backend the first layer's attention uses for this input after `cache`.
    pub fn attention_backend(&self, input_ids: &Tensor, cache: &KvCache) -> Result<SdpaBackend> {
        let hidden = self.embed(input_ids, cache.end(), Dropout::Off)?;
        let block = &self.blocks[0];
        let past = (!cache.is_empty()).then_some((cache, 0));
        Ok(block.attn.backend(&block.ln_1.forward(&hidden), past))
    }

    /// A cache sized for `batch` sequences of up to `capacity` tokens, or an error if that exceeds
    /// the model's context.
    pub fn new_cache(&self, batch: i64, capacity: i64) -> Result<KvCache> {
        if capacity > self.config.n_positions {
            return Err(ModelError::Invalid(format!(
                "{capacity} tokens do not fit the model's context of n_positions = {}",
                self.config.n_positions
            )));
        }
        Ok(KvCache::new(&self.config, batch, capacity, self.kind(), self.device()))
    }

    fn embed(&self, input_ids: &Tensor, past: i64, dropout: Dropout) -> Result<Tensor> {
        let len = input_ids.size().get(1).copied().unwrap_or(0);
        if past + len > self.config.n_positions {
            return Err(ModelError::Invalid(format!(
                "{} tokens exceed the model's context of n_positions = {}",
                past + len,
                self.config.n_positions
            )));
        }
        let positions = Tensor::arange_start(past, past + len, (Kind::Int64, self.device()));
        let hidden = self.token_rows(input_ids) + Tensor::embedding(&self.wpe, &positions, -1, false, false);
        Ok(dropout.apply(hidden, self.embd_pdrop))
    }

    /// Token embeddings: rows of `wte`, or of the narrowed head where that holds the tied table.
    fn token_rows(&self, ids: &Tensor) -> Tensor {
        if self.lm_head.is_none() {
            if let Some(head) = &self.head_quantized {
                // Ids come from the tokenizer or were checked against the vocabulary.
                return head.rows(ids).expect("token ids within the vocabulary");
            }
            if let Some(bf16) = &self.head_bf16 {
                return Tensor::embedding(bf16, ids, -1, false, false).to_kind(Kind::Float);
            }
        }
        Tensor::embedding(&self.wte, ids, -1, false, false)
    }

    /// Whether the token table lives only in the narrowed head (tied, and quantized or bf16), `wte`
    /// being empty.
    pub(crate) fn table_in_head(&self) -> bool {
        self.lm_head.is_none() && (self.head_quantized.is_some() || self.head_bf16.is_some())
    }

    /// Frees `wte` once the narrowed head holds the tied table.
    fn drop_tied_table(&self) {
        if self.table_in_head() {
            tch::no_grad(|| self.wte.shallow_clone().set_data(&empty_weight()));
        }
    }

    /// Sets the bf16 head (and with it the tied table) from `weight`, as it is loaded.
    pub(crate) fn set_bf16_head(&mut self, weight: &Tensor) {
        // A copy even of a bf16 weight: the one given may be a checkpoint's pages, mapped while loading.
        self.head_bf16 = Some(weight.to_dtype(Kind::BFloat16, false, true));
        if let Some(lm_head) = &self.lm_head {
            tch::no_grad(|| lm_head.shallow_clone().set_data(&empty_weight()));
        }
        self.drop_tied_table();
    }

    /// Vocabulary logits, through `wte` itself when the head is tied.
    fn head(&self, hidden: &Tensor) -> Tensor {
        let hidden = self.ln_f.forward(hidden);
        if let Some(head) = &self.head_quantized {
            return kernels::quantized::linear(&hidden, head, None);
        }
        if let Some(weight) = &self.head_bf16 {
            return kernels::linear::linear(&hidden, weight, None);
        }
        let weight = self.lm_head.as_ref().unwrap_or(&self.wte);
        kernels::linear::linear(&hidden, weight, None).to_kind(Kind::Float)
    }

    /// `[out, in]` of the dense layer (or head) `name`, as [`quantized_layers`](Self::quantized_layers) names it.
    pub(crate) fn dense_shape(&self, name: &str) -> Option<(i64, i64)> {
        let (vocab, d) = (self.config.vocab_size, self.config.n_embd);
        if name == "lm_head.weight" {
            return Some((vocab, d));
        }
        let rest = name.strip_prefix("transformer.h.")?;
        let (index, layer) = rest.split_once('.')?;
        let block = self.blocks.get(index.parse::<usize>().ok()?)?;
        let linear = match layer {
            "attn.c_attn.weight" => &block.attn.c_attn,
            "attn.c_proj.weight" => &block.attn.c_proj,
            "mlp.c_fc.weight" => &block.mlp.c_fc,
            "mlp.c_proj.weight" => &block.mlp.c_proj,
            _ => return None,
        };
        let size = linear.bias.size();
        let out = size[0];
        let inputs = match layer {
            "mlp.c_proj.weight" => self.config.inner_dim(),
            _ => d,
        };
        Some((out, inputs))
    }

    /// The head's weight: `lm_head`, or `wte` when tied (empty once the head is quantized or bf16).
    pub fn head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.wte)
    }

    /// The quantized layer `name` (`….weight` of a dense layer, or `lm_head.weight`).
    pub fn quantized_weight(&self, name: &str) -> Option<&QuantizedWeight> {
        self.quantized_layers().into_iter().find(|(layer, _)| layer == name).map(|(_, weight)| weight)
    }

    /// The format of the dense layers and the head when they are quantized.
    pub fn quantized_format(&self) -> Option<Format> {
        self.head_quantized.as_ref().map(QuantizedWeight::format)
    }

    /// Stores the dense layers' weights and the head in bf16 while embeddings, LayerNorms, biases
    /// and activations stay fp32 ([`Precision::Dense`] bf16 on the CPU, as llama.cpp runs bf16):
    /// half the bytes read per token. The dense kernel multiplies them with bf16 dot products
    /// (inputs rounded to bf16) or widens them as it reads them; sums stay fp32. An fp32 CPU model
    /// only; a model loaded with bf16 dense weights already has them narrowed.
    pub fn narrow_dense_weights(&mut self) -> Result<()> {
        if self.kind() != Kind::Float || self.device() != Device::Cpu || self.quantized_format().is_some() {
            return Err(ModelError::Invalid("bf16 dense weights are for fp32 models on the CPU".into()));
        }
        tch::no_grad(|| {
            for block in &mut self.blocks {
                for linear in block.linears_mut() {
                    let narrow = linear.weight.to_kind(Kind::BFloat16);
                    linear.weight.set_data(&narrow);
                }
            }
            if self.head_bf16.is_none() {
                let head = self.lm_head.as_ref().unwrap_or(&self.wte).shallow_clone();
                self.set_bf16_head(&head);
            }
        });
        Ok(())
    }

    /// Packs the fp32 or bf16 dense layers whose shapes [`kernels::calibrate`] measured faster in panels
    /// ([`kernels::linear::pack_panels`]), for inference on this CPU; returns how many it packed. The
    /// head stays as it is (tied, it is the token table too).
    pub fn pack_panels(&mut self) -> Result<usize> {
        self.pack_panels_where(kernels::calibrate::takes_panels)
    }

    /// [`pack_panels`](Self::pack_panels) for the fp32 or bf16 dense layers `take` picks among those whose
    /// outputs are a multiple of 16.
    pub fn pack_panels_where(&mut self, take: impl Fn(&Tensor) -> bool) -> Result<usize> {
        let mut packed = 0;
        tch::no_grad(|| -> Result<()> {
            for linear in self.blocks.iter_mut().flat_map(Block::linears_mut) {
                let weight = &linear.weight;
                let dense = matches!(weight.kind(), Kind::Float | Kind::BFloat16);
                let fits = dense && weight.dim() == 2 && weight.size()[0] % 16 == 0;
                if linear.quantized.is_none() && fits && take(weight) {
                    let panels =
                        kernels::linear::pack_panels(&linear.weight).map_err(|e| ModelError::Invalid(e.to_string()))?;
                    linear.weight.set_data(&panels);
                    packed += 1;
                }
            }
            Ok(())
        })?;
        Ok(packed)
    }

    /// Copies the blocks' dense weights that are not packed in panels or quantized into memory of
    /// their own: for weights mapped from a file while loading, which must not follow the file.
    pub(crate) fn own_dense_weights(&mut self) {
        tch::no_grad(|| {
            for linear in self.blocks.iter_mut().flat_map(Block::linears_mut) {
                if linear.quantized.is_none() && !kernels::linear::is_panels(&linear.weight) {
                    let owned = linear.weight.copy();
                    linear.weight.set_data(&owned);
                }
            }
        });
    }

    /// The weights of the dense layers and the head as [`kernels::linear`] receives them
    /// (quantized layers, which have their own kernel, left out).
    pub fn dense_weights(&self) -> Vec<&Tensor> {
        let mut weights: Vec<&Tensor> = self
            .blocks
            .iter()
            .flat_map(Block::linears)
            .filter(|linear| linear.quantized.is_none())
            .map(|linear| &linear.weight)
            .collect();
        if self.head_quantized.is_none() {
            weights.push(self.head_bf16.as_ref().unwrap_or(self.head_weight()));
        }
        weights
    }

    /// Whether the dense layers hold bf16 weights over fp32 activations.
    pub fn has_narrow_dense_weights(&self) -> bool {
        self.head_bf16.is_some()
    }

    /// Converts every dense layer and the head to `format` blocks ([`Precision::Quantized`]); an
    /// fp32 CPU model only. `progress` hears (done, total) layers.
    pub fn quantize(&mut self, format: Format, mut progress: impl FnMut(usize, usize)) -> Result<()> {
        if self.kind() != Kind::Float || self.device() != Device::Cpu {
            return Err(ModelError::Invalid(format!("{} weights are for fp32 models on the CPU", format.name())));
        }
        if self.quantized_layers().iter().any(|(_, weight)| weight.format() != format) {
            return Err(ModelError::Invalid(format!("the model is already quantized, not to {}", format.name())));
        }
        let total = self.blocks.len() * 4 + 1;
        let mut done = 0;
        tch::no_grad(|| -> Result<()> {
            let refused = |name: String, e: kernels::KernelError| ModelError::Invalid(format!("tensor `{name}`: {e}"));
            for (i, block) in self.blocks.iter_mut().enumerate() {
                for (name, linear) in DENSE_LAYERS.iter().zip(block.linears_mut()) {
                    // Layers quantized as they were loaded stay as they are.
                    if linear.quantized.is_none() {
                        let quantized = QuantizedWeight::quantize(&linear.weight, format)
                            .map_err(|e| refused(format!("transformer.h.{i}.{name}.weight"), e))?;
                        linear.set_quantized(quantized);
                    }
                    done += 1;
                    progress(done, total);
                }
            }
            if self.head_quantized.is_none() {
                let head = self.lm_head.as_ref().unwrap_or(&self.wte);
                let name = if self.lm_head.is_some() { "lm_head.weight" } else { "transformer.wte.weight" };
                let quantized = QuantizedWeight::quantize(head, format).map_err(|e| refused(name.into(), e))?;
                self.head_quantized = Some(quantized);
                if let Some(lm_head) = &self.lm_head {
                    lm_head.shallow_clone().set_data(&empty_weight());
                }
                self.drop_tied_table();
            }
            progress(total, total);
            Ok(())
        })
    }

    /// The quantized layers by checkpoint name (`….weight`, and `lm_head.weight` for the head).
    pub(crate) fn quantized_layers(&self) -> Vec<(String, &QuantizedWeight)> {
        let mut layers = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            for (name, linear) in DENSE_LAYERS.iter().zip(block.linears()) {
                if let Some(quantized) = &linear.quantized {
                    layers.push((format!("transformer.h.{i}.{name}.weight"), quantized));
                }
            }
        }
        if let Some(head) = &self.head_quantized {
            layers.push(("lm_head.weight".to_string(), head));
        }
        layers
    }

    /// Sets the quantized layer `name` (as [`quantized_layers`](Self::quantized_layers) names it);
    /// false if no dense layer has that name.
    pub(crate) fn set_quantized_layer(&mut self, name: &str, quantized: QuantizedWeight) -> bool {
        if name == "lm_head.weight" {
            self.head_quantized = Some(quantized);
            if let Some(lm_head) = &self.lm_head {
                tch::no_grad(|| lm_head.shallow_clone().set_data(&empty_weight()));
            }
            self.drop_tied_table();
            return true;
        }
        let Some(rest) = name.strip_prefix("transformer.h.") else { return false };
        let Some((index, layer)) = rest.split_once('.') else { return false };
        let Some(block) = index.parse::<usize>().ok().and_then(|i| self.blocks.get_mut(i)) else { return false };
        let linear = match layer {
            "attn.c_attn.weight" => &mut block.attn.c_attn,
            "attn.c_proj.weight" => &mut block.attn.c_proj,
            "mlp.c_fc.weight" => &mut block.mlp.c_fc,
            "mlp.c_proj.weight" => &mut block.mlp.c_proj,
            _ => return false,
        };
        linear.set_quantized(quantized);
        true
    }
}

/// The `dtype` string `transformers` uses for a tch kind.
pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    }
}

/// How the weights are held: dense in a dtype, or the dense layers and the head in int8 or int4
/// blocks of 32 with fp32 scales (activations quantized per block on the fly; everything else fp32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Every weight in this dtype.
    Dense(Kind),
    /// Quantized dense layers and head, on the CPU.
    Quantized(Format),
}

impl Precision {
    /// int8 blocks ([`Precision::Quantized`]).
    pub const INT8: Precision = Precision::Quantized(Format::Int8);
    /// int4 blocks ([`Precision::Quantized`]).
    pub const INT4: Precision = Precision::Quantized(Format::Int4);

    /// Whether the dense layers are quantized (CPU only).
    pub fn is_quantized(self) -> bool {
        matches!(self, Precision::Quantized(_))
    }

    /// The `--dtype` that names it.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Dense(kind) => dtype_name(kind),
            Precision::Quantized(format) => format.name(),
        }
    }

    /// The dtype the model computes in.
    pub fn kind(self) -> Kind {
        match self {
            Precision::Dense(kind) => kind,
            Precision::Quantized(_) => Kind::Float,
        }
    }
}

/// [`parse_dtype`], and `int8` (or `q8_0`) and `int4` (or `q4_0`).
pub fn parse_precision(text: &str) -> Result<Precision> {
    match text {
        "int8" | "q8_0" | "i8" => Ok(Precision::INT8),
        "int4" | "q4_0" | "i4" => Ok(Precision::INT4),
        other => parse_dtype(other).map(Precision::Dense).map_err(|_| {
            ModelError::Invalid(format!(
                "unknown dtype `{other}`: use float32 (fp32), bfloat16 (bf16), float16 (fp16), int8 or int4"
            ))
        }),
    }
}

/// Parses `float32` / `fp32`, `bfloat16` / `bf16`, `float16` / `fp16`.
pub fn parse_dtype(text: &str) -> Result<Kind> {
    match text {
        "float32" | "fp32" | "f32" => Ok(Kind::Float),
        "bfloat16" | "bf16" => Ok(Kind::BFloat16),
        "float16" | "fp16" | "f16" | "half" => Ok(Kind::Half),
        other => Err(ModelError::Invalid(format!("unknown dtype `{other}`: use float32, bfloat16 or float16"))),
    }
}
