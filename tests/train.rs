//! `wizard train` end to end: ZeRO stages over 2 Gloo ranks against one process, kill -9 and
//! resume, fine-tuning a `transformers` checkpoint whose result `transformers` loads, bad input.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::{check_failure, stdout_of, wait_until, Shape, WIZARD};
use serde_json::Value;

/// A corpus, a tokenizer trained on it, and a dropout-free tiny model config.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let fixture = Fixture { dir: tempfile::tempdir().unwrap() };
        let corpus = fixture.path("corpus");
        std::fs::create_dir(&corpus).unwrap();
        for i in 0..20 {
            let code: String =
                (0..15).map(|j| format!("def f_{i}_{j}(x):\n    return x * {j} + {i}\n\n")).collect();
            std::fs::write(corpus.join(format!("m{i}.py")), code).unwrap();
        }
        let sft: String = (0..40)
            .map(|i| {
                serde_json::json!({"instruction": format!("Write f_{i}."), "output": format!("def f_{i}(x):\n    return x + {i}\n")})
                    .to_string()
                    + "\n"
            })
            .collect();
        std::fs::write(fixture.path("sft.jsonl"), sft).unwrap();
        common::train_tokenizer(&corpus, 400, &fixture.path("tok"));
        std::fs::write(
            fixture.path("config.json"),
            r#"{"model_type":"gpt_bigcode","vocab_size":400,"n_positions":128,"n_embd":64,"n_layer":2,"n_head":4,
                "embd_pdrop":0.0,"attn_pdrop":0.0,"resid_pdrop":0.0,"bos_token_id":0,"eos_token_id":0}"#,
        )
        .unwrap();
        fixture
    })
}

/// `wizard train` arguments for the fixture's config, tokenizer and corpus at `--seq-len 64`,
/// writing to `out`, followed by `extra`.
fn train_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let f = fixture();
    let mut args = vec!["train".to_string()];
    for (flag, path) in
        [("--model-config", f.path("config.json")), ("--tokenizer", f.path("tok")), ("--data", f.path("corpus"))]
    {
        args.extend([flag.to_string(), path.to_str().unwrap().to_string()]);
    }
    args.extend(["--out", out.to_str().unwrap(), "--seq-len", "64"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Replaces the value that follows `flag` in `args`.
fn set_flag(args: &mut [String], flag: &str, value: impl AsRef<std::ffi::OsStr>) {
    let at = args.iter().position(|a| a == flag).unwrap() + 1;
    args[at] = value.as_ref().to_str().unwrap().to_string();
}

/// `wizard train` on the fixture with `extra` flags into `out`; returns the output, asserting success.
fn check_train(out: &Path, extra: &[&str]) -> Output {
    let output = common::wizard(&train_args(out, extra));
    stdout_of(&output, extra);
    output
}

fn params(checkpoint: &Path) -> Vec<f64> {
    let mut tensors = tch::Tensor::read_safetensors(checkpoint.join("model.safetensors")).unwrap();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
        .iter()
        .flat_map(|(_, t)| Vec::<f64>::try_from(t.to_kind(tch::Kind::Double).reshape([-1])).unwrap())
        .collect()
}

fn losses(out: &Path) -> Vec<f64> {
    common::read_lines(&out.join("metrics.jsonl")).iter().map(|l| l["loss"].as_f64().unwrap()).collect()
}

/// Steps recorded so far in `out`'s metrics (none before the file exists).
fn steps_logged(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |text| text.lines().count())
}

#[test]
fn zero_stages_on_two_ranks_match_one_process() {
    let work = tempfile::tempdir().unwrap();
    let steps = ["--steps", "3", "--save-every", "100", "--lr", "1e-3"];
    let single = work.path().join("single");
    check_train(&single, &[&steps[..], &["--batch-size", "4"]].concat());
    let reference = params(&single.join("checkpoints/step-000003"));
    let norm = reference.iter().map(|x| x * x).sum::<f64>().sqrt();
    for zero in ["0", "1", "2", "3"] {
        let out = work.path().join(format!("zero{zero}"));
        let output = check_train(&out, &[&steps[..], &["--batch-size", "2", "--nproc", "2", "--zero", zero]].concat());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&format!("rank 1/2 zero {zero}")), "{stderr}");
        let got = params(&out.join("checkpoints/step-000003"));
        let diff = got.iter().zip(&reference).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt() / norm;
        assert!(diff < 1e-5, "zero {zero}: relative difference {diff}");
        assert_ne!(got, params(&single.join("checkpoints/step-000003")).iter().map(|x| x + 1.0).collect::<Vec<_>>());
    }
}

/// bf16 autocast over fp32 master weights (on the CPU here, on CUDA by default there): the losses
/// follow the fp32 run closely without equalling it, and the checkpoint stays fp32.
#[test]
fn bf16_autocast_follows_fp32() {
    let work = tempfile::tempdir().unwrap();
    let steps = ["--steps", "4", "--save-every", "100", "--batch-size", "2", "--lr", "1e-3"];
    let fp32 = work.path().join("fp32");
    check_train(&fp32, &[&steps[..], &["--precision", "fp32"]].concat());
    let bf16 = work.path().join("bf16");
    let output = check_train(&bf16, &[&steps[..], &["--precision", "bf16"]].concat());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("compute: Cpu, BFloat16 autocast, fp32 master weights"), "{stderr}");
    let (expected, got) = (losses(&fp32), losses(&bf16));
    assert_eq!(got.len(), 4);
    for (step, (a, b)) in got.iter().zip(&expected).enumerate() {
        assert!((a - b).abs() < 0.02 * b, "step {}: bf16 {a} vs fp32 {b}", step + 1);
    }
    assert_ne!(got, expected, "autocast changed nothing");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(bf16.join("checkpoints/step-000004/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["dtype"], "float32");
}

/// One step on 2 ranks at ZeRO `stage`: `rank`'s memory line and the MiB figures in it.
fn memory_figures(out: &Path, stage: &str, rank: usize) -> (String, Vec<f64>) {
    let output = check_train(out, &["--steps", "1", "--batch-size", "1", "--nproc", "2", "--zero", stage]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let prefix = format!("rank {rank}/2 zero {stage}");
    let line = stderr.lines().find(|l| l.starts_with(&prefix)).unwrap().to_string();
    let numbers = line
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|s| s.parse().ok())
        .filter(|x: &f64| x.fract() != 0.0)
        .collect();
    (line, numbers)
}

#[test]
fn zero_memory_report_follows_the_formulas() {
    let work = tempfile::tempdir().unwrap();
    // Stage 2 on 2 ranks: each rank holds half of the gradients and half of the optimizer state.
    let (line, numbers) = memory_figures(&work.path().join("z2"), "2", 0);
    let (params, grads, optimizer) = (numbers[0], numbers[1], numbers[2]);
    assert!((grads - params / 2.0).abs() < 0.15, "{line}");
    assert!((optimizer - params).abs() < 0.15, "two fp32 moments of half the parameters: {line}");

    // Stage 3: parameters are partitioned too, and the formula is 16 bytes per parameter over N.
    let (line, numbers) = memory_figures(&work.path().join("z3"), "3", 1);
    let (params3, formula3) = (numbers[0], numbers[3]);
    assert!((params3 - params / 2.0).abs() < 0.15, "{line}");
    assert!((formula3 - 4.0 * params3).abs() < 0.3, "16/N bytes per parameter is 4x the fp32 shard: {line}");
}

/// Trains 8 steps with `extra` flags uninterrupted, then again killed with SIGKILL (the whole
/// process group) after the step-4 checkpoint and resumed: every step's loss must match.
fn check_kill_and_resume(extra: &[&str]) {
    let work = tempfile::tempdir().unwrap();
    let flags: Vec<&str> =
        ["--steps", "8", "--save-every", "2", "--batch-size", "2"].iter().chain(extra).copied().collect();
    let whole = work.path().join("whole");
    check_train(&whole, &flags);
    let expected = losses(&whole);
    assert_eq!(expected.len(), 8);

    let out = work.path().join("killed");
    let args = |resume: bool| {
        let mut args = train_args(&out, &flags);
        if resume {
            args.push("--resume".into());
        }
        args
    };
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(WIZARD)
        .args(args(false))
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let saved_step_4 = || std::fs::read_to_string(out.join("latest")).is_ok_and(|l| l.trim() >= "step-000004");
    wait_until("the step-4 checkpoint", Duration::from_secs(120), || {
        saved_step_4() || child.try_wait().unwrap().is_some()
    });
    common::kill_group(&mut child);
    stdout_of(&common::wizard(&args(true)), "--resume");
    let got = losses(&out);
    assert_eq!(got.len(), 8, "{got:?}");
    for (step, (a, b)) in got.iter().zip(&expected).enumerate() {
        assert!((a - b).abs() <= 1e-6 * b.abs(), "{extra:?} step {}: {a} vs {b}", step + 1);
    }
}

#[test]
fn killed_and_resumed_run_has_the_same_losses() {
    check_kill_and_resume(&[]);
}

#[test]
fn killed_and_resumed_zero3_run_on_two_ranks_has_the_same_losses() {
    check_kill_and_resume(&["--nproc", "2", "--zero", "3"]);
}

/// A disk that fills up while a checkpoint is written (a file-size limit makes every write past
/// 300 kB fail, as ENOSPC would): the run stops with an error naming the file, and `latest` still
/// names the previous checkpoint, which loads and resumes.
#[test]
fn a_full_disk_while_saving_keeps_the_previous_checkpoint() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    check_train(&out, &["--steps", "4", "--save-every", "2", "--batch-size", "2"]);
    std::fs::write(out.join("latest"), "step-000002").unwrap(); // as if step 4 had not happened
    std::fs::remove_dir_all(out.join("checkpoints/step-000004")).unwrap();
    let args = train_args(&out, &["--steps", "4", "--save-every", "2", "--batch-size", "2", "--resume"]);
    // An ignored SIGXFSZ survives exec, so writes past the limit fail with EFBIG instead of killing.
    let output = Command::new("sh")
        .args(["-c", "trap '' XFSZ; exec prlimit --fsize=300000 \"$@\"", "sh", WIZARD])
        .args(&args)
        .output()
        .unwrap();
    check_failure(&output, "wizard train under prlimit --fsize", &["step-000004.partial", "File too large"]);
    assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap(), "step-000002");
    let checkpoint = out.join("checkpoints/step-000002");
    model::gpt_bigcode::GptBigCode::load(&checkpoint, tch::Kind::Float, tch::Device::Cpu).unwrap();
    stdout_of(&common::wizard(&args), "--resume");
    assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap(), "step-000004");
}

const HF_LOGITS: &str = r#"
import json, sys, torch
from transformers import AutoModelForCausalLM
model, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True)
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.no_grad():
    logits = model.eval()(ids).logits[0]
print(json.dumps({"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]), "logits": logits.flatten().tolist()}))
"#;

#[test]
fn fine_tunes_a_transformers_checkpoint_that_transformers_loads_back() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let base = work.path().join("base");
    std::fs::create_dir(&base).unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(f.path("tok").join(file), base.join(file)).unwrap();
    }
    common::make_hf_model(&base, Shape { n_positions: 256, n_embd: 64, n_layer: 2, n_head: 4 });
    let out = work.path().join("sft");
    let (base_str, sft, out_str) = (base.to_str().unwrap(), f.path("sft.jsonl"), out.to_str().unwrap());
    let args = ["train", "--model", base_str, "--mode", "sft", "--data", sft.to_str().unwrap(), "--out", out_str];
    let args = [&args[..], &["--steps", "3", "--seq-len", "256", "--batch-size", "4", "--lr", "1e-3"]].concat();
    let output = common::wizard(&args);
    let stdout = stdout_of(&output, &args);
    let checkpoint = PathBuf::from(stdout.trim());
    assert!(checkpoint.ends_with("step-000003"), "{checkpoint:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("data: 40 documents"), "{stderr}");

    let ids: Vec<i64> = (1..30).collect();
    let ids_json = serde_json::to_string(&ids).unwrap();
    let hf: Value =
        serde_json::from_str(&common::python(HF_LOGITS, &[checkpoint.as_os_str(), ids_json.as_ref()])).unwrap();
    assert_eq!(hf["missing"], serde_json::json!([]));
    assert_eq!(hf["unexpected"], serde_json::json!([]));
    let model = model::gpt_bigcode::GptBigCode::load(&checkpoint, tch::Kind::Float, tch::Device::Cpu).unwrap();
    let ours = tch::no_grad(|| {
        model.forward_full(&tch::Tensor::from_slice(&ids).unsqueeze(0), model::gpt_bigcode::Dropout::Off).unwrap()
    });
    let ours = Vec::<f64>::try_from(ours.to_kind(tch::Kind::Double).reshape([-1])).unwrap();
    let theirs: Vec<f64> = hf["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let diff = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(diff < 1e-4, "{diff}");
    let base_model = model::gpt_bigcode::GptBigCode::load(&base, tch::Kind::Float, tch::Device::Cpu).unwrap();
    let before = tch::no_grad(|| {
        base_model.forward_full(&tch::Tensor::from_slice(&ids).unsqueeze(0), model::gpt_bigcode::Dropout::Off).unwrap()
    });
    let moved = Vec::<f64>::try_from(before.to_kind(tch::Kind::Double).reshape([-1])).unwrap();
    assert!(moved.iter().zip(&ours).any(|(a, b)| (a - b).abs() > 1e-3), "fine-tuning changed nothing");
}

#[test]
fn bad_input_is_a_clear_error() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let broken = work.path().join("broken.jsonl");
    std::fs::write(
        &broken,
        "{\"instruction\":\"a\",\"output\":\"b\"}\n{\"instruction\":\"a\",\"output\":\"b\"}\n{\"instruction\": oops}\n",
    )
    .unwrap();
    let empty = work.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let no_fim = work.path().join("no_fim");
    std::fs::create_dir(&no_fim).unwrap();
    for file in ["tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(f.path("tok").join(file), no_fim.join(file)).unwrap();
    }
    let json = std::fs::read_to_string(f.path("tok").join("tokenizer.json")).unwrap();
    std::fs::write(no_fim.join("tokenizer.json"), json.replace("<fim_prefix>", "<fim_start>")).unwrap();

    let out = work.path().join("out");
    let base = |tokenizer: &Path, data: &Path, extra: &[&str]| {
        let mut args = train_args(&out, &[&["--steps", "1"], extra].concat());
        set_flag(&mut args, "--tokenizer", tokenizer);
        set_flag(&mut args, "--data", data);
        args
    };
    let (tok, corpus) = (f.path("tok"), f.path("corpus"));
    let mut too_long = base(&tok, &corpus, &[]);
    set_flag(&mut too_long, "--seq-len", "500");
    let cases = [
        (base(&tok, &broken, &["--mode", "sft"]), "broken.jsonl: line 3"),
        (base(&tok, &empty, &[]), "no documents found"),
        (base(&no_fim, &corpus, &[]), "no <fim_prefix> token"),
        (too_long, "--seq-len 500 is longer than the model's context (n_positions = 128)"),
        (base(&tok, &corpus, &["--zero", "4"]), "invalid value '4' for '--zero"),
        (base(&tok, &corpus, &["--device", "gpu"]), "--device \"gpu\": use auto, cpu, cuda or cuda:N"),
        (base(&tok, &corpus, &["--device", "cuda:3"]), "--device cuda:3: libtorch sees"),
        (base(&tok, &corpus, &["--backend", "mpi"]), "--backend \"mpi\": use auto, gloo or nccl"),
        (base(&tok, &corpus, &["--precision", "fp8"]), "--precision \"fp8\": use auto, fp32 or bf16"),
    ];
    for (args, expected) in cases {
        check_failure(&common::wizard(&args), &args, &[expected]);
    }
    // A torchrun-style rank asking for NCCL on the CPU.
    let output = Command::new(WIZARD)
        .args(base(&tok, &corpus, &["--backend", "nccl", "--device", "cpu"]))
        .envs([("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29400")])
        .output()
        .unwrap();
    check_failure(&output, "--backend nccl --device cpu", &["--backend nccl needs a GPU per rank"]);
    // --skip-bad-lines counts the broken line and trains on the rest.
    let config256 = work.path().join("config256.json");
    let text = std::fs::read_to_string(f.path("config.json")).unwrap();
    std::fs::write(&config256, text.replace("\"n_positions\":128", "\"n_positions\":256")).unwrap();
    let mut skipping = base(&tok, &broken, &["--mode", "sft", "--skip-bad-lines"]);
    set_flag(&mut skipping, "--seq-len", "256");
    set_flag(&mut skipping, "--model-config", &config256);
    let output = common::wizard(&skipping);
    stdout_of(&output, &skipping);
    let stderr = common::text(&output.stderr);
    assert!(stderr.contains("data: 2 documents") && stderr.contains("1 bad lines skipped"), "{stderr}");
}

/// Pids of processes whose environment holds every `KEY=value` of `markers`.
fn processes_with_env(markers: &[String]) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
                markers.iter().all(|m| vars.contains(&m.as_bytes()))
            })
        })
        .collect()
}

#[test]
fn a_dying_rank_stops_the_others_with_a_clear_error() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let flags = ["--steps", "100000", "--save-every", "100000", "--batch-size", "1", "--timeout", "5"];
    let mut args = train_args(&out, &flags);

    // Ranks started by `--nproc`: the launcher stops the survivor and names the dead rank.
    let mut launcher_args = args.clone();
    launcher_args.extend(["--nproc".to_string(), "2".to_string()]);
    let launcher =
        Command::new(WIZARD).args(&launcher_args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let rank1 = [format!("WIZARD_LAUNCHER_PID={}", launcher.id()), "RANK=1".to_string()];
    wait_until("training starting", Duration::from_secs(60), || out.join("metrics.jsonl").exists());
    let victims = processes_with_env(&rank1);
    assert_eq!(victims.len(), 1, "{victims:?}");
    Command::new("kill").args(["-9", &victims[0].to_string()]).status().unwrap();
    let steps_at_kill = steps_logged(&out);
    let output = launcher.wait_with_output().unwrap();
    check_failure(&output, "the launcher", &["rank 1 failed"]);
    // Rank 0 stopped at the collective its dead peer missed: at most the step in flight was logged.
    assert!(steps_logged(&out) <= steps_at_kill + 1, "{} steps after {steps_at_kill}", steps_logged(&out));

    // torchrun-style ranks with no launcher: the survivor's collective fails within --timeout.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    set_flag(&mut args, "--out", work.path().join("out2"));
    let spawn = |rank: &str| {
        Command::new(WIZARD)
            .args(&args)
            .envs([("RANK", rank), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port)])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut survivor = spawn("0");
    let mut victim = spawn("1");
    let out2 = work.path().join("out2");
    wait_until("training starting", Duration::from_secs(60), || out2.join("metrics.jsonl").exists());
    victim.kill().unwrap();
    victim.wait().unwrap();
    let steps_at_kill = steps_logged(&out2);
    // The limit only keeps a hung survivor from hanging the test: --timeout is 5 s.
    wait_until("the survivor's collective failing", Duration::from_secs(30), || survivor.try_wait().unwrap().is_some());
    check_failure(&survivor.wait_with_output().unwrap(), "the survivor", &["wizard: error"]);
    assert!(steps_logged(&out2) <= steps_at_kill + 1, "{} steps after {steps_at_kill}", steps_logged(&out2));
}
