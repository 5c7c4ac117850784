//! Which product each fp32 dense shape takes on this machine: the dense kernel or libtorch's
//! `at::linear`, decided by timing both at load (one row, as a decode step, and 16, as a batch) and
//! remembered per machine in a cache file. A kernel tuned on one machine lost to BLAS on another; a
//! measurement on the machine itself cannot. libtorch is chosen only where it is clearly faster at
//! both row counts: the kernel also keeps every row's result independent of the batch, which
//! libtorch does not promise.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::Instant;

use tch::{Kind, Tensor};

/// How much faster libtorch must be, at both row counts, to be chosen.
const LIBTORCH_MARGIN: f64 = 1.1;
/// The row counts timed: a decode step and a full batch.
const ROWS: [i64; 2] = [1, 16];

/// The product a dense shape takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// wizard's dense kernel (`csrc/linear.cpp`).
    Kernel,
    /// libtorch's `at::linear` (BLAS).
    Libtorch,
}

/// One shape's timings (µs per call at 1 and 16 rows) and the choice they made.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// `[out, in]` of the weight.
    pub shape: (i64, i64),
    /// The kernel's time per call at 1 and 16 rows.
    pub kernel_us: [f64; 2],
    /// `at::linear`'s time per call at 1 and 16 rows.
    pub libtorch_us: [f64; 2],
    /// What the timings chose.
    pub choice: Choice,
    /// Whether the timings came from the cache file rather than this process.
    pub cached: bool,
}

/// Choices made in this process, by fp32 weight shape `[out, in]`.
fn table() -> MutexGuard<'static, HashMap<(i64, i64), Choice>> {
    static TABLE: LazyLock<Mutex<HashMap<(i64, i64), Choice>>> = LazyLock::new(Mutex::default);
    TABLE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether any shape chose libtorch: until one does, every product takes the kernel without a
/// look at the table (this runs for every dense product).
static LIBTORCH_CHOSEN: AtomicBool = AtomicBool::new(false);

/// The product an fp32 CPU weight of this shape takes (the kernel unless a measurement chose
/// libtorch).
pub(crate) fn choice_for(weight: &Tensor) -> Choice {
    if !LIBTORCH_CHOSEN.load(Ordering::Relaxed) || weight.kind() != Kind::Float {
        return Choice::Kernel;
    }
    match weight.size().as_slice() {
        [out, in_features] => table().get(&(*out, *in_features)).copied().unwrap_or(Choice::Kernel),
        _ => Choice::Kernel,
    }
}

/// Decides the product for each fp32 CPU weight in `weights` (one per distinct shape is enough),
/// timing it on the weight itself unless `cache` (a file; created if missing) already holds this
/// machine's timings for the shape. The decisions hold for the rest of the process.
pub fn calibrate(weights: &[&Tensor], cache: Option<&Path>) -> Vec<Measurement> {
    let machine = machine_key();
    let mut known = cache.map(|path| read_cache(path, &machine)).unwrap_or_default();
    let mut measurements: Vec<Measurement> = Vec::new();
    let mut fresh = Vec::new();
    for weight in weights {
        let [out, in_features] = weight.size()[..] else { continue };
        if weight.kind() != Kind::Float || weight.device() != tch::Device::Cpu || in_features == 0 {
            continue;
        }
        if measurements.iter().any(|m| m.shape == (out, in_features)) {
            continue;
        }
        let measurement = match known.remove(&(out, in_features)) {
            Some(cached) => cached,
            None => {
                let measured = measure(weight);
                fresh.push(measured.clone());
                measured
            }
        };
        if measurement.choice == Choice::Libtorch {
            LIBTORCH_CHOSEN.store(true, Ordering::Relaxed);
        }
        table().insert(measurement.shape, measurement.choice);
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

/// Where timings are kept: `$WIZARD_CACHE_DIR`, else `$XDG_CACHE_HOME/wizard`, else
/// `~/.cache/wizard`; the file `dense-kernels.tsv` there.
pub fn default_cache_file() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let dir = var("WIZARD_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("wizard")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("wizard")))?;
    Some(dir.join("dense-kernels.tsv"))
}

fn measure(weight: &Tensor) -> Measurement {
    let [out, in_features] = weight.size()[..] else { unreachable!("checked by the caller") };
    let _guard = tch::no_grad_guard();
    let mut kernel_us = [0.0; 2];
    let mut libtorch_us = [0.0; 2];
    for (i, rows) in ROWS.into_iter().enumerate() {
        let x = Tensor::randn([rows, in_features], (Kind::Float, tch::Device::Cpu));
        kernel_us[i] = best_us(|| drop(crate::linear::kernel_linear(&x, weight, None)));
        libtorch_us[i] = best_us(|| drop(x.linear::<Tensor>(weight, None)));
    }
    let libtorch_wins = (0..ROWS.len()).all(|i| libtorch_us[i] * LIBTORCH_MARGIN < kernel_us[i]);
    let choice = if libtorch_wins { Choice::Libtorch } else { Choice::Kernel };
    Measurement { shape: (out, in_features), kernel_us, libtorch_us, choice, cached: false }
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

/// What the timings depend on: the CPU (its name and a digest of its feature flags: a VM may name
/// only the family), the thread count and libtorch.
fn machine_key() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name).map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string()))
            .unwrap_or_default()
    };
    let cpu = field("model name");
    // FNV-1a: stable across builds, unlike the standard library's hasher.
    let flags =
        field("flags").bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3));
    let torch = crate::ffi::torch_version();
    format!("{cpu} (flags {flags:016x}); {} threads; torch {torch}", tch::get_num_threads()).replace('\t', " ")
}

/// Lines `machine \t out \t in \t choice \t kernel µs (1, 16 rows) \t libtorch µs (1, 16 rows)`; lines
/// of other machines, or that do not parse, are skipped.
fn read_cache(path: &Path, machine: &str) -> HashMap<(i64, i64), Measurement> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut known = HashMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        let [key, out, in_features, choice, k1, k16, l1, l16] = fields[..] else { continue };
        if key != machine {
            continue;
        }
        let parsed = (|| {
            let choice = match choice {
                "kernel" => Choice::Kernel,
                "libtorch" => Choice::Libtorch,
                _ => return None,
            };
            let number = |s: &str| s.parse::<f64>().ok();
            Some(Measurement {
                shape: (out.parse().ok()?, in_features.parse().ok()?),
                kernel_us: [number(k1)?, number(k16)?],
                libtorch_us: [number(l1)?, number(l16)?],
                choice,
                cached: true,
            })
        })();
        if let Some(measurement) = parsed {
            known.insert(measurement.shape, measurement);
        }
    }
    known
}

fn append_cache(path: &Path, machine: &str, measurements: &[Measurement]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let mut lines = String::new();
    for m in measurements {
        let choice = if m.choice == Choice::Kernel { "kernel" } else { "libtorch" };
        lines += &format!(
            "{machine}\t{}\t{}\t{choice}\t{:.2}\t{:.2}\t{:.2}\t{:.2}\n",
            m.shape.0, m.shape.1, m.kernel_us[0], m.kernel_us[1], m.libtorch_us[0], m.libtorch_us[1]
        );
    }
    file.write_all(lines.as_bytes())
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
        let weights =
            [Tensor::randn([48, 64], (Kind::Float, Device::Cpu)), Tensor::randn([64, 48], (Kind::Float, Device::Cpu))];
        let refs: Vec<&Tensor> = weights.iter().chain(&weights[..1]).collect();
        let first = calibrate(&refs, Some(&cache));
        assert_eq!(first.len(), 2, "one measurement per distinct shape");
        assert!(first.iter().all(|m| !m.cached && m.kernel_us.iter().chain(&m.libtorch_us).all(|t| *t > 0.0)));
        std::fs::write(&cache, std::fs::read_to_string(&cache).unwrap() + "garbage line\n").unwrap();
        let second = calibrate(&refs, Some(&cache));
        assert!(second.iter().all(|m| m.cached), "{second:?}");
        for (a, b) in first.iter().zip(&second) {
            assert_eq!((a.shape, a.choice), (b.shape, b.choice));
            assert_eq!(choice_for(&weights[if a.shape == (48, 64) { 0 } else { 1 }]), a.choice);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
