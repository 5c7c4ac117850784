//! What a user needs to know of the kernels this CPU runs: which weight formats fall back to slower
//! ones for lack of instructions, or because `WIZARD_CPU_MAX` (`avx512`: no AMX, `avx2`, or `scalar`)
//! caps what the kernels may use, as a CPU without those instructions would.
use crate::linear::Bf16Kernel;

/// The weights a model's dense products read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// fp32.
    Float32,
    /// bf16 weights under fp32 activations.
    Bfloat16,
    /// int8 or int4 blocks of 32 ([`crate::quantized`]).
    Quantized,
}

/// Why products over `format` run slower on this CPU than on one with the instructions their kernel
/// wants; `None` when they take the fastest kernel wizard has for them here.
pub fn fallback(format: WeightFormat) -> Option<String> {
    let why = match format {
        WeightFormat::Float32 | WeightFormat::Bfloat16 if !crate::linear::few_row_kernel_available() => {
            "this CPU has no AVX2 with FMA, so dense products go to libtorch (BLAS) instead of wizard's kernels"
        }
        WeightFormat::Bfloat16 if crate::linear::bf16_kernel() == Bf16Kernel::Widened => {
            "bf16 weights: this CPU has no AVX-512 BF16, so they are widened to fp32 as they are read"
        }
        WeightFormat::Quantized => match crate::quantized::kernel_isa() {
            "avx2" => "int8/int4 weights: this CPU has no AVX-512 VNNI, so the AVX2 kernel runs (slower)",
            "scalar" => {
                "int8/int4 weights: this CPU has no AVX2, so portable code runs (tens of times slower; --dtype float32 \
                 is faster here)"
            }
            _ => return None,
        },
        _ => return None,
    };
    let cap = cap().map(|cap| format!(" (WIZARD_CPU_MAX={cap})")).unwrap_or_default();
    Some(format!("{why}{cap}"))
}

/// `WIZARD_CPU_MAX`, when set (empty is unset).
pub fn cap() -> Option<String> {
    std::env::var("WIZARD_CPU_MAX").ok().filter(|cap| !cap.is_empty())
}

/// A `WIZARD_CPU_MAX` the kernels ignore (anything but `avx512`, `avx2` or `scalar`), said as such.
pub fn unknown_cap() -> Option<String> {
    let cap = cap()?;
    (!["avx512", "avx2", "scalar"].contains(&cap.as_str()))
        .then(|| format!("WIZARD_CPU_MAX={cap} is ignored: use avx512 (no AMX), avx2 or scalar"))
}
