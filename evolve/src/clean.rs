//! Clean-up after each round: exact and near-duplicate removal, and decontamination against
//! benchmark problems (HumanEval, MBPP) as BigCode did it: a case-insensitive substring match of the
//! benchmark's prompts, docstrings and solutions, plus a Jaccard similarity of 5-gram shingles of at least 0.58.
use std::collections::HashMap;
use std::path::Path;

use model::jsonl::Lines;
use serde_json::Value;

use crate::minhash::{jaccard, shingles, Index, Shingles};
use crate::rules::Rejection;
use crate::{EvolveError, Result};

/// Near-duplicate threshold (Jaccard of 5-gram shingles).
pub const DEDUP_THRESHOLD: f64 = 0.7;
/// Benchmark similarity threshold.
pub const CONTAMINATION_THRESHOLD: f64 = 0.58;
/// Benchmark strings shorter than this (after normalising) are too generic to match on.
pub const MIN_NEEDLE_CHARS: usize = 24;

/// Lower case with runs of whitespace made one space.
pub fn normalize(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// The problems of one benchmark file.
#[derive(Debug, Clone)]
pub struct Benchmark {
    /// The file it came from.
    pub name: String,
    /// (task id, normalised prompt, docstring or solution).
    pub needles: Vec<(String, String)>,
    /// (task id, the problem statement) for similarity.
    pub statements: Vec<(String, String)>,
}

fn docstring(prompt: &str) -> Option<&str> {
    let quote = if prompt.contains("\"\"\"") { "\"\"\"" } else { "'''" };
    let start = prompt.find(quote)? + 3;
    let end = start + prompt[start..].find(quote)?;
    Some(&prompt[start..end])
}

/// Reads a benchmark in JSONL (gzipped or not): HumanEval lines (`task_id`, `prompt`,
/// `canonical_solution`) and MBPP lines (`task_id`, `text`, `code`) are both understood.
pub fn load_benchmark(path: &Path) -> Result<Benchmark> {
    let name = path.display().to_string();
    let mut lines = Lines::open(path).map_err(|e| EvolveError::io(path, e))?;
    let mut benchmark = Benchmark { name: name.clone(), needles: Vec::new(), statements: Vec::new() };
    while let Some(value) = lines.read::<Value>().map_err(|e| EvolveError::line(&name, e, "not JSON"))? {
        let line = lines.line();
        let bad = |message: String| EvolveError::BadLine { path: name.clone(), line, message };
        let field = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_string);
        let id = match value.get("task_id") {
            Some(Value::String(id)) => id.clone(),
            Some(other) => other.to_string(),
            None => format!("line {line}"),
        };
        let statement = field("prompt").or(field("text"));
        let Some(statement) = statement else {
            return Err(bad("neither \"prompt\" (HumanEval) nor \"text\" (MBPP)".into()));
        };
        let mut texts = vec![statement.clone()];
        texts.extend(docstring(&statement).map(str::to_string));
        texts.extend(field("canonical_solution").or(field("code")));
        for text in texts {
            let needle = normalize(&text);
            if needle.len() >= MIN_NEEDLE_CHARS {
                benchmark.needles.push((id.clone(), needle));
            }
        }
        benchmark.statements.push((id.clone(), docstring(&statement).unwrap_or(&statement).to_string()));
    }
    Ok(benchmark)
}

/// Finds benchmark text in training items.
pub struct Decontaminator {
    needles: Vec<(String, String)>,
    statements: Vec<(String, Shingles)>,
}

impl Decontaminator {
    /// Indexes the problems of the benchmarks.
    pub fn new(benchmarks: &[Benchmark]) -> Decontaminator {
        let mut statements = Vec::new();
        let mut needles = Vec::new();
        for benchmark in benchmarks {
            let file = Path::new(&benchmark.name).file_name().map(|f| f.to_string_lossy().into_owned());
            let file = file.unwrap_or_default();
            for (id, needle) in &benchmark.needles {
                needles.push((format!("{file} {id}"), needle.clone()));
            }
            for (id, statement) in &benchmark.statements {
                statements.push((format!("{file} {id}"), shingles(statement)));
            }
        }
        Decontaminator { needles, statements }
    }

    /// Why `instruction` and `response` count as contaminated, if they do.
    pub fn check(&self, instruction: &str, response: &str) -> Option<Rejection> {
        let text = normalize(&format!("{instruction}\n{response}"));
        if let Some((task, _)) = self.needles.iter().find(|(_, needle)| text.contains(needle.as_str())) {
            return Some(Rejection { reason: "contaminated", detail: format!("contains text of {task}") });
        }
        // Benchmarks hold hundreds of problems, so every one is compared exactly: the Jaccard
        // similarity that MinHash would estimate, without its misses.
        let set = shingles(instruction);
        let best = self
            .statements
            .iter()
            .map(|(task, statement)| (task, jaccard(&set, statement)))
            .filter(|(_, similarity)| *similarity >= CONTAMINATION_THRESHOLD)
            .max_by(|a, b| a.1.total_cmp(&b.1));
        best.map(|(task, similarity)| Rejection {
            reason: "contaminated",
            detail: format!("similar to {task} (jaccard {similarity:.2})"),
        })
    }
}

/// Exact and near-duplicate detection over the instructions kept so far.
pub struct Deduper {
    exact: HashMap<String, i64>,
    index: Index<(i64, i64)>,
}

impl Default for Deduper {
    fn default() -> Self {
        Deduper { exact: HashMap::new(), index: Index::new(DEDUP_THRESHOLD) }
    }
}

impl Deduper {
    /// Checks item `id` of lineage `root` against everything kept so far and keeps it if it is new.
    /// Near-duplicates are searched in other lineages only: an item's own ancestors are compared
    /// with it by the equality judge instead.
    pub fn check_and_keep(&mut self, id: i64, root: i64, question: &str) -> Option<Rejection> {
        let key = normalize(question);
        if let Some(first) = self.exact.get(&key) {
            return Some(Rejection { reason: "duplicate", detail: format!("same instruction as item {first}") });
        }
        let set: Shingles = shingles(question);
        let keys = self.index.keys(&set);
        if let Some(((other, _), similarity)) = self.index.query(&set, &keys, |(_, r)| *r != root) {
            return Some(Rejection {
                reason: "near-duplicate",
                detail: format!("near-duplicate of item {other} (jaccard {similarity:.2})"),
            });
        }
        self.exact.insert(key, id);
        self.index.insert((id, root), set, &keys);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HUMANEVAL: &str = r#"{"task_id": "HumanEval/0", "prompt": "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n    \"\"\" Check if in given list of numbers, are any two numbers closer to each other than\n    given threshold.\n    \"\"\"\n", "canonical_solution": "    for idx, elem in enumerate(numbers):\n        for idx2, elem2 in enumerate(numbers):\n            if idx != idx2:\n                distance = abs(elem - elem2)\n                if distance < threshold:\n                    return True\n\n    return False\n"}
{"task_id": 11, "text": "Write a python function to remove first and last occurrence of a given character from the string.", "code": "def remove_Occ(s,ch): \r\n    for i in range(len(s)): \r\n        if (s[i] == ch): \r\n            s = s[0 : i] + s[i + 1:] \r\n            break\r\n    return s "}
"#;

    fn check(instruction: &str, response: &str, expected: Option<&str>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench.jsonl");
        std::fs::write(&path, HUMANEVAL).unwrap();
        let decontaminator = Decontaminator::new(&[load_benchmark(&path).unwrap()]);
        let got = decontaminator.check(instruction, response).map(|r| r.detail);
        assert_eq!(got.as_deref(), expected, "{instruction:?}");
    }

    #[test]
    fn contamination() {
        check("Solve this: CHECK IF IN GIVEN LIST OF NUMBERS, are any two numbers closer to each other than\n\n given threshold. Use Rust.", "", Some("contains text of bench.jsonl HumanEval/0"));
        check("Explain this code.", "for idx, elem in enumerate(numbers):\n  for idx2, elem2 in enumerate(numbers):\n   if idx != idx2:\n    distance = abs(elem - elem2)\n    if distance < threshold:\n     return True\n return False", Some("contains text of bench.jsonl HumanEval/0"));
        check(
            "Please write a python function to remove first and last occurrence of a given character from a string.",
            "",
            Some("similar to bench.jsonl 11 (jaccard 0.69)"),
        );
        check("Write a Rust function that parses an ISO date.", "fn parse() {}", None);
    }

    #[test]
    fn bad_benchmark_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.jsonl");
        std::fs::write(&path, "{\"prompt\": \"x\"}\n{\"task_id\": 1}\n").unwrap();
        let error = load_benchmark(&path).unwrap_err().to_string();
        assert!(error.ends_with("b.jsonl:2: neither \"prompt\" (HumanEval) nor \"text\" (MBPP)"), "{error}");
    }

    #[test]
    fn dedup() {
        let mut deduper = Deduper::default();
        let base = "Write a Python function that returns the sum of all even numbers in a list of integers, ignoring negative values.";
        let check = |deduper: &mut Deduper, id, root, text: &str, expected: Option<&str>| {
            let got = deduper.check_and_keep(id, root, text);
            assert_eq!(got.as_ref().map(|r| r.reason), expected, "{text}: {got:?}");
        };
        check(&mut deduper, 1, 1, base, None);
        check(&mut deduper, 2, 2, &base.to_uppercase(), Some("duplicate"));
        check(&mut deduper, 3, 3, &format!("{base} Keep it short."), Some("near-duplicate"));
        check(&mut deduper, 4, 1, &format!("{base} Keep it short."), None);
        check(&mut deduper, 5, 5, "Implement an LRU cache in Go with O(1) get and put.", None);
    }
}
