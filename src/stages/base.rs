//! The stages before the rounds: the tokenizer, FIM pretraining of the base model (or an existing
//! checkpoint in its place), and the draft model for speculative decoding.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use model::train::metrics;
use serde::{Deserialize, Serialize};

use super::config::{Config, Shape, TrainSettings};
use super::json_of;
use super::runner::{flags, os, Runner};
use super::state::{files_fingerprint, fingerprint};

/// What the rounds start from.
pub struct Base {
    /// Fingerprint of the base model: the rounds' stages chain from it.
    pub fingerprint: String,
    pub checkpoint: PathBuf,
    pub tokenizer_dir: PathBuf,
    tokenizer_fingerprint: String,
    /// The pretraining corpus (empty for an existing checkpoint) and its fingerprint.
    corpus: Vec<PathBuf>,
    corpus_fingerprint: String,
}

/// `tokenizer` stage output.
#[derive(Serialize, Deserialize)]
pub struct TrainedTokenizer {
    pub dir: PathBuf,
    pub documents: usize,
    pub vocab_size: usize,
}

/// `pretrain`, `draft` and `sft-N` stage output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trained {
    pub checkpoint: PathBuf,
    pub metrics: PathBuf,
    /// Mean loss of the last 10 steps.
    pub loss: f64,
}

/// The configured base checkpoint, or a tokenizer trained and a model pretrained from nothing.
/// Pushes the pretraining loss curve onto `curves`.
pub fn base(runner: &Runner, config: &Config, curves: &mut Vec<(String, PathBuf)>) -> anyhow::Result<Base> {
    let out = &config.run.out;
    match (&config.base, &config.tokenizer, &config.pretrain) {
        (Some(base), ..) => Ok(Base {
            fingerprint: fingerprint(&["base", &files_fingerprint(std::slice::from_ref(&base.checkpoint))]),
            checkpoint: base.checkpoint.clone(),
            tokenizer_dir: base.checkpoint.clone(),
            tokenizer_fingerprint: String::new(),
            corpus: Vec::new(),
            corpus_fingerprint: String::new(),
        }),
        (None, Some(tokenizer), Some(pre)) => {
            let inputs = expand(&tokenizer.inputs)?;
            let inputs_fingerprint = files_fingerprint(&inputs);
            let tokenizer_fingerprint =
                fingerprint(&["tokenizer", &inputs_fingerprint, &tokenizer.vocab_size.to_string()]);
            let tokenizer_dir = out.join("tokenizer");
            runner.stage("tokenizer", &tokenizer_fingerprint, std::slice::from_ref(&tokenizer_dir), || {
                train_tokenizer(&inputs, tokenizer.vocab_size, &tokenizer_dir)
            })?;
            let (corpus, corpus_fingerprint) = match &pre.inputs {
                Some(inputs) => {
                    let corpus = expand(inputs)?;
                    let fingerprint = files_fingerprint(&corpus);
                    (corpus, fingerprint)
                }
                None => (inputs, inputs_fingerprint),
            };
            let base_fingerprint =
                fingerprint(&["pretrain", &tokenizer_fingerprint, &corpus_fingerprint, &json_of(pre)]);
            let dir = out.join("base");
            let trained = runner.stage("pretrain", &base_fingerprint, std::slice::from_ref(&dir), || {
                pretrain(runner, &dir, &pre.model, &pre.train, pre.fim_rate, &tokenizer_dir, &corpus)
            })?;
            curves.push(("pretrain".into(), trained.metrics));
            Ok(Base {
                fingerprint: base_fingerprint,
                checkpoint: trained.checkpoint,
                tokenizer_dir,
                tokenizer_fingerprint,
                corpus,
                corpus_fingerprint,
            })
        }
        _ => unreachable!("validated: [base] or [tokenizer] with [pretrain]"),
    }
}

/// The draft model, pretrained like the base on the same corpus, when one is configured.
pub fn draft(
    runner: &Runner,
    config: &Config,
    base: &Base,
    curves: &mut Vec<(String, PathBuf)>,
) -> anyhow::Result<Option<PathBuf>> {
    let (Some(draft), Some(pre)) = (&config.draft, &config.pretrain) else {
        return Ok(None);
    };
    let fp = fingerprint(&["draft", &base.tokenizer_fingerprint, &base.corpus_fingerprint, &json_of(draft)]);
    let dir = config.run.out.join("draft");
    let trained = runner.stage("draft", &fp, std::slice::from_ref(&dir), || {
        pretrain(runner, &dir, &draft.model, &draft.train, pre.fim_rate, &base.tokenizer_dir, &base.corpus)
    })?;
    curves.push(("draft".into(), trained.metrics));
    Ok(Some(trained.checkpoint))
}

fn train_tokenizer(inputs: &[PathBuf], vocab_size: usize, dir: &Path) -> anyhow::Result<TrainedTokenizer> {
    let config = model::tokenizer::TrainConfig::new(inputs.to_vec(), vocab_size);
    let report =
        model::tokenizer::train(&config, dir).map_err(|e| anyhow::anyhow!("cannot train the tokenizer: {e}"))?;
    eprintln!("    {} documents, {} bytes, vocab {}", report.documents, report.bytes, report.vocab_size);
    Ok(TrainedTokenizer { dir: dir.to_path_buf(), documents: report.documents, vocab_size: report.vocab_size })
}

/// Pretrains a model of `shape` from random weights into `dir`.
fn pretrain(
    runner: &Runner,
    dir: &Path,
    shape: &Shape,
    settings: &TrainSettings,
    fim_rate: f64,
    tokenizer: &Path,
    data: &[PathBuf],
) -> anyhow::Result<Trained> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tok = model::tokenizer::Tokenizer::from_dir(tokenizer)?;
    let eos = i64::from(tok.eos_id());
    let model = model::config::ModelConfig {
        vocab_size: tok.vocab_size() as i64,
        n_positions: shape.n_positions,
        n_embd: shape.n_embd,
        n_layer: shape.n_layer,
        n_head: shape.n_head,
        bos_token_id: Some(eos),
        eos_token_id: Some(eos),
        ..Default::default()
    };
    let config_file = dir.join("model-config.json");
    std::fs::write(&config_file, model.to_json("float32"))?;
    let mut args = vec![os("train"), os("--mode"), os("pretrain"), os("--model-config"), config_file.into()];
    args.extend([os("--tokenizer"), tokenizer.into(), os("--out"), dir.into()]);
    args.extend(flags([("--fim-rate", fim_rate.to_string())]));
    args.push(os("--data"));
    args.extend(data.iter().map(|p| p.clone().into_os_string()));
    args.extend(train_flags(settings));
    runner.wizard(args)?;
    trained(dir)
}

/// `wizard train` flags of a `[pretrain.train]`, `[draft.train]` or `[sft]` section; runs resume.
pub fn train_flags(settings: &TrainSettings) -> Vec<std::ffi::OsString> {
    let save_every = settings.steps.div_ceil(4).max(1);
    let mut args = flags([
        ("--steps", settings.steps.to_string()),
        ("--seq-len", settings.seq_len.to_string()),
        ("--batch-size", settings.batch_size.to_string()),
        ("--grad-accum", settings.grad_accum.to_string()),
        ("--lr", settings.lr.to_string()),
        ("--nproc", settings.nproc.to_string()),
        ("--zero", settings.zero.to_string()),
        ("--seed", settings.seed.to_string()),
        ("--save-every", save_every.to_string()),
    ]);
    args.push(os("--resume"));
    args
}

/// The trained checkpoint in `dir` and its loss curve.
pub fn trained(dir: &Path) -> anyhow::Result<Trained> {
    let checkpoint =
        model::train::latest_checkpoint(dir)?.with_context(|| format!("no checkpoint in {}", dir.display()))?;
    let metrics_file = dir.join("metrics.jsonl");
    let steps = metrics::read(&metrics_file, None)?;
    anyhow::ensure!(!steps.is_empty(), "{} holds no training step", metrics_file.display());
    let tail = &steps[steps.len().saturating_sub(10)..];
    let loss = tail.iter().map(|m| m.loss).sum::<f64>() / tail.len().max(1) as f64;
    Ok(Trained { checkpoint, metrics: metrics_file, loss })
}

/// The Python standard library of the setup's interpreter, for `@stdlib/NAME` inputs.
fn stdlib() -> anyhow::Result<PathBuf> {
    let info = kernels::runtime::RuntimeInfo::probe()?;
    let libtorch = std::fs::canonicalize(&info.loaded_from).unwrap_or(info.loaded_from);
    let python =
        crate::python::interpreter(&libtorch).context("no Python found beside libtorch; run scripts/setup.sh")?;
    let output = Command::new(&python)
        .args(["-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"])
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    anyhow::ensure!(output.status.success(), "{} cannot name its standard library", python.display());
    Ok(PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
}

/// Input paths, with `@stdlib/NAME` resolved in the setup's Python.
fn expand(inputs: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    let mut stdlib_dir = None;
    inputs
        .iter()
        .map(|input| match input.strip_prefix("@stdlib") {
            Some(rest) => {
                if stdlib_dir.is_none() {
                    stdlib_dir = Some(stdlib()?);
                }
                let path = stdlib_dir.as_ref().expect("set").join(rest.trim_start_matches('/'));
                anyhow::ensure!(path.exists(), "{input}: {} does not exist", path.display());
                Ok(path)
            }
            None => Ok(PathBuf::from(input)),
        })
        .collect()
}
