//! `--device`, `--dtype` and `--draft` as every command takes them.
use anyhow::bail;
use std::path::Path;

use anyhow::Context;
use model::gpt_bigcode::{parse_precision, GptBigCode, Precision};
use model::tokenizer::Tokenizer;
use tch::{Device, Kind};

/// `cpu`, `cuda`, `cuda:N` or `auto` (a GPU when libtorch sees one). `auto` and `cuda` pick GPU
/// LOCAL_RANK, so that data-parallel ranks on one machine take one GPU each.
pub fn parse_device(text: &str) -> anyhow::Result<Device> {
    let gpus = kernels::runtime::cuda_device_count();
    let local_rank: usize = std::env::var("LOCAL_RANK").ok().and_then(|r| r.parse().ok()).unwrap_or(0);
    Ok(match text {
        "auto" if gpus > 0 => Device::Cuda(local_rank % gpus),
        "auto" | "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(local_rank % gpus.max(1)),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(index) => Device::Cuda(index),
            None => bail!("--device {other:?}: use auto, cpu, cuda or cuda:N"),
        },
    })
}

/// [`parse_device`], and an error when libtorch sees no such GPU.
pub fn checked_device(text: &str) -> anyhow::Result<Device> {
    let device = parse_device(text)?;
    if let Device::Cuda(index) = device {
        let gpus = kernels::runtime::cuda_device_count();
        anyhow::ensure!(
            index < gpus,
            "--device cuda:{index}: libtorch sees {gpus} CUDA device(s); `wizard doctor` says why"
        );
    }
    Ok(device)
}

/// A `--dtype` value checked as it is parsed, before a command creates anything.
pub fn known_dtype(text: &str) -> Result<String, String> {
    model::gpt_bigcode::parse_precision(text).map(|_| text.to_string()).map_err(|e| e.to_string())
}

/// `--dtype` of the weights of the model in `dir`: as given (`int8` and `int4` on the CPU only), else
/// the format a quantized directory holds, bf16 on a GPU, fp32 on the CPU.
pub fn weight_precision(dtype: Option<&str>, device: Device, dir: &Path) -> anyhow::Result<Precision> {
    let unquantized = if device.is_cuda() { Precision::Dense(Kind::BFloat16) } else { Precision::Dense(Kind::Float) };
    precision_of(dtype, device, dir, unquantized)
}

/// The weights of the model and of its draft (`--draft`): [`weight_precision`], and for the draft
/// `--draft-dtype`, else what a quantized draft directory holds, else the model's.
pub fn model_and_draft_precisions(
    dtype: Option<&str>,
    draft_dtype: Option<&str>,
    device: Device,
    dir: &Path,
    draft: Option<&Path>,
) -> anyhow::Result<(Precision, Precision)> {
    let precision = weight_precision(dtype, device, dir)?;
    let draft_precision = match draft {
        Some(draft) => precision_of(draft_dtype, device, draft, precision)?,
        None => precision,
    };
    Ok((precision, draft_precision))
}

/// Refuses a draft whose tokenizer numbers tokens otherwise than the model's (its drafts would be
/// other tokens, rejected at every step). A draft directory without tokenizer.json shares the model's.
pub fn check_draft_tokenizer(dir: &Path, draft: &Path) -> anyhow::Result<()> {
    let (ours, theirs) = (dir.join("tokenizer.json"), draft.join("tokenizer.json"));
    let same_file = matches!((ours.canonicalize(), theirs.canonicalize()), (Ok(a), Ok(b)) if a == b);
    if same_file || !theirs.exists() {
        return Ok(());
    }
    let model = Tokenizer::from_dir(dir)?;
    let draft_tokenizer = Tokenizer::from_dir(draft).with_context(|| format!("--draft {}", draft.display()))?;
    if let Some(difference) = model.numbering_difference(&draft_tokenizer) {
        bail!("--draft {}: a draft must share the model's tokenizer, and {difference}", draft.display());
    }
    Ok(())
}

/// `dtype` as given, else what `dir` holds if `wizard quantize` wrote it, else `unquantized`. A
/// directory that cannot say (missing, or a config in error) counts as unquantized here, and loading
/// it reports why, where it always has.
fn precision_of(dtype: Option<&str>, device: Device, dir: &Path, unquantized: Precision) -> anyhow::Result<Precision> {
    if let Some(text) = dtype {
        return given_precision(text, device);
    }
    match GptBigCode::stored_precision(dir).ok().flatten() {
        Some(Precision::Quantized(format)) if device.is_cuda() => {
            bail!("{} holds {} weights, which run on the CPU: use --device cpu", dir.display(), format.name())
        }
        Some(stored) => Ok(stored),
        None => Ok(unquantized),
    }
}

/// A `--dtype` as given, refused where it cannot run.
fn given_precision(text: &str, device: Device) -> anyhow::Result<Precision> {
    let precision = parse_precision(text)?;
    if let (Precision::Quantized(format), true) = (precision, device.is_cuda()) {
        bail!("--dtype {} runs on the CPU; on a GPU use bfloat16", format.name());
    }
    Ok(precision)
}

/// Loads a model directory in `precision`, with a progress bar while layers are quantized.
pub fn load_model(dir: &Path, precision: Precision, device: Device) -> anyhow::Result<GptBigCode> {
    let format = match precision {
        Precision::Quantized(format) => format.name(),
        Precision::Dense(_) => "",
    };
    with_quantizing_bar(format, |progress| GptBigCode::load_as(dir, precision, device, progress))
        .with_context(|| format!("cannot load the model in {}", dir.display()))
}

/// Runs `work` with a (done, total) callback that draws a bar on stderr once quantizing (to `format`)
/// starts.
pub fn with_quantizing_bar<T>(format: &str, work: impl FnOnce(&mut dyn FnMut(usize, usize)) -> T) -> T {
    let bar = indicatif::ProgressBar::hidden();
    let result = work(&mut |done, total| {
        if bar.is_hidden() {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_length(total as u64);
            bar.set_message(format!("quantizing to {format}"));
        }
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    result
}
