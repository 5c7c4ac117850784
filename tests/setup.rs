//! `scripts/setup.sh`: on a machine it has set up, a second run recognises the complete install and
//! changes nothing; on bad machines, each failure stops early with what failed and how to fix it.
mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{check_failure, stdout_of, text};

const SETUP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/setup.sh");

fn setup(env: &[(&str, &str)]) -> Output {
    Command::new("bash").arg(SETUP).envs(env.iter().copied()).output().expect("bash runs")
}

/// Runs the setup script with extra variables; it must fail saying every one of `expected`.
fn check(env: &[(&str, &str)], expected: &[&str]) {
    check_failure(&setup(env), env, expected);
}

#[test]
fn missing_python_names_the_package_to_install() {
    check(
        &[("WIZARD_SETUP_PYTHON", "/nonexistent/python3")],
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
        &["Python 3.8.0 is not supported", "needs Python 3.10 to 3.14"],
    );
}

#[test]
fn too_little_disk_stops_before_installing_anything() {
    let cache = tempfile::tempdir().unwrap();
    check(
        &[("WIZARD_CACHE", cache.path().to_str().unwrap()), ("WIZARD_SETUP_MIN_FREE_GB", "100000000")],
        &["GB free under", "set WIZARD_CACHE to a directory on a larger one"],
    );
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0, "nothing may be left half-made");
}

/// The tests run after setup, so the install is complete: the script takes its short path (one
/// `ready` line naming the venv, none of the lines of an install), leaves the venv's stamp and the
/// repository's links as they were, and says the same on a second run.
#[test]
fn a_complete_install_is_recognised_and_left_alone() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let site_packages =
        std::fs::read_link(repo.join(".wizard/site-packages")).expect(".wizard/site-packages links the venv");
    // <venv>/lib/pythonX.Y/site-packages
    let venv = site_packages.ancestors().nth(3).unwrap().to_path_buf();
    let stamp = venv.join(".wizard-setup-complete");
    let stamped = || (std::fs::read_to_string(&stamp).unwrap(), std::fs::metadata(&stamp).unwrap().modified().unwrap());
    let before = stamped();
    let expected = format!("setup: ready: torch 2.11.0 in {}\n", venv.display());
    for run in 1..=2 {
        let output = setup(&[]);
        assert_eq!(stdout_of(&output, ("run", run)), "", "setup writes to stderr only");
        assert_eq!(text(&output.stderr), expected, "run {run}");
        assert_eq!(stamped(), before, "run {run} rewrote {}", stamp.display());
        assert_eq!(std::fs::read_link(repo.join(".wizard/site-packages")).unwrap(), site_packages, "run {run}");
    }
    let wrapper = std::fs::read_to_string(repo.join(".wizard/python")).unwrap();
    assert_eq!(wrapper, format!("#!/bin/sh\nexec \"{}\" \"$@\"\n", venv.join("bin/python").display()));
}

fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}
