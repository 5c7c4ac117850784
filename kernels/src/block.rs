//! A whole GPTBigCode block for new positions over KV caches (a decode step, a verification pass, a
//! batch of sequences) in one call (csrc/block.cpp): fp32 activations on CPU with fp32, bf16, int8 or int4
//! dense weights, both threads through every step of the block, one wake-up per block instead of
//! ~15 libtorch ops and 5 parallel regions. The products are [`crate::linear`]'s and
//! [`crate::quantized`]'s kernels and attention [`crate::attention::decode_attention`]'s, so a position's
//! result does not depend on the other rows or positions in the call, nor on whether it went through
//! here or op by op.
use std::ptr;

use tch::{Device, Tensor};

use crate::attention::DECODE_KERNEL_MAX_POSITIONS;
use crate::calibrate::{choice_for, Choice};
use crate::ffi::{self, check};

/// `x.gelu(approximate)`; the tanh form of a CPU fp32 tensor that needs no gradient (a prefill's
/// MLP) is computed as [`DecodeBlock`] computes it, vectorised, rather than by libtorch's tanh.
pub fn gelu(x: &Tensor, approximate: &str) -> Tensor {
    if approximate != "tanh" || x.device() != Device::Cpu {
        return x.gelu(approximate);
    }
    let mut result = ptr::null_mut();
    // SAFETY: `x` is a live tch tensor for the duration of the call, which only reads it; on success
    // `result` is a new heap `at::Tensor` owned by the returned Tensor.
    let status = unsafe { ffi::wizard_gelu_tanh(ffi::tensor(x), &mut result) };
    if let Err(error) = check(status, "gelu") {
        panic!("{error}");
    }
    // SAFETY: see above; `result` is non-null after a successful call.
    unsafe { Tensor::from_ptr(result as *mut torch_sys::C_tensor) }
}

/// One block's parameters and shape, as [`DecodeBlock::forward`] takes them.
pub struct DecodeBlock<'a> {
    /// `ln_1`, `attn.c_attn`, `attn.c_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`: weight, then bias. A
    /// dense weight is fp32 or bf16 `[out, in]`, or an int8 or int4 weight's [`packed`](crate::quantized::QuantizedWeight::packed)
    /// records; everything else is fp32.
    pub parameters: [&'a Tensor; 12],
    /// Query heads; one key/value head (multi-query) or one per query head, as the caches hold.
    pub heads: i64,
    /// The LayerNorms' epsilon.
    pub layer_norm_eps: f64,
    /// The attention scores' scale.
    pub scale: f64,
    /// The MLP's GELU: exact (erf), or the tanh approximation.
    pub exact_gelu: bool,
}

impl DecodeBlock<'_> {
    /// Whether [`forward`](Self::forward) takes `x` `[batch, new, d]`: CPU tensors needing no
    /// gradient, at most [`DECODE_KERNEL_MAX_POSITIONS`] new positions, a kernel on this CPU for each
    /// dense weight, and the kernel (not libtorch) chosen by [`crate::calibrate`] for every fp32
    /// step.
    pub fn applies(&self, x: &Tensor) -> bool {
        let handles = self.handles();
        x.device() == Device::Cpu
            && x.dim() == 3
            && x.size()[1] <= DECODE_KERNEL_MAX_POSITIONS
            && [2, 4, 8, 10].iter().all(|&i| choice_for(self.parameters[i]) != Choice::Libtorch)
            // SAFETY: live tensors for the duration of the call, which only reads them.
            && unsafe { ffi::wizard_decode_block_applies(ffi::tensor(x), handles.as_ptr()) != 0 }
    }

    /// The block applied to `x` `[batch, new, d]`, whose rows are the sequences of the caches in
    /// order (`key_caches[i]`/`value_caches[i]`: contiguous `[b_i, kv_heads, capacity, head_dim]`
    /// holding `lens[i]` positions). Stores the new keys and values at positions `lens[i]..` (the
    /// caller advances the lengths); new position `j` attends over `0..=lens[i] + j`. Panics on what
    /// the kernel rejects (see [`applies`](Self::applies); shapes, a full cache), as tch ops do.
    pub fn forward(&self, x: &Tensor, key_caches: &[&Tensor], value_caches: &[&Tensor], lens: &[i64]) -> Tensor {
        assert!(key_caches.len() == lens.len() && value_caches.len() == lens.len(), "one length per cache");
        let handles = self.handles();
        let keys: Vec<ffi::TensorHandle> = key_caches.iter().map(|t| ffi::tensor(t)).collect();
        let values: Vec<ffi::TensorHandle> = value_caches.iter().map(|t| ffi::tensor(t)).collect();
        let mut result = ptr::null_mut();
        // SAFETY: every handle is a live tch tensor for the duration of the call; the arrays hold 12
        // and `lens.len()` entries. The shim writes only into the caches' buffers (positions lens[i]..)
        // and, on success, sets `result` to a new heap `at::Tensor` owned by the returned Tensor.
        let status = unsafe {
            ffi::wizard_decode_block(
                ffi::tensor(x),
                handles.as_ptr(),
                self.heads,
                self.layer_norm_eps,
                self.scale,
                i32::from(self.exact_gelu),
                keys.as_ptr(),
                values.as_ptr(),
                lens.as_ptr(),
                lens.len() as i64,
                &mut result,
            )
        };
        if let Err(error) = check(status, "decode block") {
            panic!("{error}");
        }
        // SAFETY: see above; `result` is non-null after a successful call.
        unsafe { Tensor::from_ptr(result as *mut torch_sys::C_tensor) }
    }

    fn handles(&self) -> [ffi::TensorHandle; 12] {
        self.parameters.map(ffi::tensor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantized::QuantizedWeight;
    use tch::Kind;

    /// The dense weights' format.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Format {
        Fp32,
        /// fp32 packed in panels where the outputs are a multiple of 16, as they are.
        Panels,
        Bf16,
        /// bf16 in panels likewise.
        Bf16Panels,
        Int8,
        Int4,
    }

    impl Format {
        fn quantized(self) -> Option<crate::quantized::Format> {
            match self {
                Format::Int8 => Some(crate::quantized::Format::Int8),
                Format::Int4 => Some(crate::quantized::Format::Int4),
                Format::Fp32 | Format::Panels | Format::Bf16 | Format::Bf16Panels => None,
            }
        }
    }

    /// The same block op by op (tests' reference): libtorch, and the products through `product`
    /// (index of the weight in the parameters, input); caches not touched: `keys`/`values`
    /// `[batch, kv_heads, len + new, head_dim]` already hold the new positions.
    fn reference(
        block: &DecodeBlock,
        product: &dyn Fn(usize, &Tensor) -> Tensor,
        x: &Tensor,
        keys: &Tensor,
        values: &Tensor,
    ) -> Tensor {
        let [ln1_w, ln1_b, _, _, _, _, ln2_w, ln2_b, _, _, _, _] = block.parameters;
        let (batch, fresh, d) = x.size3().unwrap();
        let norm = |t: &Tensor, w, b| t.layer_norm([d], Some(w), Some(b), block.layer_norm_eps, false);
        let qkv = product(2, &norm(x, ln1_w, ln1_b));
        let (heads, dim) = (block.heads, d / block.heads);
        let query = if keys.size()[1] == 1 {
            qkv.narrow(2, 0, d).view([batch, fresh, heads, dim]).transpose(1, 2)
        } else {
            qkv.view([batch, fresh, heads, 3 * dim]).transpose(1, 2).narrow(3, 0, dim)
        };
        let attended = crate::attention::reference_attention(&query, keys, values, block.scale);
        let middle = x + product(4, &attended.transpose(1, 2).reshape([batch, fresh, d]));
        let approximate = if block.exact_gelu { "none" } else { "tanh" };
        let hidden = product(8, &norm(&middle, ln2_w, ln2_b)).gelu(approximate);
        &middle + product(10, &hidden)
    }

    /// libtorch's products over fp32 parameters.
    fn libtorch<'a>(parameters: &'a [&'a Tensor; 12]) -> impl Fn(usize, &Tensor) -> Tensor + 'a {
        |i, x| x.linear(parameters[i], Some(parameters[i + 1]))
    }

    struct Case {
        heads: i64,
        kv_heads: i64,
        d: i64,
        inner: i64,
        fresh: i64,
        /// Per cache: its sequences and the positions they already hold.
        caches: Vec<(i64, i64)>,
        exact_gelu: bool,
        format: Format,
    }

    /// The block matches libtorch op by op, stores the new keys and values, and gives every sequence
    /// and position bit for bit what it gets alone, one position per call.
    fn check(case: Case) {
        tch::manual_seed(case.d + case.fresh);
        let opts = (Kind::Float, Device::Cpu);
        let (d, dim, capacity) = (case.d, case.d / case.heads, 40);
        let qkv_dim = d + 2 * case.kv_heads * dim;
        let shapes = [
            vec![d],
            vec![d],
            vec![qkv_dim, d],
            vec![qkv_dim],
            vec![d, d],
            vec![d],
            vec![d],
            vec![d],
            vec![case.inner, d],
            vec![case.inner],
            vec![d, case.inner],
            vec![d],
        ];
        let tensors: Vec<Tensor> = shapes.iter().map(|shape| Tensor::randn(shape.as_slice(), opts) * 0.3).collect();
        let dense = [2, 4, 8, 10];
        let int8: Vec<Option<QuantizedWeight>> = (0..12)
            .map(|i| {
                let format = case.format.quantized().filter(|_| dense.contains(&i))?;
                Some(QuantizedWeight::quantize(&tensors[i], format).unwrap())
            })
            .collect();
        let narrow: Vec<Tensor> = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let bf16 = matches!(case.format, Format::Bf16 | Format::Bf16Panels) && dense.contains(&i);
                let weight = if bf16 { t.to_kind(Kind::BFloat16) } else { t.copy() };
                let panels = matches!(case.format, Format::Panels | Format::Bf16Panels);
                if panels && dense.contains(&i) && shapes[i][0] % 16 == 0 {
                    crate::linear::pack_panels(&weight).unwrap()
                } else {
                    weight
                }
            })
            .collect();
        let block = DecodeBlock {
            parameters: std::array::from_fn(|i| int8[i].as_ref().map_or(&narrow[i], QuantizedWeight::packed)),
            heads: case.heads,
            layer_norm_eps: 1e-5,
            scale: 1.0 / (dim as f64).sqrt(),
            exact_gelu: case.exact_gelu,
        };
        // Op by op: the same kernels for the products.
        let op_by_op = |i: usize, x: &Tensor| match &int8[i] {
            Some(weight) => crate::quantized::linear(x, weight, Some(&tensors[i + 1])),
            None => crate::linear::linear(x, &narrow[i], Some(&tensors[i + 1])),
        };
        // LayerNorm differs from libtorch's in the last bits, which can move a rounded input: one
        // input a bf16 step off moves an output by a weight times that step (up to 0.04 seen at
        // d 256 over random inputs).
        let tolerance = match case.format {
            Format::Fp32 | Format::Panels => 1e-4,
            Format::Bf16 | Format::Bf16Panels => 8e-2,
            Format::Int8 | Format::Int4 => 5e-2,
        };
        let batch: i64 = case.caches.iter().map(|(b, _)| b).sum();
        let x = Tensor::randn([batch, case.fresh, d], opts);
        if case.format.quantized().is_none() && !crate::linear::few_row_kernel_available() {
            assert!(!block.applies(&x), "without the dense kernel (no AVX2) fp32 and bf16 stay op by op");
            return;
        }
        assert!(block.applies(&x));
        let buffer = |b| Tensor::randn([b, case.kv_heads, capacity, dim], opts);
        let keys: Vec<Tensor> = case.caches.iter().map(|&(b, _)| buffer(b)).collect();
        let values: Vec<Tensor> = case.caches.iter().map(|&(b, _)| buffer(b)).collect();
        let before: Vec<(Tensor, Tensor)> = keys.iter().zip(&values).map(|(k, v)| (k.copy(), v.copy())).collect();
        let lens: Vec<i64> = case.caches.iter().map(|&(_, len)| len).collect();
        let (key_refs, value_refs): (Vec<&Tensor>, Vec<&Tensor>) = (keys.iter().collect(), values.iter().collect());
        let out = block.forward(&x, &key_refs, &value_refs, &lens);
        assert_eq!(out.size(), [batch, case.fresh, d]);
        let mut row = 0;
        for (i, &(b, len)) in case.caches.iter().enumerate() {
            for j in 0..b {
                let sequence = |t: &Tensor| t.narrow(0, j, 1).narrow(2, 0, len + case.fresh);
                let x_row = x.narrow(0, row, 1);
                let expected = reference(&block, &op_by_op, &x_row, &sequence(&keys[i]), &sequence(&values[i]));
                let got = out.narrow(0, row, 1);
                let diff = (&got - &expected).abs().max().double_value(&[]);
                assert!(diff < tolerance, "{:?} cache {i} sequence {j} (len {len}): max diff {diff}", case.format);
                // Alone, one position per call, from the cache as it was.
                let (k1, v1) = (before[i].0.narrow(0, j, 1).copy(), before[i].1.narrow(0, j, 1).copy());
                for p in 0..case.fresh {
                    let alone = block.forward(&x_row.narrow(1, p, 1), &[&k1], &[&v1], &[len + p]);
                    assert!(alone.equal(&got.narrow(1, p, 1)), "cache {i} sequence {j} position {p}: differs alone");
                }
                let stored = |t: &Tensor| t.narrow(2, len, case.fresh);
                assert!(stored(&k1).equal(&stored(&keys[i].narrow(0, j, 1))), "cache {i} sequence {j}: keys");
                assert!(stored(&v1).equal(&stored(&values[i].narrow(0, j, 1))), "cache {i} sequence {j}: values");
                row += 1;
            }
        }
    }

    #[test]
    fn block_matches_op_by_op_and_itself_alone() {
        for format in [Format::Fp32, Format::Panels, Format::Bf16, Format::Bf16Panels, Format::Int8, Format::Int4] {
            for fresh in [1, 4] {
                let mqa = |caches, exact_gelu| Case {
                    heads: 4,
                    kv_heads: 1,
                    d: 64,
                    inner: 200,
                    fresh,
                    caches,
                    exact_gelu,
                    format,
                };
                check(mqa(vec![(1, 0)], false));
                check(mqa(vec![(1, 17), (2, 5), (1, 30)], false));
                check(mqa(vec![(1, 9)], true));
                // Products in several chunks that the threads claim; `in` not a multiple of 32.
                check(Case {
                    heads: 4,
                    kv_heads: 1,
                    d: 256,
                    inner: 1000,
                    fresh,
                    caches: vec![(1, 3), (1, 20)],
                    exact_gelu: false,
                    format,
                });
                let heads = Case {
                    heads: 3,
                    kv_heads: 3,
                    d: 48,
                    inner: 100,
                    fresh,
                    caches: vec![(2, 11)],
                    exact_gelu: false,
                    format,
                };
                check(heads);
            }
        }
    }

    /// Zero parameters of a two-head multi-query block of width `d` with a `d`-wide MLP.
    fn zero_parameters(d: i64) -> Vec<Tensor> {
        [[d].as_slice(), &[d], &[2 * d, d], &[2 * d], &[d, d], &[d], &[d], &[d], &[d, d], &[d], &[d, d], &[d]]
            .iter()
            .map(|shape| Tensor::zeros(*shape, (Kind::Float, Device::Cpu)))
            .collect()
    }

    #[test]
    fn int8_records_of_another_shape_are_refused() {
        let opts = (Kind::Float, Device::Cpu);
        let d = 32;
        let tensors = zero_parameters(d);
        // Every dense weight int8 (a kernel on any CPU), and c_fc's records hold [d, 2d], not [d, d].
        let int8: Vec<Option<QuantizedWeight>> = (0..12)
            .map(|i| match i {
                8 => Some(Tensor::zeros([d, 2 * d], opts)),
                2 | 4 | 10 => Some(tensors[i].shallow_clone()),
                _ => None,
            })
            .map(|weight| weight.map(|w| QuantizedWeight::quantize(&w, crate::quantized::Format::Int8).unwrap()))
            .collect();
        let block = DecodeBlock {
            parameters: std::array::from_fn(|i| int8[i].as_ref().map_or(&tensors[i], QuantizedWeight::packed)),
            heads: 2,
            layer_norm_eps: 1e-5,
            scale: 1.0,
            exact_gelu: false,
        };
        let x = Tensor::zeros([1, 1, d], opts);
        assert!(block.applies(&x));
        let cache = Tensor::zeros([1, 1, 4, d / 2], opts);
        let refused = std::panic::catch_unwind(|| block.forward(&x, &[&cache], &[&cache.copy()], &[0]));
        let message = refused.map(|_| String::new()).unwrap_err();
        let message = message.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(message.contains("mlp.c_fc.weight") && message.contains("does not hold"), "{message}");
    }

    #[test]
    fn gelu_is_the_tanh_form_in_double_to_5e_5() {
        let opts = (Kind::Float, Device::Cpu);
        // Lengths with and without a vector tail; values from the tails to the middle, against the
        // tanh form in double, written x / (1 + exp(-2u)) (0.5 x (1 + tanh(u)) loses digits where
        // tanh(u) is near -1, even in double); below x = -10 the block's clamped exp leaves a few
        // 1e-39 where the truth is smaller. In the negative tail exp(-2u) multiplies u's rounding by 2u
        // (up to ~90), hence 5e-5 rather than a few ulps.
        for n in [1, 7, 16, 1000, 40_001] {
            let x = Tensor::linspace(-30.0, 30.0, n, opts) * Tensor::rand([n], opts);
            let wide = x.to_kind(Kind::Double);
            let u = (&wide + wide.pow_tensor_scalar(3) * 0.044715) * (2.0 / std::f64::consts::PI).sqrt();
            let expected = &wide / ((u * -2.0).exp() + 1.0);
            let got = gelu(&x, "tanh").to_kind(Kind::Double);
            let error = ((&got - &expected).abs() / (expected.abs() + 1e-30)).max().double_value(&[]);
            assert!(error < 5e-5, "n {n}: relative error {error}");
            assert!(gelu(&x, "none").equal(&x.gelu("none")), "the exact form is libtorch's");
        }
        // A tensor that needs its gradient goes through libtorch, which records it.
        let x = Tensor::randn([8], opts).set_requires_grad(true);
        gelu(&x, "tanh").sum(Kind::Float).backward();
        assert!(x.grad().defined());
    }

    #[test]
    fn gelu_holds_far_into_the_tails() {
        if !crate::linear::few_row_kernel_available() {
            return; // fp32 weights stay op by op without the dense kernel (no AVX2)
        }
        // Inputs where tanh(u) is -1 or 1 in fp32: no NaN or overflow, the limits 0 and x.
        let opts = (Kind::Float, Device::Cpu);
        let d = 16;
        let identity = Tensor::eye(d, opts);
        let zeros = Tensor::zeros([d], opts);
        let ones = Tensor::ones([d], opts);
        let big = Tensor::linspace(-200.0, 200.0, d, opts);
        // Attention adds nothing (zero weights and caches), so ln_2 norms `x` and its weight spreads
        // the normed values to +-300; c_fc and c_proj are the identity.
        let qkv_weight = Tensor::zeros([3 * d, d], opts);
        let qkv_bias = Tensor::zeros([3 * d], opts);
        let block = DecodeBlock {
            parameters: [
                &ones,
                &zeros,
                &qkv_weight,
                &qkv_bias,
                &identity,
                &zeros,
                &big,
                &zeros,
                &identity,
                &zeros,
                &identity,
                &zeros,
            ],
            heads: 1,
            layer_norm_eps: 1e-5,
            scale: 1.0,
            exact_gelu: false,
        };
        let x = Tensor::linspace(-1.0, 1.0, d, opts).view([1, 1, d]);
        let cache = Tensor::zeros([1, 1, 4, d], opts);
        let out = block.forward(&x, &[&cache], &[&cache.copy()], &[0]);
        let expected =
            reference(&block, &libtorch(&block.parameters), &x, &cache.narrow(2, 0, 1), &cache.narrow(2, 0, 1));
        assert!(out.isfinite().all().int64_value(&[]) == 1, "{out}");
        let diff = (&out - &expected).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "max diff {diff}");
    }

    #[test]
    fn a_full_cache_is_refused() {
        if !crate::linear::few_row_kernel_available() {
            return; // fp32 weights stay op by op without the dense kernel (no AVX2)
        }
        let opts = (Kind::Float, Device::Cpu);
        let d = 8;
        let tensors = zero_parameters(d);
        let block = DecodeBlock {
            parameters: std::array::from_fn(|i| &tensors[i]),
            heads: 2,
            layer_norm_eps: 1e-5,
            scale: 1.0,
            exact_gelu: false,
        };
        let cache = Tensor::zeros([1, 1, 4, 4], opts);
        let full =
            std::panic::catch_unwind(|| block.forward(&Tensor::zeros([1, 2, d], opts), &[&cache], &[&cache], &[3]));
        let message = full.map(|_| String::new()).unwrap_err();
        let message = message.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(message.contains("no room for 2 more"), "{message}");
    }
}
