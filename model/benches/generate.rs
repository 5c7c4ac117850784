//! Prefill and decode speed of `model::generate` on a model directory, as one JSON line.
//! Driven by `scripts/bench/generate.py`, which runs transformers on the same model in the same run.
//!
//! `cargo bench -p model --bench generate -- MODEL_DIR PROMPT NEW_TOKENS THREADS [DEVICE] [DTYPE] [DRAFT]`
//! (DEVICE `cpu` or `cuda`, DTYPE `float32`, `bfloat16` or `int8` as `--dtype` takes them; defaults cpu, float32).
//! PROMPT is a token count (tokens spread over the vocabulary: what a random model sees) or
//! `FILE:TOKENS`, the first TOKENS tokens of a text file in the model's tokenizer (what a trained
//! draft model needs to be judged on: it predicts text, not scattered tokens).
//! With DRAFT it also times speculative decoding, greedy: DRAFT is a dtype (self-speculation: the
//! same checkpoint in that precision, say int8, drafts) or a draft model's directory (loaded in
//! DTYPE); it reports that decode rate, the acceptance, whether the tokens equal the target's, and
//! the same loop with nothing to draft beside plain rounds (`no_drafter_speedup`: the noise floor).
use std::path::Path;
use std::time::Instant;

use model::generate::{generate, GenerateConfig, NoStop, Sampling};
use model::gpt_bigcode::GptBigCode;
use model::speculative::{self, Drafter, SpeculativeConfig};
use tch::{Device, Tensor};

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// GB/s that `threads` threads read from memory: the best of 5 passes over 512 MiB (the ceiling of a
/// decode step, which streams every weight once).
fn memory_read_gb_per_s(threads: usize) -> f64 {
    let words = vec![1u64; 64 << 20];
    let part = words.len().div_ceil(threads);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        let sum: u64 = std::thread::scope(|scope| {
            let handles: Vec<_> = words
                .chunks(part)
                .map(|chunk| scope.spawn(move || chunk.iter().fold(0u64, |a, &b| a.wrapping_add(b))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(sum, words.len() as u64);
        best = best.min(start.elapsed().as_secs_f64());
    }
    (words.len() * 8) as f64 / best / 1e9
}

fn median(times: &mut [f64]) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let (dir, prompt_tokens, new_tokens, threads, device, dtype) = match args.as_slice() {
        [d, p, n, t] => (d, p, n, t, "cpu", "float32"),
        [d, p, n, t, device] => (d, p, n, t, device.as_str(), "float32"),
        [d, p, n, t, device, dtype] | [d, p, n, t, device, dtype, _] => (d, p, n, t, device.as_str(), dtype.as_str()),
        _ => {
            eprintln!("usage: generate MODEL_DIR PROMPT_TOKENS NEW_TOKENS THREADS [DEVICE] [DTYPE] [DRAFT]");
            std::process::exit(2);
        }
    };
    let device = if device == "cuda" { Device::Cuda(0) } else { Device::Cpu };
    let precision = model::gpt_bigcode::parse_precision(dtype).expect("dtype");
    let kind = precision.kind();
    let new_tokens: usize = new_tokens.parse().unwrap();
    tch::set_num_threads(threads.parse().unwrap());
    // `random:EMBD:LAYERS:HEADS` makes a random StarCoder-shaped model (for machines without transformers).
    let scratch = tempfile::tempdir().unwrap();
    let dir = match dir.strip_prefix("random:") {
        Some(dims) => {
            let dims: Vec<i64> = dims.split(':').map(|d| d.parse().expect("random:EMBD:LAYERS:HEADS")).collect();
            let config = model::config::ModelConfig {
                vocab_size: 49152,
                n_positions: 2048,
                n_embd: dims[0],
                n_layer: dims[1],
                n_head: dims[2],
                bos_token_id: Some(0),
                eos_token_id: Some(0),
                ..Default::default()
            };
            GptBigCode::new(config, Device::Cpu).unwrap().save(scratch.path(), kind).unwrap();
            scratch.path().to_path_buf()
        }
        None => Path::new(dir).to_path_buf(),
    };
    let model = GptBigCode::load_as(&dir, precision, device, |_, _| {}).expect("model loads");
    let vocab = model.config().vocab_size;
    let prompt: Vec<i64> = match prompt_tokens.rsplit_once(':') {
        Some((file, tokens)) => {
            let text = std::fs::read_to_string(file).expect("prompt file");
            let ids = model::tokenizer::Tokenizer::from_dir(&dir).expect("tokenizer").encode(&text).expect("encodes");
            let tokens: usize = tokens.parse().expect("FILE:TOKENS");
            assert!(ids.len() >= tokens, "{file} has {} tokens, fewer than {tokens}", ids.len());
            ids[..tokens].iter().map(|&id| i64::from(id)).collect()
        }
        None => (0..prompt_tokens.parse::<i64>().unwrap()).map(|i| 1 + (i * 7919) % (vocab - 1)).collect(),
    };
    let prompt_tokens = prompt.len();
    let config =
        GenerateConfig { max_new_tokens: new_tokens, num_samples: 1, sampling: Sampling::greedy(), eos_token_id: None };
    let prefill = || {
        tch::no_grad(|| {
            let mut cache = model.new_cache(1, prompt_tokens as i64).unwrap();
            let start = Instant::now();
            let input = Tensor::from_slice(&prompt).unsqueeze(0).to_device(device);
            let logits = model.forward_next(&input, &mut cache).unwrap();
            let _ = logits.argmax(-1, false).int64_value(&[0]); // waits for the GPU
            start.elapsed().as_secs_f64()
        })
    };
    // Warm-up: first calls allocate and pick kernels.
    prefill();
    let started = Instant::now();
    generate(&model, &prompt, &config, &mut NoStop).unwrap();
    // At least 3 rounds, more for small models (up to ~4 s of them): their few milliseconds per
    // generation are at the mercy of the machine's noise.
    let rounds = ((4.0 / started.elapsed().as_secs_f64()) as usize).clamp(3, 100);
    let mut prefill_s = f64::MAX;
    let mut total_s = f64::MAX;
    let mut plain = Vec::new();
    for _ in 0..rounds {
        prefill_s = prefill_s.min(prefill());
        let start = Instant::now();
        let out = generate(&model, &prompt, &config, &mut NoStop).unwrap();
        total_s = total_s.min(start.elapsed().as_secs_f64());
        assert_eq!(out[0].tokens.len(), new_tokens);
        plain = out[0].tokens.clone();
    }
    let decode_s = total_s - prefill_s;
    let mut report = serde_json::json!({
        "impl": "wizard",
        "prefill_tokens_per_s": prompt_tokens as f64 / prefill_s,
        "decode_tokens_per_s": new_tokens as f64 / decode_s,
    });
    if let Some(draft_arg) = args.get(6) {
        let draft = match model::gpt_bigcode::parse_precision(draft_arg) {
            Ok(draft_precision) => GptBigCode::load_as(&dir, draft_precision, device, |_, _| {}),
            Err(_) => GptBigCode::load_as(Path::new(draft_arg), precision, device, |_, _| {}),
        }
        .expect("draft loads");
        let drafter = Drafter::Model(&draft);
        let speculative = SpeculativeConfig {
            max_new_tokens: new_tokens,
            sampling: Sampling::greedy(),
            eos_token_id: None,
            ..SpeculativeConfig::default()
        };
        // The pair's first generation in this process, as a one-shot `generate` meets it (the
        // planner starts from its prior, the costs read from the file an earlier process filled,
        // or fills now), beside a plain one just before it: a VM's speed drifts between minutes.
        let _ = model::draft_length::Planner::for_pair(&model, Some(&draft), speculative.max_gamma).unwrap();
        let started = Instant::now();
        let _ = generate(&model, &prompt, &config, &mut NoStop).unwrap();
        let plain_before_first_s = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let _ = speculative::generate(&model, &drafter, &prompt, &speculative, &mut NoStop).unwrap();
        let first_s = started.elapsed().as_secs_f64();
        // Plain and speculative rounds alternate, so that the ratio compares the two under the same
        // machine conditions (a VM's speed drifts between minutes); medians, as a small model's
        // fastest round says more about the machine's luck than about the method.
        // A third kind of round, the speculative loop with nothing to draft, is the control: its
        // ratio to plain rounds shows how far this machine's noise moves a ratio of 1.
        let (mut plain_times, mut speculative_times, mut outs) = (Vec::new(), Vec::new(), Vec::new());
        let mut undrafted_times = Vec::new();
        for _ in 0..rounds {
            let start = Instant::now();
            let _ = speculative::generate(&model, &Drafter::None, &prompt, &speculative, &mut NoStop).unwrap();
            undrafted_times.push(start.elapsed().as_secs_f64());
            let start = Instant::now();
            let _ = generate(&model, &prompt, &config, &mut NoStop).unwrap();
            plain_times.push(start.elapsed().as_secs_f64());
            let start = Instant::now();
            outs.push(speculative::generate(&model, &drafter, &prompt, &speculative, &mut NoStop).unwrap());
            speculative_times.push(start.elapsed().as_secs_f64());
        }
        let (plain_median, speculative_median) = (median(&mut plain_times), median(&mut speculative_times));
        let planner = model::draft_length::Planner::for_pair(&model, Some(&draft), speculative.max_gamma).unwrap();
        let total =
            |count: fn(&speculative::SpeculativeStats) -> usize| outs.iter().map(|o| count(&o.stats)).sum::<usize>();
        let per_round = |figure: fn(&speculative::SpeculativeStats) -> f64| {
            outs.iter().map(|o| figure(&o.stats)).sum::<f64>() / outs.len() as f64
        };
        report["speculative_decode_tokens_per_s"] = (new_tokens as f64 / (speculative_median - prefill_s)).into();
        report["speculative_speedup"] = ((plain_median - prefill_s) / (speculative_median - prefill_s)).into();
        report["first_speculative_speedup"] = ((plain_before_first_s - prefill_s) / (first_s - prefill_s)).into();
        report["plain_beside_decode_tokens_per_s"] = (new_tokens as f64 / (plain_median - prefill_s)).into();
        report["rounds"] = rounds.into();
        report["no_drafter_speedup"] = ((plain_median - prefill_s) / (median(&mut undrafted_times) - prefill_s)).into();
        report["costs"] = format!("{:?}", planner.costs()).into();
        report["acceptance"] = (total(|s| s.accepted) as f64 / total(|s| s.drafted).max(1) as f64).into();
        report["target_passes"] = per_round(|s| s.target_passes as f64).into();
        report["draft_passes"] = per_round(|s| s.draft_passes as f64).into();
        report["drafted"] = per_round(|s| s.drafted as f64).into();
        report["draft_ms"] = per_round(|s| s.draft_ms).into();
        report["verify_ms"] = per_round(|s| s.verify_ms).into();
        report["undrafted_rounds"] = outs.iter().filter(|o| o.stats.drafted == 0).count().into();
        report["identical_to_target"] = outs.iter().all(|o| o.generation.tokens == plain).into();
    }
    report["peak_rss_mib"] = peak_rss_mib().into();
    report["huge_page_mib"] = (kernels::memory::huge_page_bytes() as f64 / 1048576.0).into();
    report["memory_read_gb_per_s"] = memory_read_gb_per_s(threads.parse().unwrap()).into();
    println!("{report}");
}
