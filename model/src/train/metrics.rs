//! `metrics.jsonl`, one JSON object per optimizer step, and the loss chart drawn from it. The
//! trainer appends to it and rewrites it on resume; the pipeline's report reads it.
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::chart::{line_chart, YAxis};
use crate::{ModelError, Result};

/// One optimizer step, as logged to `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    /// 1-based step.
    pub step: usize,
    /// Mean loss over the global batch's target tokens.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Target tokens per second across all ranks.
    pub tokens_per_s: f64,
    /// Model FLOPs utilisation against the measured matmul peak.
    pub mfu: f64,
    /// Held-out loss, on steps that save.
    pub eval_loss: Option<f64>,
}

/// Appends one step's line.
pub fn append(path: &Path, metrics: &StepMetrics) -> Result<()> {
    let mut file =
        std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| ModelError::io(path, e))?;
    writeln!(file, "{}", serde_json::to_string(metrics).expect("metrics serialize"))
        .map_err(|e| ModelError::io(path, e))
}

/// Replaces the file's lines with `history`.
pub fn rewrite(path: &Path, history: &[StepMetrics]) -> Result<()> {
    let text: String = history.iter().map(|m| serde_json::to_string(m).expect("metrics serialize") + "\n").collect();
    super::write_atomically(path, text.as_bytes())
}

/// The steps logged in `path` (none if it does not exist), up to `upto` if given: a resumed run drops
/// what came after its checkpoint. A line that does not parse (torn by a crash mid-append) is skipped.
pub fn read(path: &Path, upto: Option<usize>) -> Result<Vec<StepMetrics>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ModelError::io(path, e)),
    };
    let steps = text.lines().filter_map(|line| serde_json::from_str::<StepMetrics>(line).ok());
    Ok(steps.filter(|m| upto.is_none_or(|upto| m.step <= upto)).collect())
}

/// Training loss (and held-out loss, where measured) against steps.
pub fn loss_chart(history: &[StepMetrics]) -> String {
    let train = history.iter().map(|m| (m.step as f64, m.loss)).collect();
    let held_out: Vec<(f64, f64)> = history.iter().filter_map(|m| Some((m.step as f64, m.eval_loss?))).collect();
    let mut series = vec![("train".to_string(), train)];
    if !held_out.is_empty() {
        series.push(("held-out".to_string(), held_out));
    }
    line_chart("Training loss", "step", "loss", &series, YAxis::Fit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step: usize, loss: f64, eval_loss: Option<f64>) -> StepMetrics {
        StepMetrics { step, loss, lr: 1e-3, grad_norm: 1.0, tokens_per_s: 10.0, mfu: 0.1, eval_loss }
    }

    #[test]
    fn written_steps_read_back_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        assert!(read(&path, None).unwrap().is_empty(), "a missing file has no steps");
        for i in 1..=4 {
            append(&path, &step(i, 4.0 - i as f64 * 0.5, (i == 4).then_some(2.5))).unwrap();
        }
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"step\": 5, \"lo").unwrap();
        let steps: Vec<(usize, f64)> = read(&path, None).unwrap().iter().map(|m| (m.step, m.loss)).collect();
        assert_eq!(steps, [(1, 3.5), (2, 3.0), (3, 2.5), (4, 2.0)]);
        assert_eq!(read(&path, Some(2)).unwrap().len(), 2);
        rewrite(&path, &read(&path, Some(3)).unwrap()).unwrap();
        assert_eq!(read(&path, None).unwrap().len(), 3, "rewritten without the torn line and step 4");
        let chart = loss_chart(&read(&path, None).unwrap());
        assert!(chart.starts_with("<svg") && chart.contains(">train<") && !chart.contains("held-out"), "{chart}");
    }
}
