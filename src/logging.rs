//! Tracing set-up: human logs on stderr (stdout belongs to results and protocols), or to a file.
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::Context;
use tracing_subscriber::EnvFilter;

const FILTER_VAR: &str = "WIZARD_LOG";

/// The log file of this process, absolute, for child processes to append to.
static FILE: OnceLock<PathBuf> = OnceLock::new();

/// Where this process logs, when it logs to a file.
pub fn file() -> Option<&'static Path> {
    FILE.get().map(PathBuf::as_path)
}

pub fn init(log_file: Option<&Path>) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_env(FILTER_VAR).unwrap_or_else(|_| {
        // A log file is asked for to be read later, so it gets more than the terminal does.
        EnvFilter::new(if log_file.is_some() { "info" } else { "warn" })
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match log_file {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open log file {}", path.display()))?;
            let _ = FILE.set(std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()));
            builder.with_ansi(false).with_writer(Mutex::new(file)).init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}
