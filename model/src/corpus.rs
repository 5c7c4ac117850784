//! The corpus that tokenizer training and pretraining read. Inputs are files or directories;
//! directories are walked in name order (hidden entries and symlinked directories skipped) for files
//! with a wanted extension and for `.jsonl` files; a file named as an input is always read. A source
//! file is one document (skipped if it is not UTF-8); a JSONL line is one document, its `content`
//! (The Stack's name) or else its `text`.
use std::collections::HashSet;
use std::fs;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::jsonl::{LineError, Lines};
use crate::{ModelError, Result};

/// File extensions taken from directories when none are given. `.jsonl` files are always taken.
pub const DEFAULT_EXTENSIONS: &[&str] = &[
    "py", "pyi", "rs", "js", "mjs", "cjs", "jsx", "ts", "tsx", "go", "c", "h", "cc", "cpp", "cxx", "hpp", "hh", "hxx",
    "cu", "cuh", "java", "kt", "kts", "scala", "cs", "fs", "swift", "m", "mm", "rb", "php", "lua", "pl", "pm", "r",
    "jl", "hs", "ml", "mli", "ex", "exs", "erl", "clj", "dart", "zig", "nim", "sh", "bash", "zsh", "ps1", "sql",
    "html", "css", "scss", "vue", "svelte", "md", "rst", "tex", "toml", "yaml", "yml", "xml", "proto", "cmake",
];

/// How often a JSONL file reports progress, in lines.
const JSONL_PROGRESS_EVERY: usize = 4096;

/// A file to read documents from.
pub(crate) struct Source {
    path: PathBuf,
    jsonl: bool,
}

/// What reading the corpus found.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Files read (JSONL files included, skipped files not).
    pub files: usize,
    /// Documents read.
    pub documents: usize,
    /// UTF-8 bytes of those documents.
    pub bytes: u64,
    /// Source files skipped because they are not UTF-8.
    pub skipped_non_utf8: usize,
    /// Bad JSONL lines skipped (only when asked to).
    pub skipped_lines: usize,
}

/// The files of `inputs` to read, in order; `extensions` are compared without a leading dot and
/// case-insensitively.
pub(crate) fn sources(inputs: &[PathBuf], extensions: &[String]) -> Result<Vec<Source>> {
    let extensions: HashSet<String> =
        extensions.iter().map(|e| e.trim_start_matches('.').to_ascii_lowercase()).collect();
    let mut sources = Vec::new();
    for input in inputs {
        collect(input, &extensions, true, &mut sources)?;
    }
    Ok(sources)
}

fn is_jsonl(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("jsonl"))
}

/// Adds `path` to `out`: a file `named` by the user always, a file found in a directory if its
/// extension is wanted; directories recursively.
fn collect(path: &Path, extensions: &HashSet<String>, named: bool, out: &mut Vec<Source>) -> Result<()> {
    let metadata = fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if metadata.is_file() {
        let wanted = named
            || is_jsonl(path)
            || path.extension().and_then(|e| e.to_str()).is_some_and(|e| extensions.contains(&e.to_ascii_lowercase()));
        if wanted {
            out.push(Source { path: path.to_path_buf(), jsonl: is_jsonl(path) });
        }
        return Ok(());
    }
    if !metadata.is_dir() {
        return Ok(());
    }
    let mut entries = fs::read_dir(path)
        .and_then(|entries| entries.collect::<std::io::Result<Vec<_>>>())
        .map_err(|e| ModelError::io(path, e))?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let file_type = entry.file_type().map_err(|e| ModelError::io(entry.path(), e))?;
        if file_type.is_symlink() && entry.path().is_dir() {
            continue;
        }
        collect(&entry.path(), extensions, false, out)?;
    }
    Ok(())
}

/// One line of a JSONL corpus.
#[derive(Deserialize)]
struct JsonlLine {
    content: Option<String>,
    text: Option<String>,
}

/// The documents of the sources, read lazily. The first error ends the iteration and is returned by
/// [`Documents::finish`], since a tokenizer trainer's iterator cannot fail.
pub(crate) struct Documents<'a> {
    sources: std::slice::Iter<'a, Source>,
    jsonl: Option<(&'a Path, Lines<Box<dyn BufRead + Send>>)>,
    stats: Stats,
    failure: Option<ModelError>,
    /// Called after each file, and every few thousand JSONL lines, with the file being read.
    on_read: &'a mut (dyn FnMut(&Path, &Stats) + Send),
    /// Count and skip JSONL lines that do not parse, instead of stopping.
    skip_bad_lines: bool,
}

impl<'a> Documents<'a> {
    pub(crate) fn new(
        sources: &'a [Source],
        skip_bad_lines: bool,
        on_read: &'a mut (dyn FnMut(&Path, &Stats) + Send),
    ) -> Self {
        Documents {
            sources: sources.iter(),
            jsonl: None,
            stats: Stats::default(),
            failure: None,
            on_read,
            skip_bad_lines,
        }
    }

    /// What was read, or the error that stopped the reading; finding no document at all is an error.
    pub(crate) fn finish(self, inputs: &[PathBuf]) -> Result<Stats> {
        if let Some(error) = self.failure {
            return Err(error);
        }
        if self.stats.documents == 0 {
            return Err(ModelError::Invalid(format!(
                "no documents found in {} ({} non-UTF-8 files skipped)",
                display_paths(inputs),
                self.stats.skipped_non_utf8
            )));
        }
        Ok(self.stats)
    }

    fn count(&mut self, document: &str) {
        self.stats.documents += 1;
        self.stats.bytes += document.len() as u64;
    }

    /// Starts on `source`: a JSONL file is opened for the lines that follow; a source file is one
    /// document, returned.
    fn open(&mut self, source: &'a Source) -> Option<String> {
        if source.jsonl {
            match Lines::open(&source.path) {
                Ok(lines) => {
                    self.stats.files += 1;
                    self.jsonl = Some((&source.path, lines));
                }
                Err(error) => self.failure = Some(ModelError::io(&source.path, error)),
            }
            return None;
        }
        match fs::read(&source.path).map(String::from_utf8) {
            Ok(Ok(text)) => {
                self.stats.files += 1;
                self.count(&text);
                (self.on_read)(&source.path, &self.stats);
                Some(text)
            }
            Ok(Err(_)) => {
                tracing::warn!("skipping {}: not UTF-8", source.path.display());
                self.stats.skipped_non_utf8 += 1;
                None
            }
            Err(error) => {
                self.failure = Some(ModelError::io(&source.path, error));
                None
            }
        }
    }
}

impl Iterator for Documents<'_> {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        while self.failure.is_none() {
            let Some((path, lines)) = &mut self.jsonl else {
                let source = self.sources.next()?;
                match self.open(source) {
                    Some(document) => return Some(document),
                    None => continue,
                }
            };
            let path = *path;
            let document = lines.read::<JsonlLine>().and_then(|line| match line {
                None => Ok(None),
                Some(JsonlLine { content, text }) => match content.or(text) {
                    Some(document) => Ok(Some(document)),
                    None => Err(lines.error("no string field `content` or `text`")),
                },
            });
            let line = lines.line();
            match document {
                Ok(Some(document)) => {
                    self.count(&document);
                    if line % JSONL_PROGRESS_EVERY == 0 {
                        (self.on_read)(path, &self.stats);
                    }
                    return Some(document);
                }
                Ok(None) => {
                    self.jsonl = None;
                    (self.on_read)(path, &self.stats);
                }
                Err(LineError::Bad { line, message }) if self.skip_bad_lines => {
                    tracing::warn!("skipping {}: line {line}: {message}", path.display());
                    self.stats.skipped_lines += 1;
                }
                Err(error) => self.failure = Some(ModelError::jsonl(path, error)),
            }
        }
        None
    }
}

/// Every document of `inputs`, in order, and how many bad JSONL lines were skipped (only with
/// `skip_bad_lines`; otherwise the first one is an error).
pub(crate) fn read_documents(
    inputs: &[PathBuf],
    extensions: &[String],
    skip_bad_lines: bool,
) -> Result<(Vec<String>, usize)> {
    let sources = sources(inputs, extensions)?;
    let mut ignore = |_: &Path, _: &Stats| {};
    let mut documents = Documents::new(&sources, skip_bad_lines, &mut ignore);
    let texts: Vec<String> = documents.by_ref().collect();
    let stats = documents.finish(inputs)?;
    Ok((texts, stats.skipped_lines))
}

pub(crate) fn display_paths(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}
