//! The pipeline's end report: `report.md` (a summary and a table of rounds), `report.json`, and two
//! plots drawn as SVG by hand: `loss.svg` (every training run's loss curve), `pass1.svg` (HumanEval
//! pass@1 per round) and `loglik.svg` (the reference solutions' log-likelihood per round). `model` links to the best round's checkpoint.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use model::chart::{line_chart, YAxis};
use model::train::metrics;
use serde_json::json;

use super::round::{Benchmark, Round};

fn cell(value: Option<f64>, digits: usize) -> String {
    value.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "-".into())
}

/// Writes `report.md`, `report.json`, `loss.svg`, `pass1.svg` and `loglik.svg` into `out` and links `out/model` to
/// the best checkpoint; returns the Markdown file.
pub fn write(
    out: &Path,
    rounds: &[Round],
    best: u32,
    curves: &[(String, PathBuf)],
    model: &Path,
    draft: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    let mut series = Vec::new();
    for (name, path) in curves {
        if path.exists() {
            let points = metrics::read(path, None)?.iter().map(|m| (m.step as f64, m.loss)).collect();
            series.push((name.clone(), points));
        }
    }
    std::fs::write(out.join("loss.svg"), line_chart("Training loss", "step", "loss", &series, YAxis::Fit))?;
    let mut pass_series = vec![(
        "HumanEval pass@1".to_string(),
        rounds.iter().map(|r| (f64::from(r.round), r.pass1())).collect::<Vec<_>>(),
    )];
    let mbpp = rounds.iter().any(|r| r.eval.mbpp.is_some());
    if mbpp {
        let points = rounds.iter().map(|r| (f64::from(r.round), r.eval.mbpp.as_ref().map_or(f64::NAN, |m| m.pass1())));
        pass_series.push(("MBPP pass@1".to_string(), points.collect()));
    }
    std::fs::write(
        out.join("pass1.svg"),
        line_chart("pass@1 per round", "round", "pass@1", &pass_series, YAxis::Probability),
    )?;
    let loglik = |benchmark: Option<&Benchmark>| benchmark.and_then(|b| b.reference_loglik).unwrap_or(f64::NAN);
    let mut loglik_series = vec![(
        "HumanEval".to_string(),
        rounds.iter().map(|r| (f64::from(r.round), loglik(Some(&r.eval.humaneval)))).collect::<Vec<_>>(),
    )];
    if mbpp {
        let points = rounds.iter().map(|r| (f64::from(r.round), loglik(r.eval.mbpp.as_ref())));
        loglik_series.push(("MBPP".to_string(), points.collect()));
    }
    let title = "Reference solutions: mean log-likelihood per token";
    std::fs::write(out.join("loglik.svg"), line_chart(title, "round", "log-likelihood", &loglik_series, YAxis::Fit))?;

    let link = out.join("model");
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(&link).with_context(|| format!("cannot replace {}", link.display()))?;
    }
    let absolute = std::fs::canonicalize(model).unwrap_or_else(|_| model.to_path_buf());
    std::os::unix::fs::symlink(&absolute, &link).with_context(|| format!("cannot link {}", link.display()))?;

    let ks: Vec<String> = {
        let mut ks: Vec<String> = rounds.iter().flat_map(|r| r.eval.humaneval.pass_at_k.keys().cloned()).collect();
        ks.sort_by_key(|k| k.trim_start_matches("pass@").parse::<u32>().unwrap_or(0));
        ks.dedup();
        ks
    };
    let mut md = String::from("# wizard pipeline report\n\n");
    let best_round = rounds.iter().find(|r| r.round == best).expect("best is a run round");
    let _ = writeln!(
        md,
        "Best round: **{best}**, HumanEval pass@1 **{:.4}** on {} problems; its model: `{}` (linked as `model`).",
        best_round.pass1(),
        best_round.eval.humaneval.problems,
        absolute.display()
    );
    if let Some(draft) = draft {
        let _ = writeln!(md, "Draft model for speculative decoding: `{}`.", draft.display());
    }
    let last = rounds.last().expect("at least one round");
    if rounds.len() > 1 && last.round != best {
        let _ = writeln!(
            md,
            "\nRound {} did not beat round {best}'s pass@1 (or, tied, its reference log-likelihood); round {best} is kept.",
            last.round
        );
    }
    md.push_str("\n| round | items trained on | evolved | accepted | acceptance | SFT loss | ref log-likelihood |");
    for k in &ks {
        let _ = write!(md, " HumanEval {k} |");
    }
    if mbpp {
        md.push_str(" MBPP pass@1 |");
    }
    md.push_str("\n|---|---|---|---|---|---|---|");
    md.push_str(&"---|".repeat(ks.len() + usize::from(mbpp)));
    md.push('\n');
    let mut json_rounds = Vec::new();
    for r in rounds {
        let marker = if r.round == best { " (best)" } else { "" };
        let _ = write!(
            md,
            "| {}{marker} | {} | {} | {} | {:.1}% | {:.4} |",
            r.round,
            r.export.items,
            r.evolve.items,
            r.evolve.accepted,
            100.0 * r.evolve.acceptance,
            r.sft.loss
        );
        let _ = write!(md, " {} |", cell(r.eval.humaneval.reference_loglik, 4));
        for k in &ks {
            let _ = write!(md, " {} |", cell(r.eval.humaneval.pass_at_k.get(k).copied(), 4));
        }
        if mbpp {
            let _ = write!(md, " {} |", cell(r.eval.mbpp.as_ref().map(|m| m.pass1()), 4));
        }
        md.push('\n');
        json_rounds
            .push(json!({ "round": r.round, "evolve": r.evolve, "export": r.export, "sft": r.sft, "eval": r.eval }));
    }
    md.push_str("\n\"items trained on\" is round 0 (the seeds) merged with the evolved rounds up to this one; \"evolved\" and\n");
    md.push_str(
        "\"accepted\" count this round's items in `evolve.sqlite` (`wizard evolve status --db evolve.sqlite`).\n",
    );
    md.push_str("\"ref log-likelihood\" is HumanEval's canonical solutions' mean log-likelihood per token given their prompts:\n");
    md.push_str("it moves with training where pass@1 stays at 0, and breaks pass@1 ties between rounds.\n");
    md.push_str("\n![training loss](loss.svg)\n\n![pass@1 per round](pass1.svg)\n\n![reference log-likelihood per round](loglik.svg)\n");
    let report = out.join("report.md");
    std::fs::write(&report, md)?;
    let summary = json!({ "best_round": best, "model": absolute, "draft": draft, "rounds": json_rounds });
    std::fs::write(out.join("report.json"), serde_json::to_string_pretty(&summary)? + "\n")?;
    Ok(report)
}
