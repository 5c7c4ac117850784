//! `scripts/setup.sh` on bad machines: each failure stops early with what failed and how to fix it.
use std::path::Path;
use std::process::Command;

const SETUP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/setup.sh");

/// Runs the setup script with extra variables and checks its exit status and what it said.
fn check(env: &[(&str, &str)], expect_success: bool, expect_in_stderr: &[&str]) {
    let output = Command::new("bash").arg(SETUP).envs(env.iter().copied()).output().expect("bash runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.success(), expect_success, "{env:?}: {stderr}");
    for expected in expect_in_stderr {
        assert!(stderr.contains(expected), "{env:?}: expected {expected:?} in:\n{stderr}");
    }
}

#[test]
fn missing_python_names_the_package_to_install() {
    check(
        &[("WIZARD_SETUP_PYTHON", "/nonexistent/python3")],
        false,
        &["no '/nonexistent/python3' on PATH", "fix: apt-get install -y python3 python3-venv"],
    );
}

#[test]
fn unsupported_python_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("python3");
    std::fs::write(&fake, "#!/bin/sh\n[ \"$1\" = --version ] && echo 'Python 3.8.0'\nexit 1\n").unwrap();
    make_executable(&fake);
    check(
        &[("WIZARD_SETUP_PYTHON", fake.to_str().unwrap())],
        false,
        &["Python 3.8.0 is not supported", "needs Python 3.10 to 3.14"],
    );
}

#[test]
fn too_little_disk_stops_before_installing_anything() {
    let cache = tempfile::tempdir().unwrap();
    check(
        &[("WIZARD_CACHE", cache.path().to_str().unwrap()), ("WIZARD_SETUP_MIN_FREE_GB", "100000000")],
        false,
        &["GB free under", "set WIZARD_CACHE to a directory on a larger one"],
    );
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0, "nothing may be left half-made");
}

#[test]
fn complete_install_is_recognised_quickly() {
    check(&[], true, &["setup: ready: torch 2.11.0"]);
}

fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}
