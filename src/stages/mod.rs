//! `wizard pipeline --config wizard.toml`: WizardCoder's procedure as resumable stages. A tokenizer and
//! FIM pretraining (or an existing checkpoint), an optional draft model, then rounds of
//! evolve → export (round 0..r merged) → SFT from the base checkpoint → HumanEval (and MBPP) pass@k,
//! continuing while pass@1 rises (ties broken by the reference solutions' log-likelihood, which moves
//! where a small model's pass@1 stays 0); the best round is kept. Stage state lives in `pipeline.sqlite`: a
//! stage whose configuration fingerprint is unchanged and done is skipped, an interrupted one is
//! continued by its own resumption (train `--resume`, the evolve and eval stores), a changed one
//! starts again, and everything downstream of it follows through the chained fingerprints.
//!
//! The long stages run as `wizard train|evolve|eval` child processes of this same binary: each
//! brings its progress bars, resumption and (for training) the rank launcher, and its memory is
//! returned when it ends. Short stages (tokenizer, export, report) call the libraries directly.
mod base;
pub mod config;
mod report;
mod round;
mod runner;
mod state;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use config::Config;
use round::{Chain, Round};
use runner::Runner;

#[derive(clap::Args)]
pub struct Args {
    /// The pipeline's configuration (TOML; see the README's `wizard pipeline` section).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Most evolution rounds (overrides `run.rounds`).
    #[arg(long, value_name = "N")]
    rounds: Option<u32>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    let outcome = execute(&config, args.rounds)?;
    println!("{}", outcome.report.display());
    Ok(ExitCode::SUCCESS)
}

/// What a finished pipeline leaves behind.
pub struct Outcome {
    pub report: PathBuf,
    /// The best round's fine-tuned checkpoint.
    pub model: PathBuf,
    pub draft: Option<PathBuf>,
    pub best_round: u32,
    pub best_pass1: f64,
}

fn json_of<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("config serializes")
}

/// Runs the pipeline to its end (or its first failing stage) and writes the report.
pub fn execute(config: &Config, rounds_cap: Option<u32>) -> anyhow::Result<Outcome> {
    let out = &config.run.out;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let runner = Runner::open(&out.join("pipeline.sqlite"))?;
    let rounds_cap = rounds_cap.unwrap_or(config.run.rounds);
    anyhow::ensure!(rounds_cap > 0, "--rounds must be at least 1");
    let mut curves: Vec<(String, PathBuf)> = Vec::new();
    let base = base::base(&runner, config, &mut curves)?;
    let draft = base::draft(&runner, config, &base, &mut curves)?;

    let mut chain = Chain::new(config, &base);
    let mut rounds: Vec<Round> = Vec::new();
    let mut best: Option<usize> = None;
    for r in 1..=rounds_cap {
        eprintln!("==> round {r} of at most {rounds_cap}");
        let round = round::run(&runner, config, &base, &mut chain, r)?;
        curves.push((format!("sft round {r}"), round.sft.metrics.clone()));
        rounds.push(round);
        let (round, kept) = (&rounds[rounds.len() - 1], best.map(|b| &rounds[b]));
        match kept {
            Some(kept) if !round.beats(kept) => {
                eprintln!(
                    "    pass@1 {:.4} (reference log-likelihood {:.4}) did not beat round {}'s {:.4} ({:.4}): \
                     stopping (round {} is kept)",
                    round.pass1(),
                    round.reference_loglik(),
                    kept.round,
                    kept.pass1(),
                    kept.reference_loglik(),
                    kept.round
                );
                break;
            }
            _ => best = Some(rounds.len() - 1),
        }
    }

    let best = &rounds[best.expect("at least one round ran")];
    let model = best.sft.checkpoint.clone();
    let report = report::write(out, &rounds, best.round, &curves, &model, draft.as_deref())?;
    eprintln!(
        "==> [{:6.1}s] done: best round {} (HumanEval pass@1 {:.4}); report in {}",
        runner.started.elapsed().as_secs_f64(),
        best.round,
        best.pass1(),
        report.display()
    );
    Ok(Outcome { report, model, draft, best_round: best.round, best_pass1: best.pass1() })
}
