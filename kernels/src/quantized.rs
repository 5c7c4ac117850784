//! Weights quantized in blocks of 32 along `in`, each block with its own scale (per-block scales
//! keep the error of each block proportional to its own largest value), and `x @ w^T + b` over them.
//! Two formats ([`Format`]):
//! - int8 (llama.cpp's q8_0): per block, scale = max|w| / 127 and q = round(w / scale), ties to
//!   even, so every value is in -127..=127. Values are stored as int8 `[out, padded]`.
//! - int4: values in -8..=7 (q4_0's range) with, per block, the scale that leaves the smallest squared
//!   error among a few candidate roundings (each with its least-squares scale). Values are stored two
//!   per byte as uint8 `[out, padded / 2]`: value `2i` in the low nibble, `2i + 1` in the high one,
//!   each plus 8.
//!
//! `padded` is `in` rounded up to a multiple of 32 (zeros after `in`); scales are fp32
//! `[out, padded / 32]`, each a half-precision number times one power of two per weight (so the
//! kernels read 2 bytes a block, as q8_0 and q4_0 do: int8 1.0625 bytes a weight, int4 0.5625). A
//! scale is rounded to that form before the values are taken against it; parts whose scales are
//! not of that form have them rounded to it (by at most 2^-12 of each) as they are packed.
//!
//! The kernels read a packed copy (outputs in groups of 16, each block's values of a group side by
//! side; see csrc/quantized.cpp), made when a weight is quantized or built from its parts; the parts
//! are unpacked from it when asked for. For inference (fp32 on CPU, no gradient, any row count:
//! decode, a batch, verification, prefill) a kernel quantizes each activation row to int8 blocks on
//! the fly and sums, per output, (exact int32 block dot) * (weight scale * activation scale) over the
//! blocks in order (AVX-512 VNNI, AVX2, or portable code), so a row's result is the same bits alone or
//! with others, whatever the thread split, and on every kernel. Anything else dequantizes the weight
//! and calls `at::linear`.
use std::ptr;

use tch::{Device, Kind, Tensor};

use crate::ffi::{self, check};
use crate::KernelError;

/// Values per block: each block of a weight row has its own scale.
pub const BLOCK: i64 = 32;

/// How many bits a quantized value holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    /// int8 values in -127..=127.
    Int8,
    /// int4 values in -8..=7, two per stored byte.
    Int4,
}

impl Format {
    /// Bits per value: 8 or 4.
    pub fn bits(self) -> i64 {
        match self {
            Format::Int8 => 8,
            Format::Int4 => 4,
        }
    }

    /// `int8` or `int4`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Int8 => "int8",
            Format::Int4 => "int4",
        }
    }

    /// The dtype of the stored values: int8, or uint8 holding two int4 values.
    pub fn values_kind(self) -> Kind {
        match self {
            Format::Int8 => Kind::Int8,
            Format::Int4 => Kind::Uint8,
        }
    }

    /// Columns of the stored values for `in_features` inputs.
    pub fn value_columns(self, in_features: i64) -> i64 {
        padded(in_features) * self.bits() / 8
    }
}

/// A weight `[out, in]` as int8 or int4 blocks of 32 along `in` with one scale each, on the CPU.
#[derive(Debug)]
pub struct QuantizedWeight {
    packed: Tensor,
    out_features: i64,
    in_features: i64,
    format: Format,
}

/// Which kernel: the widest this CPU runs, or a narrower one (to test them all on one machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Widest = 0,
    #[cfg_attr(not(test), allow(dead_code))]
    Avx2 = 1,
    #[cfg_attr(not(test), allow(dead_code))]
    Scalar = 2,
}

fn invalid<T>(format: Format, reason: String) -> Result<T, KernelError> {
    Err(KernelError::QuantizedWeight(format!("{} weight: {reason}", format.name())))
}

/// What the shim refused in a weight (its checks are of the values: the shapes are checked here
/// first), said of the weight.
fn about_the_weight(format: Format, error: KernelError) -> KernelError {
    match error {
        KernelError::Torch { message, .. } => {
            KernelError::QuantizedWeight(format!("{} weight: {message}", format.name()))
        }
        other => other,
    }
}

/// `in_features` rounded up to whole blocks.
fn padded(in_features: i64) -> i64 {
    (in_features + BLOCK - 1) / BLOCK * BLOCK
}

/// A new tensor handed over by the shim.
///
/// # Safety
/// `handle` must be a heap `at::Tensor` that the shim just created and nothing else owns.
unsafe fn owned(handle: ffi::TensorHandle) -> Tensor {
    // SAFETY: see above; the returned Tensor frees it.
    unsafe { Tensor::from_ptr(handle as *mut torch_sys::C_tensor) }
}

impl QuantizedWeight {
    /// Quantizes a floating-point weight `[out, in]` (fp32, bf16, ..., on any device) into `format`
    /// blocks on the CPU. Refuses other shapes and dtypes, and NaN or infinite values.
    pub fn quantize(weight: &Tensor, format: Format) -> Result<QuantizedWeight, KernelError> {
        Self::quantize_with(Isa::Widest, weight, format)
    }

    fn quantize_with(isa: Isa, weight: &Tensor, format: Format) -> Result<QuantizedWeight, KernelError> {
        if weight.dim() != 2 {
            return invalid(format, format!("expected a weight [out, in] to quantize, got shape {:?}", weight.size()));
        }
        if !weight.is_floating_point() {
            return invalid(format, format!("expected a floating-point weight to quantize, got {:?}", weight.kind()));
        }
        let weight = weight.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        let finite = crate::all_finite(&weight)
            .map_err(|e| KernelError::QuantizedWeight(format!("{} weight: {e}", format.name())))?;
        if !finite {
            return invalid(format, "the weight to quantize holds NaN or infinite values".into());
        }
        let mut packed = ptr::null_mut();
        // SAFETY: the weight is a live tch tensor for the duration of the call, which only reads it;
        // on success the output is a new heap tensor whose ownership passes to us.
        let status = unsafe {
            ffi::wizard_quantized_quantize(ffi::tensor(&weight), format.bits() as i32, isa as i32, &mut packed)
        };
        check(status, "quantize").map_err(|e| about_the_weight(format, e))?;
        // SAFETY: see above.
        let packed = unsafe { owned(packed) };
        let (out_features, in_features) = (weight.size()[0], weight.size()[1]);
        Ok(QuantizedWeight { packed, out_features, in_features, format })
    }

    /// A weight from its stored parts: `values` (int8 `[out, padded]`, or for int4 uint8
    /// `[out, padded / 2]`) with `padded` the multiple of 32 at or above `in_features`, fp32
    /// `scales` `[out, padded / 32]`. They come from files users give, so every mismatch is refused
    /// with what was expected; int8 values of -128 (which symmetric blocks never hold) and NaN or
    /// infinite scales too. The parts are moved to the CPU.
    pub fn from_parts(
        values: Tensor,
        scales: Tensor,
        in_features: i64,
        format: Format,
    ) -> Result<QuantizedWeight, KernelError> {
        if values.kind() != format.values_kind() {
            return invalid(format, format!("values must be {:?}, got {:?}", format.values_kind(), values.kind()));
        }
        if scales.kind() != Kind::Float {
            return invalid(format, format!("scales must be float32, got {:?}", scales.kind()));
        }
        if values.dim() != 2 {
            return invalid(format, format!("values must be a matrix [out, columns], got shape {:?}", values.size()));
        }
        if scales.dim() != 2 {
            return invalid(format, format!("scales must be a matrix [out, blocks], got shape {:?}", scales.size()));
        }
        if in_features < 0 {
            return invalid(format, format!("in_features must not be negative, got {in_features}"));
        }
        let (out, columns, expected) = (values.size()[0], values.size()[1], format.value_columns(in_features));
        if columns != expected {
            return invalid(
                format,
                format!(
                    "values have {columns} columns, but {in_features} input features padded to a multiple of \
                     {BLOCK} make {expected}"
                ),
            );
        }
        let blocks = padded(in_features) / BLOCK;
        if scales.size() != [out, blocks] {
            return invalid(
                format,
                format!(
                    "scales have shape {:?}, but values [{out}, {expected}] need [{out}, {blocks}] (one per block \
                     of {BLOCK})",
                    scales.size(),
                ),
            );
        }
        let values = values.to_device(Device::Cpu).contiguous();
        let scales = scales.detach().to_device(Device::Cpu).contiguous();
        if format == Format::Int8 && values.numel() > 0 && values.min().int64_value(&[]) < -127 {
            return invalid(
                format,
                "values hold -128, which symmetric blocks never do (they are in -127..=127)".into(),
            );
        }
        if scales.isfinite().all().int64_value(&[]) == 0 {
            return invalid(format, "scales hold NaN or infinite values".into());
        }
        let mut packed = ptr::null_mut();
        // SAFETY: the parts are live tch tensors for the duration of the call, which only reads them;
        // on success the output is a new heap tensor whose ownership passes to us.
        let status = unsafe {
            ffi::wizard_quantized_pack(
                ffi::tensor(&values),
                ffi::tensor(&scales),
                in_features,
                format.bits() as i32,
                &mut packed,
            )
        };
        check(status, "pack").map_err(|e| about_the_weight(format, e))?;
        // SAFETY: see above.
        let packed = unsafe { owned(packed) };
        Ok(QuantizedWeight { packed, out_features: out, in_features, format })
    }

    /// The stored parts: values (see [`from_parts`](Self::from_parts); zeros after `in_features` in
    /// each row) and fp32 scales `[out, padded / 32]`, one per block, unpacked.
    pub fn parts(&self) -> (Tensor, Tensor) {
        let (mut values, mut scales) = (ptr::null_mut(), ptr::null_mut());
        // SAFETY: the packed tensor is live for the duration of the call, which only reads it; on
        // success both outputs are new heap tensors whose ownership passes to us.
        let status = unsafe {
            ffi::wizard_quantized_unpack(
                ffi::tensor(&self.packed),
                self.out_features,
                self.in_features,
                self.bits(),
                &mut values,
                &mut scales,
            )
        };
        if let Err(error) = check(status, "unpack") {
            panic!("{error}");
        }
        // SAFETY: see above.
        unsafe { (owned(values), owned(scales)) }
    }

    /// The packed records the kernels read, as a dense weight of [`crate::block::DecodeBlock`] takes them.
    pub fn packed(&self) -> &Tensor {
        &self.packed
    }

    /// int8 or int4.
    pub fn format(&self) -> Format {
        self.format
    }

    fn bits(&self) -> i32 {
        self.format.bits() as i32
    }

    /// `in` of the weight `[out, in]` these blocks stand for.
    pub fn in_features(&self) -> i64 {
        self.in_features
    }

    /// `out` of the weight `[out, in]` these blocks stand for.
    pub fn out_features(&self) -> i64 {
        self.out_features
    }

    /// Rows `ids` (any shape) of [`dequantize`](Self::dequantize), `[..ids, in]`, without the rest:
    /// an embedding lookup in a quantized table. An id outside `0..out` is an error.
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor, KernelError> {
        let mut result = ptr::null_mut();
        // SAFETY: the handles are live tch tensors for the duration of the call, which only reads
        // them; on success `result` is a new heap tensor whose ownership passes to us.
        let status = unsafe {
            ffi::wizard_quantized_rows(
                ffi::tensor(&self.packed),
                self.out_features,
                self.in_features,
                self.bits(),
                ffi::tensor(ids),
                &mut result,
            )
        };
        check(status, "rows")?;
        let mut shape = ids.size();
        shape.push(self.in_features);
        // SAFETY: see above.
        Ok(unsafe { owned(result) }.view(shape.as_slice()).to_device(ids.device()))
    }

    /// The fp32 weight `[out, in]` these blocks stand for: value times its block's scale.
    pub fn dequantize(&self) -> Tensor {
        let every_row = Tensor::arange(self.out_features, (Kind::Int64, Device::Cpu));
        self.rows(&every_row).expect("every row is in the table")
    }
}

/// `x @ dequantize(weight)^T + bias` for `x` `[..., in]`. fp32 CPU rows that need no gradient,
/// outside autocast, take the kernel (activations quantized per block of 32, so the result differs
/// from the dequantized product by a fraction of a percent); everything else (other dtypes or
/// devices, training) dequantizes the weight for the call and goes to `at::linear`.
/// Panics on what `at::linear` rejects (mismatched shapes), as tch ops do.
pub fn linear(x: &Tensor, weight: &QuantizedWeight, bias: Option<&Tensor>) -> Tensor {
    linear_with(Isa::Widest, x, weight, bias)
}

/// The kernel this CPU runs, as `wizard doctor` reports it: `avx512-vnni`, `avx2`, or `scalar`
/// (portable code, slower than `at::linear` over the dequantized weight but in the same fixed order).
pub fn kernel_isa() -> &'static str {
    // SAFETY: no arguments, an integer out.
    match unsafe { ffi::wizard_quantized_kernel_isa() } {
        2 => "avx512-vnni",
        1 => "avx2",
        _ => "scalar",
    }
}

/// The lead the kernels prefetch the weight by unless [`crate::calibrate`] measured none faster.
pub const PREFETCH_LEAD: i64 = 12 * 1024;

/// How many bytes ahead of the records being read the kernels prefetch the weight
/// ([`PREFETCH_LEAD`] or 0). Results are the same bits either way.
pub fn prefetch_bytes() -> i64 {
    // SAFETY: an integer in, an integer out.
    unsafe { ffi::wizard_quantized_prefetch_bytes(-1) }
}

/// Sets [`prefetch_bytes`] (0 or more) for the rest of the process.
pub fn set_prefetch_bytes(bytes: i64) {
    // SAFETY: an integer in, an integer out.
    unsafe { ffi::wizard_quantized_prefetch_bytes(bytes.max(0)) };
}

#[cfg_attr(not(test), allow(dead_code))]
fn kernel_available(isa: Isa) -> bool {
    // SAFETY: an integer in, an integer out.
    unsafe { ffi::wizard_quantized_kernel_available(isa as i32) != 0 }
}

fn linear_with(isa: Isa, x: &Tensor, weight: &QuantizedWeight, bias: Option<&Tensor>) -> Tensor {
    let mut result = ptr::null_mut();
    // SAFETY: the handles are live tch tensors for the duration of the call, which only reads them;
    // on success `result` is a new heap tensor whose ownership passes to the returned Tensor.
    let status = unsafe {
        ffi::wizard_quantized_linear(
            ffi::tensor(x),
            ffi::tensor(&weight.packed),
            weight.out_features,
            weight.in_features,
            weight.bits(),
            bias.map_or(ptr::null_mut(), ffi::tensor),
            isa as i32,
            &mut result,
        )
    };
    if let Err(error) = check(status, "quantized linear") {
        panic!("{error}");
    }
    // SAFETY: see above.
    unsafe { owned(result) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISAS: [Isa; 3] = [Isa::Widest, Isa::Avx2, Isa::Scalar];
    const FORMATS: [Format; 2] = [Format::Int8, Format::Int4];

    #[derive(Clone, Copy)]
    enum Weights {
        Random,
        /// Every third output row all zeros (zero scales).
        ZeroRows,
        AllZero,
    }

    struct Case {
        rows: i64,
        in_dim: i64,
        out_dim: i64,
        bias: bool,
        weights: Weights,
        format: Format,
    }

    /// The values of int4 parts, signed, `[out, padded]`.
    fn int4_values(values: &Tensor) -> Tensor {
        let values = values.to_kind(Kind::Int64);
        let low = values.bitwise_and(15) - 8;
        let high = values.bitwise_right_shift_tensor_scalar(4) - 8;
        Tensor::stack(&[low, high], 2).reshape([values.size()[0], -1])
    }

    /// int8: per element, |w - dequantize(quantize(w))| is at most half its block's scale. int4: per
    /// block, the squared error is at most that of q4_0's rounding (scale max / -8, values clamped to
    /// -8..=7), one of the candidates it chooses among. Padding holds zeros.
    fn check_quantized(weight: &Tensor, q: &QuantizedWeight) {
        let (out, in_dim) = (weight.size()[0], weight.size()[1]);
        assert_eq!((q.out_features(), q.in_features()), (out, in_dim));
        let weight = weight.to_kind(Kind::Float);
        let (values, scales) = q.parts();
        let error = &weight - q.dequantize();
        let pad = padded(in_dim) - in_dim;
        let blocks = |t: &Tensor| t.constant_pad_nd([0, pad]).reshape([out, -1, BLOCK]);
        let values = match q.format() {
            Format::Int8 => {
                let scale = scales.repeat_interleave_self_int(BLOCK, Some(1), None).narrow(1, 0, in_dim);
                let slack = &scale * 0.5 * (1.0 + 1e-5) + weight.abs() * 1e-6;
                let beyond = error.abs().le_tensor(&slack).all().int64_value(&[]) != 1;
                assert!(!beyond, "[{out}, {in_dim}]: error beyond scale / 2");
                values.to_kind(Kind::Int64)
            }
            Format::Int4 => {
                let w = blocks(&weight);
                let index = w.abs().argmax(2, true);
                let d = w.gather(2, &index, false) / -8.0;
                let q4_0 = (&w / &d).nan_to_num(0.0, None, None).round().clamp(-8.0, 7.0) * &d;
                let sse = |e: Tensor| e.square().sum_dim_intlist([2].as_slice(), false, Kind::Float);
                let (ours, theirs) = (sse(blocks(&error)), sse(&w - q4_0));
                let worse = ours.gt_tensor(&(&theirs * (1.0 + 1e-4) + 1e-12)).any().int64_value(&[]) != 0;
                assert!(!worse, "[{out}, {in_dim}]: a block's error beyond q4_0's");
                int4_values(&values)
            }
        };
        assert_eq!(values.size(), [out, padded(in_dim)]);
        if pad > 0 {
            let padding = values.narrow(1, in_dim, pad);
            assert_eq!(padding.abs().sum(Kind::Int64).int64_value(&[]), 0, "padding is not zeros");
        }
    }

    /// The kernel against `x.linear(dequantize(w))` within the error of quantizing activations (at
    /// most half an activation scale per element, weighed by |w|, plus fp32 rounding; under 1% of
    /// the result's norm); every kernel
    /// this CPU runs gives the same bits; every row gives the same bits computed alone. The first
    /// block of the first row is zero (a zero activation scale).
    fn check(case: Case) {
        let Case { rows, in_dim, out_dim, bias, weights, format } = case;
        tch::manual_seed(rows * 1000 + in_dim * 7 + out_dim);
        let opts = (Kind::Float, Device::Cpu);
        let x = Tensor::randn([1, rows, in_dim], opts);
        if rows > 0 {
            let _ = x.narrow(1, 0, 1).narrow(2, 0, in_dim.min(BLOCK)).zero_();
        }
        let mut weight = Tensor::randn([out_dim, in_dim], opts) * 0.1;
        match weights {
            Weights::Random => {}
            Weights::ZeroRows => {
                let _ =
                    weight.index_fill_(0, &Tensor::arange_start_step(0, out_dim, 3, (Kind::Int64, Device::Cpu)), 0.0);
            }
            Weights::AllZero => weight = weight.zeros_like(),
        }
        let bias = bias.then(|| Tensor::randn([out_dim], opts));
        let q = QuantizedWeight::quantize(&weight, format).unwrap();
        check_quantized(&weight, &q);

        let dequantized = q.dequantize();
        let expected = x.linear(&dequantized, bias.as_ref());
        // Σ_blocks (activation scale / 2) * Σ_block |w|, per row and output.
        let pad = padded(in_dim) - in_dim;
        let blocks = padded(in_dim) / BLOCK;
        let x_scale = x
            .reshape([rows, in_dim])
            .constant_pad_nd([0, pad])
            .reshape([rows, blocks, BLOCK])
            .abs()
            .amax([2].as_slice(), false)
            / 127.0;
        let w_l1 = dequantized.abs().constant_pad_nd([0, pad]).reshape([out_dim, blocks, BLOCK]).sum_dim_intlist(
            [2].as_slice(),
            false,
            Kind::Float,
        );
        let magnitude = x.reshape([rows, in_dim]).abs().matmul(&dequantized.abs().tr());
        let bound = (x_scale * 0.5).matmul(&w_l1.tr()) * (1.0 + 1e-4) + magnitude * 1e-5 + 1e-6;

        let kernel_ran = in_dim > 0;
        let mut first: Option<Tensor> = None;
        for isa in ISAS.into_iter().filter(|&isa| kernel_available(isa)) {
            let got = tch::no_grad(|| linear_with(isa, &x, &q, bias.as_ref()));
            assert_eq!(got.size(), expected.size());
            let error = (&got - &expected).abs().reshape([rows, out_dim]);
            assert!(
                error.le_tensor(&bound).all().int64_value(&[]) == 1,
                "{format:?} {isa:?} rows {rows} [{out_dim}, {in_dim}]: error {} beyond the bound",
                error.max().double_value(&[])
            );
            let relative = (&got - &expected).norm().double_value(&[]) / expected.norm().double_value(&[]).max(1e-30);
            assert!(relative < 1e-2, "{isa:?} rows {rows} [{out_dim}, {in_dim}]: relative error {relative}");
            if !kernel_ran {
                continue;
            }
            if let Some(first) = &first {
                assert!(got.equal(first), "{isa:?} rows {rows} [{out_dim}, {in_dim}]: differs from {:?}", ISAS[0]);
            }
            for row in 0..rows {
                let alone = tch::no_grad(|| linear_with(isa, &x.narrow(1, row, 1).contiguous(), &q, bias.as_ref()));
                assert!(alone.equal(&got.narrow(1, row, 1)), "{isa:?}: row {row} of {rows} differs when alone");
            }
            first.get_or_insert(got);
        }
    }

    #[test]
    fn kernel_matches_the_dequantized_product_and_itself() {
        for format in FORMATS {
            kernel_matches_in(format);
        }
    }

    fn kernel_matches_in(format: Format) {
        for rows in 1..=16 {
            // 3 blocks: a lone last block after a pair; 300 outputs: not a multiple of the unroll.
            check(Case { rows, in_dim: 96, out_dim: 300, bias: true, weights: Weights::Random, format });
        }
        check(Case { rows: 5, in_dim: 100, out_dim: 37, bias: false, weights: Weights::Random, format }); // partial block
        check(Case { rows: 3, in_dim: 7, out_dim: 5, bias: true, weights: Weights::Random, format }); // in < 32
        check(Case { rows: 4, in_dim: 64, out_dim: 64, bias: false, weights: Weights::Random, format });
        check(Case { rows: 16, in_dim: 768, out_dim: 67, bias: true, weights: Weights::Random, format });
        // Chunks of 72 columns that two threads claim; the last is not a multiple of four weight rows.
        check(Case { rows: 2, in_dim: 768, out_dim: 1001, bias: true, weights: Weights::Random, format });
        check(Case { rows: 6, in_dim: 200, out_dim: 31, bias: true, weights: Weights::ZeroRows, format });
        check(Case { rows: 3, in_dim: 40, out_dim: 9, bias: true, weights: Weights::AllZero, format });
        check(Case { rows: 0, in_dim: 64, out_dim: 8, bias: true, weights: Weights::Random, format }); // no rows
        check(Case { rows: 2, in_dim: 0, out_dim: 3, bias: true, weights: Weights::Random, format }); // empty products
        check(Case { rows: 40, in_dim: 64, out_dim: 64, bias: true, weights: Weights::Random, format });
        check(Case { rows: 203, in_dim: 3000, out_dim: 21, bias: true, weights: Weights::Random, format });
        // Partial groups of 16 outputs beside whole ones, at prefill widths.
        check(Case { rows: 48, in_dim: 100, out_dim: 37, bias: true, weights: Weights::ZeroRows, format });
    }

    /// Rows looked up by id are the dequantized weight's rows, bit for bit, in the ids' shape; an id
    /// outside the table is an error.
    #[test]
    fn rows_are_the_dequantized_rows() {
        tch::manual_seed(3);
        for ((out, inputs), format) in [(37, 100), (16, 64), (5, 7), (300, 96)].into_iter().zip(FORMATS.iter().cycle())
        {
            let q =
                QuantizedWeight::quantize(&Tensor::randn([out, inputs], (Kind::Float, Device::Cpu)), *format).unwrap();
            let ids = Tensor::from_slice(&[0i64, out - 1, 3 % out, 0, 17 % out, out / 2]).view([2, 3]);
            let rows = q.rows(&ids).unwrap();
            assert_eq!(rows.size(), [2, 3, inputs]);
            assert!(
                rows.equal(&q.dequantize().index_select(0, &ids.view([-1])).view([2, 3, inputs])),
                "[{out}, {inputs}]"
            );
            for bad in [out, -1] {
                let error = q.rows(&Tensor::from_slice(&[bad])).unwrap_err().to_string();
                assert!(error.contains("outside the table"), "{error}");
            }
        }
    }

    /// Ties round to even, the largest magnitude maps to ±127, and a block of zeros has scale 0.
    /// Scales are halves times one power of two (here 2^-15, from the largest scale, 1.0): 3 / 127
    /// is stored as the nearest, 774 * 2^-15, and the block's values are taken against that.
    #[test]
    fn quantize_follows_the_format() {
        let mut row = vec![0.0f32; 40];
        row[..5].copy_from_slice(&[0.5, 1.5, 2.5, -2.5, -127.0]);
        row[32] = 3.0;
        let weight = Tensor::from_slice(&row).reshape([1, 40]);
        let zeros = Tensor::zeros([1, 40], (Kind::Float, Device::Cpu));
        let q = QuantizedWeight::quantize(&Tensor::cat(&[weight, zeros], 0), Format::Int8).unwrap();
        let (values, scales) = q.parts();
        assert_eq!(values.size(), [2, 64]);
        let values = Vec::<i64>::try_from(values.narrow(1, 0, 33).reshape([-1]).to_kind(Kind::Int64)).unwrap();
        assert_eq!(values[..5], [0, 2, 2, -2, -127]);
        assert_eq!(values[32], 127);
        assert!(values[33..].iter().all(|&v| v == 0));
        let scales = Vec::<f32>::try_from(scales.reshape([-1])).unwrap();
        assert_eq!(scales, [1.0, 774.0 / 32768.0, 0.0, 0.0]);
    }

    /// int4: a block that is a scale times values in -8..=7 comes back exactly, two values a byte
    /// (the even one low, each plus 8); a block of zeros has scale 0 and values 0.
    #[test]
    fn int4_follows_the_format() {
        let mut row = vec![0.0f32; 40];
        row[..4].copy_from_slice(&[-4.0, 3.5, 0.0, 0.5]);
        row[32] = -1.0;
        let weight = Tensor::cat(
            &[Tensor::from_slice(&row).reshape([1, 40]), Tensor::zeros([1, 40], (Kind::Float, Device::Cpu))],
            0,
        );
        let q = QuantizedWeight::quantize(&weight, Format::Int4).unwrap();
        assert!(q.dequantize().equal(&weight));
        let (values, scales) = q.parts();
        assert_eq!((values.size(), values.kind()), (vec![2, 32], Kind::Uint8));
        let bytes = Vec::<i64>::try_from(values.reshape([-1]).to_kind(Kind::Int64)).unwrap();
        assert_eq!(bytes[..2], [0xF0, 0x98]);
        assert_eq!(bytes[16], 0x80, "-8 (stored 0) low, 0 (stored 8) high");
        assert!(bytes[2..16].iter().chain(&bytes[17..]).all(|&b| b == 0x88));
        let scales = Vec::<f32>::try_from(scales.reshape([-1])).unwrap();
        assert_eq!(scales, [0.5, 0.125, 0.0, 0.0]);
    }

    /// Blocks of tiny (subnormal) and huge weights quantize as well as ordinary ones: the int4
    /// search runs on the block over its largest magnitude, so nothing in it overflows.
    #[test]
    fn int4_takes_tiny_and_huge_weights() {
        let weight = Tensor::randn([8, 70], (Kind::Float, Device::Cpu));
        let relative_error = |scale: f64| {
            let scaled = &weight * scale;
            let q = QuantizedWeight::quantize(&scaled, Format::Int4).unwrap();
            let restored = q.dequantize() / scale;
            assert_eq!(restored.isfinite().all().int64_value(&[]), 1, "scale {scale}");
            (restored - &weight).norm().double_value(&[]) / weight.norm().double_value(&[])
        };
        let ordinary = relative_error(1.0);
        assert!(ordinary > 0.0 && ordinary < 0.15, "{ordinary}");
        for scale in [1e-39, 1e-30, 1e25, 1e35] {
            let error = relative_error(scale);
            assert!((error - ordinary).abs() < 0.01, "scale {scale}: relative error {error} against {ordinary}");
        }
    }

    /// Every kernel this CPU runs quantizes to the same records (the AVX-512 int4 search takes four
    /// blocks at a time, AVX2 rounds int8 eight values at a time): over blocks of zeros, of a largest
    /// magnitude held with both signs in either order, of values on rounding ties, of tiny and huge
    /// values, and ragged last blocks; and over enough random blocks (130K) that a search rounding
    /// otherwise (a multiply and add fused) changes some record.
    #[test]
    fn every_kernel_quantizes_to_the_same_records() {
        let opts = (Kind::Float, Device::Cpu);
        tch::manual_seed(11);
        let weight = Tensor::randn([40, 300], opts);
        let block = |row: i64, b: i64| weight.narrow(0, row, 1).narrow(1, 32 * b, 32);
        let _ = block(0, 1).zero_();
        block(1, 0).copy_(&((Tensor::arange(32, opts) - 16.0) / 4.0));
        let signs = Tensor::from_slice(&[1.0f32, -1.0]).repeat([16]);
        block(2, 0).copy_(&(&signs * 2.0));
        block(2, 2).copy_(&(-&signs * 2.0));
        // Tiny and huge weights (a weight's scales span about 2^28 at most, so each on its own).
        let (tiny, huge) = (&weight * 1e-38, &weight * 1e30);
        let wide = Tensor::randn([1024, 4096 + 96 + 5], opts) * 0.02;
        for weight in [&weight, &weight.narrow(1, 0, 256).contiguous(), &tiny, &huge, &wide] {
            for format in FORMATS {
                let widest = QuantizedWeight::quantize_with(Isa::Widest, weight, format).unwrap();
                for isa in [Isa::Avx2, Isa::Scalar].into_iter().filter(|&isa| kernel_available(isa)) {
                    let other = QuantizedWeight::quantize_with(isa, weight, format).unwrap();
                    assert!(
                        other.packed().equal(widest.packed()),
                        "{format:?} {:?}: {isa:?} records differ from the widest kernel's",
                        weight.size()
                    );
                }
            }
        }
    }

    /// Scales are halves times one power of two per weight, here over rows whose magnitudes span
    /// 2^20; parts go back into the same records; scales of another form are rounded to the nearest
    /// such (here to within 2^-12 of each), and the products follow the rounded scales.
    #[test]
    fn scales_are_halves_times_one_power_of_two() {
        let magnitudes = Tensor::from_slice(&[1e-3f32, 1.0, 1e3]).reshape([3, 1]);
        let weight = Tensor::randn([3, 70], (Kind::Float, Device::Cpu)) * magnitudes;
        for format in FORMATS {
            let q = QuantizedWeight::quantize(&weight, format).unwrap();
            let (values, scales) = q.parts();
            let largest = scales.abs().max().double_value(&[]);
            // The power of two that maps the largest scale into (2^14, 2^15].
            let shift = 2f64.powi(15 - largest.log2().ceil() as i32);
            let halves = &scales * shift;
            assert!(halves.to_kind(Kind::Half).to_kind(Kind::Float).equal(&halves), "{format:?}: {scales}");
            let again =
                QuantizedWeight::from_parts(values.shallow_clone(), scales.shallow_clone(), 70, format).unwrap();
            assert!(again.packed().equal(q.packed()), "{format:?}: parts pack into other records");

            let off = &scales * (1.0 + 1e-5);
            let rounded = QuantizedWeight::from_parts(values, off.shallow_clone(), 70, format).unwrap();
            let kept = rounded.parts().1;
            let change = ((&kept - &off).abs() / off.abs().clamp_min(1e-30)).max().double_value(&[]);
            assert!(change <= 2f64.powi(-12), "{format:?}: scales moved by {change} of themselves");
            let (values, _) = rounded.parts();
            let values = match format {
                Format::Int8 => values.to_kind(Kind::Float),
                Format::Int4 => int4_values(&values).to_kind(Kind::Float),
            };
            let expected = (values * kept.repeat_interleave_self_int(BLOCK, Some(1), None)).narrow(1, 0, 70);
            assert!(rounded.dequantize().equal(&expected), "{format:?}: the weight is not values times kept scales");
        }
    }

    /// A largest scale just above 2^14 halves of its power of two, which rounds down to 2^14 of them,
    /// packs again from its parts to the same records (its unshift is that of the rounded scales).
    #[test]
    fn scales_rounding_down_to_a_power_of_two_pack_again_the_same() {
        let scale = 0.5001f32;
        let mut int8 = vec![0.0f32; 32];
        int8[0] = 127.0 * scale;
        let mut int4 = vec![0.0f32; 32];
        int4[..2].copy_from_slice(&[-8.0 * scale, 7.0 * scale]);
        for (format, row) in [(Format::Int8, int8), (Format::Int4, int4)] {
            let q = QuantizedWeight::quantize(&Tensor::from_slice(&row).reshape([1, 32]), format).unwrap();
            let (values, scales) = q.parts();
            assert_eq!(Vec::<f32>::try_from(scales.reshape([-1])).unwrap(), [0.5], "{format:?}");
            let again = QuantizedWeight::from_parts(values, scales, 32, format).unwrap();
            assert!(again.packed().equal(q.packed()), "{format:?}: parts pack into other records");
        }
    }

    #[test]
    fn quantize_takes_bf16_on_any_device_and_refuses_what_it_cannot() {
        let weight = (Tensor::randn([10, 70], (Kind::Float, Device::Cpu)) * 3.0).to_kind(Kind::BFloat16);
        for format in FORMATS {
            let q = QuantizedWeight::quantize(&weight, format).unwrap();
            check_quantized(&weight, &q);
            assert_eq!(q.parts().0.device(), Device::Cpu);
        }

        let nan = Tensor::from_slice(&[1.0f32, f32::NAN]).reshape([1, 2]);
        // One row 1e20 times the others: their scales would be halves far below the normal ones.
        let wide = Tensor::randn([4, 64], (Kind::Float, Device::Cpu))
            * Tensor::from_slice(&[1e20f32, 1., 1., 1.]).view([4, 1]);
        for (weight, message) in [
            (nan, "NaN or infinite"),
            (wide, "hold (about 2^28); load this model as float32"),
            (Tensor::ones([4], (Kind::Float, Device::Cpu)), "got shape [4]"),
            (Tensor::ones([2, 2], (Kind::Int64, Device::Cpu)), "floating-point"),
        ] {
            let error = QuantizedWeight::quantize(&weight, Format::Int4).unwrap_err().to_string();
            assert!(error.starts_with("int4 weight: ") && error.contains(message), "{error}");
        }
    }

    #[test]
    fn from_parts_refuses_parts_that_do_not_fit() {
        let cpu = Device::Cpu;
        let values = |out: i64, cols: i64| Tensor::zeros([out, cols], (Kind::Int8, cpu));
        let scales = |out: i64, blocks: i64| Tensor::ones([out, blocks], (Kind::Float, cpu));
        let cases = [
            (values(4, 64).to_kind(Kind::Float), scales(4, 2), 64, "values must be Int8, got Float"),
            (values(4, 64), scales(4, 2).to_kind(Kind::Half), 64, "scales must be float32, got Half"),
            (values(4, 64).reshape([256]), scales(4, 2), 64, "values must be a matrix"),
            (values(4, 64), scales(4, 2).reshape([8]), 64, "scales must be a matrix"),
            (values(4, 64), scales(4, 2), -1, "must not be negative"),
            (values(4, 60), scales(4, 2), 60, "values have 60 columns, but 60 input features"),
            (values(4, 64), scales(4, 2), 30, "values have 64 columns, but 30 input features"),
            (values(4, 64), scales(4, 3), 64, "scales have shape [4, 3], but values [4, 64] need [4, 2]"),
            (values(4, 64), scales(3, 2), 64, "scales have shape [3, 2]"),
            (values(4, 64).fill(-128), scales(4, 2), 64, "values hold -128"),
            (values(4, 64), scales(4, 2).fill(f64::INFINITY), 64, "NaN or infinite"),
            (values(4, 64), scales(4, 2).index_fill(0, &Tensor::from_slice(&[2i64]), 1e12), 64, "block 0 of row 0"),
        ];
        for (values, scales, in_features, message) in cases {
            let error = QuantizedWeight::from_parts(values, scales, in_features, Format::Int8).unwrap_err().to_string();
            assert!(error.starts_with("int8 weight: ") && error.contains(message), "{error}");
        }
        let nibbles = |out: i64, cols: i64| Tensor::zeros([out, cols], (Kind::Uint8, cpu));
        let int4_cases = [
            (values(4, 32), scales(4, 2), 64, "values must be Uint8, got Int8"),
            (
                nibbles(4, 64),
                scales(4, 2),
                64,
                "values have 64 columns, but 64 input features padded to a multiple of 32 make 32",
            ),
            (nibbles(4, 16), scales(4, 2), 40, "values have 16 columns, but 40 input features"),
            (nibbles(4, 32), scales(4, 1), 64, "scales have shape [4, 1], but values [4, 32] need [4, 2]"),
        ];
        for (values, scales, in_features, message) in int4_cases {
            let error = QuantizedWeight::from_parts(values, scales, in_features, Format::Int4).unwrap_err().to_string();
            assert!(error.starts_with("int4 weight: ") && error.contains(message), "{error}");
        }
        // A scale 2^30 under the largest is a subnormal half, held exactly (as a file written by an
        // earlier `wizard quantize` may hold it): it loads, as it is.
        let exact = Tensor::from_slice(&[1.0f32, 2f32.powi(-30), 0.5, 0.25]).view([4, 1]);
        let q = QuantizedWeight::from_parts(values(4, 32).fill(3), exact.shallow_clone(), 32, Format::Int8).unwrap();
        assert!(q.dequantize().equal(&(exact * 3.0).expand([4, 32], false)));
        // Parts that fit: the same weight back.
        for format in FORMATS {
            let weight = Tensor::randn([5, 50], (Kind::Float, cpu));
            let q = QuantizedWeight::quantize(&weight, format).unwrap();
            let (values, scales) = q.parts();
            let again = QuantizedWeight::from_parts(values, scales, q.in_features(), format).unwrap();
            assert!(again.dequantize().equal(&q.dequantize()));
            let x = Tensor::randn([2, 50], (Kind::Float, cpu));
            assert!(tch::no_grad(|| linear(&x, &again, None).equal(&linear(&x, &q, None))));
        }
    }

    /// A NaN in a block makes every output of its row NaN, as it would without quantization.
    #[test]
    fn non_finite_activations_give_nan() {
        for format in FORMATS {
            let q = QuantizedWeight::quantize(&Tensor::randn([6, 64], (Kind::Float, Device::Cpu)), format).unwrap();
            let x = Tensor::randn([2, 64], (Kind::Float, Device::Cpu));
            let _ = x.get(1).get(40).fill_(f64::INFINITY);
            for isa in ISAS.into_iter().filter(|&isa| kernel_available(isa)) {
                let y = tch::no_grad(|| linear_with(isa, &x, &q, None));
                assert_eq!(y.get(0).isfinite().all().int64_value(&[]), 1, "{format:?} {isa:?}");
                assert_eq!(y.get(1).isnan().all().int64_value(&[]), 1, "{format:?} {isa:?}");
            }
        }
    }

    /// Training goes to at::linear over the dequantized weight, so gradients reach x; under CPU
    /// autocast the result is in the autocast dtype.
    #[test]
    fn gradients_and_autocast_take_at_linear() {
        let weight = Tensor::randn([8, 16], (Kind::Float, Device::Cpu));
        let q = QuantizedWeight::quantize(&weight, Format::Int4).unwrap();
        let x = Tensor::randn([2, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        linear(&x, &q, None).sum(Kind::Float).backward();
        let expected =
            q.dequantize().sum_dim_intlist([0].as_slice(), false, Kind::Float).unsqueeze(0).expand([2, 16], false);
        assert!(x.grad().allclose(&expected, 1e-5, 1e-5, false));

        let x = Tensor::randn([2, 16], (Kind::Float, Device::Cpu));
        let y =
            crate::precision::autocast(Device::Cpu, Kind::BFloat16, || tch::no_grad(|| linear(&x, &q, None))).unwrap();
        assert_eq!(y.kind(), Kind::BFloat16);
    }

    /// Timings against the fp32 kernel and at::linear on 2 threads, printed; run with
    /// `WIZARD_INT8_TIMINGS=1 cargo test --release -p kernels quantized::tests::timings -- --nocapture`.
    /// "hot" repeats one weight (it stays in cache); "cold" cycles through copies that overflow the
    /// last-level cache, as the layers of a model do.
    #[test]
    fn timings() {
        if std::env::var_os("WIZARD_INT8_TIMINGS").is_none() {
            return;
        }
        tch::set_num_threads(2);
        let time = |calls: usize, f: &mut dyn FnMut(usize)| {
            f(0);
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let start = std::time::Instant::now();
                for call in 0..calls {
                    f(call);
                }
                best = best.min(start.elapsed().as_secs_f64() * 1e6 / calls as f64);
            }
            best
        };
        println!("int8/int4 kernel: {}", kernel_isa());
        println!(
            "{:>12} {:>4} {:>5} | {:>8} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} | {:>7} {:>7} {:>7} {:>7}",
            "out x in",
            "rows",
            "cache",
            "int4 us",
            "int8 us",
            "bf16 us",
            "fp32 us",
            "at us",
            "fp32/i8",
            "at/fp32",
            "i4 GB/s",
            "i8 GB/s",
            "bf GB/s",
            "f32GB/s"
        );
        // WIZARD_INT8_TIMINGS=1b: StarCoder-1B's products at decode, verification and prefill widths.
        let shapes = match std::env::var("WIZARD_INT8_TIMINGS").as_deref() {
            Ok("1b") => [(2304, 2048), (2048, 2048), (8192, 2048), (2048, 8192)],
            _ => [(768, 768), (3072, 768), (768, 3072), (4000, 768)],
        };
        for (out, inp) in shapes {
            let copies = (256 << 20) / (out * inp * 4) as usize + 1;
            let weights: Vec<Tensor> =
                (0..copies).map(|_| Tensor::randn([out, inp], (Kind::Float, Device::Cpu))).collect();
            let quantized: Vec<QuantizedWeight> =
                weights.iter().map(|w| QuantizedWeight::quantize(w, Format::Int8).unwrap()).collect();
            let int4: Vec<QuantizedWeight> =
                weights.iter().map(|w| QuantizedWeight::quantize(w, Format::Int4).unwrap()).collect();
            let narrow: Vec<Tensor> = weights.iter().map(|w| w.to_kind(Kind::BFloat16)).collect();
            // Bytes each call reads of its weight: int4 or int8 values and their scales, bf16, fp32.
            let gigabytes = |bytes_per_weight: f64| (out * inp) as f64 * bytes_per_weight / 1e3;
            for rows in [1, 4, 16, 128] {
                let x = Tensor::randn([rows, inp], (Kind::Float, Device::Cpu));
                for (cache, n) in [("hot", 1), ("cold", copies)] {
                    let calls = copies.max(3200 / rows as usize);
                    let _guard = tch::no_grad_guard();
                    let int4_us = time(calls, &mut |c| drop(linear(&x, &int4[c % n], None)));
                    let int8 = time(calls, &mut |c| drop(linear(&x, &quantized[c % n], None)));
                    let bf16 = time(calls, &mut |c| drop(crate::linear::linear(&x, &narrow[c % n], None)));
                    let fp32 = time(calls, &mut |c| drop(crate::linear::linear(&x, &weights[c % n], None)));
                    let at = time(calls, &mut |c| drop(x.linear::<Tensor>(&weights[c % n], None)));
                    println!(
                        "{:>12} {rows:>4} {cache:>5} | {int4_us:>8.1} {int8:>8.1} {bf16:>8.1} {fp32:>8.1} {at:>8.1} | {:>8.2} {:>8.2} | {:>7.1} {:>7.1} {:>7.1} {:>7.1}",
                        format!("{out}x{inp}"),
                        fp32 / int8,
                        at / fp32,
                        gigabytes(0.625) / int4_us,
                        gigabytes(1.125) / int8,
                        gigabytes(2.0) / bf16,
                        gigabytes(4.0) / fp32,
                    );
                }
            }
        }
    }
}
