//! Causal self-attention through libtorch's `scaled_dot_product_attention`, which picks a fused
//! backend (flash or memory-efficient on CUDA, the flash CPU kernel on CPU), plus a naive reference
//! used by the tests. Multi-query K/V (one head) is never copied per query head: decode steps fold
//! the heads into the query length, prefill uses SDPA's grouped-query mode.
use std::fmt;

use tch::{Kind, Tensor};

/// The SDPA backend libtorch chooses for a call (`at::_fused_sdp_choice`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdpaBackend {
    /// Plain matmul-softmax-matmul.
    Math,
    /// FlashAttention (CUDA) or the flash CPU kernel.
    Flash,
    /// Memory-efficient attention (CUDA).
    Efficient,
    /// cuDNN attention (CUDA).
    Cudnn,
    /// A backend registered by an out-of-tree device.
    Overrideable,
    /// libtorch found no backend for these inputs.
    None,
}

impl fmt::Display for SdpaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SdpaBackend::Math => "math",
            SdpaBackend::Flash => "flash",
            SdpaBackend::Efficient => "memory-efficient",
            SdpaBackend::Cudnn => "cudnn",
            SdpaBackend::Overrideable => "overrideable",
            SdpaBackend::None => "none",
        })
    }
}

/// How one attention call will be laid out for SDPA.
struct Plan {
    query: Tensor,
    mask: Option<Tensor>,
    causal: bool,
    grouped: bool,
    folded_heads: bool,
}

/// `query` is `[batch, heads, q_len, head_dim]`; `key`/`value` are `[batch, kv_heads, k_len, head_dim]`
/// with `kv_heads` dividing `heads` and `k_len >= q_len`. The queries are the last `q_len` positions
/// of the keys (a KV cache holds the `k_len - q_len` earlier ones).
fn plan(query: &Tensor, key: &Tensor) -> Plan {
    let (batch, heads, q_len, head_dim) = query.size4().expect("query is 4-d");
    let (_, kv_heads, k_len, _) = key.size4().expect("key is 4-d");
    if q_len == 1 && kv_heads == 1 {
        // One query per head attends to every key: fold heads into the query length, no mask.
        let query = query.reshape([batch, 1, heads, head_dim]);
        return Plan { query, mask: None, causal: false, grouped: false, folded_heads: true };
    }
    let grouped = kv_heads != heads;
    if q_len == k_len {
        return Plan { query: query.shallow_clone(), mask: None, causal: true, grouped, folded_heads: false };
    }
    if q_len == 1 {
        return Plan { query: query.shallow_clone(), mask: None, causal: false, grouped, folded_heads: false };
    }
    // New queries after a cache: query i (absolute position past + i) sees keys 0..=past + i.
    let mask = causal_mask(q_len, k_len, query.device());
    Plan { query: query.shallow_clone(), mask: Some(mask), causal: false, grouped, folded_heads: false }
}

/// Boolean `[q_len, k_len]` mask, true where attention is allowed.
fn causal_mask(q_len: i64, k_len: i64, device: tch::Device) -> Tensor {
    let past = k_len - q_len;
    let rows = Tensor::arange(q_len, (Kind::Int64, device)).unsqueeze(1) + past;
    let cols = Tensor::arange(k_len, (Kind::Int64, device)).unsqueeze(0);
    cols.le_tensor(&rows)
}

/// Causal attention, `[batch, heads, q_len, head_dim]` out; `scale` multiplies `q·k`.
pub fn causal_attention(query: &Tensor, key: &Tensor, value: &Tensor, scale: f64, dropout: f64) -> Tensor {
    let plan = plan(query, key);
    let out = Tensor::scaled_dot_product_attention(
        &plan.query,
        key,
        value,
        plan.mask.as_ref(),
        dropout,
        plan.causal,
        scale,
        plan.grouped,
    );
    if plan.folded_heads {
        out.reshape(query.size())
    } else {
        out
    }
}

/// The backend [`causal_attention`] gets for these inputs.
pub fn backend_for(query: &Tensor, key: &Tensor, value: &Tensor, scale: f64) -> SdpaBackend {
    let plan = plan(query, key);
    let choice = Tensor::internal_fused_sdp_choice(
        &plan.query,
        key,
        value,
        plan.mask.as_ref(),
        0.0,
        plan.causal,
        scale,
        plan.grouped,
    );
    match choice {
        0 => SdpaBackend::Math,
        1 => SdpaBackend::Flash,
        2 => SdpaBackend::Efficient,
        3 => SdpaBackend::Cudnn,
        4 => SdpaBackend::Overrideable,
        _ => SdpaBackend::None,
    }
}

/// The textbook computation, in fp32, with K/V repeated per head: the tests' reference.
pub fn reference_attention(query: &Tensor, key: &Tensor, value: &Tensor, scale: f64) -> Tensor {
    let (_, heads, q_len, _) = query.size4().expect("query is 4-d");
    let (_, kv_heads, k_len, _) = key.size4().expect("key is 4-d");
    let repeat = heads / kv_heads;
    let key = key.to_kind(Kind::Float).repeat_interleave_self_int(repeat, 1, None);
    let value = value.to_kind(Kind::Float).repeat_interleave_self_int(repeat, 1, None);
    let scores = query.to_kind(Kind::Float).matmul(&key.transpose(-1, -2)) * scale;
    let allowed = causal_mask(q_len, k_len, query.device());
    let scores = scores.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
    scores.softmax(-1, Kind::Float).matmul(&value).to_kind(query.kind())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    struct Case {
        heads: i64,
        kv_heads: i64,
        q_len: i64,
        k_len: i64,
    }

    /// SDPA must match the reference within 1e-5 in fp32.
    fn check(case: Case) {
        tch::manual_seed(7);
        let opts = (Kind::Float, Device::Cpu);
        let head_dim = 16;
        let query = Tensor::randn([2, case.heads, case.q_len, head_dim], opts);
        let key = Tensor::randn([2, case.kv_heads, case.k_len, head_dim], opts);
        let value = Tensor::randn([2, case.kv_heads, case.k_len, head_dim], opts);
        let scale = 1.0 / (head_dim as f64).sqrt();
        let fused = causal_attention(&query, &key, &value, scale, 0.0);
        let reference = reference_attention(&query, &key, &value, scale);
        let diff = (fused - reference).abs().max().double_value(&[]);
        assert!(
            diff < 1e-5,
            "heads {} kv {} q {} k {}: max diff {diff}",
            case.heads,
            case.kv_heads,
            case.q_len,
            case.k_len
        );
    }

    #[test]
    fn sdpa_matches_reference() {
        check(Case { heads: 4, kv_heads: 1, q_len: 9, k_len: 9 }); // MQA prefill
        check(Case { heads: 4, kv_heads: 1, q_len: 1, k_len: 9 }); // MQA decode, folded heads
        check(Case { heads: 4, kv_heads: 1, q_len: 3, k_len: 9 }); // MQA verify step after a cache
        check(Case { heads: 4, kv_heads: 4, q_len: 9, k_len: 9 }); // MHA prefill
        check(Case { heads: 4, kv_heads: 4, q_len: 1, k_len: 9 }); // MHA decode
        check(Case { heads: 4, kv_heads: 4, q_len: 5, k_len: 12 }); // MHA after a cache
    }

    #[test]
    fn masking_is_causal() {
        // Changing a later key must not change an earlier output.
        tch::manual_seed(3);
        let opts = (Kind::Float, Device::Cpu);
        let query = Tensor::randn([1, 2, 6, 8], opts);
        let key = Tensor::randn([1, 1, 6, 8], opts);
        let value = Tensor::randn([1, 1, 6, 8], opts);
        let before = causal_attention(&query, &key, &value, 0.3, 0.0);
        let changed_value = value.copy();
        let _ = changed_value.narrow(2, 5, 1).fill_(100.0);
        let after = causal_attention(&query, &key, &changed_value, 0.3, 0.0);
        let early = (before.narrow(2, 0, 5) - after.narrow(2, 0, 5)).abs().max().double_value(&[]);
        let last = (before.narrow(2, 5, 1) - after.narrow(2, 5, 1)).abs().max().double_value(&[]);
        assert_eq!(early, 0.0);
        assert!(last > 1.0);
    }

    #[test]
    fn cpu_prefill_runs_the_flash_kernel() {
        let opts = (Kind::Float, Device::Cpu);
        let query = Tensor::randn([1, 4, 16, 16], opts);
        let key = Tensor::randn([1, 1, 16, 16], opts);
        let value = Tensor::randn([1, 1, 16, 16], opts);
        assert_eq!(backend_for(&query, &key, &value, 0.25), SdpaBackend::Flash);
        let decode = query.narrow(2, 15, 1);
        assert_eq!(backend_for(&decode, &key, &value, 0.25), SdpaBackend::Flash);
    }
}
