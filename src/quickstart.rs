//! `wizard quickstart`: the pipeline on an embedded toy-scale configuration (`quickstart.toml`), with
//! no network and nothing to configure, then how to attach `wizard serve` with the produced model and
//! draft to Neovim and VS Code. `WIZARD_EVOLVE_BASE_URL` and `WIZARD_EVOLVE_MODEL` (with the key in
//! `OPENAI_API_KEY`) make an OpenAI-compatible endpoint evolve the instructions instead of the base model.
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;

use crate::stages::{self, config::Config};

/// The embedded configuration, written to `OUT/wizard.toml`.
pub const CONFIG: &str = include_str!("quickstart.toml");

#[derive(clap::Args)]
pub struct Args {
    /// Output folder: every artefact, the configuration and the report.
    #[arg(long, value_name = "DIR", default_value = "wizard-quickstart")]
    out: PathBuf,
    /// Weights for the stages that generate (evolve, eval) and for the serve script: float32,
    /// bfloat16, int8 or int4 (default float32).
    #[arg(long, value_parser = crate::device::known_dtype)]
    dtype: Option<String>,
}

/// The embedded configuration, with `dtype` in `[run]` when given and an OpenAI-compatible endpoint
/// for evolution when the environment names one.
fn config_text(dtype: Option<&str>) -> String {
    let config = match dtype {
        Some(dtype) => CONFIG.replacen("[run]\n", &format!("[run]\ndtype = {}\n", toml_string(dtype)), 1),
        None => CONFIG.to_string(),
    };
    let url = std::env::var("WIZARD_EVOLVE_BASE_URL").ok().filter(|v| !v.is_empty());
    let model = std::env::var("WIZARD_EVOLVE_MODEL").ok().filter(|v| !v.is_empty());
    match (url, model) {
        (Some(url), Some(model)) => {
            let line = format!("[evolve]\nbase_url = {}\nmodel = {}\n", toml_string(&url), toml_string(&model));
            config.replacen("[evolve]", line.trim_end(), 1)
        }
        _ => config,
    }
}

fn toml_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let out = std::fs::canonicalize(&args.out)?;
    let config_file = out.join("wizard.toml");
    let text = config_text(args.dtype.as_deref());
    std::fs::write(&config_file, &text).with_context(|| format!("cannot write {}", config_file.display()))?;
    let config = Config::parse(&text, &out).context("the embedded quickstart configuration")?;
    eprintln!(
        "wizard quickstart into {} (configuration: {}); HumanEval is scored on its first {} problems",
        out.display(),
        config_file.display(),
        config.eval.limit.map(|n| n.to_string()).unwrap_or_else(|| "164".into())
    );
    let outcome = stages::execute(&config, None)?;
    let wizard = std::env::current_exe().context("cannot find the wizard binary")?;
    // Linux names a binary replaced while it runs (a rebuild) "PATH (deleted)"; the new one is at PATH.
    let wizard = PathBuf::from(wizard.to_string_lossy().trim_end_matches(" (deleted)"));
    let script = out.join("wizard-serve.sh");
    write_serve_script(&script, &wizard, &outcome.model, outcome.draft.as_deref(), config.run.dtype.as_deref())?;
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    print!("{}", instructions(&out, &outcome, &wizard, &script, minutes, config.run.dtype.as_deref()));
    Ok(ExitCode::SUCCESS)
}

fn write_serve_script(
    path: &Path,
    wizard: &Path,
    model: &Path,
    draft: Option<&Path>,
    dtype: Option<&str>,
) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let draft = draft.map(|d| format!(" --draft '{}'", d.display())).unwrap_or_default();
    let dtype = dtype.map(|d| format!(" --dtype '{d}'")).unwrap_or_default();
    let text =
        format!("#!/bin/sh\nexec '{}' serve --model '{}'{draft}{dtype} \"$@\"\n", wizard.display(), model.display());
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn instructions(
    out: &Path,
    outcome: &stages::Outcome,
    wizard: &Path,
    script: &Path,
    minutes: f64,
    dtype: Option<&str>,
) -> String {
    let model = outcome.model.display();
    let serve_args = outcome.draft.as_ref().map(|d| format!(", '--draft', '{}'", d.display())).unwrap_or_default();
    let serve_args = serve_args + &dtype.map(|d| format!(", '--dtype', '{d}'")).unwrap_or_default();
    format!(
        r#"
Done in {minutes:.1} minutes. Everything is in {out}:
  report.md, *.svg                  the rounds table and plots (best round {best}, HumanEval pass@1 {pass1:.4})
  model -> {model}
  draft                             {draft}
  evolve.sqlite, pipeline.sqlite    the evolved instructions and the stage state
  wizard.toml                       this run's configuration: `wizard pipeline --config {out}/wizard.toml`

A model this small writes little working code; the point is the procedure. See the README's "real scale" recipe.

Attach the model to an editor (`wizard serve` speaks LSP over stdio; the draft turns on speculative decoding):

Neovim (0.10+), in init.lua:

vim.api.nvim_create_autocmd('FileType', {{ pattern = {{ 'python' }}, callback = function()
  vim.lsp.start({{ name = 'wizard', cmd = {{ '{wizard}', '--log-file', '/tmp/wizard.log', 'serve', '--model', '{model}'{serve_args} }},
                  init_options = {{ maxTokens = 64 }} }})
end }})

VS Code (llm-vscode with wizard as its language server), settings.json:

{{ "llm.lsp.binaryPath": "{script}", "llm.fillInTheMiddle.enabled": true, "llm.contextWindow": 1024 }}

({script} runs `wizard serve` with both models.)
"#,
        out = out.display(),
        best = outcome.best_round,
        pass1 = outcome.best_pass1,
        draft = outcome.draft.as_ref().map(|d| d.display().to_string()).unwrap_or_else(|| "(none)".into()),
        wizard = wizard.display(),
        script = script.display(),
    )
}
