//! `wizard generate` as a user runs it: a tokenizer trained by `wizard tokenizer train`, a random
//! GPTBigCode made by `transformers`, and our completion compared with `transformers`' own.
mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use common::{check_failure, stdout_of, Shape};

const HF_GREEDY: &str = r#"
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
directory, prompt, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(directory)
model = AutoModelForCausalLM.from_pretrained(directory).eval()
ids = tokenizer(prompt, return_tensors="pt").input_ids
out = model.generate(ids, do_sample=False, max_new_tokens=new, eos_token_id=0, pad_token_id=0)[0, ids.shape[1]:].tolist()
while out and out[-1] == 0:
    out.pop()
sys.stdout.write(tokenizer.decode(out, skip_special_tokens=False, clean_up_tokenization_spaces=False))
"#;

/// A model directory shared by the tests: our tokenizer plus a random transformers model.
fn model_dir() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let work = tempfile::tempdir().unwrap();
        let code: String = (0..200)
            .map(|i| {
                format!(
                    "def function_{i}(value):\n    if value > {i}:\n        return value * {i}\n    return None\n\n"
                )
            })
            .collect();
        let shape = Shape { n_positions: 96, n_embd: 64, n_layer: 2, n_head: 4 };
        let model = common::tiny_model(work.path(), &code, 400, shape);
        (work, model)
    })
    .1
}

fn generate(args: &[&str]) -> Output {
    generate_with(args, &[])
}

fn generate_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = common::wizard_command(&["generate", "--model"]);
    command.arg(model_dir()).args(args).envs(env.iter().copied()).output().unwrap()
}

/// Runs `wizard generate` and returns stdout, asserting success.
fn check(args: &[&str]) -> String {
    stdout_of(&generate(args), args)
}

/// What `transformers` generates greedily after `prompt`.
fn transformers_greedy(prompt: &str, new_tokens: usize) -> String {
    let new_tokens = new_tokens.to_string();
    common::python(HF_GREEDY, &[model_dir().as_os_str(), OsStr::new(prompt), OsStr::new(&new_tokens)])
}

const PROMPT: &str = "def function_7(value):\n";

#[test]
fn greedy_completion_equals_transformers() {
    let ours = check(&["--prompt", PROMPT, "--max-new-tokens", "40", "--temperature", "0"]);
    assert!(!ours.is_empty(), "an empty completion");
    assert_eq!(ours, transformers_greedy(PROMPT, 40));
}

#[test]
fn speculative_decoding_gives_the_same_greedy_completion() {
    let plain = check(&["--prompt", PROMPT, "--max-new-tokens", "40"]);
    let model = model_dir().to_str().unwrap();
    assert_eq!(check(&["--prompt", PROMPT, "--max-new-tokens", "40", "--draft", model]), plain);
    assert_eq!(check(&["--prompt", PROMPT, "--max-new-tokens", "40", "--prompt-lookup"]), plain);
    // Self-speculation: the target's own int8 or int4 copy drafts; the output is still the fp32 target's.
    for draft in ["int8", "int4"] {
        let self_drafted = ["--prompt", PROMPT, "--max-new-tokens", "40", "--draft", model, "--draft-dtype", draft];
        assert_eq!(check(&self_drafted), plain, "{draft} drafting");
    }
    // Drafts of a fixed length, as long as a verification pass may be: the same bits at any width.
    for gamma in ["1", "63"] {
        let fixed = ["--prompt", PROMPT, "--max-new-tokens", "40", "--draft", model, "--gamma", gamma];
        assert_eq!(check(&fixed), plain, "--gamma {gamma}");
    }
}

#[test]
fn prompt_file_and_stop_sequences() {
    let full = check(&["--prompt", PROMPT, "--max-new-tokens", "40"]);
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 8, "{full:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let expected = &full[..full.find(&stop).unwrap()];
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), PROMPT).unwrap();
    let stopped = check(&["--prompt-file", file.path().to_str().unwrap(), "--max-new-tokens", "40", "--stop", &stop]);
    assert_eq!(stopped, expected, "stop {stop:?}");
}

/// Asking for more tokens than the context holds stops at the context, and says so, on every path,
/// however many are asked for (counts near the integer limits once overflowed into a panic or a
/// speculative cache of a few positions).
#[test]
fn a_full_context_is_reported() {
    let mut stopped_at = Vec::new();
    let self_draft = ["--draft", model_dir().to_str().unwrap(), "--draft-dtype", "int8"];
    for asked in ["500", "9223372036854775807", "18446744073709551615"] {
        for path in [&[][..], &["--prompt-lookup"], &self_draft] {
            let output = generate(&[&["--prompt", PROMPT, "--max-new-tokens", asked][..], path].concat());
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(output.status.success(), "{asked} {path:?}: {stderr}");
            let full = format!("of the {asked} new tokens asked for: the model's context (n_positions = 96) is full");
            assert!(stderr.contains(&full), "{asked} {path:?}: {stderr}");
            let count = stderr.split("stopped after ").nth(1).and_then(|rest| rest.split(' ').next());
            stopped_at.push((count.unwrap_or_default().to_string(), asked, path));
        }
    }
    assert!(stopped_at.iter().all(|(count, ..)| *count == stopped_at[0].0), "{stopped_at:?}");
}

/// On a CPU without the instructions a kernel wants (`WIZARD_CPU_MAX` caps them, as such a CPU
/// would) the slower kernel runs and says so once, however many models load; every int8 and int4
/// kernel sums in the same order, so the output is the same.
#[test]
fn kernels_fall_back_where_the_cpu_lacks_instructions() {
    let model = model_dir().to_str().unwrap();
    let prompt = ["--prompt", PROMPT, "--max-new-tokens"];
    let int8 = [&prompt[..], &["12", "--dtype", "int8", "--draft", model, "--draft-dtype", "int8"]].concat();
    let int4 = [&prompt[..], &["12", "--dtype", "int4", "--draft", model, "--draft-dtype", "int4"]].concat();
    let bf16 = [&prompt[..], &["4", "--dtype", "bfloat16"]].concat();
    let fp32 = [&prompt[..], &["4"]].concat();
    let (widest, widest_int4) = (check(&int8), check(&int4));
    let cases = [
        ("scalar", &int8, "int8/int4 weights: this CPU has no AVX2, so portable code runs"),
        (
            "avx2",
            &int8,
            "int8/int4 weights: this CPU has no AVX-512 VNNI, so the AVX2 kernel runs (slower) (WIZARD_CPU_MAX=avx2)",
        ),
        ("scalar", &int4, "int8/int4 weights: this CPU has no AVX2, so portable code runs"),
        ("avx2", &int4, "int8/int4 weights: this CPU has no AVX-512 VNNI, so the AVX2 kernel runs"),
        ("avx2", &bf16, "bf16 weights: this CPU has no AVX-512 BF16"),
        ("scalar", &fp32, "dense products go to libtorch (BLAS)"),
        ("sse9", &fp32, "WIZARD_CPU_MAX=sse9 is ignored"),
    ];
    for (cap, args, expected) in cases {
        let output = generate_with(args, &[("WIZARD_CPU_MAX", cap)]);
        let stdout = stdout_of(&output, (cap, args));
        let stderr = common::text(&output.stderr);
        assert_eq!(stderr.matches(expected).count(), 1, "{cap} {args:?}: {stderr}");
        if *args == int8 {
            assert_eq!(stdout, widest, "{cap}");
        }
        if *args == int4 {
            assert_eq!(stdout, widest_int4, "{cap}");
        }
    }
}

#[test]
fn seeds_make_sampling_reproducible() {
    let sample = |seed: &str| {
        check(&[
            "--prompt",
            PROMPT,
            "--temperature",
            "1.0",
            "--top-p",
            "0.95",
            "--max-new-tokens",
            "30",
            "--seed",
            seed,
        ])
    };
    assert_eq!(sample("7"), sample("7"));
    assert_ne!(sample("7"), sample("8"));
    let top_k_1 = check(&["--prompt", PROMPT, "--temperature", "1.0", "--top-k", "1", "--max-new-tokens", "30"]);
    assert_eq!(top_k_1, check(&["--prompt", PROMPT, "--max-new-tokens", "30"]), "top-k 1 is greedy");
}

#[test]
fn bad_requests_are_clear_errors() {
    let cases: [(&[&str], &str); 7] = [
        (&["--prompt", "x", "--prompt-lookup", "--gamma", "64"], "64 is not in 1..=63"),
        (&["--prompt", "x", "--gamma", "4"], "--gamma needs --draft or --prompt-lookup"),
        (&["--prompt", &"x = 1\n".repeat(60)], "n_positions"),
        (&["--prompt", "x", "--top-p", "1.5"], "top-p must be in (0, 1]"),
        (&["--prompt", "x", "--device", "tpu"], "--device \"tpu\""),
        (
            &["--prompt", "x", "--dtype", "int3"],
            "unknown dtype `int3`: use float32 (fp32), bfloat16 (bf16), float16 (fp16), int8 or int4",
        ),
        (&["--prompt-file", "/nonexistent/prompt.txt"], "/nonexistent/prompt.txt"),
    ];
    for (args, expected) in cases {
        let output = generate(args);
        check_failure(&output, args, &[expected]);
        assert_eq!(common::text(&output.stdout), "", "{args:?}");
    }
    let output = common::wizard(&["generate", "--model", "/nonexistent/model", "--prompt", "x"]);
    check_failure(&output, "--model /nonexistent/model", &["/nonexistent/model/tokenizer.json"]);
    let weights = model_dir().join("model.safetensors");
    let output = common::wizard(&["generate", "--model", weights.to_str().unwrap(), "--prompt", "x"]);
    check_failure(&output, "--model FILE", &[&format!("{}: a file, where a model directory", weights.display())]);
    // A draft whose tokenizer numbers tokens otherwise (its vocabulary the same size), and one
    // whose vocabulary is another size.
    let work = tempfile::tempdir().unwrap();
    let shape = Shape { n_positions: 96, n_embd: 32, n_layer: 1, n_head: 2 };
    for dir in ["a", "b"] {
        std::fs::create_dir(work.path().join(dir)).unwrap();
    }
    let other_numbering = common::tiny_model(&work.path().join("a"), &"class Zq:\n    pass\n".repeat(50), 400, shape);
    let output = generate(&["--prompt", "x", "--draft", other_numbering.to_str().unwrap()]);
    let named = format!("--draft {}: a draft must share the model's tokenizer, and `", other_numbering.display());
    check_failure(&output, "--draft with another tokenizer", &[&named, "tokenizer.json"]);
    let smaller = common::tiny_model(&work.path().join("b"), &"def f(x):\n    return x\n".repeat(50), 300, shape);
    std::fs::remove_file(smaller.join("tokenizer.json")).unwrap();
    let output = generate(&["--prompt", "x", "--draft", smaller.to_str().unwrap()]);
    let named = format!("--draft {}: the draft model's vocabulary (", smaller.display());
    check_failure(&output, "--draft", &[&named, "differs from the target's (400)"]);
}

/// Sampling settings mean the same on every path: what plain generation refuses, speculative
/// decoding (draft model or prompt lookup) refuses with the same message, before loading anything.
#[test]
fn bad_sampling_is_refused_on_every_path() {
    let model = model_dir().to_str().unwrap();
    let paths: [&[&str]; 3] = [&[], &["--prompt-lookup"], &["--draft", model]];
    let cases: [(&[&str], &str); 5] = [
        (&["--top-k", "0"], "top-k must be at least 1"),
        (&["--top-p", "0"], "top-p must be in (0, 1], got 0"),
        (&["--top-p", "1.5"], "top-p must be in (0, 1], got 1.5"),
        (&["--top-p", "nan"], "top-p must be in (0, 1], got NaN"),
        (&["--temperature=-1"], "temperature must be >= 0"),
    ];
    for path in paths {
        for (setting, expected) in cases {
            let args: Vec<&str> = ["--prompt", PROMPT].iter().chain(setting).chain(path).copied().collect();
            let output = generate(&args);
            check_failure(&output, &args, &[expected]);
            assert_eq!(common::text(&output.stdout), "", "{args:?}");
        }
    }
}

/// `wizard quantize` writes an int8 or int4 directory, with each layer's error, that generates what
/// quantizing at load generates; a directory is loaded in its own format only (the default without
/// `--dtype`), and quantize writes
/// quantized formats only.
#[test]
fn quantized_directories_generate_as_quantizing_at_load_does() {
    let work = tempfile::tempdir().unwrap();
    let model = model_dir().to_str().unwrap();
    for (format, other) in [("int8", "int4"), ("int4", "int8")] {
        let out = work.path().join(format);
        let out_text = out.to_str().unwrap();
        let output = common::wizard(&["quantize", "--model", model, "--dtype", format, "--out", out_text]);
        let report = stdout_of(&output, format);
        let rows: Vec<&str> =
            report.lines().filter(|line| line.starts_with("transformer.h.") || line.starts_with("lm_head")).collect();
        assert_eq!(rows.len(), 2 * 4 + 1, "{report}");
        for row in rows {
            let relative: f64 = row.split_whitespace().rev().nth(1).unwrap().parse().unwrap();
            // int4's 16 levels a block leave about 10% of a random layer's norm; int8's under 1%.
            let bound = if format == "int4" { 0.15 } else { 0.01 };
            assert!(relative > 0.0 && relative < bound, "{format}: {row}");
        }
        let args = ["--prompt", PROMPT, "--max-new-tokens", "20", "--dtype", format];
        let at_load = check(&args);
        let mut command = common::wizard_command(&["generate", "--model"]);
        let saved = command.arg(&out).args(args).output().unwrap();
        assert_eq!(stdout_of(&saved, format), at_load, "{format}");
        // Without --dtype the directory loads in the format it holds.
        let mut command = common::wizard_command(&["generate", "--model"]);
        let own = command.arg(&out).args(&args[..4]).output().unwrap();
        assert_eq!(stdout_of(&own, format), at_load, "{format} without --dtype");
        // As a draft it drafts in that format too; the output stays the fp32 target's.
        let mut command = common::wizard_command(&["generate", "--model", model, "--draft"]);
        let drafted = command.arg(&out).args(&args[..4]).output().unwrap();
        assert_eq!(stdout_of(&drafted, format), check(&args[..4]), "{format} drafting");
        // So it does beside a target's own --dtype (--draft-dtype alone names the draft's).
        let mut command = common::wizard_command(&["generate", "--model", model, "--dtype", "float32", "--draft"]);
        let drafted = command.arg(&out).args(&args[..4]).output().unwrap();
        assert_eq!(stdout_of(&drafted, format), check(&args[..4]), "{format} drafting for --dtype float32");
        let mut command = common::wizard_command(&["generate", "--model"]);
        let wrong = command.arg(&out).args(["--prompt", PROMPT, "--dtype", other]).output().unwrap();
        check_failure(&wrong, other, &[&format!("holds {format} weights"), &format!("load it as {format}")]);
    }
    let out = work.path().join("fp32").to_str().unwrap().to_string();
    let output = common::wizard(&["quantize", "--model", model, "--dtype", "float32", "--out", &out]);
    check_failure(&output, "float32", &["--dtype float32: wizard quantize writes int8 or int4"]);
    // A quantized directory is not quantized again (its fp32 weights are gone).
    let int8 = work.path().join("int8").to_str().unwrap().to_string();
    let again = work.path().join("again").to_str().unwrap().to_string();
    let output = common::wizard(&["quantize", "--model", &int8, "--dtype", "int8", "--out", &again]);
    check_failure(&output, "int8 again", &["already holds int8 weights"]);
    // The model directory by other spellings is refused, and left as it was.
    let copy = work.path().join("model");
    std::fs::create_dir(&copy).unwrap();
    for entry in std::fs::read_dir(model).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    let weights = std::fs::read(copy.join("model.safetensors")).unwrap();
    let link = work.path().join("link");
    std::os::unix::fs::symlink(&copy, &link).unwrap();
    for out in [format!("{}/", copy.display()), format!("{}/./", copy.display()), link.display().to_string()] {
        let output = common::wizard(&["quantize", "--model", copy.to_str().unwrap(), "--dtype", "int8", "--out", &out]);
        check_failure(&output, &out, &["is the model directory"]);
    }
    // So is one that only resolves to it once made, and what was made for it is removed.
    let through_new = format!("{}/new/..", copy.display());
    let output =
        common::wizard(&["quantize", "--model", copy.to_str().unwrap(), "--dtype", "int8", "--out", &through_new]);
    check_failure(&output, &through_new, &["is the model directory"]);
    assert!(!copy.join("new").exists(), "the directory made for --out was left");
    assert!(std::fs::read(copy.join("model.safetensors")).unwrap() == weights, "the model directory changed");
    // Another model's directory is not written over; an earlier quantized copy is.
    let output = common::wizard(&["quantize", "--model", model, "--dtype", "int8", "--out", copy.to_str().unwrap()]);
    check_failure(&output, "another model", &["holds files and is not an earlier quantized copy"]);
    assert!(std::fs::read(copy.join("model.safetensors")).unwrap() == weights, "another model's directory changed");
    let output = common::wizard(&["quantize", "--model", model, "--dtype", "int4", "--out", &int8]);
    stdout_of(&output, "into an earlier quantized copy");
    let config = std::fs::read_to_string(Path::new(&int8).join("config.json")).unwrap();
    assert!(config.contains("wizard_int4"), "{config}");
    // A FIFO among the carried files is refused, not waited on, and the new --out is removed.
    let piped = work.path().join("piped");
    std::fs::create_dir(&piped).unwrap();
    for entry in std::fs::read_dir(model).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), piped.join(entry.file_name())).unwrap();
    }
    let fifo = piped.join("special_tokens_map.json");
    let _ = std::fs::remove_file(&fifo);
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let fresh = work.path().join("fresh");
    let output = common::wizard(&["quantize", "--model", piped.to_str().unwrap(), "--out", fresh.to_str().unwrap()]);
    check_failure(&output, "a FIFO", &["special_tokens_map.json: not a regular file"]);
    assert!(!fresh.exists(), "the --out made for the failed run was left");
    // An earlier quantized copy's files are replaced, not written through: a hard link to the
    // source's tokenizer, a symbolic link to another file.
    let linked = work.path().join("linked");
    let output = common::wizard(&["quantize", "--model", copy.to_str().unwrap(), "--out", linked.to_str().unwrap()]);
    stdout_of(&output, "a first copy");
    std::fs::remove_file(linked.join("tokenizer.json")).unwrap();
    std::fs::hard_link(copy.join("tokenizer.json"), linked.join("tokenizer.json")).unwrap();
    let elsewhere = work.path().join("elsewhere.txt");
    std::fs::write(&elsewhere, "kept").unwrap();
    let _ = std::fs::remove_file(linked.join("tokenizer_config.json"));
    std::os::unix::fs::symlink(&elsewhere, linked.join("tokenizer_config.json")).unwrap();
    let tokenizer = std::fs::read(copy.join("tokenizer.json")).unwrap();
    let output = common::wizard(&["quantize", "--model", copy.to_str().unwrap(), "--out", linked.to_str().unwrap()]);
    stdout_of(&output, "quantize into links");
    assert!(std::fs::read(copy.join("tokenizer.json")).unwrap() == tokenizer, "the source's tokenizer changed");
    assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "kept");
    assert!(std::fs::read(linked.join("tokenizer.json")).unwrap() == tokenizer);
    let mut command = common::wizard_command(&["generate", "--model"]);
    let from_links = command.arg(&linked).args(["--prompt", PROMPT, "--max-new-tokens", "20"]).output().unwrap();
    assert_eq!(
        stdout_of(&from_links, "linked"),
        check(&["--prompt", PROMPT, "--max-new-tokens", "20", "--dtype", "int8"])
    );
    let file = work.path().join("a-file");
    std::fs::write(&file, "kept").unwrap();
    let output = common::wizard(&["quantize", "--model", model, "--dtype", "int8", "--out", file.to_str().unwrap()]);
    check_failure(&output, "a file", &["exists and is not a directory"]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "kept");
    // A directory of other files is not written into; a failed run removes only what it made
    // (`missing/..` made `missing`, not the directory it leads back to).
    let notes = work.path().join("notes");
    std::fs::create_dir(&notes).unwrap();
    std::fs::write(notes.join("tokenizer_config.json"), "mine").unwrap();
    let output = common::wizard(&["quantize", "--model", model, "--out", notes.to_str().unwrap()]);
    check_failure(&output, "a directory of other files", &["holds files and is not an earlier quantized copy"]);
    assert_eq!(std::fs::read_to_string(notes.join("tokenizer_config.json")).unwrap(), "mine");
    let kept = work.path().join("kept");
    std::fs::create_dir(&kept).unwrap();
    let through = format!("{}/missing/../kept/new", work.path().display());
    let output = common::wizard(&["quantize", "--model", "/nonexistent/model", "--out", &through]);
    check_failure(&output, "a missing model", &["--model /nonexistent/model"]);
    assert!(kept.is_dir() && !kept.join("new").exists() && !work.path().join("missing").exists());
}
