//! Two evaluations side by side (`wizard eval compare A B`): pass@k of each, and the problems that
//! flipped. A problem counts as solved when at least one of its samples passed. Each side is a file
//! that `wizard eval` writes: `results.jsonl` (per sample, `task_id` and `passed`, as the official
//! harness writes it too) or `report.json` (per problem, `task_id`, `n` and `passed`).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use model::files;
use model::jsonl::Lines;
use serde_json::Value;

use crate::error::{io, line_error, EvalError, Result};
use crate::passk;
use crate::problems::task_id;

/// One side: per problem, in file order, (task id, samples, passed).
#[derive(Debug, Clone, PartialEq)]
pub struct Side {
    /// The file.
    pub path: PathBuf,
    /// (task id, n, passed) per problem.
    pub problems: Vec<(String, usize, usize)>,
}

impl Side {
    /// Reads a `results.jsonl` or a `report.json`.
    pub fn read(path: &Path) -> Result<Side> {
        let bytes = files::read(path).map_err(io(path))?;
        let text = String::from_utf8(bytes)
            .map_err(|e| EvalError::File { path: path.into(), message: format!("not UTF-8: {e}") })?;
        let problems = match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(report)) if report.contains_key("per_problem") => from_report(path, &report)?,
            _ => from_results(path, &text)?,
        };
        if problems.is_empty() {
            return Err(EvalError::File { path: path.into(), message: "no results in it".into() });
        }
        Ok(Side { path: path.into(), problems })
    }

    /// pass@k for each k every problem has samples for.
    pub fn pass_at_k(&self) -> Vec<(usize, f64)> {
        let pairs: Vec<(usize, usize)> = self.problems.iter().map(|&(_, n, c)| (n, c)).collect();
        passk::mean_pass_at_k(&pairs, &passk::KS)
    }
}

fn from_report(path: &Path, report: &serde_json::Map<String, Value>) -> Result<Vec<(String, usize, usize)>> {
    let error = |message: String| EvalError::File { path: path.into(), message };
    let Some(Value::Array(rows)) = report.get("per_problem") else {
        return Err(error("`per_problem` must be a list".into()));
    };
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let count = |name: &str| row.get(name).and_then(Value::as_u64).map(|v| v as usize);
            let id = task_id(row.get("task_id")).map_err(|e| error(format!("per_problem[{i}]: {e}")))?;
            match (count("n"), count("passed")) {
                (Some(n), Some(passed)) if passed <= n => Ok((id, n, passed)),
                _ => Err(error(format!("per_problem[{i}]: `n` and `passed` must be counts, passed <= n"))),
            }
        })
        .collect()
}

fn from_results(path: &Path, text: &str) -> Result<Vec<(String, usize, usize)>> {
    let mut lines = Lines::new(text.as_bytes());
    let mut order: Vec<(String, usize, usize)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    while let Some(value) = lines.read::<Value>().map_err(line_error(path))? {
        let error = |message: String| EvalError::Line { path: path.into(), line: lines.line(), message };
        let Value::Object(record) = value else {
            return Err(error("a result must be a JSON object (results.jsonl) or the file a report.json".into()));
        };
        let id = task_id(record.get("task_id")).map_err(error)?;
        let passed = match record.get("passed") {
            Some(Value::Bool(passed)) => *passed,
            Some(_) => return Err(error("field `passed` must be true or false".into())),
            None => return Err(error("missing field `passed` (not a results.jsonl or report.json)".into())),
        };
        let at = *index.entry(id.clone()).or_insert_with(|| {
            order.push((id, 0, 0));
            order.len() - 1
        });
        order[at].1 += 1;
        order[at].2 += usize::from(passed);
    }
    Ok(order)
}

/// A problem solved on one side only: its id and each side's (samples, passed).
#[derive(Debug, Clone, PartialEq)]
pub struct Flip {
    /// The problem.
    pub task_id: String,
    /// A's (n, passed).
    pub a: (usize, usize),
    /// B's (n, passed).
    pub b: (usize, usize),
}

/// Two sides and what changed between them.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// The first file.
    pub a: Side,
    /// The second file.
    pub b: Side,
    /// Problems of both files solved in B but not in A.
    pub fixed: Vec<Flip>,
    /// Problems of both files solved in A but not in B.
    pub broken: Vec<Flip>,
    /// Problems in only one of the files: (in A only, in B only).
    pub unshared: (usize, usize),
}

/// Compares two sides, problem by problem in A's order.
pub fn compare(a: Side, b: Side) -> Comparison {
    let in_b: HashMap<&str, (usize, usize)> = b.problems.iter().map(|(id, n, c)| (id.as_str(), (*n, *c))).collect();
    let (mut fixed, mut broken, mut shared) = (Vec::new(), Vec::new(), 0);
    for (id, n, c) in &a.problems {
        let Some(&(bn, bc)) = in_b.get(id.as_str()) else { continue };
        shared += 1;
        let flip = || Flip { task_id: id.clone(), a: (*n, *c), b: (bn, bc) };
        match (*c > 0, bc > 0) {
            (false, true) => fixed.push(flip()),
            (true, false) => broken.push(flip()),
            _ => {}
        }
    }
    let unshared = (a.problems.len() - shared, b.problems.len() - shared);
    Comparison { a, b, fixed, broken, unshared }
}

impl Comparison {
    /// The comparison as text: a table of both sides, then the flipped problems.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut row = |key: &str, a: String, b: String| out.push_str(&format!("{key:<12}{a:>12}{b:>12}\n"));
        row("", "A".into(), "B".into());
        let sides = [&self.a, &self.b];
        let [problems_a, problems_b] = sides.map(|s| s.problems.len().to_string());
        row("problems", problems_a, problems_b);
        let [samples_a, samples_b] = sides.map(|s| s.problems.iter().map(|p| p.1).sum::<usize>().to_string());
        row("samples", samples_a, samples_b);
        let [solved_a, solved_b] = sides.map(|s| s.problems.iter().filter(|p| p.2 > 0).count().to_string());
        row("solved", solved_a, solved_b);
        let (scores_a, scores_b) = (self.a.pass_at_k(), self.b.pass_at_k());
        for k in passk::KS {
            let value = |scores: &[(usize, f64)]| {
                scores.iter().find(|(kk, _)| *kk == k).map_or("-".to_string(), |(_, v)| format!("{v:.4}"))
            };
            if scores_a.iter().chain(&scores_b).any(|(kk, _)| *kk == k) {
                row(&format!("pass@{k}"), value(&scores_a), value(&scores_b));
            }
        }
        out.push_str(&format!("A           {}\nB           {}\n", self.a.path.display(), self.b.path.display()));
        if self.unshared != (0, 0) {
            out.push_str(&format!(
                "not compared: {} problems only in A, {} only in B\n",
                self.unshared.0, self.unshared.1
            ));
        }
        let mut list = |title: &str, flips: &[Flip]| {
            out.push_str(&format!("\n{title}: {}\n", flips.len()));
            for Flip { task_id, a: (n, c), b: (bn, bc) } in flips {
                out.push_str(&format!("  {task_id:<40} {c}/{n} -> {bc}/{bn}\n"));
            }
        };
        list("solved in B only (failed in A)", &self.fixed);
        list("solved in A only (failed in B)", &self.broken);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compares file A (`a`, named by its extension `a_name`) with file B; the table, or the error.
    fn check(a_name: &str, a: &str, b: &str, expect: &str) {
        let dir = tempfile::tempdir().unwrap();
        let (path_a, path_b) = (dir.path().join(a_name), dir.path().join("b.jsonl"));
        std::fs::write(&path_a, a).unwrap();
        std::fs::write(&path_b, b).unwrap();
        let got = match Side::read(&path_a).and_then(|a| Ok(compare(a, Side::read(&path_b)?))) {
            Ok(comparison) => comparison.table(),
            Err(e) => e.to_string(),
        };
        let got = got.replace(&dir.path().display().to_string(), "DIR");
        assert_eq!(got.trim_end(), expect.trim_end(), "\n{got}");
    }

    const B: &str = r#"{"task_id": "T/0", "passed": true}
{"task_id": "T/1", "passed": false}
{"task_id": "T/2", "passed": true}
{"task_id": 7, "passed": false}
"#;

    #[test]
    fn results_files() {
        let a = "{\"task_id\": \"T/0\", \"passed\": false, \"result\": \"failed: \"}\n\n{\"task_id\": \"T/1\", \"passed\": true}\n{\"task_id\": \"T/2\", \"passed\": true}\n{\"task_id\": \"T/3\", \"passed\": true}\n";
        check(
            "a.jsonl",
            a,
            B,
            "                       A           B
problems               4           4
samples                4           4
solved                 3           2
pass@1            0.7500      0.5000
A           DIR/a.jsonl
B           DIR/b.jsonl
not compared: 1 problems only in A, 1 only in B

solved in B only (failed in A): 1
  T/0                                      0/1 -> 1/1

solved in A only (failed in B): 1
  T/1                                      1/1 -> 0/1",
        );
    }

    #[test]
    fn a_report_against_results() {
        let report = r#"{"benchmark": "humaneval", "per_problem": [
            {"task_id": "T/0", "n": 2, "passed": 1, "pass_at_k": {"pass@1": 0.5}},
            {"task_id": "T/1", "n": 2, "passed": 0}, {"task_id": "T/2", "n": 2, "passed": 2},
            {"task_id": "7", "n": 2, "passed": 0}]}"#;
        check(
            "report.json",
            report,
            B,
            "                       A           B
problems               4           4
samples                8           4
solved                 2           2
pass@1            0.3750      0.5000
A           DIR/report.json
B           DIR/b.jsonl

solved in B only (failed in A): 0

solved in A only (failed in B): 0",
        );
    }

    #[test]
    fn bad_files_name_the_line() {
        check(
            "a.jsonl",
            "{\"task_id\": \"T/0\", \"passed\": true}\n{\"task_id\": \"T/1\"}\n",
            B,
            "DIR/a.jsonl:2: missing field `passed` (not a results.jsonl or report.json)",
        );
        check(
            "a.jsonl",
            "{\"task_id\": \"T/0\", \"passed\": 1}\n",
            B,
            "DIR/a.jsonl:1: field `passed` must be true or false",
        );
        check("a.jsonl", "{\"passed\": true}\n", B, "DIR/a.jsonl:1: missing field `task_id`");
        check(
            "a.jsonl",
            "[1]\n",
            B,
            "DIR/a.jsonl:1: a result must be a JSON object (results.jsonl) or the file a report.json",
        );
        check(
            "a.jsonl",
            "{\"task_id\": \"T/0\", \"passed\": true}\n{oops\n",
            B,
            "DIR/a.jsonl:2: bad JSON: key must be a string at column 2",
        );
        check(
            "a.json",
            "{\"per_problem\": [{\"task_id\": \"T/0\", \"n\": 1, \"passed\": 2}]}",
            B,
            "DIR/a.json: per_problem[0]: `n` and `passed` must be counts, passed <= n",
        );
        check("a.jsonl", "\n", B, "DIR/a.jsonl: no results in it");
    }
}
