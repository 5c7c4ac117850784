//! One round of WizardCoder: evolve the instructions one more generation, export rounds 0..r merged,
//! fine-tune the base model on them, and measure pass@k. Each stage returns what it made, typed.
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::base::{train_flags, trained, Base, Trained};
use super::config::Config;
use super::json_of;
use super::runner::{flags, os, Runner};
use super::state::{files_fingerprint, fingerprint};

/// One round's results, for the stopping rule and the report.
#[derive(Debug, Clone)]
pub struct Round {
    pub round: u32,
    pub evolve: Evolved,
    pub export: Exported,
    pub sft: Trained,
    pub eval: Evaluated,
}

impl Round {
    pub fn pass1(&self) -> f64 {
        self.eval.humaneval.pass1()
    }

    /// HumanEval's mean log-likelihood per token of the reference solutions (-inf when unknown).
    pub fn reference_loglik(&self) -> f64 {
        self.eval.humaneval.reference_loglik.unwrap_or(f64::NEG_INFINITY)
    }

    /// Whether this round is better than `other`: a higher pass@1, or the same pass@1 (a tiny model's
    /// 0 every round) and references the model finds more likely.
    pub fn beats(&self, other: &Round) -> bool {
        (self.pass1(), self.reference_loglik()) > (other.pass1(), other.reference_loglik())
    }
}

/// `evolve-N` stage output: this round's items in `evolve.sqlite`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evolved {
    pub items: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub removed: u64,
    /// Accepted over decided items.
    pub acceptance: f64,
    /// Eliminations per reason code.
    pub reasons: BTreeMap<String, u64>,
}

/// `export-N` stage output: the fine-tuning file of rounds 0..N merged.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Exported {
    pub file: PathBuf,
    pub items: usize,
}

/// `eval-N` stage output: one report per benchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluated {
    pub humaneval: Benchmark,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mbpp: Option<Benchmark>,
}

/// A benchmark's `report.json` without its per-problem table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Benchmark {
    pub dir: PathBuf,
    pub problems: usize,
    pub pass_at_k: BTreeMap<String, f64>,
    /// Mean log-likelihood per token of the reference solutions given their prompts.
    #[serde(default)]
    pub reference_loglik: Option<f64>,
    /// The report's other counts (samples, passed, failed, timed out...).
    #[serde(flatten)]
    pub counts: serde_json::Map<String, Value>,
}

impl Benchmark {
    pub fn pass1(&self) -> f64 {
        self.pass_at_k.get("pass@1").copied().unwrap_or(0.0)
    }
}

/// Fingerprints chained through the rounds: each stage's includes the one before it.
pub struct Chain {
    evolve: String,
}

impl Chain {
    /// The chain's start: everything the evolution depends on.
    pub fn new(config: &Config, base: &Base) -> Chain {
        let seeds: Vec<PathBuf> = config.evolve.seeds.iter().cloned().collect();
        let evolve = fingerprint(&[
            "evolve",
            &base.fingerprint,
            &json_of(&config.evolve),
            &files_fingerprint(&seeds),
            &generation_settings(config),
        ]);
        Chain { evolve }
    }
}

/// Runs round `r`: evolve → export → SFT → pass@k.
pub fn run(runner: &Runner, config: &Config, base: &Base, chain: &mut Chain, r: u32) -> anyhow::Result<Round> {
    let out = &config.run.out;
    let round_dir = out.join(format!("round-{r}"));
    let evolve_db = out.join("evolve.sqlite");
    chain.evolve = fingerprint(&[&chain.evolve, &r.to_string()]);
    let clear: Vec<PathBuf> = if r == 1 {
        ["", "-wal", "-shm"].iter().map(|s| PathBuf::from(format!("{}{s}", evolve_db.display()))).collect()
    } else {
        Vec::new()
    };
    let evolve = runner
        .stage(&format!("evolve-{r}"), &chain.evolve, &clear, || evolve_round(runner, config, base, &evolve_db, r))?;

    let export_fp = fingerprint(&["export", &chain.evolve]);
    let train_file = round_dir.join("train.jsonl");
    let export = runner.stage(&format!("export-{r}"), &export_fp, std::slice::from_ref(&train_file), || {
        export_rounds(&evolve_db, r, &train_file)
    })?;

    let sft_fp = fingerprint(&["sft", &export_fp, &base.fingerprint, &json_of(&config.sft)]);
    let sft_dir = round_dir.join("sft");
    let sft = runner.stage(&format!("sft-{r}"), &sft_fp, std::slice::from_ref(&sft_dir), || {
        fine_tune(runner, config, base, &train_file, &sft_dir)
    })?;

    let mbpp: Vec<PathBuf> = config.eval.mbpp.iter().cloned().collect();
    let eval_fp = fingerprint(&[
        "eval",
        &sft_fp,
        &json_of(&config.eval),
        &files_fingerprint(&mbpp),
        &generation_settings(config),
    ]);
    let clear = vec![round_dir.join("humaneval"), round_dir.join("mbpp")];
    let eval = runner.stage(&format!("eval-{r}"), &eval_fp, &clear, || {
        let humaneval = evaluate(runner, config, &sft.checkpoint, "humaneval", None, &round_dir)?;
        let mbpp = match &config.eval.mbpp {
            Some(data) => Some(evaluate(runner, config, &sft.checkpoint, "mbpp", Some(data), &round_dir)?),
            None => None,
        };
        Ok(Evaluated { humaneval, mbpp })
    })?;
    Ok(Round { round: r, evolve, export, sft, eval })
}

/// `--device` and `--dtype` of the stages that generate (evolve with the local model, eval).
fn generation_flags(config: &Config) -> Vec<OsString> {
    let mut args = flags([("--device", config.run.device.clone())]);
    if let Some(dtype) = &config.run.dtype {
        args.extend(flags([("--dtype", dtype.clone())]));
    }
    args
}

/// What of `[run]` a generating stage's output depends on (the device alone when no dtype is set, as
/// before `run.dtype` existed, so that earlier runs resume).
fn generation_settings(config: &Config) -> String {
    match &config.run.dtype {
        Some(dtype) => format!("{} {dtype}", config.run.device),
        None => config.run.device.clone(),
    }
}

/// `wizard evolve` one more round into `evolve_db`.
fn evolve_round(runner: &Runner, config: &Config, base: &Base, evolve_db: &Path, r: u32) -> anyhow::Result<Evolved> {
    let e = &config.evolve;
    let mut args = vec![os("evolve"), os("--db"), evolve_db.into(), os("--rounds"), os(r.to_string())];
    match (&e.base_url, &e.model) {
        (Some(url), Some(model)) => args.extend(flags([
            ("--base-url", url.clone()),
            ("--model", model.clone()),
            ("--api-key-env", e.api_key_env.clone()),
        ])),
        _ => {
            args.extend([os("--local"), base.checkpoint.clone().into()]);
            args.extend(generation_flags(config));
        }
    }
    args.extend(flags([
        ("--concurrency", e.concurrency.to_string()),
        ("--max-tokens", e.max_tokens.to_string()),
        ("--temperature", e.temperature.to_string()),
        ("--seed", e.seed.to_string()),
    ]));
    if let Some(seeds) = &e.seeds {
        args.extend([os("--seeds"), seeds.clone().into()]);
    }
    if !e.decontaminate {
        args.push(os("--no-decontaminate"));
    } else if let Some(mbpp) = &config.eval.mbpp {
        args.extend([
            os("--benchmark"),
            crate::python::humaneval_data(None)?.into(),
            os("--benchmark"),
            mbpp.clone().into(),
        ]);
    }
    runner.wizard(args)?;
    let stats = evolve::store::Store::open(evolve_db)?.round_stats(r)?;
    let decided = stats.accepted + stats.rejected + stats.removed;
    Ok(Evolved {
        items: stats.items,
        accepted: stats.accepted,
        rejected: stats.rejected,
        removed: stats.removed,
        acceptance: if decided > 0 { stats.accepted as f64 / decided as f64 } else { 0.0 },
        reasons: stats.reasons,
    })
}

/// Rounds 0..=r of `evolve_db` merged into one fine-tuning file.
fn export_rounds(evolve_db: &Path, r: u32, train_file: &Path) -> anyhow::Result<Exported> {
    if let Some(dir) = train_file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let store = evolve::store::Store::open(evolve_db)?;
    let merged: Vec<u32> = (1..=r).collect();
    let items = evolve::export::export(&store, Some(&merged), train_file)?;
    anyhow::ensure!(items > 0, "no accepted items in rounds 0..{r} to fine-tune on");
    Ok(Exported { file: train_file.to_path_buf(), items })
}

/// `wizard train --mode sft` of the base checkpoint on `train_file`.
fn fine_tune(runner: &Runner, config: &Config, base: &Base, train_file: &Path, dir: &Path) -> anyhow::Result<Trained> {
    let mut args = vec![os("train"), os("--mode"), os("sft"), os("--model"), base.checkpoint.clone().into()];
    args.extend([os("--data"), train_file.into(), os("--out"), dir.into()]);
    args.extend([os("--tokenizer"), base.tokenizer_dir.clone().into()]);
    args.extend(train_flags(&config.sft));
    runner.wizard(args)?;
    trained(dir)
}

/// `wizard eval run` of one benchmark into `round_dir/NAME`.
fn evaluate(
    runner: &Runner,
    config: &Config,
    checkpoint: &Path,
    name: &str,
    data: Option<&PathBuf>,
    round_dir: &Path,
) -> anyhow::Result<Benchmark> {
    let dir = round_dir.join(name);
    let e = &config.eval;
    let mut args = vec![os("eval"), os("run"), os("--benchmark"), os(name), os("--model"), checkpoint.into()];
    args.extend([os("--out"), dir.clone().into()]);
    args.extend(flags([
        ("--format", e.format.clone()),
        ("--samples", e.samples.to_string()),
        ("--temperature", e.temperature.to_string()),
        ("--max-new-tokens", e.max_new_tokens.to_string()),
        ("--timeout", e.timeout.to_string()),
    ]));
    args.extend(generation_flags(config));
    if let Some(limit) = e.limit {
        args.extend(flags([("--limit", limit.to_string())]));
    }
    if let Some(top_p) = e.top_p {
        args.extend(flags([("--top-p", top_p.to_string())]));
    }
    if let Some(data) = data {
        args.extend([os("--data"), data.clone().into()]);
    }
    runner.wizard(args)?;
    let path = dir.join("report.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut report: serde_json::Map<String, Value> =
        serde_json::from_str(&text).with_context(|| format!("{} is not a report", path.display()))?;
    report.remove("per_problem");
    report.insert("dir".into(), serde_json::json!(dir));
    serde_json::from_value(Value::Object(report)).with_context(|| format!("{} is not a report", path.display()))
}
