//! Runs stages: skips one that is done with the same fingerprint, records its status and typed
//! outputs in the state table, and starts the long ones as `wizard` child processes.
use std::cell::RefCell;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::state::{Plan, State};

pub struct Runner {
    state: State,
    /// The stage running now, whose child processes are recorded.
    current: RefCell<String>,
    db: PathBuf,
    exe: PathBuf,
    pub started: Instant,
}

impl Runner {
    /// Opens the state table `db`; refuses to run beside a stage's child left running by a pipeline
    /// that was stopped without it.
    pub fn open(db: &Path) -> anyhow::Result<Runner> {
        let runner = Runner {
            state: State::open(db)?,
            current: RefCell::default(),
            db: db.to_path_buf(),
            exe: std::env::current_exe().context("cannot find the wizard binary")?,
            started: Instant::now(),
        };
        if let Some((name, pid)) = runner.state.orphans(&runner.exe)?.into_iter().next() {
            anyhow::bail!(
                "stage `{name}` is still running in process {pid}, left by a pipeline that was stopped without it; \
                 wait for it to end or stop it (`kill {pid}`), then run this again"
            );
        }
        Ok(runner)
    }

    /// Runs `body` unless the stage is done with this fingerprint (its recorded outputs are returned).
    /// On a fresh start, `clear` is removed first. A failure is recorded and names the stage.
    pub fn stage<T: Serialize + DeserializeOwned>(
        &self,
        name: &str,
        fingerprint: &str,
        clear: &[PathBuf],
        body: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let elapsed = self.started.elapsed().as_secs_f64();
        match self.state.plan(name, fingerprint)? {
            Plan::Skip(outputs) => match serde_json::from_value(outputs) {
                Ok(outputs) => {
                    eprintln!("==> [{elapsed:6.1}s] {name}: done before with this configuration, skipped");
                    return Ok(outputs);
                }
                // Recorded by an older wizard in another shape: the stage's own resumption redoes it.
                Err(error) => {
                    eprintln!("==> [{elapsed:6.1}s] {name}: recorded outputs unreadable ({error}), rerunning")
                }
            },
            Plan::Resume => eprintln!("==> [{elapsed:6.1}s] {name}: continuing where it stopped"),
            Plan::Fresh => {
                for path in clear {
                    remove(path)?;
                }
                eprintln!("==> [{elapsed:6.1}s] {name}");
            }
        }
        self.state.start(name, fingerprint)?;
        *self.current.borrow_mut() = name.to_string();
        let span = tracing::info_span!("stage", name).entered();
        let started = Instant::now();
        let result = body();
        drop(span);
        match result {
            Ok(outputs) => {
                self.state.finish(name, &serde_json::to_value(&outputs)?)?;
                eprintln!("    {name} done in {:.1}s", started.elapsed().as_secs_f64());
                Ok(outputs)
            }
            Err(error) => {
                self.state.fail(name, &format!("{error:#}"))?;
                Err(error.context(format!(
                    "stage `{name}` failed; the stages before it are kept in {}, and running the same command again continues from it",
                    self.db.display()
                )))
            }
        }
    }

    /// Runs `wizard ARGS` with stderr shown (its progress bars); returns its stdout, also shown on stderr.
    pub fn wizard(&self, args: Vec<OsString>) -> anyhow::Result<String> {
        let what: Vec<String> =
            args.iter().map(|a| a.to_string_lossy().into_owned()).take_while(|a| !a.starts_with('-')).collect();
        let what = what.join(" ");
        tracing::info!(?args, "running wizard {what}");
        let mut command = Command::new(&self.exe);
        if let Some(log) = crate::logging::file() {
            command.env("WIZARD_LOG_FILE", log);
        }
        let child = command
            .args(&args)
            // `wizard train` then dies with this process (PR_SET_PDEATHSIG) instead of living on.
            .env("WIZARD_LAUNCHER_PID", std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start `wizard {what}`"))?;
        self.state.set_pid(&self.current.borrow(), child.id())?;
        let output = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        for line in stdout.lines() {
            eprintln!("    {line}");
        }
        anyhow::ensure!(output.status.success(), "`wizard {what}` failed ({})", output.status);
        Ok(stdout)
    }
}

fn remove(path: &Path) -> anyhow::Result<()> {
    let result = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// An argument of a child `wizard` command.
pub fn os(text: impl Into<OsString>) -> OsString {
    text.into()
}

/// `--flag value` pairs as arguments.
pub fn flags<'a>(pairs: impl IntoIterator<Item = (&'a str, String)>) -> Vec<OsString> {
    pairs.into_iter().flat_map(|(flag, value)| [os(flag), os(value)]).collect()
}
