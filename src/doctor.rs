//! `wizard doctor`: what libtorch and which devices wizard runs on, and whether the Python peers
//! are importable. Every problem it finds comes with the command that fixes it.
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use indicatif::ProgressBar;
use kernels::runtime::{CudaBackend, RuntimeInfo};
use serde_json::json;

use crate::python;

const EXPECTED_TORCH: &str = "2.11.0";
const SETUP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/setup.sh");

#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

struct Problem {
    what: String,
    fix: String,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let spinner = ProgressBar::new_spinner().with_message("asking libtorch about itself");
    spinner.enable_steady_tick(Duration::from_millis(100));
    let info = RuntimeInfo::probe().context("libtorch could not describe itself")?;
    let loaded_from = std::fs::canonicalize(&info.loaded_from).unwrap_or_else(|_| info.loaded_from.clone());
    tracing::info!(
        "libtorch {} loaded from {}; CUDA available: {}",
        info.torch_version,
        loaded_from.display(),
        info.cuda.available
    );
    let mut problems = Vec::new();

    let wheel_version = installed_wheel_version(&loaded_from);
    match &wheel_version {
        Some(version) if version.split('+').next() == Some(EXPECTED_TORCH) => {}
        found => problems.push(Problem {
            what: format!(
                "the libtorch at {} belongs to torch {}, wizard needs {EXPECTED_TORCH}",
                loaded_from.display(),
                found.as_deref().unwrap_or("(unknown version)")
            ),
            fix: format!("{SETUP} && cargo build --release"),
        }),
    }
    let linked = std::fs::canonicalize(&info.linked_at_build).unwrap_or_else(|_| info.linked_at_build.clone());
    if !loaded_from.starts_with(&linked) {
        problems.push(Problem {
            what: format!(
                "the loader picked {}, but wizard was linked against {}",
                loaded_from.display(),
                linked.display()
            ),
            fix: "unset LD_LIBRARY_PATH (the binary finds its libtorch through its rpath)".into(),
        });
    }

    spinner.set_message("importing the Python peers");
    if let CudaBackend::Failed(message) = &info.cuda_backend {
        problems.push(Problem {
            what: format!("there is an NVIDIA driver, but libtorch's CUDA backend did not load: {message}"),
            fix: SETUP.into(),
        });
    }
    let python = python::interpreter(&loaded_from);
    let peers = match &python {
        None => {
            problems.push(Problem {
                what: "no Python interpreter beside the torch wheel (and WIZARD_PYTHON is not set)".into(),
                fix: SETUP.into(),
            });
            Vec::new()
        }
        Some(python) => match python::probe_peers(python) {
            Ok(peers) => peers,
            Err(error) => {
                problems.push(Problem { what: format!("{error:#}"), fix: SETUP.into() });
                Vec::new()
            }
        },
    };
    for peer in &peers {
        if let Some(error) = &peer.error {
            let package = python::PEERS.iter().find(|(module, _)| *module == peer.module).map_or("?", |p| p.1);
            problems
                .push(Problem { what: format!("Python peer {package} is not importable: {error}"), fix: SETUP.into() });
        }
    }
    spinner.finish_and_clear();

    if args.json {
        print_json(&info, &loaded_from, wheel_version.as_deref(), python.as_deref(), &peers, &problems);
    } else {
        print_text(&info, &loaded_from, python.as_deref(), &peers, &problems);
    }
    Ok(if problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The wheel's own `torch/version.py` says which torch the loaded library file belongs to.
fn installed_wheel_version(libtorch: &Path) -> Option<String> {
    let version_py = libtorch.parent()?.parent()?.join("version.py");
    let text = std::fs::read_to_string(version_py).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("__version__ = "))
        .map(|value| value.trim().trim_matches(['\'', '"']).to_string())
}

fn cuda_line(info: &RuntimeInfo) -> String {
    if info.cuda.available {
        return format!(
            "yes (CUDA runtime {}, cuDNN {})",
            info.cuda.runtime_version.as_deref().unwrap_or("?"),
            if info.cuda.cudnn { "available" } else { "not available" }
        );
    }
    match &info.cuda_backend {
        CudaBackend::Loaded => "no: CPU only (libtorch's CUDA backend is loaded, but no device is visible)".into(),
        backend => format!("no: CPU only (libtorch's CUDA backend {})", backend.describe()),
    }
}

fn print_text(
    info: &RuntimeInfo,
    loaded_from: &Path,
    python: Option<&Path>,
    peers: &[python::Peer],
    problems: &[Problem],
) {
    println!("libtorch        {}", info.torch_version);
    println!("loaded from     {}", loaded_from.display());
    println!("CUDA            {}", cuda_line(info));
    println!(
        "NCCL            {}",
        if info.built_with_nccl {
            "built in (ProcessGroupNCCL for one GPU per rank; CUDA graphs for decode steps)"
        } else {
            "not built: the CUDA headers were missing at build time (scripts/setup.sh, then cargo build)"
        }
    );
    for device in &info.cuda.devices {
        println!(
            "  cuda:{}        {} ({:.1} GiB, compute capability {}.{})",
            device.index,
            device.name,
            device.total_memory as f64 / f64::from(1 << 30),
            device.capability.0,
            device.capability.1
        );
        match kernels::cuda_graph::probe(device.index) {
            Ok(()) => println!("    CUDA graphs   record and replay (decode steps run as graphs)"),
            Err(error) => println!("    CUDA graphs   not working, decode steps run op by op: {error}"),
        }
    }
    println!("threads         {} intra-op, {} inter-op", info.intra_op_threads, info.inter_op_threads);
    let kernel = if kernels::linear::few_row_kernel_available() {
        let bf16 = kernels::linear::bf16_kernel();
        let pairs = if bf16 == kernels::linear::Bf16Kernel::Widened { "" } else { ", bf16 in pairs of steps" };
        format!(
            "wizard's dense kernel (fp32, {}; or fp32/bf16 panels{pairs}, or libtorch for fp32 prompt chunks, per shape as timed at load)",
            bf16.describe()
        )
    } else {
        "BLAS (no AVX2)".to_string()
    };
    let cap = kernels::cpu::cap().map(|cap| format!(" (capped: WIZARD_CPU_MAX={cap})")).unwrap_or_default();
    println!("CPU decoding    {kernel}; int8/int4 kernel: {}{cap}", kernels::quantized::kernel_isa());
    let prompt_attention = if kernels::attention::bf16_attention_faster() { "bf16" } else { "fp32" };
    // Timed on d768's shape (12 heads over one key head of 64); each model's own is timed as it runs.
    let grouped = if kernels::attention::prompt_attention_faster(12, 1, 64) { "matrix products" } else { "SDPA" };
    println!(
        "CPU prompts     attention under bf16 weights in {prompt_attention}; fp32 multi-query attention by {grouped} (as timed now)"
    );
    println!("python          {}", python.map_or_else(|| "not found".into(), |p| p.display().to_string()));
    for peer in peers {
        let state = match (&peer.version, &peer.error) {
            (Some(version), _) => version.clone(),
            (None, Some(error)) => format!("NOT IMPORTABLE ({error})"),
            (None, None) => "unknown".into(),
        };
        println!("  {:<14}{state}", peer.module);
    }
    if problems.is_empty() {
        println!("status          ok");
        return;
    }
    for problem in problems {
        println!("problem         {}", problem.what);
        println!("  fix           {}", problem.fix);
    }
}

fn print_json(
    info: &RuntimeInfo,
    loaded_from: &Path,
    wheel_version: Option<&str>,
    python: Option<&Path>,
    peers: &[python::Peer],
    problems: &[Problem],
) {
    let report = json!({
        "torch_version": info.torch_version,
        "wheel_version": wheel_version,
        "loaded_from": loaded_from,
        "linked_at_build": info.linked_at_build,
        "built_with_cuda": info.built_with_cuda,
        "built_with_nccl": info.built_with_nccl,
        "cuda_backend": info.cuda_backend.describe(),
        "cuda": {
            "available": info.cuda.available,
            "cudnn": info.cuda.cudnn,
            "runtime_version": info.cuda.runtime_version,
            "devices": info.cuda.devices.iter().map(|d| json!({
                "index": d.index, "name": d.name, "total_memory": d.total_memory,
                "capability": [d.capability.0, d.capability.1],
                "cuda_graphs": kernels::cuda_graph::probe(d.index).map_or_else(|e| e.to_string(), |()| "ok".into()),
            })).collect::<Vec<_>>(),
        },
        "threads": { "intra_op": info.intra_op_threads, "inter_op": info.inter_op_threads },
        "few_row_kernel": kernels::linear::few_row_kernel_available(),
        "int8_kernel": kernels::quantized::kernel_isa(),
        "bf16_kernel": kernels::linear::bf16_kernel().name(),
        "bf16_prompt_attention": kernels::attention::bf16_attention_faster(),
        "prompt_attention_products": kernels::attention::prompt_attention_faster(12, 1, 64),
        "cpu_max": kernels::cpu::cap(),
        "python": python.map(PathBuf::from),
        "peers": peers.iter().map(|p| json!({"module": p.module, "version": p.version, "error": p.error})).collect::<Vec<_>>(),
        "problems": problems.iter().map(|p| json!({"what": p.what, "fix": p.fix})).collect::<Vec<_>>(),
        "ok": problems.is_empty(),
    });
    println!("{report:#}");
}
