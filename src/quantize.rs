//! `wizard quantize`: a model directory to an int8 or int4 one (dense layers and head in blocks of 32
//! with one scale each) that loads without quantizing again, with each layer's error.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use model::gpt_bigcode::{parse_precision, GptBigCode, Precision};
use tch::{Device, Kind};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory in Hugging Face format (config.json, safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// The format to write: int8 or int4.
    #[arg(long, default_value = "int8")]
    dtype: String,
    /// Where to write the quantized directory: new, empty, or an earlier quantized copy (replaced).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// Files beside the weights that a model directory carries over unchanged.
const CARRIED: [&str; 5] =
    ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "vocab.json"];

/// The quantized directory: the carried files, then the weights, then config.json, each written
/// beside its place and renamed over it, so that a file there (a hard link to the source's, a
/// symbolic link) is replaced, never written through, and a failure leaves no torn file.
fn write_directory(model: &GptBigCode, args: &Args) -> anyhow::Result<()> {
    for name in CARRIED {
        let from = args.model.join(name);
        match std::fs::metadata(&from) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error).with_context(|| format!("cannot read {}", from.display())),
            // A FIFO would block the copy, a device would stream forever.
            Ok(metadata) if !metadata.is_file() => anyhow::bail!("{}: not a regular file", from.display()),
            Ok(_) => {}
        }
        model::files::replace_with(&args.out.join(name), |to| std::fs::copy(&from, to).map(drop))
            .with_context(|| format!("cannot copy {} into {}", from.display(), args.out.display()))?;
    }
    Ok(model.save_quantized(&args.out)?)
}

/// The directories [`create_out`] made, in the order it made them.
struct Made(Vec<PathBuf>);

impl Made {
    /// Removes what was made, deepest first: `out` with what was written into it, its parents only
    /// while they are empty (another process may have used them since).
    fn remove(&self, out: &Path) {
        for (index, dir) in self.0.iter().enumerate().rev() {
            let _ = if index + 1 == self.0.len() && dir == out {
                std::fs::remove_dir_all(dir)
            } else {
                std::fs::remove_dir(dir)
            };
        }
    }
}

/// Creates `out` and whatever of its path is missing, a component at a time, so that what this
/// call made is known exactly (`missing/../existing` makes `missing` only).
fn create_out(out: &Path) -> anyhow::Result<Made> {
    let mut made = Made(Vec::new());
    let mut path = PathBuf::new();
    for component in out.components() {
        path.push(component);
        match std::fs::create_dir(&path) {
            Ok(()) => made.0.push(path.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {}
            Err(e) => {
                made.remove(out);
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    anyhow::bail!("--out {}: {} exists and is not a directory", out.display(), path.display());
                }
                return Err(e).with_context(|| format!("cannot create --out {}", path.display()));
            }
        }
    }
    Ok(made)
}

/// Refuses an `--out` that is, once made, the model directory (by any spelling: a trailing slash,
/// a link, `MODEL/new/..`), which would be overwritten while it is read, or that holds anything but an earlier quantized copy, which writing
/// would replace.
fn check_out(args: &Args) -> anyhow::Result<()> {
    let canonical =
        |path: &Path, flag: &str| std::fs::canonicalize(path).with_context(|| format!("{flag} {}", path.display()));
    anyhow::ensure!(
        canonical(&args.out, "--out")? != canonical(&args.model, "--model")?,
        "--out {} is the model directory {}: write the quantized copy elsewhere",
        args.out.display(),
        args.model.display()
    );
    let empty = std::fs::read_dir(&args.out).with_context(|| format!("--out {}", args.out.display()))?.next().is_none();
    let quantized_copy = matches!(GptBigCode::stored_precision(&args.out), Ok(Some(Precision::Quantized(_))));
    anyhow::ensure!(
        empty || quantized_copy,
        "--out {} holds files and is not an earlier quantized copy: choose a new or empty directory, so that nothing in it is replaced",
        args.out.display()
    );
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let Ok(Precision::Quantized(format)) = parse_precision(&args.dtype) else {
        anyhow::bail!(
            "--dtype {}: wizard quantize writes int8 or int4 (other dtypes load from the original directory)",
            args.dtype
        );
    };
    // Made first: an --out that cannot be written fails before minutes of quantizing.
    let made = create_out(&args.out)?;
    let outcome = check_out(&args).and_then(|()| quantize_into(&args, format));
    if outcome.is_err() {
        made.remove(&args.out);
    }
    outcome?;
    eprintln!("wrote {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}

/// Loads, quantizes and writes the model, then prints each layer's error.
fn quantize_into(args: &Args, format: kernels::quantized::Format) -> anyhow::Result<()> {
    if args.model.join("tokenizer.json").exists() {
        // Carried over as it is: a copy that cannot load would only fail later, in every command.
        model::tokenizer::Tokenizer::from_dir(&args.model)?;
    } else {
        tracing::warn!(
            "{} has no tokenizer.json, so neither will {}: copy one in before generating with it",
            args.model.display(),
            args.out.display()
        );
    }
    let mut model = GptBigCode::load(&args.model, Kind::Float, Device::Cpu)?;
    if let Some(stored) = model.quantized_format() {
        anyhow::bail!(
            "{} already holds {} weights (from `wizard quantize`): quantize the original fp32 or bf16 directory",
            args.model.display(),
            stored.name()
        );
    }
    // The fp32 weights, for each layer's error (quantizing frees them).
    let mut originals: Vec<(String, tch::Tensor)> = model
        .vars()
        .variables()
        .into_iter()
        .filter(|(name, _)| name.ends_with(".weight") && (name.contains(".attn.c_") || name.contains(".mlp.c_")))
        .map(|(name, tensor)| (name, tensor.copy()))
        .collect();
    originals.sort_by(|a, b| a.0.cmp(&b.0));
    originals.push(("lm_head.weight".into(), model.head_weight().copy()));
    crate::device::with_quantizing_bar(format.name(), |progress| model.quantize(format, progress))
        .with_context(|| format!("cannot quantize the model in {}", args.model.display()))?;
    write_directory(&model, args)?;
    // Each layer's error: relative Frobenius norm and the largest element, dequantized against the original.
    println!("{:<36} {:>14} {:>12} {:>12}", "tensor", "shape", "rel. error", "max error");
    for (name, weight) in originals {
        let restored = model.quantized_weight(&name).context("a quantized layer is missing")?.dequantize();
        let difference = &restored - &weight;
        // In f64: the squares of large fp32 weights overflow fp32.
        let norm = |t: &tch::Tensor| t.norm_scalaropt_dtype(2, Kind::Double).double_value(&[]);
        let relative = norm(&difference) / norm(&weight).max(f64::MIN_POSITIVE);
        let largest = difference.abs().max().double_value(&[]);
        let shape = format!("{:?}", weight.size());
        println!("{name:<36} {shape:>14} {relative:>12.2e} {largest:>12.2e}");
    }
    Ok(())
}
