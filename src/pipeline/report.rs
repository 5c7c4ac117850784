//! The pipeline's end report: `report.md` (a summary and a table of rounds), `report.json`, and two
//! plots drawn as SVG by hand: `loss.svg` (every training run's loss curve) and `pass1.svg`
//! (HumanEval pass@1 per round). `model` links to the best round's checkpoint.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{json, Value};

use super::Round;

/// `(step, loss)` per line of a `metrics.jsonl`.
pub fn read_losses(path: &Path) -> anyhow::Result<Vec<(usize, f64)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let value: Value = serde_json::from_str(line).with_context(|| format!("{}: bad line", path.display()))?;
            Ok((value["step"].as_u64().unwrap_or(0) as usize, value["loss"].as_f64().unwrap_or(f64::NAN)))
        })
        .collect()
}

const COLOURS: &[&str] = &["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

/// A line chart of named series, with axes, ticks and a legend; `probability` fixes the y axis at
/// 0 below and at most 1 above.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    probability: bool,
) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 420.0, 70.0, 170.0, 40.0, 50.0);
    let points = series.iter().flat_map(|(_, p)| p.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if probability {
        (y0, y1) = (0.0, (y1 * 1.2).clamp(0.05, 1.0));
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-9 {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    let (pw, ph) = (w - left - right, h - top - bottom);
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| top + ph - (y - y0) / (y1 - y0) * ph;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        left + pw / 2.0,
        escape(title)
    );
    let _ = writeln!(svg, r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#);
    // Whole-number x values over a short span (rounds) get a tick each.
    let whole = series.iter().flat_map(|(_, p)| p.iter()).all(|(x, _)| x.fract() == 0.0) && x1 - x0 <= 10.0;
    let x_ticks: Vec<f64> = if whole {
        (x0 as i64..=x1 as i64).map(|x| x as f64).collect()
    } else {
        (0..=4).map(|i| x0 + (x1 - x0) * i as f64 / 4.0).collect()
    };
    for fx in x_ticks {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            sx(fx),
            top + ph + 16.0,
            tick(fx)
        );
    }
    for i in 0..=4 {
        let fy = y0 + (y1 - y0) * i as f64 / 4.0;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 6.0,
            sy(fy) + 4.0,
            tick(fy)
        );
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/>"##,
            left + pw,
            sy(fy),
            sy(fy)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        h - 12.0,
        escape(x_label)
    );
    let _ = writeln!(
        svg,
        r#"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        top + ph / 2.0,
        escape(y_label)
    );
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
            path.join(" ")
        );
        if points.len() <= 20 {
            for p in &path {
                let (cx, cy) = p.split_once(',').expect("formatted as x,y");
                let _ = writeln!(svg, r#"<circle cx="{cx}" cy="{cy}" r="3" fill="{colour}"/>"#);
            }
        }
        let ly = top + 10.0 + 18.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{0}" x2="{1}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="3"/>"#,
            w - right + 10.0,
            w - right + 30.0
        );
        let _ = writeln!(svg, r#"<text x="{}" y="{}">{}</text>"#, w - right + 36.0, ly + 4.0, escape(name));
    }
    svg.push_str("</svg>\n");
    svg
}

fn tick(value: f64) -> String {
    if value.abs() >= 100.0 || value.fract().abs() < 1e-9 {
        format!("{value:.0}")
    } else {
        format!("{value:.3}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn cell(value: &Value, digits: usize) -> String {
    value.as_f64().map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "-".into())
}

/// Writes `report.md`, `report.json`, `loss.svg` and `pass1.svg` into `out` and links `out/model` to
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
            let points = read_losses(path)?.into_iter().map(|(s, l)| (s as f64, l)).collect();
            series.push((name.clone(), points));
        }
    }
    std::fs::write(out.join("loss.svg"), line_chart("Training loss", "step", "loss", &series, false))?;
    let mut pass_series = vec![(
        "HumanEval pass@1".to_string(),
        rounds.iter().map(|r| (f64::from(r.round), r.pass1())).collect::<Vec<_>>(),
    )];
    if rounds.iter().any(|r| r.eval.get("mbpp").is_some()) {
        let points = rounds
            .iter()
            .map(|r| (f64::from(r.round), r.eval["mbpp"]["pass_at_k"]["pass@1"].as_f64().unwrap_or(f64::NAN)));
        pass_series.push(("MBPP pass@1".to_string(), points.collect()));
    }
    std::fs::write(out.join("pass1.svg"), line_chart("pass@1 per round", "round", "pass@1", &pass_series, true))?;

    let link = out.join("model");
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(&link).with_context(|| format!("cannot replace {}", link.display()))?;
    }
    let absolute = std::fs::canonicalize(model).unwrap_or_else(|_| model.to_path_buf());
    std::os::unix::fs::symlink(&absolute, &link).with_context(|| format!("cannot link {}", link.display()))?;

    let ks: Vec<String> = {
        let mut ks: Vec<String> = rounds
            .iter()
            .flat_map(|r| {
                r.eval["humaneval"]["pass_at_k"]
                    .as_object()
                    .map(|m| m.keys().cloned().collect::<Vec<_>>())
                    .unwrap_or_default()
            })
            .collect();
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
        best_round.eval["humaneval"]["problems"],
        absolute.display()
    );
    if let Some(draft) = draft {
        let _ = writeln!(md, "Draft model for speculative decoding: `{}`.", draft.display());
    }
    let last = rounds.last().expect("at least one round");
    if rounds.len() > 1 && last.round != best {
        let _ = writeln!(md, "\nRound {} did not raise pass@1 above round {best}'s; round {best} is kept.", last.round);
    }
    md.push_str("\n| round | items trained on | evolved | accepted | acceptance | SFT loss |");
    for k in &ks {
        let _ = write!(md, " HumanEval {k} |");
    }
    let mbpp = rounds.iter().any(|r| r.eval.get("mbpp").is_some());
    if mbpp {
        md.push_str(" MBPP pass@1 |");
    }
    md.push_str("\n|---|---|---|---|---|---|");
    md.push_str(&"---|".repeat(ks.len() + usize::from(mbpp)));
    md.push('\n');
    let mut json_rounds = Vec::new();
    for r in rounds {
        let marker = if r.round == best { " (best)" } else { "" };
        let _ = write!(
            md,
            "| {}{marker} | {} | {} | {} | {} | {} |",
            r.round,
            r.export["items"],
            r.evolve["items"],
            r.evolve["accepted"],
            r.evolve["acceptance"].as_f64().map(|a| format!("{:.1}%", 100.0 * a)).unwrap_or_else(|| "-".into()),
            cell(&r.sft["loss"], 4)
        );
        for k in &ks {
            let _ = write!(md, " {} |", cell(&r.eval["humaneval"]["pass_at_k"][k], 4));
        }
        if mbpp {
            let _ = write!(md, " {} |", cell(&r.eval["mbpp"]["pass_at_k"]["pass@1"], 4));
        }
        md.push('\n');
        json_rounds
            .push(json!({ "round": r.round, "evolve": r.evolve, "export": r.export, "sft": r.sft, "eval": r.eval }));
    }
    md.push_str("\n\"items trained on\" is round 0 (the seeds) merged with the evolved rounds up to this one; \"evolved\" and\n");
    md.push_str(
        "\"accepted\" count this round's items in `evolve.sqlite` (`wizard evolve status --db evolve.sqlite`).\n",
    );
    md.push_str("\n![training loss](loss.svg)\n\n![pass@1 per round](pass1.svg)\n");
    let report = out.join("report.md");
    std::fs::write(&report, md)?;
    let summary = json!({ "best_round": best, "model": absolute, "draft": draft, "rounds": json_rounds });
    std::fs::write(out.join("report.json"), serde_json::to_string_pretty(&summary)? + "\n")?;
    Ok(report)
}
