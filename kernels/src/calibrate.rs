//! Which product each fp32 dense shape takes on this machine: the dense kernel or libtorch's
//! `at::linear`, decided by timing both at load (one row, as a decode step, and 16, as a batch) and
//! remembered per machine in a cache file. A kernel tuned on one machine lost to BLAS on another; a
//! measurement on the machine itself cannot. libtorch is chosen only where it is clearly faster at
//! both row counts: the kernel also keeps every row's result independent of the batch, which
//! libtorch does not promise. Likewise whether the kernel's one-row products (decode steps) prefetch
//! the next weight rows, per weight dtype: prefetching sped fp32 decode up on one machine and slowed
//! it on another; and on AMX, whether decode steps take bf16 weights on the tiles ([`calibrate_one_row`]).
//! And whether a shape's weight is better packed in panels ([`crate::linear::pack_panels`]): an
//! outer-product kernel that ran prefill 1.3x faster on an AVX2 EPYC, timed at a prefill's row count
//! as well as a decode step's and a batch's.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::Instant;

use tch::{Kind, Tensor};

use crate::quantized::{Format, QuantizedWeight};

/// How much faster libtorch must be, at both row counts, to be chosen.
const LIBTORCH_MARGIN: f64 = 1.1;
/// How much faster libtorch must be for a prompt chunk to take it there alone.
const LIBTORCH_PROMPT_MARGIN: f64 = 1.05;
/// The row counts timed: a decode step, a verification pass of 6 drafted tokens, a full batch and a
/// prefill chunk.
const ROWS: [i64; 4] = [1, 7, 16, 128];
const STEP: usize = 0;
const VERIFY: usize = 1;
const BATCH: usize = 2;
const PREFILL: usize = 3;
/// µs per call at each of [`ROWS`].
pub type Times = [f64; 4];
/// How much faster panels must be for a prefill chunk to be chosen...
const PANELS_PREFILL_GAIN: f64 = 1.05;
/// ...and how much slower they may be for a decode step and for a full batch (one 1B shape timed
/// panels 1.28x faster at 128 rows, 1.13x at one row and 1.06x slower at 16: a trade worth taking).
const PANELS_STEP_SLACK: f64 = 1.05;
const PANELS_BATCH_SLACK: f64 = 1.1;
/// Or how much faster panels must be for a verification pass, a step not slower, to be chosen even
/// where a batch and a prefill chunk lose a little (AVX-512 panels on a Zen 4 EPYC: 7 rows of 1B's
/// shapes in about one step's time, where the row kernel took 1.5 steps; 16 and 128 rows 1-10% slower).
const PANELS_VERIFY_GAIN: f64 = 1.1;
const PANELS_VERIFY_BATCH_SLACK: f64 = 1.15;
const PANELS_VERIFY_PREFILL_SLACK: f64 = 1.1;

/// The product a dense shape takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// wizard's dense kernel (`csrc/linear.cpp`).
    Kernel,
    /// libtorch's `at::linear` (BLAS).
    Libtorch,
    /// wizard's kernel over the weight packed in panels ([`crate::linear::pack_panels`]), which the
    /// model does at load ([`takes_panels`]).
    Panels,
    /// wizard's kernel for steps of few positions (decode steps, verification passes, batches of
    /// them), `at::linear` for prompt chunks: BLAS ran a d768 model's 3072 x 768 product over 512
    /// prompt rows 1.3x faster than the kernel, which stays faster for a step.
    LibtorchForPrompts,
}

impl Choice {
    /// The name `wizard doctor`'s log and the cache file show.
    pub fn name(self) -> &'static str {
        match self {
            Choice::Kernel => "kernel",
            Choice::Libtorch => "libtorch",
            Choice::Panels => "panels",
            Choice::LibtorchForPrompts => "kernel+libtorch-prompts",
        }
    }
}

/// One shape's timings (µs per call at 1, 7, 16 and 128 rows) and the choice they made.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// The weight's dtype: fp32, or bf16 (under fp32 activations; libtorch is not timed for it).
    pub kind: Kind,
    /// `[out, in]` of the weight.
    pub shape: (i64, i64),
    /// The kernel's time per call at 1, 7, 16 and 128 rows.
    pub kernel_us: Times,
    /// `at::linear`'s time per call at 1, 16 and 128 rows, what its rules read (infinite at 7, and
    /// for bf16 weights, which it does not multiply under fp32 activations).
    pub libtorch_us: Times,
    /// The panel kernel's time per call at 1, 7, 16 and 128 rows (infinite where it cannot run).
    pub panels_us: Times,
    /// What the timings chose.
    pub choice: Choice,
    /// Whether the timings came from the cache file rather than this process.
    pub cached: bool,
}

/// A weight's dtype (bf16 or not) and shape `[out, in]`.
type Shape = (bool, i64, i64);

fn shape_of(kind: Kind, out: i64, in_features: i64) -> Shape {
    (kind == Kind::BFloat16, out, in_features)
}

impl Measurement {
    fn key(&self) -> Shape {
        shape_of(self.kind, self.shape.0, self.shape.1)
    }
}

/// Choices made in this process, by weight dtype and shape.
fn table() -> MutexGuard<'static, HashMap<Shape, Choice>> {
    static TABLE: LazyLock<Mutex<HashMap<Shape, Choice>>> = LazyLock::new(Mutex::default);
    TABLE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether any shape chose libtorch: until one does, every product takes the kernel without a
/// look at the table (this runs for every dense product).
static LIBTORCH_CHOSEN: AtomicBool = AtomicBool::new(false);

/// The product an fp32 CPU weight of this shape takes as it is: libtorch (always or for prompt
/// chunks) where a measurement chose it, else the kernel (also for a shape that chose panels but
/// was not packed).
pub(crate) fn choice_for(weight: &Tensor) -> Choice {
    if !LIBTORCH_CHOSEN.load(Ordering::Relaxed) || weight.kind() != Kind::Float {
        return Choice::Kernel;
    }
    match weight.size().as_slice() {
        [out, in_features] => match table().get(&shape_of(Kind::Float, *out, *in_features)) {
            Some(&choice @ (Choice::Libtorch | Choice::LibtorchForPrompts)) => choice,
            _ => Choice::Kernel,
        },
        _ => Choice::Kernel,
    }
}

/// Whether `weight` (fp32 or bf16 `[out, in]` on the CPU) should be packed in panels: its dtype and
/// shape measured faster so ([`calibrate`]).
pub fn takes_panels(weight: &Tensor) -> bool {
    weight.device() == tch::Device::Cpu
        && match weight.size().as_slice() {
            [out, in_features] => table().get(&shape_of(weight.kind(), *out, *in_features)) == Some(&Choice::Panels),
            _ => false,
        }
}

/// Decides the product for each fp32 or bf16 CPU weight in `weights` (one per distinct dtype and shape
/// is enough), timing it on the weight itself unless `cache` (a file; created if missing) already
/// holds this machine's timings for the shape. The decisions hold for the rest of the process.
pub fn calibrate(weights: &[&Tensor], cache: Option<&Path>) -> Vec<Measurement> {
    let machine = machine_key();
    let mut known = cache.map(|path| read_cache(path, &machine)).unwrap_or_default();
    let mut measurements: Vec<Measurement> = Vec::new();
    let mut fresh = Vec::new();
    for weight in weights {
        let [out, in_features] = weight.size()[..] else { continue };
        let kind = weight.kind();
        if !matches!(kind, Kind::Float | Kind::BFloat16) || weight.device() != tch::Device::Cpu || in_features == 0 {
            continue;
        }
        let shape = shape_of(kind, out, in_features);
        if measurements.iter().any(|m| m.key() == shape) {
            continue;
        }
        let measurement = match known.remove(&shape) {
            Some(cached) => cached,
            None => {
                let measured = measure(weight);
                fresh.push(measured.clone());
                measured
            }
        };
        if matches!(measurement.choice, Choice::Libtorch | Choice::LibtorchForPrompts) {
            LIBTORCH_CHOSEN.store(true, Ordering::Relaxed);
        }
        table().insert(shape, measurement.choice);
        measurements.push(measurement);
    }
    if let (Some(path), false) = (cache, fresh.is_empty()) {
        // A cache that cannot be written only costs a measurement next time.
        if let Err(error) = append_cache(path, &machine, &fresh) {
            eprintln!("warning: cannot record kernel timings in {}: {error}", path.display());
        }
    }
    measurements
}

/// What a one-row timing decides for one weight format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OneRowQuestion {
    /// Whether one-row products prefetch the weights ahead of the rows being read.
    Prefetch,
    /// Whether steps of few positions take bf16 weights on AMX tiles (on) or in dot products (off).
    AmxTiles,
    /// Whether one-row products over fp32 or bf16 weights read the rows one after another (on) or
    /// in tiles of several rows, prefetched as the first question decided (off).
    Stream,
}

/// A decode step's products timed with an option on and off, for one weight format.
#[derive(Debug, Clone, PartialEq)]
pub struct OneRowMeasurement {
    /// The option timed.
    pub question: OneRowQuestion,
    /// fp32, bf16, or `Int8` for int8 or int4 blocks.
    pub kind: Kind,
    /// With `Int8`, which of the two: their records differ, and so may the answer.
    pub quantized: Option<Format>,
    /// The weights' bytes, rounded up to a power of two MiB: the timing holds for models about this size.
    pub size_mib: u64,
    /// Median µs of one pass over the weights with the option on, and off.
    pub on_us: f64,
    /// See `on_us`.
    pub off_us: f64,
    /// What the timing chose: on when that pass was faster.
    pub on: bool,
    /// Whether the timing came from the cache file rather than this process.
    pub cached: bool,
}

/// Decides, per weight format among the dense `weights` that the kernel reads (fp32 or bf16 on the
/// CPU) and the `quantized` (int8 or int4) ones, whether one-row products prefetch: for fp32 and bf16 the next weight
/// rows, for quantized ones [`PREFETCH_LEAD`](crate::quantized::PREFETCH_LEAD) bytes ahead of the records (or no
/// lead); and where bf16 could take AMX tiles, whether steps of few positions do, or dot products
/// (the tiles won prefill 4x and lost a d768 decode step by 15% on one Xeon; weights below
/// [`MEMORY_BOUND_MIB`] keep the tiles untimed). One-row products over all of them, as a decode
/// step streams them from memory, are timed both ways, alternating (at least three passes each,
/// about a second in all), unless `cache` holds this machine's timing for models of this size. The
/// decisions hold for the rest of the process.
pub fn calibrate_one_row(
    weights: &[&Tensor],
    quantized: &[&QuantizedWeight],
    cache: Option<&Path>,
) -> Vec<OneRowMeasurement> {
    use crate::linear::{linear_with, Isa};
    let machine = machine_key();
    let known = cache.map(|path| read_one_row_cache(path, &machine)).unwrap_or_default();
    let mut measurements = Vec::new();
    let amx = crate::linear::bf16_kernel() == crate::linear::Bf16Kernel::AmxTiles;
    for kind in [Kind::Float, Kind::BFloat16, Kind::Int8] {
        let dense: Vec<&Tensor> = weights
            .iter()
            .copied()
            .filter(|w| w.kind() == kind && w.device() == tch::Device::Cpu && w.dim() == 2 && w.size()[1] > 0)
            .filter(|w| kind != Kind::Float || choice_for(w) != Choice::Libtorch)
            .collect();
        let (count, bytes) = match kind {
            Kind::Int8 => (quantized.len(), quantized.iter().map(|w| w.packed().numel() as i64).sum::<i64>()),
            _ => (dense.len(), dense.iter().map(|w| w.numel() as i64 * w.kind().elt_size_in_bytes() as i64).sum()),
        };
        let size_mib = ((bytes as u64).div_ceil(1 << 20)).next_power_of_two();
        let format = if kind == Kind::Int8 { quantized.first().map(|w| w.format()) } else { None };
        let on_tiles = kind == Kind::BFloat16 && amx;
        let kernel = if kind == Kind::Int8 {
            crate::quantized::kernel_isa() != "scalar"
        } else {
            crate::linear::few_row_kernel_available()
        };
        if count == 0 || !kernel || (on_tiles && size_mib < MEMORY_BOUND_MIB) {
            continue;
        }
        let mut questions = vec![OneRowQuestion::Prefetch];
        if kind != Kind::Int8 {
            questions.push(OneRowQuestion::Stream);
        }
        if on_tiles {
            questions.push(OneRowQuestion::AmxTiles);
        }
        for question in questions {
            let set = |on: bool| match (question, kind) {
                (OneRowQuestion::AmxTiles, _) => crate::linear::set_few_positions_on_amx(on),
                (OneRowQuestion::Stream, _) => crate::linear::set_one_row_stream(kind, on),
                (_, Kind::Int8) => {
                    crate::quantized::set_prefetch_bytes(if on { crate::quantized::PREFETCH_LEAD } else { 0 })
                }
                _ => crate::linear::set_one_row_prefetch(kind, on),
            };
            let cached = known
                .iter()
                .find(|m| m.question == question && m.kind == kind && m.quantized == format && m.size_mib == size_mib);
            let measurement = match cached {
                Some(cached) => cached.clone(),
                None => {
                    // Prefetching and streaming are questions for the dot products' loop (the AMX
                    // tiles do neither).
                    let isa = if question == OneRowQuestion::AmxTiles { Isa::FewPositions } else { Isa::Avx512 };
                    let mut pass: Box<dyn FnMut()> = match kind {
                        Kind::Int8 => {
                            Box::new(one_row_products(quantized, |w| w.in_features(), crate::quantized::linear))
                        }
                        _ => Box::new(one_row_products(
                            &dense,
                            |w| w.size()[1],
                            move |x, w, b| linear_with(isa, x, w, b),
                        )),
                    };
                    let (measured, plausible) = until_plausible(size_mib, || {
                        measure_both_ways(question, (kind, format), size_mib, &set, &mut pass)
                    });
                    if let Some(path) = cache.filter(|_| plausible) {
                        if let Err(error) = append_one_row_cache(path, &machine, &measured) {
                            eprintln!("warning: cannot record kernel timings in {}: {error}", path.display());
                        }
                    }
                    measured
                }
            };
            set(measurement.on);
            measurements.push(measurement);
        }
    }
    measurements
}

/// One pass of one-row products over `weights` (`product` of an input row `[1, in]`, a weight and
/// no bias).
fn one_row_products<'w, W>(
    weights: &'w [&'w W],
    in_features: impl Fn(&W) -> i64,
    product: impl Fn(&Tensor, &W, Option<&Tensor>) -> Tensor + 'w,
) -> impl FnMut() + 'w {
    let inputs: Vec<Tensor> =
        weights.iter().map(|w| Tensor::randn([1, in_features(w)], (Kind::Float, tch::Device::Cpu))).collect();
    move || {
        let _guard = tch::no_grad_guard();
        for (weight, x) in weights.iter().zip(&inputs) {
            drop(product(x, weight, None));
        }
    }
}

/// Weights this large are read from memory, not from the caches, on any CPU.
const MEMORY_BOUND_MIB: u64 = 64;

/// `measure` until its timing is plausible, three times at most; the last timing and whether it
/// was. Prefetching moves a pass over weights read from memory by tens of percent: a gap of twice or
/// more means the machine was busy with something else (one such timing, cached, kept 1B bf16 from
/// prefetching: 664 ms a pass against 184). Smaller weights' passes are short and noisy; any gap goes.
fn until_plausible(size_mib: u64, mut measure: impl FnMut() -> OneRowMeasurement) -> (OneRowMeasurement, bool) {
    let plausible =
        |m: &OneRowMeasurement| size_mib < MEMORY_BOUND_MIB || m.on_us.max(m.off_us) < 2.0 * m.on_us.min(m.off_us);
    let mut measured = measure();
    for _ in 0..2 {
        if plausible(&measured) {
            break;
        }
        measured = measure();
    }
    let ok = plausible(&measured);
    (measured, ok)
}

fn measure_both_ways(
    question: OneRowQuestion,
    (kind, quantized): (Kind, Option<Format>),
    size_mib: u64,
    set: &impl Fn(bool),
    pass: &mut dyn FnMut(),
) -> OneRowMeasurement {
    let mut timed = |on: bool| {
        set(on);
        let start = Instant::now();
        pass();
        start.elapsed().as_secs_f64() * 1e6
    };
    timed(true);
    let (mut on, mut off) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while on.len() < 3 || (on.len() < 9 && start.elapsed().as_secs_f64() < 1.0) {
        on.push(timed(true));
        off.push(timed(false));
    }
    let median = |mut times: Vec<f64>| {
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    let (on_us, off_us) = (median(on), median(off));
    OneRowMeasurement { question, kind, quantized, size_mib, on_us, off_us, on: on_us < off_us, cached: false }
}

/// Lines `machine \t prefetch|stream|amx-tiles \t dtype \t MiB \t on|off \t on µs \t off µs` (seven fields,
/// which [`read_cache`] skips; dtype float32, bfloat16, int8 or int4); lines of other machines, or
/// that do not parse, are skipped.
fn read_one_row_cache(path: &Path, machine: &str) -> Vec<OneRowMeasurement> {
    whole_lines(path)
        .unwrap_or_default()
        .iter()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            let [key, question, kind, size_mib, choice, on_us, off_us] = fields[..] else { return None };
            let question = match question {
                "prefetch" => OneRowQuestion::Prefetch,
                "amx-tiles" => OneRowQuestion::AmxTiles,
                "stream" => OneRowQuestion::Stream,
                _ => return None,
            };
            let (kind, quantized) = match kind {
                "float32" => (Kind::Float, None),
                "bfloat16" => (Kind::BFloat16, None),
                "int8" => (Kind::Int8, Some(Format::Int8)),
                "int4" => (Kind::Int8, Some(Format::Int4)),
                _ => return None,
            };
            if key != machine {
                return None;
            }
            Some(OneRowMeasurement {
                question,
                kind,
                quantized,
                size_mib: size_mib.parse().ok()?,
                on_us: on_us.parse().ok()?,
                off_us: off_us.parse().ok()?,
                on: match choice {
                    "on" => true,
                    "off" => false,
                    _ => return None,
                },
                cached: true,
            })
        })
        .collect()
}

fn append_one_row_cache(path: &Path, machine: &str, m: &OneRowMeasurement) -> std::io::Result<()> {
    let kind = match (m.kind, m.quantized) {
        (Kind::BFloat16, _) => "bfloat16",
        (Kind::Int8, Some(Format::Int4)) => "int4",
        (Kind::Int8, _) => "int8",
        _ => "float32",
    };
    let question = match m.question {
        OneRowQuestion::Prefetch => "prefetch",
        OneRowQuestion::AmxTiles => "amx-tiles",
        OneRowQuestion::Stream => "stream",
    };
    let choice = if m.on { "on" } else { "off" };
    append_lines(
        path,
        &format!("{machine}\t{question}\t{kind}\t{}\t{choice}\t{:.1}\t{:.1}\n", m.size_mib, m.on_us, m.off_us),
    )
}

/// FNV-1a of `bytes`: stable across builds and processes, unlike the standard library's hasher.
pub fn digest(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3))
}

/// Where timings are kept: `$WIZARD_CACHE_DIR`, else `$XDG_CACHE_HOME/wizard`, else
/// `~/.cache/wizard`.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("WIZARD_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("wizard")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("wizard")))
}

/// The file `dense-kernels.tsv` in [`cache_dir`].
pub fn default_cache_file() -> Option<PathBuf> {
    Some(cache_dir()?.join("dense-kernels.tsv"))
}

fn measure(weight: &Tensor) -> Measurement {
    let [out, in_features] = weight.size()[..] else { unreachable!("checked by the caller") };
    let _guard = tch::no_grad_guard();
    // Timed in memory of its own, in 2 MiB pages as loaded weights are: not where it may be for now
    // (a weight mapped from its file, in 4 KiB pages, reads slower than the model will read it).
    let weight = &crate::memory::loading_weights(|| {
        let mut copy = weight.empty_like();
        copy.copy_(weight);
        copy
    });
    let mut kernel_us = [0.0; ROWS.len()];
    let mut libtorch_us = [f64::INFINITY; ROWS.len()];
    let mut panels_us = [f64::INFINITY; ROWS.len()];
    let panels = crate::linear::pack_panels(weight).ok().filter(|_| crate::linear::few_row_kernel_available());
    for (i, rows) in ROWS.into_iter().enumerate() {
        let x = Tensor::randn([rows, in_features], (Kind::Float, tch::Device::Cpu));
        kernel_us[i] = best_us(|| drop(crate::linear::kernel_linear(&x, weight, None)));
        // libtorch's rules read a step, a batch and a prompt chunk; it multiplies one dtype, so not
        // bf16 weights under fp32 activations.
        if weight.kind() == Kind::Float && i != VERIFY {
            libtorch_us[i] = best_us(|| drop(x.linear::<Tensor>(weight, None)));
        }
        if let Some(panels) = &panels {
            panels_us[i] = best_us(|| drop(crate::linear::kernel_linear(&x, panels, None)));
        }
    }
    // Chosen from the timings as the cache keeps them, so that a choice read back is the same.
    for us in kernel_us.iter_mut().chain(&mut libtorch_us).chain(&mut panels_us) {
        *us = (*us * 100.0).round() / 100.0;
    }
    let choice = choose(&kernel_us, &libtorch_us, &panels_us);
    Measurement {
        kind: weight.kind(),
        shape: (out, in_features),
        kernel_us,
        libtorch_us,
        panels_us,
        choice,
        cached: false,
    }
}

/// libtorch where it is clearly faster for a decode step and a batch; else panels where they are
/// faster for a prompt chunk (than the kernel and libtorch) and about as fast for a step and a batch,
/// or faster for a verification pass and not slower for a step, losing little elsewhere; else the
/// kernel, with libtorch for prompt chunks where it is clearly faster there.
fn choose(kernel_us: &Times, libtorch_us: &Times, panels_us: &Times) -> Choice {
    let prompts_on_libtorch = libtorch_us[PREFILL] * LIBTORCH_PROMPT_MARGIN < kernel_us[PREFILL];
    // What a weight left as it is (not packed) takes for a prompt chunk.
    let mut plain_us = *kernel_us;
    if prompts_on_libtorch {
        plain_us[PREFILL] = libtorch_us[PREFILL];
    }
    // Whether `times` at `rows` beat the plain weight's by `factor` (below 1: lose by at most 1 / factor).
    let beat = |times: &Times, rows: usize, factor: f64| times[rows] * factor < plain_us[rows];
    let for_prefill = beat(panels_us, PREFILL, PANELS_PREFILL_GAIN)
        && beat(panels_us, STEP, 1.0 / PANELS_STEP_SLACK)
        && beat(panels_us, BATCH, 1.0 / PANELS_BATCH_SLACK);
    let for_verification = beat(panels_us, VERIFY, PANELS_VERIFY_GAIN)
        && beat(panels_us, STEP, 1.0)
        && beat(panels_us, BATCH, 1.0 / PANELS_VERIFY_BATCH_SLACK)
        && beat(panels_us, PREFILL, 1.0 / PANELS_VERIFY_PREFILL_SLACK);
    if beat(libtorch_us, STEP, LIBTORCH_MARGIN) && beat(libtorch_us, BATCH, LIBTORCH_MARGIN) {
        Choice::Libtorch
    } else if for_prefill || for_verification {
        Choice::Panels
    } else if prompts_on_libtorch {
        Choice::LibtorchForPrompts
    } else {
        Choice::Kernel
    }
}

/// The best time of a few repeats of `f`, after a warm-up call, in µs; about 20 ms in all.
fn best_us(mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    f();
    let first = start.elapsed().as_secs_f64();
    let repeats = ((0.02 / first.max(1e-6)) as usize).clamp(3, 200);
    (0..repeats)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e6
        })
        .fold(f64::INFINITY, f64::min)
}

/// The kernels' memory layouts, as timed: raised when one changes, so that choices timed on the old
/// layout are timed again (2: quantized records with half scales, in a region of their own; 3: fp32
/// panels timed beside the dense kernel, at 128 rows too; 4: fp32 panels on AVX-512, timed at 7 rows
/// too; 5: bf16 panels in pairs on AVX-512 BF16; 6: libtorch timed at 128 rows too).
const KERNEL_LAYOUTS: u32 = 6;

/// What the timings depend on: the CPU (its name and a digest of its feature flags: a VM may name
/// only the family), the thread count, libtorch, whether weights get 2 MiB pages, and the kernels'
/// layouts. Other timings kept per machine ([`cache_dir`]) are keyed by it too.
pub fn machine_key() -> String {
    // Read once per process: the CPU and libtorch do not change, the thread count may.
    static CPU_AND_TORCH: LazyLock<(String, String)> = LazyLock::new(|| {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            info.lines()
                .find_map(|line| {
                    line.strip_prefix(name).map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
                })
                .unwrap_or_default()
        };
        let flags = digest(field("flags").bytes());
        let pages = if crate::memory::huge_pages_granted() { "2 MiB pages" } else { "4 KiB pages" };
        (
            format!("{} (flags {flags:016x})", field("model name")),
            format!("torch {}; {pages}; layouts {KERNEL_LAYOUTS}", crate::ffi::torch_version()),
        )
    });
    let (cpu, torch_and_pages) = &*CPU_AND_TORCH;
    format!("{cpu}; {} threads; {torch_and_pages}", tch::get_num_threads()).replace('\t', " ")
}

/// Lines `machine \t float32|bfloat16 \t out \t in \t choice \t kernel µs (1, 7, 16, 128 rows) \t
/// libtorch µs (the same) \t panels µs (the same)`; lines of other machines, or that do not parse,
/// are skipped.
fn read_cache(path: &Path, machine: &str) -> HashMap<Shape, Measurement> {
    let mut known = HashMap::new();
    for line in whole_lines(path).unwrap_or_default() {
        let fields: Vec<&str> = line.split('\t').collect();
        let [key, kind, out, in_features, choice, ref times @ ..] = fields[..] else { continue };
        if times.len() != 3 * ROWS.len() {
            continue;
        }
        if key != machine {
            continue;
        }
        let parsed = (|| {
            // The choice is written for people to read; it is made again from the timings, so that
            // a change to the rule applies without timing again.
            if ![Choice::Kernel, Choice::Libtorch, Choice::Panels, Choice::LibtorchForPrompts]
                .iter()
                .any(|known| known.name() == choice)
            {
                return None;
            }
            let kind = match kind {
                "float32" => Kind::Float,
                "bfloat16" => Kind::BFloat16,
                _ => return None,
            };
            let parse = |at: usize| -> Option<Times> {
                let mut parsed = [0.0; ROWS.len()];
                for (i, value) in parsed.iter_mut().enumerate() {
                    *value = times[at + i].parse().ok()?;
                }
                Some(parsed)
            };
            let n = ROWS.len();
            let (kernel_us, libtorch_us, panels_us) = (parse(0)?, parse(n)?, parse(2 * n)?);
            Some(Measurement {
                kind,
                shape: (out.parse().ok()?, in_features.parse().ok()?),
                kernel_us,
                libtorch_us,
                panels_us,
                choice: choose(&kernel_us, &libtorch_us, &panels_us),
                cached: true,
            })
        })();
        if let Some(measurement) = parsed {
            known.insert(measurement.key(), measurement);
        }
    }
    known
}

fn append_cache(path: &Path, machine: &str, measurements: &[Measurement]) -> std::io::Result<()> {
    let mut lines = String::new();
    for m in measurements {
        let choice = m.choice.name();
        let times: Vec<String> =
            [m.kernel_us, m.libtorch_us, m.panels_us].iter().flatten().map(|us| format!("{us:.2}")).collect();
        let kind = if m.kind == Kind::BFloat16 { "bfloat16" } else { "float32" };
        lines += &format!("{machine}\t{kind}\t{}\t{}\t{choice}\t{}\n", m.shape.0, m.shape.1, times.join("\t"));
    }
    append_lines(path, &lines)
}

/// The most of a cache file that is read: its newest lines (a file that nothing compacts, or that
/// something else filled, must not fill memory).
const CACHE_READ_BYTES: u64 = 4 << 20;

/// The lines of a cache file that end in a newline (a last line without one is being written or
/// was cut short), read lossily (bytes that are not UTF-8 spoil only their line), of its last
/// [`CACHE_READ_BYTES`] at most.
pub fn whole_lines(path: &Path) -> Option<Vec<String>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    // From the byte before the newest ones: the first line read is one begun before them, or (if
    // that byte ends a line) nothing but its newline.
    let before = file.metadata().ok()?.len().saturating_sub(CACHE_READ_BYTES + 1);
    file.seek(SeekFrom::Start(before)).ok()?;
    let mut bytes = Vec::new();
    file.take(CACHE_READ_BYTES + 1).read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let mut lines = text.split_inclusive('\n');
    if before > 0 {
        lines.next();
    }
    Some(lines.filter_map(|line| line.strip_suffix('\n')).map(str::to_string).collect())
}

/// Appends `lines` to the cache file `path`, creating it and its folder if missing.
pub fn append_lines(path: &Path, lines: &str) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new().create(true).append(true).open(path)?.write_all(lines.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Timings are taken once per machine: a second calibration reads them back from the file, with
    /// the same choices; a line that does not parse is skipped.
    #[test]
    fn choices_are_measured_once_and_read_back() {
        let dir = std::env::temp_dir().join(format!("wizard-calibrate-{}", std::process::id()));
        let cache = dir.join("dense-kernels.tsv");
        let _ = std::fs::remove_file(&cache);
        let weight = |shape: [i64; 2]| Tensor::randn(shape, (Kind::Float, Device::Cpu));
        let weights = [weight([48, 64]), weight([64, 48]), weight([48, 64]).to_kind(Kind::BFloat16)];
        let refs: Vec<&Tensor> = weights.iter().chain(&weights[..1]).collect();
        let first = calibrate(&refs, Some(&cache));
        assert_eq!(first.len(), 3, "one measurement per distinct dtype and shape");
        assert!(first.iter().all(|m| !m.cached && m.kernel_us.iter().chain(&m.libtorch_us).all(|t| *t > 0.0)));
        let libtorch_timed = |m: &Measurement| [STEP, BATCH, PREFILL].iter().all(|&i| m.libtorch_us[i].is_finite());
        assert!(first[..2].iter().all(libtorch_timed), "{first:?}");
        assert!(first[2].kind == Kind::BFloat16 && first[2].libtorch_us.iter().all(|t| t.is_infinite()));
        // Panels are timed where the kernel runs.
        let timed = |m: &Measurement| m.panels_us.iter().all(|t| t.is_finite() && *t > 0.0);
        assert!(first.iter().all(|m| timed(m) == crate::linear::few_row_kernel_available()), "{first:?}");
        // A line of bytes that are not UTF-8 spoils only itself.
        std::fs::write(&cache, [b"\xff\xfe garbage\n".as_slice(), &std::fs::read(&cache).unwrap()].concat()).unwrap();
        let second = calibrate(&refs, Some(&cache));
        assert!(second.iter().all(|m| m.cached), "{second:?}");
        for (a, b) in first.iter().zip(&second) {
            assert_eq!((a.kind, a.shape, a.choice), (b.kind, b.shape, b.choice));
            let weight = weights.iter().find(|w| w.kind() == a.kind && w.size() == [a.shape.0, a.shape.1]).unwrap();
            let on_libtorch = matches!(a.choice, Choice::Libtorch | Choice::LibtorchForPrompts);
            assert_eq!(choice_for(weight), if on_libtorch { a.choice } else { Choice::Kernel });
            assert_eq!(takes_panels(weight), a.choice == Choice::Panels);
            // Kept to a hundredth of a µs.
            assert!(a.panels_us.iter().zip(&b.panels_us).all(|(x, y)| x == y || (x - y).abs() < 0.006), "{a:?} {b:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A cache file is read as whole lines of its newest [`CACHE_READ_BYTES`].
    #[test]
    fn cache_files_are_read_as_whole_newest_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.tsv");
        let check = |bytes: &[u8], expected: Option<Vec<&str>>| {
            std::fs::write(&path, bytes).unwrap();
            let expected = expected.map(|lines| lines.iter().map(|line| line.to_string()).collect());
            assert_eq!(whole_lines(&path), expected, "{:?}", String::from_utf8_lossy(&bytes[..bytes.len().min(64)]));
        };
        check(b"a\nb\n", Some(vec!["a", "b"]));
        check(b"a\nb", Some(vec!["a"]));
        check(b"a\n\xff\n", Some(vec!["a", "\u{fffd}"]));
        // Lines of 64 bytes, the newest 4 MiB beginning at one: all of those are read, and no other.
        let kept = CACHE_READ_BYTES as usize / 64;
        let big = "x".repeat(63) + "\n";
        let newest = "y".repeat(63) + "\n";
        std::fs::write(&path, big.repeat(10) + &newest.repeat(kept)).unwrap();
        let lines = whole_lines(&path).unwrap();
        assert_eq!(lines.len(), kept);
        assert!(lines.iter().all(|line| *line == newest[..63]));
        // A line begun before them (128 bytes, its second half among them) is not read.
        std::fs::write(&path, big.repeat(9) + &"z".repeat(127) + "\n" + &newest.repeat(kept - 1)).unwrap();
        let lines = whole_lines(&path).unwrap();
        assert_eq!(lines.len(), kept - 1);
        assert!(lines.iter().all(|line| *line == newest[..63]));
        assert_eq!(whole_lines(&dir.path().join("missing.tsv")), None);
    }

    /// libtorch only where clearly faster for a step and a batch; panels where a prefill chunk gains
    /// and a step or a batch loses little, or where a verification pass gains, a step does not lose
    /// and the rest loses little; else the kernel.
    #[test]
    fn choices_follow_the_timings() {
        let never = [f64::INFINITY; 4];
        let kernel = [100.0, 200.0, 400.0, 3000.0];
        for (libtorch, panels, expected) in [
            ([80.0, never[1], 300.0, never[3]], [90.0, 190.0, 380.0, 2500.0], Choice::Libtorch),
            ([95.0, never[1], 300.0, never[3]], never, Choice::Kernel),
            (never, [90.0, 200.0, 420.0, 2400.0], Choice::Panels),
            (never, [104.0, 200.0, 420.0, 2400.0], Choice::Panels),
            (never, [110.0, 190.0, 380.0, 2400.0], Choice::Kernel),
            (never, [90.0, 200.0, 450.0, 2400.0], Choice::Kernel),
            (never, [90.0, 200.0, 380.0, 2900.0], Choice::Kernel),
            // A verification pass 1.2x faster: panels though a batch and prefill lose a little...
            (never, [99.0, 165.0, 450.0, 3250.0], Choice::Panels),
            // ...but not where the step loses, the pass gains too little, or the rest loses more.
            (never, [101.0, 165.0, 380.0, 3000.0], Choice::Kernel),
            (never, [90.0, 185.0, 380.0, 3000.0], Choice::Kernel),
            (never, [90.0, 165.0, 470.0, 3000.0], Choice::Kernel),
            (never, [90.0, 165.0, 380.0, 3350.0], Choice::Kernel),
            (never, never, Choice::Kernel),
            // libtorch for prompt chunks alone where it is 1.05x faster there...
            ([95.0, never[1], 420.0, 2800.0], never, Choice::LibtorchForPrompts),
            ([95.0, never[1], 420.0, 2900.0], never, Choice::Kernel),
            // ...and panels chosen for a prompt chunk only where they beat it there too.
            ([95.0, never[1], 420.0, 2300.0], [90.0, 200.0, 420.0, 2400.0], Choice::LibtorchForPrompts),
            ([95.0, never[1], 420.0, 2600.0], [90.0, 200.0, 420.0, 2400.0], Choice::Panels),
        ] {
            assert_eq!(choose(&kernel, &libtorch, &panels), expected, "{libtorch:?} {panels:?}");
        }
    }

    /// A shape that takes libtorch for prompt chunks multiplies them with `at::linear` and keeps
    /// the kernel for steps of few positions (one position per row, or a few per sequence).
    #[test]
    fn prompt_chunks_take_libtorch_where_chosen() {
        use crate::attention::DECODE_KERNEL_MAX_POSITIONS;
        let _guard = tch::no_grad_guard();
        let weight = Tensor::randn([40, 512], (Kind::Float, Device::Cpu));
        table().insert(shape_of(Kind::Float, 40, 512), Choice::LibtorchForPrompts);
        LIBTORCH_CHOSEN.store(true, Ordering::Relaxed);
        assert_eq!(choice_for(&weight), Choice::LibtorchForPrompts);
        for (shape, prompt) in [
            (vec![3, 512], false),
            (vec![2, DECODE_KERNEL_MAX_POSITIONS, 512], false),
            (vec![1, DECODE_KERNEL_MAX_POSITIONS + 1, 512], true),
            (vec![2, 300, 512], true),
        ] {
            let x = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu));
            let (libtorch, kernel) =
                (x.linear::<Tensor>(&weight, None), crate::linear::kernel_linear(&x, &weight, None));
            if crate::linear::few_row_kernel_available() {
                // Their sums run in different orders, so the bits tell which one ran.
                assert!(!libtorch.equal(&kernel), "{shape:?}");
            }
            let expected = if prompt { libtorch } else { kernel };
            assert!(crate::linear::linear(&x, &weight, None).equal(&expected), "{shape:?}");
        }
    }

    /// A disturbed timing of a pass over weights read from memory is taken again, and not kept
    /// when it stays disturbed; small weights' timings are kept as they come.
    #[test]
    fn disturbed_prefetch_timings_are_taken_again() {
        let check = |size_mib: u64, timings: &[(f64, f64)], expected: (usize, (f64, f64), bool)| {
            let mut taken = 0;
            let (m, plausible) = until_plausible(size_mib, || {
                let (on_us, off_us) = timings[taken];
                taken += 1;
                OneRowMeasurement {
                    question: OneRowQuestion::Prefetch,
                    kind: Kind::BFloat16,
                    quantized: None,
                    size_mib,
                    on_us,
                    off_us,
                    on: on_us < off_us,
                    cached: false,
                }
            });
            assert_eq!((taken, (m.on_us, m.off_us), plausible), expected, "{size_mib} MiB, {timings:?}");
        };
        check(2048, &[(37.7, 42.7)], (1, (37.7, 42.7), true));
        check(2048, &[(664.2, 183.9), (37.7, 42.7)], (2, (37.7, 42.7), true));
        check(2048, &[(90.0, 40.0), (40.0, 95.0), (100.0, 41.0)], (3, (100.0, 41.0), false));
        check(1, &[(15.0, 7.0)], (1, (15.0, 7.0), true));
    }

    /// Prefetching and reading rows one at a time are timed once per machine and model size, read
    /// back the same, and set; a product is the same bits either way.
    #[test]
    fn one_row_options_are_measured_once_and_change_no_bits() {
        if !crate::linear::few_row_kernel_available() {
            return; // no dense kernel (no AVX2): nothing to prefetch for
        }
        let dir = std::env::temp_dir().join(format!("wizard-prefetch-{}", std::process::id()));
        let cache = dir.join("dense-kernels.tsv");
        let fp32 = Tensor::randn([96, 64], (Kind::Float, Device::Cpu));
        let bf16 = Tensor::randn([64, 96], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let int8 = QuantizedWeight::quantize(
            &Tensor::randn([96, 64], (Kind::Float, Device::Cpu)),
            crate::quantized::Format::Int8,
        )
        .unwrap();
        let first = calibrate_one_row(&[&fp32, &bf16], &[&int8], Some(&cache));
        let amx = crate::linear::bf16_kernel() == crate::linear::Bf16Kernel::AmxTiles;
        let asked: Vec<(Kind, OneRowQuestion)> = first.iter().map(|m| (m.kind, m.question)).collect();
        let mut expected = vec![(Kind::Float, OneRowQuestion::Prefetch), (Kind::Float, OneRowQuestion::Stream)];
        if !amx {
            expected.extend([(Kind::BFloat16, OneRowQuestion::Prefetch), (Kind::BFloat16, OneRowQuestion::Stream)]);
        }
        expected.push((Kind::Int8, OneRowQuestion::Prefetch));
        assert_eq!(asked, expected);
        assert!(first.iter().all(|m| !m.cached && m.size_mib == 1 && m.on_us > 0.0 && m.off_us > 0.0), "{first:?}");
        let second = calibrate_one_row(&[&fp32, &bf16], &[&int8], Some(&cache));
        for (a, b) in first.iter().zip(&second) {
            assert!(b.cached, "{b:?}");
            assert_eq!((a.question, a.kind, a.on), (b.question, b.kind, b.on));
            let set = match (b.kind, b.question) {
                (Kind::Int8, _) => crate::quantized::prefetch_bytes() == crate::quantized::PREFETCH_LEAD,
                (kind, OneRowQuestion::Stream) => crate::linear::one_row_stream(kind),
                (kind, _) => crate::linear::one_row_prefetch(kind),
            };
            assert_eq!(set, b.on);
        }
        assert_eq!(first.last().map(|m| m.quantized), Some(Some(Format::Int8)));
        // int4 records as large are a question of their own, timed and then read back as such.
        let int4 =
            QuantizedWeight::quantize(&Tensor::randn([96, 64], (Kind::Float, Device::Cpu)), Format::Int4).unwrap();
        for cached in [false, true] {
            let m = calibrate_one_row(&[], &[&int4], Some(&cache));
            assert_eq!(
                m.iter().map(|m| (m.quantized, m.size_mib, m.cached)).collect::<Vec<_>>(),
                [(Some(Format::Int4), 1, cached)]
            );
        }
        let (x, x_narrow) =
            (Tensor::randn([1, 64], (Kind::Float, Device::Cpu)), Tensor::randn([1, 96], (Kind::Float, Device::Cpu)));
        let product = |prefetch, stream| {
            for kind in [Kind::Float, Kind::BFloat16] {
                crate::linear::set_one_row_prefetch(kind, prefetch);
                crate::linear::set_one_row_stream(kind, stream);
            }
            crate::quantized::set_prefetch_bytes(if prefetch { crate::quantized::PREFETCH_LEAD } else { 0 });
            let fp32_rows = crate::linear::kernel_linear(&x, &fp32, None);
            (fp32_rows, crate::linear::kernel_linear(&x_narrow, &bf16, None), crate::quantized::linear(&x, &int8, None))
        };
        let first = product(true, false);
        for (prefetch, stream) in [(false, false), (true, true), (false, true)] {
            let other = product(prefetch, stream);
            assert!(first.0.equal(&other.0) && first.1.equal(&other.1) && first.2.equal(&other.2));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
