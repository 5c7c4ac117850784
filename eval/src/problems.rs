//! Benchmarks as problems: HumanEval (and HumanEval+) and MBPP (Google's JSONL, the sanitized JSON, MBPP+),
//! each problem with its prompts, its reference solution and the program that tests a completion.
use std::path::Path;

use model::files;
use model::jsonl::Lines;
use serde_json::{Map, Value};

use crate::error::{io, line_error, EvalError, Result};

/// Which benchmark a data file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Benchmark {
    /// OpenAI's HumanEval: complete a function from its signature and docstring.
    HumanEval,
    /// Google's MBPP: write a function from a one-line description and its tests.
    Mbpp,
}

impl Benchmark {
    /// The name used on the command line and in stores.
    pub fn name(self) -> &'static str {
        match self {
            Benchmark::HumanEval => "humaneval",
            Benchmark::Mbpp => "mbpp",
        }
    }

    /// Parses `humaneval` or `mbpp`.
    pub fn parse(text: &str) -> Result<Benchmark> {
        match text.to_ascii_lowercase().as_str() {
            "humaneval" | "humaneval+" => Ok(Benchmark::HumanEval),
            "mbpp" | "mbpp+" => Ok(Benchmark::Mbpp),
            other => Err(EvalError::Invalid(format!("unknown benchmark {other:?}: use humaneval or mbpp"))),
        }
    }

    /// Stop sequences for base-model completion, as bigcode-evaluation-harness uses them.
    pub fn stop_sequences(self) -> Vec<String> {
        let stops: &[&str] = match self {
            Benchmark::HumanEval => &["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```"],
            Benchmark::Mbpp => &["\nclass", "\nassert", "\n\"\"\"", "\nprint", "\nif", "\n```"],
        };
        stops.iter().map(|s| s.to_string()).collect()
    }
}

/// How prompts are put to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptFormat {
    /// Base-model completion: the prompt as is, stop sequences applied during decoding.
    Base,
    /// WizardCoder's Alpaca template; the code is extracted from the response.
    Instruct,
}

/// One problem: what the model sees, and how its answer is tested.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The benchmark's id (MBPP's integer ids as decimal text).
    pub task_id: String,
    /// The base-model prompt; a completion is appended to it.
    pub prompt: String,
    /// The task for an instruction-following model (without the template).
    pub instruction: String,
    /// A completion that passes: HumanEval's canonical solution, MBPP's reference code.
    pub reference: String,
    /// Program text before the prompt (MBPP's test imports).
    head: String,
    /// Program text after the completion: the tests and the call that runs them.
    tests: String,
}

impl Problem {
    /// The Python program that passes if and only if `completion` solves the problem (the official
    /// harness's `prompt + completion + "\n" + test + "\n" + f"check({entry_point})"` for HumanEval).
    pub fn program(&self, completion: &str) -> String {
        [self.head.as_str(), &self.prompt, completion, &self.tests].concat()
    }

    /// The prompt for `format`.
    pub fn prompt_for(&self, format: PromptFormat) -> String {
        match format {
            PromptFormat::Base => self.prompt.clone(),
            PromptFormat::Instruct => alpaca(&self.instruction),
        }
    }
}

/// WizardCoder's Alpaca template around an instruction.
pub fn alpaca(instruction: &str) -> String {
    format!(
        "Below is an instruction that describes a task. Write a response that appropriately completes the \
         request.\n\n### Instruction:\n{instruction}\n\n### Response:"
    )
}

/// The code in an instruction model's response, as WizardCoder's post-processing extracts it: the first
/// ```python block if any, without a `__main__` block or example usage.
pub fn extract_code(response: &str) -> String {
    let mut code = response.replace('\r', "");
    if let Some(start) = code.find("```python") {
        let mut block = code[start + "```python".len()..].to_string();
        if let Some(end) = block.find("```") {
            block.truncate(end);
        }
        code = block.trim().to_string();
    }
    for marker in ["if __name__ == \"__main__\":", "# Example usage"] {
        if let Some(at) = code.find(marker) {
            code = code[..at].trim().to_string();
        }
    }
    code
}

/// Which problems to load.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// MBPP: keep every task instead of the test split (task ids 11–510).
    pub all_tasks: bool,
}

/// Reads a benchmark file: JSONL (optionally gzipped) or, for sanitized MBPP, one JSON array.
pub fn load(benchmark: Benchmark, path: &Path, options: LoadOptions) -> Result<Vec<Problem>> {
    let text = read_text(path)?;
    let records: Vec<(usize, Value)> = if text.trim_start().starts_with('[') {
        let array: Vec<Value> = serde_json::from_str(&text).map_err(|e| EvalError::Line {
            path: path.into(),
            line: e.line(),
            message: e.to_string(),
        })?;
        array.into_iter().enumerate().map(|(i, v)| (i + 1, v)).collect()
    } else {
        let mut lines = Lines::new(text.as_bytes());
        let mut records = Vec::new();
        while let Some(value) = lines.read().map_err(line_error(path))? {
            records.push((lines.line(), value));
        }
        records
    };
    let mut problems = Vec::with_capacity(records.len());
    let mut seen = std::collections::HashSet::new();
    for (line, record) in records {
        let error = |message: String| EvalError::Line { path: path.into(), line, message };
        let Value::Object(record) = record else {
            return Err(error("a problem must be a JSON object".into()));
        };
        let problem = match benchmark {
            Benchmark::HumanEval => human_eval(&record).map_err(error)?,
            Benchmark::Mbpp => match mbpp(&record, options).map_err(error)? {
                Some(problem) => problem,
                None => continue,
            },
        };
        if !seen.insert(problem.task_id.clone()) {
            return Err(error(format!("task_id {:?} appears twice", problem.task_id)));
        }
        problems.push(problem);
    }
    if problems.is_empty() {
        return Err(EvalError::File { path: path.into(), message: format!("no {} problems in it", benchmark.name()) });
    }
    Ok(problems)
}

/// The file's text, gzip undone.
fn read_text(path: &Path) -> Result<String> {
    let bytes = files::read(path).map_err(io(path))?;
    String::from_utf8(bytes).map_err(|e| EvalError::File { path: path.into(), message: format!("not UTF-8: {e}") })
}

fn text_field<'a>(record: &'a Map<String, Value>, name: &str) -> Result<&'a str, String> {
    match record.get(name) {
        Some(Value::String(text)) => Ok(text),
        Some(_) => Err(format!("field `{name}` must be a string")),
        None => Err(format!("missing field `{name}`")),
    }
}

/// A task id as text: strings as they are, integers in decimal.
pub(crate) fn task_id(value: Option<&Value>) -> Result<String, String> {
    match value {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Number(number)) if number.is_u64() => Ok(number.to_string()),
        Some(_) => Err("field `task_id` must be a string or a non-negative integer".into()),
        None => Err("missing field `task_id`".into()),
    }
}

fn human_eval(record: &Map<String, Value>) -> Result<Problem, String> {
    if record.contains_key("test_list") {
        return Err("this is an MBPP problem (it has `test_list`); use --benchmark mbpp".into());
    }
    let prompt = text_field(record, "prompt")?;
    let entry_point = text_field(record, "entry_point")?;
    let test = text_field(record, "test")?;
    Ok(Problem {
        task_id: task_id(record.get("task_id"))?,
        prompt: prompt.to_string(),
        instruction: format!("Create a Python script for this problem:\n{prompt}"),
        reference: record.get("canonical_solution").and_then(Value::as_str).unwrap_or_default().to_string(),
        head: String::new(),
        tests: format!("\n{test}\ncheck({entry_point})"),
    })
}

fn strings(record: &Map<String, Value>, name: &str) -> Result<Vec<String>, String> {
    match record.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_string).ok_or_else(|| format!("`{name}` must hold strings")))
            .collect(),
        Some(_) => Err(format!("field `{name}` must be a list of strings")),
    }
}

/// An MBPP problem in Google's format (`text`, `code`, `test_list`, `test_setup_code`), the sanitized
/// format (`prompt`, `code`, `test_imports`, `test_list`) or MBPP+ (`test` besides). `None` when the task
/// is outside the test split.
fn mbpp(record: &Map<String, Value>, options: LoadOptions) -> Result<Option<Problem>, String> {
    if !record.contains_key("test_list") {
        return Err(if record.contains_key("entry_point") {
            "this is a HumanEval problem (no `test_list`); use --benchmark humaneval".into()
        } else {
            "missing field `test_list` (an MBPP problem has text or prompt, code and test_list)".into()
        });
    }
    let id = task_id(record.get("task_id"))?;
    if let Ok(number) = id.parse::<u64>() {
        if !options.all_tasks && !(11..=510).contains(&number) {
            return Ok(None);
        }
    }
    let description = text_field(record, "text").or_else(|_| text_field(record, "prompt"))?;
    let tests = strings(record, "test_list")?;
    let first = tests.first().ok_or("`test_list` is empty")?;
    let imports = strings(record, "test_imports")?;
    let setup = record.get("test_setup_code").and_then(Value::as_str).unwrap_or_default();
    let mut tail = format!("\n{setup}\n{}\n", tests.join("\n"));
    // MBPP+ (EvalPlus): more tests in `test`, maybe as a `check` function.
    if let Some(extra) = record.get("test").and_then(Value::as_str).filter(|t| !t.trim().is_empty()) {
        tail.push_str(extra);
        tail.push('\n');
        if let (true, Some(entry)) = (extra.contains("def check("), record.get("entry_point").and_then(Value::as_str)) {
            tail.push_str(&format!("check({entry})\n"));
        }
    }
    let head = if imports.is_empty() { String::new() } else { format!("{}\n", imports.join("\n")) };
    Ok(Some(Problem {
        task_id: id,
        prompt: format!("\"\"\"\n{description}\n{first}\n\"\"\"\n"),
        instruction: format!("{description}\nYour code should pass these tests:\n\n{}", tests.join("\n")),
        reference: text_field(record, "code").unwrap_or_default().replace("\r\n", "\n"),
        head,
        tests: tail,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads `text` as `benchmark` and renders each problem's prompt and reference program, or the error.
    fn check(benchmark: Benchmark, text: &str, all_tasks: bool, expect: &str) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.jsonl");
        std::fs::write(&path, text).unwrap();
        let got = match load(benchmark, &path, LoadOptions { all_tasks }) {
            Ok(problems) => problems
                .iter()
                .map(|p| format!("[{}]\n{}", p.task_id, p.program(&p.reference)))
                .collect::<Vec<_>>()
                .join("\n---\n"),
            Err(e) => e.to_string().replace(&path.display().to_string(), "FILE"),
        };
        assert_eq!(got.trim(), expect.trim(), "\n{got}");
    }

    #[test]
    fn human_eval_program_is_the_official_concatenation() {
        check(
            Benchmark::HumanEval,
            r#"{"task_id": "T/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n", "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}"#,
            false,
            "[T/0]\ndef f():\n    return 1\n\ndef check(c):\n    assert c() == 1\n\ncheck(f)",
        );
    }

    #[test]
    fn mbpp_google_format_test_split_and_setup() {
        let text = [
            r#"{"task_id": 5, "text": "skip me", "code": "x", "test_list": ["assert 1"], "test_setup_code": "", "challenge_test_list": []}"#,
            r#"{"task_id": 11, "text": "Add one.", "code": "def add(x):\r\n  return x + 1", "test_list": ["assert add(1) == 2", "assert add(2) == 3"], "test_setup_code": "import math", "challenge_test_list": []}"#,
        ]
        .join("\n");
        check(
            Benchmark::Mbpp,
            &text,
            false,
            "[11]\n\"\"\"\nAdd one.\nassert add(1) == 2\n\"\"\"\ndef add(x):\n  return x + 1\nimport math\nassert add(1) == 2\nassert add(2) == 3",
        );
        check(Benchmark::Mbpp, &text, true, "[5]\n\"\"\"\nskip me\nassert 1\n\"\"\"\nx\n\nassert 1\n\n---\n[11]\n\"\"\"\nAdd one.\nassert add(1) == 2\n\"\"\"\ndef add(x):\n  return x + 1\nimport math\nassert add(1) == 2\nassert add(2) == 3");
    }

    #[test]
    fn mbpp_sanitized_json_array() {
        check(
            Benchmark::Mbpp,
            r#"[{"source_file": "x", "task_id": 12, "prompt": "Square it.", "code": "def sq(x):\n    return x * x", "test_imports": ["import math"], "test_list": ["assert sq(3) == 9"]}]"#,
            false,
            "[12]\nimport math\n\"\"\"\nSquare it.\nassert sq(3) == 9\n\"\"\"\ndef sq(x):\n    return x * x\n\nassert sq(3) == 9",
        );
    }

    #[test]
    fn wrong_format_errors_name_the_line() {
        let human = r#"{"task_id": "T/0", "prompt": "p", "test": "t", "entry_point": "f"}"#;
        let mbpp = r#"{"task_id": 11, "text": "t", "code": "c", "test_list": ["assert 1"]}"#;
        check(
            Benchmark::Mbpp,
            human,
            false,
            "FILE:1: this is a HumanEval problem (no `test_list`); use --benchmark humaneval",
        );
        check(
            Benchmark::HumanEval,
            mbpp,
            false,
            "FILE:1: this is an MBPP problem (it has `test_list`); use --benchmark mbpp",
        );
        check(
            Benchmark::HumanEval,
            &format!("{human}\n\n{{oops"),
            false,
            "FILE:3: bad JSON: key must be a string at column 2",
        );
        check(
            Benchmark::HumanEval,
            r#"{"task_id": "a", "prompt": "p", "test": "t"}"#,
            false,
            "FILE:1: missing field `entry_point`",
        );
        check(Benchmark::HumanEval, &format!("{human}\n{human}"), false, "FILE:2: task_id \"T/0\" appears twice");
        check(Benchmark::HumanEval, "\n", false, "FILE: no humaneval problems in it");
    }

    #[test]
    fn instruct_code_extraction() {
        let response = "Here you go:\n```python\ndef f():\n    return 1\n\nif __name__ == \"__main__\":\n    print(f())\n```\nDone.";
        assert_eq!(extract_code(response), "def f():\n    return 1");
        assert_eq!(extract_code("def g():\n    pass\n# Example usage\ng()"), "def g():\n    pass");
        assert!(alpaca("Do it.").ends_with("### Instruction:\nDo it.\n\n### Response:"));
    }
}
