//! `x @ w^T + b` as `F.linear` computes it, with a kernel for inference on CPU (AVX-512, or AVX2
//! with FMA) at any row count, for fp32 or bf16 weights (fp32 sums either way). Each output element
//! is one fixed-order dot product, so a row's result is the same whether it is computed alone or
//! with others: the dense layers of a speculative verification pass equal one-token steps, and a
//! batched sequence gets what it gets alone. Where libtorch is faster for an fp32 shape on this
//! machine, [`crate::calibrate`] says so and [`linear`] takes it. On AMX, steps of few positions
//! (decode, verification) take bf16 weights on the tiles or in dot products, whichever
//! [`crate::calibrate`] measured faster here; longer ones (prefill) take the tiles.
use std::ptr;

use tch::{Kind, Tensor};

use crate::attention::DECODE_KERNEL_MAX_POSITIONS;
use crate::calibrate::Choice;
use crate::ffi::{self, check};
use crate::KernelError;

/// Which kernel: the widest this CPU runs, or AVX2 or AVX-512 without AMX (to test them on wider
/// machines too), or the widest for steps of few positions (AMX as [`few_positions_on_amx`] says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Widest = 0,
    #[cfg_attr(not(test), allow(dead_code))]
    Avx2 = 1,
    Avx512 = 2,
    FewPositions = 3,
}

/// How the dense kernel multiplies bf16 weights on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// Widened to fp32 as they are read (no AVX-512 BF16).
    Widened,
    /// AVX-512 BF16 dot products, inputs rounded to bf16.
    DotProduct,
    /// Dot products: the CPU has AMX but the OS did not grant this process its tile state.
    DotProductAmxNotGranted,
    /// AMX tiles (dot products for the columns past the last whole tile), inputs rounded to bf16.
    AmxTiles,
}

impl Bf16Kernel {
    /// A short name for reports: `amx`, `avx512-bf16` or `widened`.
    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Widened => "widened",
            Bf16Kernel::DotProduct | Bf16Kernel::DotProductAmxNotGranted => "avx512-bf16",
            Bf16Kernel::AmxTiles => "amx",
        }
    }

    /// What `wizard doctor` says of it.
    pub fn describe(self) -> &'static str {
        match self {
            Bf16Kernel::Widened => "bf16 widened to fp32: no AVX-512 BF16",
            Bf16Kernel::DotProduct => "bf16 with AVX-512 BF16 dot products",
            Bf16Kernel::DotProductAmxNotGranted => "bf16 with AVX-512 BF16 dot products: the OS did not grant AMX",
            Bf16Kernel::AmxTiles => "bf16 on AMX tiles",
        }
    }
}

/// `x @ weight^T + bias` for `weight` `[out, in]` (the checkpoint's layout). fp32 or bf16 CPU
/// inputs that need no gradient, outside autocast, take the kernel (when the CPU has AVX-512 or AVX2
/// with FMA, and unless [`crate::calibrate`] measured libtorch faster for an fp32 shape, for every
/// product or for prompt chunks); everything else goes to `at::linear`. A step of few positions (`x` `[rows, in]`, one position per
/// row, or `[batch, positions, in]` with at most [`DECODE_KERNEL_MAX_POSITIONS`] of them, as the
/// fused block takes) multiplies bf16 weights as the fused block does. Panics on what `at::linear`
/// rejects (mismatched shapes), as tch ops do.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    match crate::calibrate::choice_for(weight) {
        Choice::Libtorch => x.linear(weight, bias),
        Choice::LibtorchForPrompts if !few_positions(x) => x.linear(weight, bias),
        Choice::Kernel | Choice::Panels | Choice::LibtorchForPrompts => kernel_linear(x, weight, bias),
    }
}

/// Whether `x` is a step of few positions: `[rows, in]`, one position per row, or `[batch,
/// positions, in]` with at most [`DECODE_KERNEL_MAX_POSITIONS`] of them; else a prompt chunk.
fn few_positions(x: &Tensor) -> bool {
    match x.size()[..] {
        [_, _] => true,
        [_, positions, _] => positions <= DECODE_KERNEL_MAX_POSITIONS,
        _ => false,
    }
}

/// [`linear`] through the kernel whatever [`crate::calibrate`] chose for the shape.
pub(crate) fn kernel_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    linear_with(if few_positions(x) { Isa::FewPositions } else { Isa::Widest }, x, weight, bias)
}

/// Whether this CPU runs the dense kernel (AVX-512, or AVX2 with FMA).
pub fn few_row_kernel_available() -> bool {
    kernel_available(Isa::Widest)
}

/// How bf16 weights are multiplied on this CPU (chosen once per process).
pub fn bf16_kernel() -> Bf16Kernel {
    // SAFETY: no arguments, an integer out.
    match unsafe { ffi::wizard_linear_bf16_kernel() } {
        3 => Bf16Kernel::AmxTiles,
        2 => Bf16Kernel::DotProductAmxNotGranted,
        1 => Bf16Kernel::DotProduct,
        _ => Bf16Kernel::Widened,
    }
}

/// Whether one-row products (decode steps) over `kind` weights (fp32 or bf16) prefetch the next
/// weight rows; [`crate::calibrate`] measures which is faster on this machine. Results are the same
/// bits either way.
pub fn one_row_prefetch(kind: Kind) -> bool {
    // SAFETY: integers in, an integer out.
    unsafe { ffi::wizard_linear_one_row_prefetch(i32::from(kind == Kind::BFloat16), -1) != 0 }
}

/// Sets [`one_row_prefetch`] for `kind` weights (fp32 or bf16) for the rest of the process.
pub fn set_one_row_prefetch(kind: Kind, on: bool) {
    // SAFETY: integers in, an integer out.
    unsafe { ffi::wizard_linear_one_row_prefetch(i32::from(kind == Kind::BFloat16), i32::from(on)) };
}

/// Whether one-row products over `kind` weights (fp32 or bf16) read the weight rows one after another
/// rather than in tiles of several rows; [`crate::calibrate`] measures which is faster on this
/// machine. Results are the same bits either way.
pub fn one_row_stream(kind: Kind) -> bool {
    // SAFETY: integers in, an integer out.
    unsafe { ffi::wizard_linear_one_row_stream(i32::from(kind == Kind::BFloat16), -1) != 0 }
}

/// Sets [`one_row_stream`] for `kind` weights (fp32 or bf16) for the rest of the process.
pub fn set_one_row_stream(kind: Kind, on: bool) {
    // SAFETY: integers in, an integer out.
    unsafe { ffi::wizard_linear_one_row_stream(i32::from(kind == Kind::BFloat16), i32::from(on)) };
}

/// Whether steps of few positions take bf16 weights on AMX tiles (where [`bf16_kernel`] is
/// [`Bf16Kernel::AmxTiles`]) rather than in dot products; [`crate::calibrate`] measures which is
/// faster on this machine. Longer steps take the tiles.
pub fn few_positions_on_amx() -> bool {
    // SAFETY: an integer in, an integer out.
    unsafe { ffi::wizard_linear_few_positions_on_amx(-1) != 0 }
}

/// Sets [`few_positions_on_amx`] for the rest of the process.
pub fn set_few_positions_on_amx(on: bool) {
    // SAFETY: an integer in, an integer out.
    unsafe { ffi::wizard_linear_few_positions_on_amx(i32::from(on)) };
}

/// `weight` (`[out, in]` fp32 or bf16 on the CPU, `out` a multiple of 16) in panels of 16 outputs,
/// `[out / 16, in, 16]`, which [`linear`] multiplies with an outer-product kernel for fp32 rows (AVX2
/// with FMA; bf16 widened as it is read, its steps' values in the order that makes that cheap): faster than
/// the row kernel for prefill on CPUs where [`crate::calibrate`] measures it so. Every output stays
/// one fixed-order sum, so a row's result does not depend on the row count here either.
pub fn pack_panels(weight: &Tensor) -> Result<Tensor, KernelError> {
    // SAFETY: `weight` is a live tensor the call only reads; `result` receives a new tensor.
    tensor_from(|result| unsafe { ffi::wizard_panel_pack(ffi::tensor(weight), result) }, "pack panels")
}

/// `panels` (from [`pack_panels`]) back as the `[out, in]` weight.
pub fn unpack_panels(panels: &Tensor) -> Result<Tensor, KernelError> {
    // SAFETY: `panels` is a live tensor the call only reads; `result` receives a new tensor.
    tensor_from(|result| unsafe { ffi::wizard_panel_unpack(ffi::tensor(panels), result) }, "unpack panels")
}

/// Whether `weight` is fp32 or bf16 panels ([`pack_panels`]).
pub fn is_panels(weight: &Tensor) -> bool {
    matches!(weight.kind(), Kind::Float | Kind::BFloat16) && weight.dim() == 3 && weight.size()[2] == 16
}

/// The tensor a shim call returns through `result`.
fn tensor_from(
    call: impl FnOnce(*mut ffi::TensorHandle) -> std::ffi::c_int,
    operation: &'static str,
) -> Result<Tensor, KernelError> {
    let mut result = ptr::null_mut();
    check(call(&mut result), operation)?;
    // SAFETY: on success `result` is a new heap `at::Tensor` whose ownership passes to the Tensor.
    Ok(unsafe { Tensor::from_ptr(result as *mut torch_sys::C_tensor) })
}

fn kernel_available(isa: Isa) -> bool {
    // SAFETY: an integer in, an integer out.
    unsafe { ffi::wizard_linear_kernel_available(isa as i32) != 0 }
}

pub(crate) fn linear_with(isa: Isa, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    let mut result = ptr::null_mut();
    // SAFETY: the handles are live tch tensors for the duration of the call, which only reads them;
    // on success `result` is a new heap `at::Tensor` whose ownership passes to the returned Tensor.
    let status = unsafe {
        ffi::wizard_linear(
            ffi::tensor(x),
            ffi::tensor(weight),
            bias.map_or(ptr::null_mut(), ffi::tensor),
            isa as i32,
            &mut result,
        )
    };
    if let Err(error) = check(status, "linear") {
        panic!("{error}");
    }
    // SAFETY: see above; `result` is non-null after a successful call.
    unsafe { Tensor::from_ptr(result as *mut torch_sys::C_tensor) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    struct Case {
        isa: Isa,
        rows: i64,
        in_dim: i64,
        out_dim: i64,
        bias: bool,
        /// The input's and bias's dtype...
        kind: Kind,
        /// ...and the weight's: the same, or bf16 under fp32.
        weight_kind: Kind,
        /// Whether the (fp32) weight goes in panels.
        panels: bool,
    }

    /// Every row equals the exact product to the dtype's rounding (fp32 sums; a bf16 result is rounded
    /// once), and equals bit for bit the same row computed alone (the property speculative decoding's
    /// greedy equality and batch invariance rest on).
    fn check(case: Case) {
        tch::manual_seed(case.rows * 1000 + case.in_dim);
        let opts = (Kind::Float, Device::Cpu);
        let x = Tensor::randn([1, case.rows, case.in_dim], opts).to_kind(case.kind);
        let weight = Tensor::randn([case.out_dim, case.in_dim], opts).to_kind(case.weight_kind);
        let bias = case.bias.then(|| Tensor::randn([case.out_dim], opts).to_kind(case.kind));
        let operand = if case.panels { pack_panels(&weight).unwrap() } else { weight.shallow_clone() };
        let got = tch::no_grad(|| linear_with(case.isa, &x, &operand, bias.as_ref()));
        assert_eq!(got.kind(), case.kind);
        let wide = |t: &Tensor| t.to_kind(Kind::Double);
        let expected = wide(&x).linear(&wide(&weight), bias.as_ref().map(wide).as_ref());
        assert_eq!(got.size(), expected.size());
        let error = (wide(&got) - &expected).abs().max().double_value(&[]);
        let scale = expected.abs().max().double_value(&[]).max(1.0);
        // bf16 anywhere: a bf16 dot product rounds the inputs too (or a bf16 output is rounded).
        let exact_inputs = case.kind == Kind::Float && case.weight_kind == Kind::Float;
        let tolerance = if exact_inputs { 1e-6 * (case.in_dim as f64).sqrt() } else { 1.0 / 128.0 };
        assert!(error <= tolerance * scale, "{:?} rows {}: error {error}", case.kind, case.rows);
        // Without the kernel at::linear (BLAS) runs, which promises no such thing.
        let kernel_ran = if case.panels { few_row_kernel_available() } else { kernel_available(case.isa) };
        for row in (0..case.rows).filter(|_| kernel_ran) {
            let alone =
                tch::no_grad(|| linear_with(case.isa, &x.narrow(1, row, 1).contiguous(), &operand, bias.as_ref()));
            assert!(alone.equal(&got.narrow(1, row, 1)), "row {row} of {} differs when computed alone", case.rows);
        }
    }

    #[test]
    fn rows_match_at_linear_and_themselves() {
        let dtypes = [(Kind::Float, Kind::Float), (Kind::BFloat16, Kind::BFloat16), (Kind::Float, Kind::BFloat16)];
        for isa in [Isa::Widest, Isa::Avx2, Isa::Avx512, Isa::FewPositions] {
            for (kind, weight_kind) in dtypes {
                let case = |rows, in_dim, out_dim, bias| Case {
                    isa,
                    rows,
                    in_dim,
                    out_dim,
                    bias,
                    kind,
                    weight_kind,
                    panels: false,
                };
                for rows in [1, 2, 3, 4, 5, 8, 9, 16] {
                    check(case(rows, 96, 300, true));
                }
                check(case(5, 100, 37, false)); // partial chunk
                check(case(3, 7, 5, true));
                check(case(2, 0, 3, true)); // empty products: the bias (at::linear)
                check(case(40, 64, 64, true));
                check(case(203, 1030, 19, true)); // several row blocks
                check(case(1, 96, 1003, true)); // columns in chunks the threads claim
                check(case(3, 64, 701, false));
                check(case(300, 72, 40, true)); // an odd number of 16-row tiles
            }
        }
    }

    /// Panels, fp32 and bf16 under fp32 rows: every row count the tiles split differently (1 to 7
    /// rows a tile, one, two or four panels, chunks of `in`), `in` of any length (bf16 in pairs
    /// where it is even), outputs that the threads claim in chunks.
    #[test]
    fn panels_match_the_product_and_every_row_alone() {
        for weight_kind in [Kind::Float, Kind::BFloat16] {
            let case = |rows, in_dim, out_dim, bias| Case {
                isa: Isa::Widest,
                rows,
                in_dim,
                out_dim,
                bias,
                kind: Kind::Float,
                weight_kind,
                panels: true,
            };
            for rows in [1, 2, 3, 4, 5, 6, 7, 8, 13, 16] {
                check(case(rows, 96, 304, true));
            }
            check(case(3, 7, 16, false));
            check(case(1, 1030, 48, true)); // one-row steps: four panels, then the rest one by one
            check(case(40, 600, 64, true)); // several chunks of `in`
            check(case(9, 2100, 64, true)); // several chunks of bf16 pairs
            check(case(7, 300, 48, true)); // seven rows over two panels in chunks of `in`, then one panel
            check(case(203, 130, 32, false));
            check(case(2, 64, 1008, true)); // columns in chunks the threads claim
        }
    }

    /// Panels hold the weight exactly and refuse what they cannot hold, naming it.
    #[test]
    fn panels_round_trip_and_refuse_odd_shapes() {
        // bf16 panels of an even `in` are held in pairs where the CPU has AVX-512 BF16.
        for (kind, inputs) in [(Kind::Float, 37), (Kind::BFloat16, 37), (Kind::BFloat16, 38)] {
            let weight = Tensor::randn([48, inputs], (Kind::Float, Device::Cpu)).to_kind(kind);
            let panels = pack_panels(&weight).unwrap();
            assert_eq!((panels.size(), panels.kind()), (vec![3, inputs, 16], kind));
            assert!(is_panels(&panels) && !is_panels(&weight));
            assert!(unpack_panels(&panels).unwrap().equal(&weight));
        }
        // bf16 pairs not aligned as 32-bit words (a view one value into its storage) pack the same.
        let flat = Tensor::randn([1 + 48 * 38], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let unaligned = flat.narrow(0, 1, 48 * 38).view([48, 38]);
        assert!(pack_panels(&unaligned).unwrap().equal(&pack_panels(&unaligned.copy()).unwrap()));
        assert!(unpack_panels(&pack_panels(&unaligned).unwrap()).unwrap().equal(&unaligned));
        let odd = pack_panels(&Tensor::randn([40, 8], (Kind::Float, Device::Cpu))).unwrap_err().to_string();
        assert!(odd.contains("[40, 8]") && odd.contains("multiples of 16"), "{odd}");
        let half = Tensor::randn([16, 8], (Kind::Float, Device::Cpu)).to_kind(Kind::Half);
        let error = pack_panels(&half).unwrap_err().to_string();
        assert!(error.contains("Half"), "{error}");
        let weight = Tensor::randn([16, 8], (Kind::Float, Device::Cpu));
        assert!(unpack_panels(&weight).unwrap_err().to_string().contains("not panels"));
    }

    /// fp32 inputs meet bf16 weights rounded as `to_kind(BFloat16)` rounds them (to nearest, ties to
    /// even): the sums equal those of the rounded inputs bit for bit.
    #[test]
    fn fp32_inputs_round_as_bf16_does() {
        let opts = (Kind::Float, Device::Cpu);
        // Ties between two bf16 values (1 + 2^-8 rounds down to 1, 1 + 3 * 2^-8 up to 1 + 2^-6), among
        // random values, in rows long enough for whole tiles and a partial one.
        let (low, high): (f32, f32) = (1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0);
        let ties = Tensor::from_slice(&[low, high, -low, -high]).repeat([25]);
        let x = Tensor::cat(&[Tensor::randn([3, 100], opts), ties.view([1, 100])], 0);
        assert_eq!(x.kind(), Kind::Float);
        let weight = Tensor::randn([40, 100], opts).to_kind(Kind::BFloat16);
        for isa in [Isa::Widest, Isa::Avx512].into_iter().filter(|isa| kernel_available(*isa)) {
            let from_fp32 = tch::no_grad(|| linear_with(isa, &x, &weight, None));
            let from_bf16 = tch::no_grad(|| linear_with(isa, &x.to_kind(Kind::BFloat16), &weight, None));
            if bf16_kernel() != Bf16Kernel::Widened {
                assert!(from_fp32.to_kind(Kind::BFloat16).equal(&from_bf16), "{isa:?}");
            }
        }
    }

    /// Under CPU autocast the result is in the autocast dtype, as at::linear gives it.
    #[test]
    fn autocast_is_respected() {
        let x = Tensor::randn([2, 32], (Kind::Float, Device::Cpu));
        let weight = Tensor::randn([8, 32], (Kind::Float, Device::Cpu));
        let y = crate::precision::autocast(Device::Cpu, Kind::BFloat16, || tch::no_grad(|| linear(&x, &weight, None)))
            .unwrap();
        assert_eq!(y.kind(), Kind::BFloat16);
    }

    #[test]
    fn gradients_still_flow() {
        let weight = Tensor::randn([8, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::randn([2, 16], (Kind::Float, Device::Cpu));
        linear(&x, &weight, None).sum(Kind::Float).backward();
        let expected = x.sum_dim_intlist([0].as_slice(), false, Kind::Float).unsqueeze(0).expand([8, 16], false);
        assert!(weight.grad().allclose(&expected, 1e-5, 1e-5, false));
    }
}
