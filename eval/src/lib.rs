//! Evaluation: HumanEval and MBPP prompts, sample generation, sandboxed execution and pass@k.
//!
//! The flow of `wizard eval run`: [`problems::load`] a benchmark, [`generate::generate`] samples into a
//! [`store::Store`], [`execute`] the samples that have no outcome yet in the [`sandbox`], and [`score`]
//! them. `wizard eval score` starts from a samples file ([`samples::read`]) instead of a model;
//! `wizard eval compare` puts two evaluations' files side by side ([`compare`]).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod compare;
mod error;
pub mod generate;
pub mod likelihood;
pub mod passk;
pub mod problems;
pub mod samples;
pub mod sandbox;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use serde::Serialize;

pub use error::{EvalError, Result};
use problems::Problem;
use sandbox::{Isolation, Job, SandboxConfig, Status};
use store::Store;

/// What an outcome depends on besides its sample and its problem: the sandbox's limits, isolation and
/// interpreter (the file it resolves to, however it is spelled).
fn execution_settings(sandbox: &SandboxConfig) -> String {
    let python = resolve_program(&sandbox.python);
    format!(
        "timeout {} ns, memory {} bytes, processes {}, file {} bytes, output {} chars, python {}, isolation {}",
        sandbox.timeout.as_nanos(),
        sandbox.memory_bytes,
        sandbox.max_processes,
        sandbox.max_file_bytes,
        sandbox.output_chars,
        python.display(),
        sandbox.isolation
    )
}

/// `program` as the file it names: looked up on PATH when it has no slash, links resolved; as given
/// where it cannot be found (starting it will say why).
fn resolve_program(program: &Path) -> std::path::PathBuf {
    let found = if program.components().count() > 1 {
        Some(program.to_path_buf())
    } else {
        std::env::var_os("PATH")
            .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file()))
    };
    found.and_then(|path| std::fs::canonicalize(path).ok()).unwrap_or_else(|| program.to_path_buf())
}

/// Forgets the store's outcomes if they were made under other execution settings (another
/// timeout, memory limit, interpreter or isolation) than `sandbox`; returns how many, which then run
/// again. Only once the sandbox is known to start: a run that cannot execute anything loses nothing.
pub fn forget_stale_outcomes(store: &Store, sandbox: &SandboxConfig) -> Result<usize> {
    let settings = execution_settings(sandbox);
    let forgotten = match store.meta("execution")? {
        Some(stored) if stored != settings => {
            sandbox::probe(sandbox)?;
            store.forget_outcomes()?
        }
        _ => 0,
    };
    store.set_meta("execution", &settings)?;
    Ok(forgotten)
}

/// Runs every stored sample that has no outcome yet, recording each outcome as it arrives. `progress` is
/// called with (done, to do) after each. Returns the isolation the sandbox got, and how many ran.
pub fn execute(
    store: &Store,
    problems: &[Problem],
    sandbox: &SandboxConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<(Isolation, usize)> {
    let by_id: HashMap<&str, &Problem> = problems.iter().map(|p| (p.task_id.as_str(), p)).collect();
    let pending: Vec<samples::Sample> =
        store.scored()?.into_iter().filter(|(_, outcome)| outcome.is_none()).map(|(sample, _)| sample).collect();
    let mut jobs = Vec::with_capacity(pending.len());
    for (key, sample) in pending.iter().enumerate() {
        let problem = by_id.get(sample.task_id.as_str()).ok_or_else(|| EvalError::Store {
            path: store.path().into(),
            message: format!("it holds a sample of {:?}, which this benchmark file lacks", sample.task_id),
        })?;
        jobs.push(Job { key, program: problem.program(&sample.completion) });
    }
    let total = jobs.len();
    let mut done = 0;
    let isolation = sandbox::run(sandbox, jobs, |key, outcome| {
        store.record(&pending[key], &outcome)?;
        done += 1;
        progress(done, total);
        Ok(())
    })?;
    Ok((isolation, total))
}

/// The scores of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// `humaneval` or `mbpp`.
    pub benchmark: String,
    /// Problems with samples.
    pub problems: usize,
    /// Samples with an outcome.
    pub samples: usize,
    /// Samples without an outcome yet (an unfinished run).
    pub pending: usize,
    /// Samples that passed.
    pub passed: usize,
    /// Samples that failed.
    pub failed: usize,
    /// Samples that timed out.
    pub timed_out: usize,
    /// Mean pass@k for each k that every problem has enough samples for, keyed `pass@k`.
    pub pass_at_k: BTreeMap<String, f64>,
    /// Per problem, in task order of the samples.
    pub per_problem: Vec<ProblemScore>,
    /// Mean log-likelihood per token of the reference solutions given their prompts (set by runs
    /// that have the model): it moves where pass@k stays at 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_loglik: Option<f64>,
}

/// One problem's counts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProblemScore {
    /// The problem.
    pub task_id: String,
    /// Samples with an outcome.
    pub n: usize,
    /// Of which passed.
    pub passed: usize,
    /// pass@k of this problem.
    pub pass_at_k: BTreeMap<String, f64>,
}

/// Scores what the store holds, saves the scores in it, and returns them.
pub fn score(store: &mut Store) -> Result<Report> {
    let scored = store.scored()?;
    let mut order: Vec<String> = Vec::new();
    let mut counts: HashMap<String, (usize, usize)> = HashMap::new();
    let (mut passed, mut failed, mut timed_out, mut pending) = (0, 0, 0, 0);
    for (sample, outcome) in &scored {
        let Some(outcome) = outcome else {
            pending += 1;
            continue;
        };
        let entry = counts.entry(sample.task_id.clone()).or_insert_with(|| {
            order.push(sample.task_id.clone());
            (0, 0)
        });
        entry.0 += 1;
        match outcome.status {
            Status::Passed => {
                entry.1 += 1;
                passed += 1;
            }
            Status::Failed => failed += 1,
            Status::TimedOut => timed_out += 1,
        }
    }
    let pairs: Vec<(usize, usize)> = order.iter().map(|id| counts[id]).collect();
    let scores = passk::mean_pass_at_k(&pairs, &passk::KS);
    let per_problem = order
        .iter()
        .map(|id| {
            let (n, c) = counts[id];
            let pass_at_k =
                passk::KS.iter().filter_map(|&k| passk::pass_at_k(n, c, k).map(|v| (format!("pass@{k}"), v))).collect();
            ProblemScore { task_id: id.clone(), n, passed: c, pass_at_k }
        })
        .collect::<Vec<_>>();
    let rows: Vec<(String, usize, usize)> = per_problem.iter().map(|p| (p.task_id.clone(), p.n, p.passed)).collect();
    store.save_scores(&rows, &scores)?;
    Ok(Report {
        benchmark: store.meta("benchmark")?.unwrap_or_default(),
        problems: per_problem.len(),
        samples: passed + failed + timed_out,
        pending,
        passed,
        failed,
        timed_out,
        pass_at_k: scores.into_iter().map(|(k, v)| (format!("pass@{k}"), v)).collect(),
        per_problem,
        reference_loglik: store.meta(REFERENCE_LOGLIK)?.and_then(|value| value.parse().ok()),
    })
}

/// The store's `meta` key of the reference solutions' log-likelihood (see [`likelihood`]).
pub const REFERENCE_LOGLIK: &str = "reference_loglik";

impl Report {
    /// The report as an aligned text table (per-problem lines only with `per_problem`).
    pub fn table(&self, per_problem: bool) -> String {
        let mut out = String::new();
        let mut line = |key: &str, value: String| out.push_str(&format!("{key:<12}{value}\n"));
        line("benchmark", self.benchmark.clone());
        line("problems", self.problems.to_string());
        line("samples", self.samples.to_string());
        if self.pending > 0 {
            line("pending", format!("{} (not executed yet; run again to finish)", self.pending));
        }
        line("passed", self.passed.to_string());
        line("failed", self.failed.to_string());
        line("timed out", self.timed_out.to_string());
        for (k, value) in &self.pass_at_k {
            line(k, format!("{value:.4}"));
        }
        if let Some(loglik) = self.reference_loglik {
            line("ref loglik", format!("{loglik:.4} per token (reference solutions given their prompts)"));
        }
        if per_problem {
            out.push_str(&format!("\n{:<16}{:>6}{:>8}{:>10}\n", "task", "n", "passed", "pass@1"));
            for problem in &self.per_problem {
                let pass1 = problem.pass_at_k.get("pass@1").copied().unwrap_or(0.0);
                out.push_str(&format!("{:<16}{:>6}{:>8}{:>10.4}\n", problem.task_id, problem.n, problem.passed, pass1));
            }
        }
        out
    }
}

/// Writes the samples with their outcomes as JSONL in the official harness's results format
/// (`task_id`, `completion`, `result`, `passed`), replacing `path` atomically.
pub fn write_results(store: &Store, path: &Path) -> Result<()> {
    let scored = store.scored()?;
    model::files::replace_with(path, |temporary| {
        let mut out = std::io::BufWriter::new(std::fs::File::create(temporary)?);
        for (sample, outcome) in scored {
            let Some(outcome) = outcome else { continue };
            let line = serde_json::json!({
                "task_id": sample.task_id,
                "completion": sample.completion,
                "result": outcome.result,
                "passed": outcome.status == Status::Passed,
            });
            writeln!(out, "{line}")?;
        }
        out.flush()
    })
    .map_err(|error| EvalError::Io { path: path.into(), error })
}
