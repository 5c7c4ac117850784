//! Causal self-attention through libtorch's `scaled_dot_product_attention`, which picks a fused
//! backend (flash or memory-efficient on CUDA, the flash CPU kernel on CPU), plus a naive reference
//! used by the tests. Multi-query K/V (one head) is never copied per query head: decode steps fold
//! the heads into the query length, prefill uses SDPA's grouped-query mode or, in fp32 on the CPU
//! where it measures faster, [`prompt_attention`], which folds them into its matrix products.
use std::fmt;
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

use crate::ffi::{self, check};

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

/// Runs `sdpa` with libtorch's cuDNN attention kept out when `query` is an inference input on CUDA:
/// cuDNN builds a plan for every new sequence length, and a decode step's keys are one longer each
/// time (measured on an H200: a 128-token generation stalled for tens of seconds). Training, whose
/// shapes repeat, keeps libtorch's choice. The switch is process-wide, as `torch.nn.attention.
/// sdpa_kernel` is, and restored when the last inference call in flight ends (so that calls on
/// several threads cannot leave it off for good).
fn with_inference_backends<T>(query: &Tensor, sdpa: impl FnOnce() -> T) -> T {
    if !query.device().is_cuda() || query.requires_grad() {
        return sdpa();
    }
    let _off = CudnnOff::new();
    sdpa()
}

/// Inference calls in flight, and libtorch's setting from before the first of them.
static CUDNN_OFF: Mutex<(usize, i32)> = Mutex::new((0, 1));

/// cuDNN attention kept out while one lives (also when the call inside panics).
struct CudnnOff;

impl CudnnOff {
    fn new() -> CudnnOff {
        let mut state = CUDNN_OFF.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.0 == 0 {
            // SAFETY: sets and reads a flag of libtorch's global context.
            state.1 = unsafe { ffi::wizard_sdpa_allow_cudnn(0) };
        }
        state.0 += 1;
        CudnnOff
    }
}

impl Drop for CudnnOff {
    fn drop(&mut self) {
        let mut state = CUDNN_OFF.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        state.0 -= 1;
        if state.0 == 0 {
            // SAFETY: as above.
            unsafe { ffi::wizard_sdpa_allow_cudnn(state.1) };
        }
    }
}

/// Causal attention, `[batch, heads, q_len, head_dim]` out; `scale` multiplies `q·k`.
pub fn causal_attention(query: &Tensor, key: &Tensor, value: &Tensor, scale: f64, dropout: f64) -> Tensor {
    let plan = plan(query, key);
    let out = with_inference_backends(query, || {
        Tensor::scaled_dot_product_attention(
            &plan.query,
            key,
            value,
            plan.mask.as_ref(),
            dropout,
            plan.causal,
            scale,
            plan.grouped,
        )
    });
    if plan.folded_heads {
        out.reshape(query.size())
    } else {
        out
    }
}

/// [`causal_attention`] of fp32 inputs computed in bf16 (the result fp32 again), for models whose
/// weights are bf16: where this CPU multiplies bf16 faster (AMX, AVX-512 BF16), a long prompt chunk's
/// attention takes a third of its fp32 time. `None` where bf16 measured no faster here.
pub fn causal_attention_bf16(query: &Tensor, key: &Tensor, value: &Tensor, scale: f64) -> Option<Tensor> {
    if !bf16_attention_faster() {
        return None;
    }
    let narrow = |t: &Tensor| t.to_kind(Kind::BFloat16);
    Some(causal_attention(&narrow(query), &narrow(key), &narrow(value), scale, 0.0).to_kind(Kind::Float))
}

/// Whether causal attention of a prompt chunk runs at least 1.2x faster in bf16 than in fp32 on this
/// CPU, timed once per process (a few milliseconds): libtorch's bf16 kernel converts each block where
/// the CPU has no bf16 arithmetic, and is slower there.
pub fn bf16_attention_faster() -> bool {
    static FASTER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FASTER.get_or_init(|| {
        let _guard = tch::no_grad_guard();
        let query = Tensor::randn([1, 8, 256, 64], (Kind::Float, Device::Cpu));
        let key = Tensor::randn([1, 1, 256, 64], (Kind::Float, Device::Cpu));
        let time = |kind: Kind| {
            let (query, key) = (query.to_kind(kind), key.to_kind(kind));
            (0..4)
                .map(|_| {
                    let start = std::time::Instant::now();
                    drop(causal_attention(&query, &key, &key, 0.125, 0.0));
                    start.elapsed()
                })
                .min()
                .unwrap_or_default()
        };
        time(Kind::BFloat16).as_secs_f64() * 1.2 < time(Kind::Float).as_secs_f64()
    })
}

/// Causal attention of a prompt chunk as [`causal_attention`] computes it, for fp32 CPU inference
/// with grouped keys and values (a multi-query model's one key head), as `[batch, q_len, heads *
/// head_dim]`: each block of positions times a group's heads is one matrix, its scores against the
/// keys it may see one BLAS product, its weighted values another (`csrc/prompt_attention.cpp`).
/// `None` where it does not apply (gradients, other dtypes or devices, as many key heads as query
/// heads) or SDPA measured faster for this shape on this CPU ([`prompt_attention_faster`]).
pub fn prompt_attention(query: &Tensor, key: &Tensor, value: &Tensor, scale: f64) -> Option<Tensor> {
    let inference_fp32 = |t: &Tensor| t.device() == Device::Cpu && t.kind() == Kind::Float && !t.requires_grad();
    // The kernel's own conditions: one batch, key heads dividing the query heads (fewer of them),
    // keys and values alike, at least as many keys as queries.
    let shapes_fit = match (query.size().as_slice(), key.size().as_slice()) {
        (&[batch, heads, len, dim], &[key_batch, kv_heads, k_len, key_dim]) => {
            key_batch == batch
                && key_dim == dim
                && value.size() == key.size()
                && kv_heads > 0
                && kv_heads < heads
                && heads % kv_heads == 0
                && len > 0
                && k_len >= len
        }
        _ => false,
    };
    let applies = shapes_fit && [query, key, value].into_iter().all(inference_fp32);
    let faster = || prompt_attention_faster(query.size()[1], key.size()[1], query.size()[3]);
    (applies && faster()).then(|| prompt_attention_kernel(query, key, value, scale))
}

/// Whether [`prompt_attention`]'s products beat SDPA by at least 5% on a 256-position prompt chunk
/// of `heads` query heads over `kv_heads` key heads of `head_dim` on this CPU, timed once per process
/// and shape (a few milliseconds).
pub fn prompt_attention_faster(heads: i64, kv_heads: i64, head_dim: i64) -> bool {
    /// Query heads, key heads, head size.
    type Shape = (i64, i64, i64);
    static FASTER: Mutex<Vec<(Shape, bool)>> = Mutex::new(Vec::new());
    let shape: Shape = (heads, kv_heads, head_dim);
    let mut known = FASTER.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(&(_, faster)) = known.iter().find(|(timed, _)| *timed == shape) {
        return faster;
    }
    let _guard = tch::no_grad_guard();
    let query = Tensor::randn([1, heads, 256, head_dim], (Kind::Float, Device::Cpu));
    let key = Tensor::randn([1, kv_heads, 256, head_dim], (Kind::Float, Device::Cpu));
    let time = |attend: &dyn Fn()| {
        (0..4)
            .map(|_| {
                let start = std::time::Instant::now();
                attend();
                start.elapsed()
            })
            .min()
            .unwrap_or_default()
            .as_secs_f64()
    };
    let scale = 1.0 / (head_dim as f64).sqrt();
    let products = time(&|| drop(prompt_attention_kernel(&query, &key, &key, scale)));
    let sdpa = time(&|| drop(causal_attention(&query, &key, &key, scale, 0.0)));
    let faster = products * 1.05 < sdpa;
    known.push((shape, faster));
    faster
}

/// [`prompt_attention`] whatever was measured. Panics on what the kernel rejects (see there).
fn prompt_attention_kernel(query: &Tensor, key: &Tensor, value: &Tensor, scale: f64) -> Tensor {
    // The kernel reads rows of any stride, but each row's values one after another.
    let rows = |t: &Tensor| if t.stride()[3] == 1 { t.shallow_clone() } else { t.contiguous() };
    let (query, key, value) = (rows(query), rows(key), rows(value));
    let mut result = std::ptr::null_mut();
    // SAFETY: the handles are live tch tensors for the duration of the call, which only reads them;
    // on success `result` is a new heap `at::Tensor` whose ownership passes to the returned Tensor.
    let status = unsafe {
        ffi::wizard_prompt_attention(ffi::tensor(&query), ffi::tensor(&key), ffi::tensor(&value), scale, &mut result)
    };
    if let Err(error) = check(status, "prompt attention") {
        panic!("{error}");
    }
    // SAFETY: see above; `result` is non-null after a successful call.
    unsafe { Tensor::from_ptr(result as *mut torch_sys::C_tensor) }
}

/// The most new positions per sequence that [`decode_attention`] takes: every decode step and
/// verification pass (speculation's widths stay below it); longer prompt chunks go to SDPA, whose
/// blocked kernel is faster there.
pub const DECODE_KERNEL_MAX_POSITIONS: i64 = 64;

/// Whether [`decode_attention`] takes this query `[batch, heads, new, head_dim]` (fp32 on CPU, at
/// most [`DECODE_KERNEL_MAX_POSITIONS`] new positions); elsewhere SDPA does the work.
pub fn decode_kernel_applies(query: &Tensor) -> bool {
    query.device() == Device::Cpu && query.kind() == Kind::Float && query.size()[2] <= DECODE_KERNEL_MAX_POSITIONS
}

/// Attention of new positions (a decode step, or a verification pass of several) for sequences with
/// caches of different lengths, in one call. `key_caches[i]`/`value_caches[i]` are contiguous
/// `[b_i, kv_heads, capacity, head_dim]` buffers holding `lens[i]` positions; the query rows are
/// their sequences in order. Stores `new_keys` and `new_values` (`[batch, kv_heads, new, head_dim]`)
/// at positions `lens[i]..` (the caller advances the lengths) and returns the attention of `query`
/// (`[batch, heads, new, head_dim]`), new position `j` over positions `0..=lens[i] + j`, as `[batch,
/// new, heads * head_dim]`. Each sequence, head and position is computed in a fixed order, the same
/// whatever else is in the call: k positions in one call give the bits of k one-position calls.
/// Panics on what the kernel rejects (shapes, a full cache, not fp32 on CPU: see
/// [`decode_kernel_applies`]), as tch ops do.
pub fn decode_attention(
    query: &Tensor,
    new_keys: &Tensor,
    new_values: &Tensor,
    key_caches: &[&Tensor],
    value_caches: &[&Tensor],
    lens: &[i64],
    scale: f64,
) -> Tensor {
    assert!(key_caches.len() == lens.len() && value_caches.len() == lens.len(), "one length per cache");
    let keys: Vec<ffi::TensorHandle> = key_caches.iter().map(|t| ffi::tensor(t)).collect();
    let values: Vec<ffi::TensorHandle> = value_caches.iter().map(|t| ffi::tensor(t)).collect();
    let mut result = std::ptr::null_mut();
    // SAFETY: every handle is a live tch tensor for the duration of the call; the arrays hold
    // `lens.len()` entries. The shim writes only into the caches' buffers (position lens[i]) and, on
    // success, sets `result` to a new heap `at::Tensor` whose ownership passes to the returned Tensor.
    let status = unsafe {
        ffi::wizard_decode_attention(
            ffi::tensor(query),
            ffi::tensor(new_keys),
            ffi::tensor(new_values),
            keys.as_ptr(),
            values.as_ptr(),
            lens.as_ptr(),
            lens.len() as i64,
            scale,
            &mut result,
        )
    };
    if let Err(error) = check(status, "decode attention") {
        panic!("{error}");
    }
    // SAFETY: see above; `result` is non-null after a successful call.
    unsafe { Tensor::from_ptr(result as *mut torch_sys::C_tensor) }
}

/// The backend [`causal_attention`] gets for these inputs.
pub fn backend_for(query: &Tensor, key: &Tensor, value: &Tensor, scale: f64) -> SdpaBackend {
    let plan = plan(query, key);
    let choice = with_inference_backends(query, || {
        Tensor::internal_fused_sdp_choice(
            &plan.query,
            key,
            value,
            plan.mask.as_ref(),
            0.0,
            plan.causal,
            scale,
            plan.grouped,
        )
    });
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

    #[derive(Clone, Copy)]
    struct Case {
        heads: i64,
        kv_heads: i64,
        q_len: i64,
        k_len: i64,
    }

    /// SDPA and the prompt kernel must match the reference within 1e-5 in fp32.
    fn check(case: Case) {
        tch::manual_seed(7);
        let opts = (Kind::Float, Device::Cpu);
        let head_dim = 16;
        let query = Tensor::randn([2, case.heads, case.q_len, head_dim], opts);
        let key = Tensor::randn([2, case.kv_heads, case.k_len, head_dim], opts);
        let value = Tensor::randn([2, case.kv_heads, case.k_len, head_dim], opts);
        let scale = 1.0 / (head_dim as f64).sqrt();
        let reference = reference_attention(&query, &key, &value, scale);
        let close = |what: &str, got: Tensor, expected: &Tensor| {
            let diff = (got - expected).abs().max().double_value(&[]);
            let Case { heads, kv_heads, q_len, k_len } = case;
            assert!(diff < 1e-5, "{what}, heads {heads} kv {kv_heads} q {q_len} k {k_len}: max diff {diff}");
        };
        close("sdpa", causal_attention(&query, &key, &value, scale, 0.0), &reference);
        // The prompt kernel on the layouts the model hands it: queries a view of rows laid out
        // position by position, keys and values rows of a longer cache.
        let positions_first = query.transpose(1, 2).contiguous().transpose(1, 2);
        let cached = |t: &Tensor| {
            let buffer = Tensor::zeros([2, case.kv_heads, case.k_len + 5, head_dim], opts);
            buffer.narrow(2, 0, case.k_len).copy_(t);
            buffer.narrow(2, 0, case.k_len)
        };
        let products = prompt_attention_kernel(&positions_first, &cached(&key), &cached(&value), scale);
        close("prompt kernel", products, &reference.transpose(1, 2).reshape([2, case.q_len, -1]));
    }

    #[test]
    fn sdpa_matches_reference() {
        check(Case { heads: 4, kv_heads: 1, q_len: 9, k_len: 9 }); // MQA prefill
        check(Case { heads: 4, kv_heads: 1, q_len: 1, k_len: 9 }); // MQA decode, folded heads
        check(Case { heads: 4, kv_heads: 1, q_len: 3, k_len: 9 }); // MQA verify step after a cache
        check(Case { heads: 4, kv_heads: 4, q_len: 9, k_len: 9 }); // MHA prefill
        check(Case { heads: 4, kv_heads: 4, q_len: 1, k_len: 9 }); // MHA decode
        check(Case { heads: 4, kv_heads: 4, q_len: 5, k_len: 12 }); // MHA after a cache

        // Prompt chunks of several blocks of the prompt kernel, alone and after a cache.
        check(Case { heads: 12, kv_heads: 1, q_len: 300, k_len: 300 });
        check(Case { heads: 12, kv_heads: 1, q_len: 100, k_len: 333 });
        check(Case { heads: 8, kv_heads: 2, q_len: 130, k_len: 150 });
    }

    /// Where it applies and measured faster, the model's prompt chunks take the prompt kernel; a NaN
    /// in one head's query stays in that head's rows.
    #[test]
    fn prompt_attention_applies_to_grouped_fp32_inference() {
        let opts = (Kind::Float, Device::Cpu);
        let (query, key) = (Tensor::randn([1, 4, 80, 16], opts), Tensor::randn([1, 1, 80, 16], opts));
        let taken = prompt_attention(&query, &key, &key, 0.25);
        assert_eq!(taken.is_some(), prompt_attention_faster(4, 1, 16));
        assert!(prompt_attention(&query.to_kind(Kind::BFloat16), &key, &key, 0.25).is_none());
        // Shapes the kernel does not take fall to SDPA rather than panic.
        let keys = |shape: [i64; 4]| Tensor::randn(shape, opts);
        for shape in [[1, 4, 80, 16], [1, 3, 80, 16], [2, 1, 80, 16], [1, 1, 79, 16], [1, 1, 80, 8]] {
            assert!(prompt_attention(&query, &keys(shape), &keys(shape), 0.25).is_none(), "{shape:?}");
        }
        assert!(prompt_attention(&query, &key, &keys([1, 1, 81, 16]), 0.25).is_none());
        assert!(prompt_attention(&query.set_requires_grad(true), &key, &key, 0.25).is_none());
        let query = Tensor::randn([1, 4, 80, 16], opts);
        let _ = query.narrow(1, 2, 1).narrow(2, 10, 1).narrow(3, 0, 1).fill_(f64::NAN);
        let out = prompt_attention_kernel(&query, &key, &key, 0.25).view([80, 4, 16]);
        let nan_rows = out.isnan().any_dims(&[2][..], false);
        let expected = Tensor::zeros([80, 4], (Kind::Bool, Device::Cpu));
        let _ = expected.narrow(0, 10, 1).narrow(1, 2, 1).fill_(1);
        assert!(nan_rows.equal(&expected), "{nan_rows}");
    }

    struct DecodeCase {
        heads: i64,
        kv_heads: i64,
        head_dim: i64,
        /// New positions per sequence in the call.
        fresh: i64,
        /// Per cache: its sequences and the positions they already hold.
        caches: Vec<(i64, i64)>,
    }

    /// The decode kernel stores the new keys and values where they belong, matches the reference on
    /// every sequence, and gives each sequence and position bit for bit what it gets alone, one
    /// position per call.
    fn check_decode(case: DecodeCase) {
        tch::manual_seed(case.head_dim);
        let opts = (Kind::Float, Device::Cpu);
        let fresh = case.fresh;
        let capacity = case.caches.iter().map(|&(_, len)| len).max().unwrap_or(0) + fresh + 3;
        let batch: i64 = case.caches.iter().map(|(b, _)| b).sum();
        let query = Tensor::randn([batch, case.heads, fresh, case.head_dim], opts);
        let new_keys = Tensor::randn([batch, case.kv_heads, fresh, case.head_dim], opts);
        let new_values = Tensor::randn([batch, case.kv_heads, fresh, case.head_dim], opts);
        let buffer = |b| Tensor::randn([b, case.kv_heads, capacity, case.head_dim], opts);
        let keys: Vec<Tensor> = case.caches.iter().map(|&(b, _)| buffer(b)).collect();
        let values: Vec<Tensor> = case.caches.iter().map(|&(b, _)| buffer(b)).collect();
        let lens: Vec<i64> = case.caches.iter().map(|&(_, len)| len).collect();
        let (key_refs, value_refs): (Vec<&Tensor>, Vec<&Tensor>) = (keys.iter().collect(), values.iter().collect());
        let scale = 1.0 / (case.head_dim as f64).sqrt();
        let out = decode_attention(&query, &new_keys, &new_values, &key_refs, &value_refs, &lens, scale);
        assert_eq!(out.size(), [batch, fresh, case.heads * case.head_dim]);
        let mut row = 0;
        for (i, &(b, len)) in case.caches.iter().enumerate() {
            for j in 0..b {
                let sequence = |t: &Tensor| t.narrow(0, j, 1);
                let stored = sequence(&keys[i]).narrow(2, len, fresh);
                assert!(stored.equal(&new_keys.narrow(0, row, 1)), "cache {i} sequence {j}: keys not stored");
                let stored = sequence(&values[i]).narrow(2, len, fresh);
                assert!(stored.equal(&new_values.narrow(0, row, 1)), "cache {i} sequence {j}: values not stored");
                let (k, v) =
                    (sequence(&keys[i]).narrow(2, 0, len + fresh), sequence(&values[i]).narrow(2, 0, len + fresh));
                let q = query.narrow(0, row, 1);
                let expected = reference_attention(&q, &k, &v, scale).transpose(1, 2).reshape([1, fresh, -1]);
                let got = out.narrow(0, row, 1);
                let diff = (&got - expected).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "cache {i} sequence {j} (len {len}): max diff {diff}");
                // Alone, one position per call, from the same cache state (positions are rewritten
                // with the same keys and values).
                let (k1, v1) = (sequence(&keys[i]).contiguous(), sequence(&values[i]).contiguous());
                for p in 0..fresh {
                    let position = |t: &Tensor| t.narrow(0, row, 1).narrow(2, p, 1);
                    let alone = decode_attention(
                        &position(&query),
                        &position(&new_keys),
                        &position(&new_values),
                        &[&k1],
                        &[&v1],
                        &[len + p],
                        scale,
                    );
                    assert!(alone.equal(&got.narrow(1, p, 1)), "cache {i} sequence {j} position {p}: differs alone");
                }
                row += 1;
            }
        }
    }

    #[test]
    fn decode_kernel_matches_reference_and_itself_alone() {
        for fresh in [1, 3, 13] {
            let caches = vec![(1, 0), (1, 17), (1, 27), (1, 5)];
            check_decode(DecodeCase { heads: 4, kv_heads: 1, head_dim: 64, fresh, caches }); // MQA
            check_decode(DecodeCase { heads: 6, kv_heads: 2, head_dim: 20, fresh, caches: vec![(3, 9), (1, 1)] }); // groups
            check_decode(DecodeCase { heads: 3, kv_heads: 3, head_dim: 7, fresh, caches: vec![(2, 26)] });
            // MHA, short head
        }
        // Caches longer than a tile of positions (16 KiB of keys), with the head sizes of d768 and 1B
        // models; one new position splits a group's heads among the threads, more do not.
        for fresh in [1, 5] {
            check_decode(DecodeCase { heads: 12, kv_heads: 1, head_dim: 64, fresh, caches: vec![(1, 200), (1, 63)] });
            check_decode(DecodeCase { heads: 16, kv_heads: 1, head_dim: 128, fresh, caches: vec![(2, 150)] });
            check_decode(DecodeCase { heads: 2, kv_heads: 1, head_dim: 256, fresh, caches: vec![(1, 70)] });
            check_decode(DecodeCase { heads: 4, kv_heads: 2, head_dim: 16, fresh, caches: vec![(1, 1100)] });
        }
    }

    #[test]
    fn decode_kernel_passes_nan_on() {
        let opts = (Kind::Float, Device::Cpu);
        for head_dim in [64, 20] {
            let query = Tensor::randn([1, 4, 1, head_dim], opts);
            let _ = query.narrow(1, 2, 1).narrow(3, 0, 1).fill_(f64::NAN);
            let new = Tensor::randn([1, 1, 1, head_dim], opts);
            let cache = Tensor::randn([1, 1, 50, head_dim], opts);
            let out = decode_attention(&query, &new, &new, &[&cache], &[&cache], &[40], 0.125).view([4, head_dim]);
            for head in 0..4 {
                let nan = out.get(head).isnan().all().int64_value(&[]) == 1;
                let finite = out.get(head).isfinite().all().int64_value(&[]) == 1;
                assert!(if head == 2 { nan } else { finite }, "head dim {head_dim}, head {head}: {}", out.get(head));
            }
        }
    }

    #[test]
    fn decode_kernel_refuses_a_full_cache() {
        let opts = (Kind::Float, Device::Cpu);
        let query = Tensor::randn([1, 2, 2, 8], opts);
        let new = Tensor::randn([1, 1, 2, 8], opts);
        let cache = Tensor::zeros([1, 1, 4, 8], opts);
        let full = std::panic::catch_unwind(|| decode_attention(&query, &new, &new, &[&cache], &[&cache], &[3], 1.0));
        let message = full.map(|_| String::new()).unwrap_err();
        let message = message.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(message.contains("no room for 2 more"), "{message}");
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
