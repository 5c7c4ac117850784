//! `--device` and `--dtype` as every command takes them.
use anyhow::bail;
use model::gpt_bigcode::parse_dtype;
use tch::{Device, Kind};

/// `cpu`, `cuda`, `cuda:N` or `auto` (a GPU when libtorch sees one). `auto` and `cuda` pick GPU
/// LOCAL_RANK, so that data-parallel ranks on one machine take one GPU each.
pub fn parse_device(text: &str) -> anyhow::Result<Device> {
    let gpus = tch::Cuda::device_count() as usize;
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
        let gpus = tch::Cuda::device_count();
        anyhow::ensure!(
            (index as i64) < gpus,
            "--device cuda:{index}: libtorch sees {gpus} CUDA device(s); `wizard doctor` says why"
        );
    }
    Ok(device)
}

/// `--dtype` of the weights: as given, else bf16 on a GPU and fp32 on the CPU.
pub fn weight_kind(dtype: Option<&str>, device: Device) -> anyhow::Result<Kind> {
    match dtype {
        Some(text) => Ok(parse_dtype(text)?),
        None if device.is_cuda() => Ok(Kind::BFloat16),
        None => Ok(Kind::Float),
    }
}
