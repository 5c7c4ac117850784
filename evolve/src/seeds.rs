//! Seed instructions in Code Alpaca JSONL form: `{"instruction", "input"?, "output"?}` per line.
use std::path::Path;

use model::jsonl::Lines;
use serde::Deserialize;

use crate::{EvolveError, Result};

/// The seed set shipped with wizard: varied programming tasks written for this project.
pub const DEFAULT_SEEDS: &str = include_str!("../data/seeds.jsonl");

/// One seed task.
#[derive(Debug, Clone, PartialEq)]
pub struct Seed {
    /// The task.
    pub instruction: String,
    /// Extra input for the task (empty when none).
    pub input: String,
    /// A reference answer; when absent the backend answers the seed in round 0.
    pub output: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    instruction: String,
    #[serde(default)]
    input: Option<String>,
    #[serde(default)]
    output: Option<String>,
}

/// Parses JSONL seeds; blank lines are skipped and errors name the 1-based line.
pub fn parse(text: &str, source: &str) -> Result<Vec<Seed>> {
    let mut lines = Lines::new(text.as_bytes());
    let mut seeds = Vec::new();
    while let Some(line) = lines.read::<Line>().map_err(|e| EvolveError::line(source, e, "not a seed object"))? {
        if line.instruction.trim().is_empty() {
            let message = "empty \"instruction\"".into();
            return Err(EvolveError::BadLine { path: source.to_string(), line: lines.line(), message });
        }
        seeds.push(Seed {
            instruction: line.instruction.trim().to_string(),
            input: line.input.unwrap_or_default().trim().to_string(),
            output: line.output.filter(|o| !o.trim().is_empty()),
        });
    }
    if seeds.is_empty() {
        return Err(EvolveError::Invalid(format!("{source}: no seeds")));
    }
    Ok(seeds)
}

/// Reads seeds from a file, or the shipped set when `path` is `None`.
pub fn load(path: Option<&Path>) -> Result<Vec<Seed>> {
    match path {
        None => parse(DEFAULT_SEEDS, "<shipped seeds>"),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| EvolveError::io(path, e))?;
            parse(&text, &path.display().to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: std::result::Result<usize, &str>) {
        match (parse(text, "seeds.jsonl"), expected) {
            (Ok(seeds), Ok(n)) => assert_eq!(seeds.len(), n, "{text:?}"),
            (Err(error), Err(message)) => assert_eq!(error.to_string(), message, "{text:?}"),
            (got, want) => panic!("{text:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn seed_lines() {
        check("{\"instruction\": \"a\"}\n\n{\"instruction\": \"b\", \"input\": \"x\", \"output\": \"y\"}\n", Ok(2));
        check(
            "{\"instruction\": \"a\"}\n{\"instruction\": \"b\"\n",
            Err("seeds.jsonl:2: not a seed object: EOF while parsing an object at column 19"),
        );
        check("\n{\"instruction\": \"  \"}", Err("seeds.jsonl:2: empty \"instruction\""));
        check("{\"instruction\": \"a\", \"answer\": 1}", Err("seeds.jsonl:1: not a seed object: unknown field `answer`, expected one of `instruction`, `input`, `output` at column 29"));
        check("\n\n", Err("seeds.jsonl: no seeds"));
    }

    #[test]
    fn shipped_seeds_are_many_and_distinct() {
        let seeds = load(None).unwrap();
        assert!(seeds.len() >= 60, "{}", seeds.len());
        let distinct: std::collections::HashSet<_> = seeds.iter().map(|s| &s.instruction).collect();
        assert_eq!(distinct.len(), seeds.len());
    }
}
