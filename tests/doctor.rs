//! `wizard doctor` run as a user would run it: the built binary, real libtorch, real Python.
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const WIZARD: &str = env!("CARGO_BIN_EXE_wizard");

struct Run {
    args: &'static [&'static str],
    /// Clear the environment apart from PATH (and the variables given here).
    clean_env: bool,
    env: Vec<(&'static str, String)>,
}

fn run(case: &Run) -> Output {
    let mut command = Command::new(WIZARD);
    command.args(case.args);
    if case.clean_env {
        command.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    }
    command.envs(case.env.iter().map(|(k, v)| (k, v)));
    command.output().expect("wizard runs")
}

/// Runs the case, checks the exit code, and returns the parsed `--json` report.
fn check(case: Run, expect_success: bool) -> Value {
    let output = run(&case);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.success(),
        expect_success,
        "{:?} exited {:?}\nstdout: {stdout}\nstderr: {}",
        case.args,
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn doctor_json(clean_env: bool, env: Vec<(&'static str, String)>) -> Run {
    Run { args: &["doctor", "--json"], clean_env, env }
}

#[test]
fn doctor_reports_torch_2_11_and_the_devices_it_sees() {
    let report = check(doctor_json(false, vec![]), true);
    assert_eq!(report["torch_version"], "2.11.0");
    assert!(report["wheel_version"].as_str().unwrap().starts_with("2.11.0"), "{report}");
    assert_eq!(report["built_with_cuda"], true, "libtorch_cuda must be linked unconditionally");
    assert_eq!(report["built_with_nccl"], true, "setup installs the headers ProcessGroupNCCL needs");
    let devices = report["cuda"]["devices"].as_array().unwrap();
    assert_eq!(report["cuda"]["available"], !devices.is_empty(), "{report}");
    assert!(report["threads"]["intra_op"].as_i64().unwrap() >= 1);
    assert!(report["few_row_kernel"].is_boolean(), "{report}");
    assert!(Path::new(report["loaded_from"].as_str().unwrap()).ends_with("torch/lib/libtorch_cpu.so"));
    for peer in report["peers"].as_array().unwrap() {
        assert!(peer["version"].is_string(), "peer not importable: {peer}");
    }
    assert_eq!(report["peers"].as_array().unwrap().len(), 6);
}

#[test]
fn doctor_runs_with_only_path_in_the_environment() {
    // The rpath, not LD_LIBRARY_PATH, finds libtorch.
    let report = check(doctor_json(true, vec![]), true);
    assert_eq!(report["ok"], true, "{report}");
}

#[test]
fn doctor_names_missing_python_peers_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let venv = dir.path().join("bare");
    let created = Command::new("python3").args(["-m", "venv", "--without-pip"]).arg(&venv).status().unwrap();
    assert!(created.success());
    let python = venv.join("bin/python").display().to_string();
    let report = check(doctor_json(true, vec![("WIZARD_PYTHON", python)]), false);
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 6, "one problem per missing peer: {report}");
    assert!(problems[0]["what"].as_str().unwrap().contains("Python peer torch is not importable"), "{report}");
    assert!(problems[0]["fix"].as_str().unwrap().ends_with("scripts/setup.sh"), "{report}");
}

#[test]
fn doctor_text_output_says_what_is_wrong() {
    let output =
        run(&Run { args: &["doctor"], clean_env: true, env: vec![("WIZARD_PYTHON", "/nonexistent/python3".into())] });
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success());
    assert!(stdout.contains("libtorch        2.11.0"), "{stdout}");
    assert!(stdout.contains("problem         cannot run /nonexistent/python3"), "{stdout}");
    assert!(stdout.contains("scripts/setup.sh"), "{stdout}");
}

#[test]
fn log_file_receives_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("wizard.log");
    let output = Command::new(WIZARD).arg("--log-file").arg(&log).args(["doctor", "--json"]).output().unwrap();
    assert!(output.status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("INFO") && text.contains("libtorch 2.11.0"), "{text}");
    assert!(output.stderr.is_empty(), "logs went to stderr too: {}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn unwritable_log_file_is_a_clear_error() {
    let output = Command::new(WIZARD).args(["--log-file", "/nonexistent/dir/wizard.log", "doctor"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr.contains("cannot open log file /nonexistent/dir/wizard.log"), "{stderr}");
}
