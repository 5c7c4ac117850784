//! Speculative decoding speed: wall time of greedy generation with no drafter, a draft model and
//! prompt lookup over the same prompts, whether the outputs are identical, and acceptance rates.
//! Prints one JSON object per drafter and workload. Driven by `scripts/bench/serve.py`.
//!
//! `cargo bench -p lsp --bench speculative -- TARGET_DIR DRAFT_DIR PROMPTS_JSONL NEW_TOKENS THREADS [DTYPE]`
//! (each prompts line: `{"workload": "...", "prompt": "..."}`; DTYPE float32 (default) or bfloat16, or
//! TARGET/DRAFT dtypes such as `bfloat16/float32`). Environment: `GAMMA`, `MAX_GAMMA` set the draft
//! length (start and adaptive bound), `FIXED=1` keeps it fixed, `DEVICE=cuda` runs both models on the
//! first GPU (CPU otherwise). First lines: each model's pass costs.
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use model::generate::{NoStop, Sampling};
use model::gpt_bigcode::GptBigCode;
use model::speculative::{generate, Drafter, SpeculativeConfig};
use model::tokenizer::Tokenizer;
use tch::{Device, Kind};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let (args, dtype, draft_dtype) = match args.as_slice() {
        [rest @ .., dtypes] if rest.len() == 5 => {
            let (target, draft) = dtypes.split_once('/').unwrap_or((dtypes, dtypes));
            let parse = |text| model::gpt_bigcode::parse_dtype(text).unwrap();
            (rest, parse(target), parse(draft))
        }
        rest => (rest, Kind::Float, Kind::Float),
    };
    let [target_dir, draft_dir, prompts, new_tokens, threads] = args else {
        eprintln!("usage: speculative TARGET_DIR DRAFT_DIR PROMPTS_JSONL NEW_TOKENS THREADS [DTYPE]");
        std::process::exit(2);
    };
    tch::set_num_threads(threads.parse().unwrap());
    let new_tokens: usize = new_tokens.parse().unwrap();
    let tokenizer = Tokenizer::from_dir(Path::new(target_dir)).unwrap();
    let device = if std::env::var("DEVICE").as_deref() == Ok("cuda") { Device::Cuda(0) } else { Device::Cpu };
    let target = GptBigCode::load(Path::new(target_dir), dtype, device).unwrap();
    let draft = GptBigCode::load(Path::new(draft_dir), draft_dtype, device).unwrap();
    let mut workloads: BTreeMap<String, Vec<Vec<i64>>> = BTreeMap::new();
    for line in std::fs::read_to_string(prompts).unwrap().lines() {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        let ids = tokenizer.encode(value["prompt"].as_str().unwrap()).unwrap().into_iter().map(i64::from).collect();
        workloads.entry(value["workload"].as_str().unwrap().to_string()).or_default().push(ids);
    }
    let defaults = SpeculativeConfig::default();
    let from_env = |name: &str, default: usize| std::env::var(name).map_or(default, |value| value.parse().unwrap());
    let config = SpeculativeConfig {
        max_new_tokens: new_tokens,
        sampling: Sampling::greedy(),
        eos_token_id: None,
        gamma: from_env("GAMMA", defaults.gamma),
        max_gamma: from_env("MAX_GAMMA", defaults.max_gamma),
        adaptive: std::env::var_os("FIXED").is_none(),
    };
    let drafters = [
        ("none", Drafter::None),
        ("draft-model", Drafter::Model(&draft)),
        ("prompt-lookup", Drafter::PromptLookup { max_ngram: 3 }),
    ];
    if let Some(prompt) = workloads.values().flatten().next() {
        for (name, model) in [("target", &target), ("draft", &draft)] {
            println!("{}", serde_json::json!({ "model": name, "pass_ms": pass_costs(model, prompt) }));
        }
    }
    for (workload, prompts) in &workloads {
        // Per drafter: best-of-3 seconds per prompt (interleaved, against noisy neighbours), figures.
        let mut seconds = [0.0f64; 3];
        let (mut identical, mut drafted, mut accepted, mut tokens, mut passes) =
            ([0; 3], [0; 3], [0; 3], [0; 3], [0; 3]);
        // Prefill (+ one token) per prompt, best of 3: subtracted to get decode time alone.
        let mut prefill = 0.0;
        let one = SpeculativeConfig { max_new_tokens: 1, ..config.clone() };
        for prompt in prompts {
            let mut best = f64::INFINITY;
            for _ in 0..3 {
                let started = Instant::now();
                generate(&target, &Drafter::None, prompt, &one, &mut NoStop).unwrap();
                best = best.min(started.elapsed().as_secs_f64());
            }
            prefill += best;
        }
        for prompt in prompts {
            let mut best = [f64::INFINITY; 3];
            let mut outputs: Vec<Vec<i64>> = vec![Vec::new(); 3];
            for round in 0..3 {
                for (d, (_, drafter)) in drafters.iter().enumerate() {
                    let started = Instant::now();
                    let out = generate(&target, drafter, prompt, &config, &mut NoStop).unwrap();
                    best[d] = best[d].min(started.elapsed().as_secs_f64());
                    if round == 0 {
                        drafted[d] += out.stats.drafted;
                        accepted[d] += out.stats.accepted;
                        tokens[d] += out.generation.tokens.len();
                        passes[d] += out.stats.target_passes;
                        outputs[d] = out.generation.tokens;
                    }
                }
            }
            for d in 0..3 {
                seconds[d] += best[d];
                identical[d] += usize::from(outputs[d] == outputs[0]);
            }
        }
        for (d, (name, _)) in drafters.iter().enumerate() {
            println!(
                "{}",
                serde_json::json!({
                    "workload": workload, "drafter": name, "prompts": prompts.len(), "tokens": tokens[d],
                    "seconds": seconds[d], "speedup": seconds[0] / seconds[d], "identical": identical[d],
                    "prefill_seconds": prefill,
                    "decode_speedup": (seconds[0] - prefill) / (seconds[d] - prefill),
                    "acceptance": if drafted[d] > 0 { accepted[d] as f64 / drafted[d] as f64 } else { 0.0 },
                    "target_passes": passes[d],
                })
            );
        }
    }
}

/// Milliseconds of one forward pass over k = 1, 2, 3, 5, 8 new tokens after `prompt`, best of 20:
/// what verifying k - 1 draft tokens costs against a one-token step.
fn pass_costs(model: &GptBigCode, prompt: &[i64]) -> BTreeMap<i64, f64> {
    tch::no_grad(|| {
        let mut cache = model.new_cache(1, prompt.len() as i64 + 8).expect("prompt + 8 tokens fit the context");
        let ids = |tokens: &[i64]| tch::Tensor::from_slice(tokens).unsqueeze(0).to_device(model.device());
        let _ = model.forward_next(&ids(prompt), &mut cache).unwrap();
        let held = cache.len();
        [1i64, 2, 3, 5, 8]
            .into_iter()
            .filter(|&k| k as usize <= prompt.len())
            .map(|k| {
                let input = ids(&prompt[..k as usize]);
                let mut best = f64::INFINITY;
                for _ in 0..20 {
                    let started = Instant::now();
                    let logits = model.forward(&input, &mut cache).unwrap();
                    let _ = logits.argmax(-1, false).int64_value(&[0, 0]);
                    best = best.min(started.elapsed().as_secs_f64() * 1e3);
                    cache.truncate(held);
                }
                (k, best)
            })
            .collect()
    })
}
