//! Byte-level BPE tokenizers in StarCoder's layout: training one on source files and JSONL corpora,
//! writing it as a Hugging Face tokenizer directory that `transformers.AutoTokenizer` loads, and
//! encoding and decoding text with it.
//!
//! The pipeline mirrors StarCoder's `tokenizer.json`: no normalizer, a ByteLevel pre-tokenizer (GPT-2
//! regex, no prefix space), a BPE model whose alphabet is all 256 byte symbols (so every input is
//! encodable and nothing is ever unknown), a ByteLevel post-processor that adds nothing, and a
//! ByteLevel decoder. The 19 special tokens of [`SPECIAL_TOKENS`] hold ids 0..=18, as in StarCoder.
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, NormalizerWrapper, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, TokenizerBuilder,
    Trainer,
};

use crate::corpus::{self, DEFAULT_EXTENSIONS};
use crate::{files, ModelError, Result};

/// StarCoder's special tokens; the token at index `i` has id `i`.
pub const SPECIAL_TOKENS: [&str; 19] = [
    "<|endoftext|>",
    "<fim_prefix>",
    "<fim_middle>",
    "<fim_suffix>",
    "<fim_pad>",
    "<filename>",
    "<gh_stars>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<empty_output>",
    "<commit_before>",
    "<commit_msg>",
    "<commit_after>",
    "<reponame>",
];

/// End of text, also used as beginning of text and unknown token (id 0).
pub const EOS_TOKEN: &str = SPECIAL_TOKENS[0];

/// The smallest vocabulary: the special tokens plus one token per byte.
pub const MIN_VOCAB_SIZE: usize = SPECIAL_TOKENS.len() + 256;

/// The context length StarCoder was trained with; written as `model_max_length`.
pub const DEFAULT_MODEL_MAX_LENGTH: usize = 8192;

/// What to train on and how big a vocabulary to learn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainConfig {
    /// Files or directories. Directories are walked recursively (hidden entries skipped) for files with
    /// one of [`TrainConfig::extensions`] and for `.jsonl` files; a file named here is always read.
    pub inputs: Vec<PathBuf>,
    /// The vocabulary size to reach, special tokens and the 256 byte tokens included.
    pub vocab_size: usize,
    /// A pair must occur at least this often to be merged.
    pub min_frequency: u64,
    /// Extensions (without the dot, compared case-insensitively) of the files taken from directories.
    pub extensions: Vec<String>,
    /// Written to `tokenizer_config.json` as `model_max_length`.
    pub model_max_length: usize,
}

impl TrainConfig {
    /// A config with the default extensions, `min_frequency` 2 and StarCoder's context length.
    pub fn new(inputs: Vec<PathBuf>, vocab_size: usize) -> Self {
        TrainConfig {
            inputs,
            vocab_size,
            min_frequency: 2,
            extensions: DEFAULT_EXTENSIONS.iter().map(|e| e.to_string()).collect(),
            model_max_length: DEFAULT_MODEL_MAX_LENGTH,
        }
    }
}

/// What a training run read and wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainReport {
    /// Input files read (JSONL files included, skipped files not).
    pub files: usize,
    /// Documents trained on: one per source file, one per JSONL line.
    pub documents: usize,
    /// UTF-8 bytes of those documents.
    pub bytes: u64,
    /// Source files skipped because they are not UTF-8.
    pub skipped_non_utf8: usize,
    /// The vocabulary size reached, special tokens included (at most the requested size).
    pub vocab_size: usize,
    /// The files written, in the order they were written.
    pub written: Vec<PathBuf>,
}

/// Progress of [`train_with_progress`], for a progress bar.
#[derive(Debug, Clone, Copy)]
pub enum TrainEvent<'a> {
    /// The inputs were walked: this many files will be read.
    Found {
        /// Files to read.
        files: usize,
    },
    /// Documents were read from `path` (after each file, and every few thousand JSONL lines).
    Read {
        /// The file being read.
        path: &'a Path,
        /// Documents read so far, over all files.
        documents: usize,
        /// Bytes read so far, over all files.
        bytes: u64,
    },
    /// Everything was read; merges are being learned.
    Merging {
        /// Documents read.
        documents: usize,
    },
    /// The tokenizer is being written.
    Writing {
        /// The output directory.
        dir: &'a Path,
    },
}

/// Trains a tokenizer on `config.inputs` and writes it into `out_dir` (created if missing):
/// `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`, each replaced atomically.
pub fn train(config: &TrainConfig, out_dir: &Path) -> Result<TrainReport> {
    train_with_progress(config, out_dir, &mut |_| {})
}

/// [`train`], calling `on_event` as it goes (possibly from a worker thread).
pub fn train_with_progress(
    config: &TrainConfig,
    out_dir: &Path,
    on_event: &mut (dyn FnMut(TrainEvent<'_>) + Send),
) -> Result<TrainReport> {
    let _span = tracing::info_span!("tokenizer_train", vocab_size = config.vocab_size).entered();
    if config.vocab_size < MIN_VOCAB_SIZE {
        return Err(ModelError::Invalid(format!(
            "`vocab_size` is {}, but it must be at least {MIN_VOCAB_SIZE} ({} special tokens + 256 byte tokens)",
            config.vocab_size,
            SPECIAL_TOKENS.len()
        )));
    }
    if config.inputs.is_empty() {
        return Err(ModelError::Invalid("no inputs to train the tokenizer on".into()));
    }
    let sources = corpus::sources(&config.inputs, &config.extensions)?;
    if sources.is_empty() {
        return Err(ModelError::Invalid(format!(
            "no source files under {} (looked for .jsonl and .{})",
            corpus::display_paths(&config.inputs),
            config.extensions.join(", .")
        )));
    }
    on_event(TrainEvent::Found { files: sources.len() });
    tracing::info!("reading {} files", sources.len());

    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(config.vocab_size)
        .min_frequency(config.min_frequency)
        .show_progress(false)
        .special_tokens(SPECIAL_TOKENS.iter().map(|&t| special_token(t)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let pre_tokenizer = ByteLevel::new(false, true, true);
    let mut on_read = |path: &Path, stats: &corpus::Stats| {
        on_event(TrainEvent::Read { path, documents: stats.documents, bytes: stats.bytes })
    };
    let mut documents = corpus::Documents::new(&sources, false, &mut on_read);
    // The tokenizer has no added tokens yet, so this is exactly what `TokenizerImpl::train` feeds; feeding
    // ourselves lets a bad input line stop the run before any merges are learned.
    trainer
        .feed(&mut documents, |text| {
            let mut pre_tokenized = PreTokenizedString::from(text);
            pre_tokenizer.pre_tokenize(&mut pre_tokenized)?;
            Ok(pre_tokenized
                .get_splits(OffsetReferential::Original, OffsetType::Byte)
                .into_iter()
                .map(|(word, _, _)| word.to_owned())
                .collect())
        })
        .map_err(|e| tokenizer_error(out_dir, format!("could not pre-tokenize the corpus: {e}")))?;
    let stats = documents.finish(&config.inputs)?;

    on_event(TrainEvent::Merging { documents: stats.documents });
    let mut model = BPE::default();
    let specials =
        trainer.train(&mut model).map_err(|e| tokenizer_error(out_dir, format!("BPE training failed: {e}")))?;
    let mut tokenizer: tokenizers::Tokenizer =
        TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
            .with_model(model)
            .with_pre_tokenizer(Some(pre_tokenizer))
            .with_post_processor(Some(ByteLevel::new(false, false, true)))
            .with_decoder(Some(ByteLevel::new(false, true, true)))
            .build()
            .map_err(|e| tokenizer_error(out_dir, e.to_string()))?
            .into();
    tokenizer.add_special_tokens(specials).map_err(|e| tokenizer_error(out_dir, e.to_string()))?;
    for (id, token) in SPECIAL_TOKENS.iter().enumerate() {
        if tokenizer.token_to_id(token) != Some(id as u32) {
            return Err(tokenizer_error(out_dir, format!("special token {token} did not get id {id}")));
        }
    }

    on_event(TrainEvent::Writing { dir: out_dir });
    let written = write_tokenizer_dir(&tokenizer, config, out_dir)?;
    let vocab_size = tokenizer.get_vocab_size(true);
    tracing::info!("trained {vocab_size} tokens on {} documents, wrote {}", stats.documents, out_dir.display());
    Ok(TrainReport {
        files: stats.files,
        documents: stats.documents,
        bytes: stats.bytes,
        skipped_non_utf8: stats.skipped_non_utf8,
        vocab_size,
        written,
    })
}

/// A trained tokenizer loaded from a Hugging Face tokenizer directory.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    eos_id: u32,
    /// The `vocab_size` of the model beside it (its config.json), where there is one: ids from it
    /// on have no embedding, and text that encodes to them is refused.
    model_vocab: Option<u64>,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`, which must define [`EOS_TOKEN`].
    pub fn from_dir(dir: &Path) -> Result<Tokenizer> {
        if dir.is_file() {
            let message = format!(
                "{}: a file, where a model directory (config.json, tokenizer.json, ...) was expected",
                dir.display()
            );
            return Err(ModelError::Invalid(message));
        }
        let path = dir.join("tokenizer.json");
        let text = crate::files::read_regular_to_string(&path)
            .map_err(|e| tokenizer_error(&path, format!("cannot read it: {e}")))?;
        let inner: tokenizers::Tokenizer =
            text.parse().map_err(|e| tokenizer_error(&path, format!("not a valid tokenizer.json: {e}")))?;
        let eos_id =
            inner.token_to_id(EOS_TOKEN).ok_or_else(|| tokenizer_error(&path, format!("has no {EOS_TOKEN} token")))?;
        // The vocabulary proper (added tokens aside) must have rows in the embedding of the model
        // beside it; added tokens past it (a pad token added without resizing the embedding) are
        // refused only where a text holds them.
        let config = dir.join("config.json");
        let model_vocab = model_vocab_size(&config);
        if let Some(vocab_size) = model_vocab {
            let largest = inner.get_vocab(false).into_values().max().unwrap_or(0);
            if u64::from(largest) >= vocab_size {
                let message = format!(
                    "holds token id {largest}, but {}'s vocab_size is {vocab_size}: the model has no embedding for ids from {vocab_size} on",
                    config.display()
                );
                return Err(tokenizer_error(&path, message));
            }
        }
        Ok(Tokenizer { inner, path, eos_id, model_vocab })
    }

    /// The token ids of `text`, without any added BOS/EOS. Special tokens written in the text are
    /// recognised and encoded as their single ids, as Hugging Face tokenizers do.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode_fast(text, false).map_err(|e| tokenizer_error(&self.path, e.to_string()))?;
        let ids = encoding.get_ids();
        if let Some(limit) = self.model_vocab {
            if let Some(&id) = ids.iter().find(|&&id| u64::from(id) >= limit) {
                let token = self.inner.id_to_token(id).unwrap_or_default();
                let message = format!(
                    "the text holds `{token}` (id {id}), which the model (vocab_size {limit}) has no embedding for"
                );
                return Err(ModelError::Invalid(message));
            }
        }
        Ok(ids.to_vec())
    }

    /// The text of `ids`. Special tokens are written out unless `skip_special` is set. An id outside the
    /// vocabulary is an error.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.check_ids(ids)?;
        self.inner.decode(ids, skip_special).map_err(|e| tokenizer_error(&self.path, e.to_string()))
    }

    /// Where each token's text starts in `decode(ids, skip_special)`, in characters (see
    /// [`TextOffsets`](crate::text_offsets::TextOffsets)).
    pub fn char_offsets(&self, ids: &[u32], skip_special: bool) -> Result<Vec<usize>> {
        self.check_ids(ids)?;
        let mut text = crate::text_offsets::TextOffsets::default();
        for &id in ids {
            text.push(&self.token_bytes(id, skip_special));
        }
        text.finish();
        Ok((0..ids.len()).map(|index| text.offset(index).unwrap_or(0)).collect())
    }

    /// The bytes token `id` adds to `decode(.., skip_special)`: exact where the decoder is
    /// byte-level (GPT-2's map from bytes to characters, as every StarCoder tokenizer has), else
    /// the token decoded alone.
    pub fn token_bytes(&self, id: u32, skip_special: bool) -> Vec<u8> {
        let byte_level = matches!(self.inner.get_decoder(), Some(tokenizers::DecoderWrapper::ByteLevel(_)));
        match self.inner.id_to_token(id) {
            Some(token) if byte_level => {
                if skip_special && self.inner.get_added_vocabulary().is_special_token(&token) {
                    return Vec::new();
                }
                // As the byte-level decoder does: a token outside the map is its own UTF-8.
                token.chars().map(byte_level_byte).collect::<Option<Vec<u8>>>().unwrap_or_else(|| token.into_bytes())
            }
            _ => self.inner.decode(&[id], skip_special).unwrap_or_default().into_bytes(),
        }
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let size = self.vocab_size();
        match ids.iter().find(|&&id| id as usize >= size) {
            Some(bad) => Err(ModelError::Invalid(format!(
                "token id {bad} is outside the vocabulary of {} ({size} tokens)",
                self.path.display()
            ))),
            None => Ok(()),
        }
    }

    /// The id of `token` (a vocabulary entry in byte-level form, or a special token).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The number of ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of [`EOS_TOKEN`].
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The lowest-numbered token that `other` numbers otherwise, or lacks, or holds and this one
    /// lacks, described; `None` when both number every token alike.
    pub fn numbering_difference(&self, other: &Tokenizer) -> Option<String> {
        let (ours, theirs) = (self.inner.get_vocab(true), other.inner.get_vocab(true));
        let (here, there) = (self.path.display(), other.path.display());
        let differs = ours.iter().filter(|(token, id)| theirs.get(*token) != Some(id)).min_by_key(|(_, id)| **id);
        if let Some((token, id)) = differs {
            return Some(match theirs.get(token) {
                Some(their_id) => format!("`{token}` is id {id} in {here} and {their_id} in {there}"),
                None => format!("`{token}` (id {id} in {here}) is not in {there}"),
            });
        }
        let extra = theirs.iter().filter(|(token, _)| !ours.contains_key(*token)).min_by_key(|(_, id)| **id);
        extra.map(|(token, id)| format!("`{token}` (id {id} in {there}) is not in {here}"))
    }
}

fn special_token(content: &str) -> AddedToken {
    AddedToken::from(content, true)
}

/// `vocab_size` of the config.json at `path`, where it can be read (else the model's loading says why).
fn model_vocab_size(path: &Path) -> Option<u64> {
    let text = crate::files::read_regular_to_string(path).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?.get("vocab_size")?.as_u64()
}

fn tokenizer_error(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Tokenizer { path: path.to_path_buf(), message: message.into() }
}

/// Writes the Hugging Face tokenizer files, `tokenizer.json` last.
fn write_tokenizer_dir(tokenizer: &tokenizers::Tokenizer, config: &TrainConfig, dir: &Path) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let special = |token: &str| {
        json!({
            "content": token, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true,
        })
    };
    let additional: Vec<&str> = SPECIAL_TOKENS[1..].to_vec();
    let added_tokens_decoder: serde_json::Map<String, Value> =
        SPECIAL_TOKENS.iter().enumerate().map(|(id, token)| (id.to_string(), special(token))).collect();
    let tokenizer_config = json!({
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "add_prefix_space": false,
        "add_bos_token": false,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": config.model_max_length,
        "vocab_size": tokenizer.get_vocab_size(true),
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": additional,
    });
    let special_tokens_map = json!({
        "bos_token": special(EOS_TOKEN),
        "eos_token": special(EOS_TOKEN),
        "unk_token": special(EOS_TOKEN),
        "additional_special_tokens": additional,
    });
    let tokenizer_json = tokenizer.to_string(true).map_err(|e| tokenizer_error(dir, e.to_string()))?;
    let files = [
        ("tokenizer_config.json", pretty(&tokenizer_config)),
        ("special_tokens_map.json", pretty(&special_tokens_map)),
        ("tokenizer.json", tokenizer_json),
    ];
    let mut written = Vec::new();
    for (name, contents) in files {
        let path = dir.join(name);
        files::write_atomically(&path, contents.as_bytes()).map_err(|e| ModelError::io(&path, e))?;
        written.push(path);
    }
    Ok(written)
}

fn pretty(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("a JSON value serializes");
    text.push('\n');
    text
}

/// The byte GPT-2's byte-level alphabet writes as `c`: printable Latin-1 as itself, the other
/// bytes, in order, from U+0100 on.
fn byte_level_byte(c: char) -> Option<u8> {
    static BYTES: std::sync::OnceLock<[Option<u8>; 0x144]> = std::sync::OnceLock::new();
    let table = BYTES.get_or_init(|| {
        let printable = |b: u8| matches!(b, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff);
        let mut table = [None; 0x144];
        let mut next = 0x100;
        for byte in 0..=255u8 {
            if printable(byte) {
                table[usize::from(byte)] = Some(byte);
            } else {
                table[next] = Some(byte);
                next += 1;
            }
        }
        table
    });
    table.get(c as usize).copied().flatten()
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;

    const CORPUS_PY: &str = r#"import os
import sys


def read_lines(path):
    """Return the lines of a file, without their newlines."""
    with open(path, encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle]


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, word):
        self.counts[word] = self.counts.get(word, 0) + 1
        return self.counts[word]


if __name__ == "__main__":
    counter = Counter()
    for line in read_lines(sys.argv[1]):
        for word in line.split():
            counter.add(word)
    print(sorted(counter.counts.items(), key=lambda item: -item[1])[:10])
"#;

    const CORPUS_RS: &str = r#"use std::collections::HashMap;

/// Counts words.
pub fn count_words(text: &str) -> HashMap<&str, usize> {
    let mut counts = HashMap::new();
    for word in text.split_whitespace() {
        *counts.entry(word).or_insert(0) += 1;
    }
    counts
}

fn main() {
    let text = std::fs::read_to_string("input.txt").expect("readable");
    let counts = count_words(&text);
    println!("{} distinct words", counts.len());
}
"#;

    /// A tokenizer trained once on the corpus above, for all the tests that only read it.
    fn trained() -> &'static Tokenizer {
        static TRAINED: OnceLock<(tempfile::TempDir, Tokenizer)> = OnceLock::new();
        &TRAINED
            .get_or_init(|| {
                let dir = tempfile::tempdir().unwrap();
                let corpus = dir.path().join("corpus");
                fs::create_dir(&corpus).unwrap();
                fs::write(corpus.join("count.py"), CORPUS_PY.repeat(3)).unwrap();
                fs::write(corpus.join("count.rs"), CORPUS_RS.repeat(3)).unwrap();
                let out = dir.path().join("tokenizer");
                train(&TrainConfig::new(vec![corpus], 400), &out).unwrap();
                let tokenizer = Tokenizer::from_dir(&out).unwrap();
                (dir, tokenizer)
            })
            .1
    }

    /// `text` must decode back to itself, contain exactly `specials` as special-token ids (in order), and
    /// decode to itself minus those tokens when they are skipped.
    fn check(text: &str, specials: &[&str]) {
        let tokenizer = trained();
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text, "round trip of {text:?} via {ids:?}");
        let found: Vec<&str> = ids.iter().filter(|&&id| id < 19).map(|&id| SPECIAL_TOKENS[id as usize]).collect();
        assert_eq!(found, specials, "special tokens in {text:?}");
        let without = specials.iter().fold(text.to_string(), |text, token| text.replacen(token, "", 1));
        assert_eq!(tokenizer.decode(&ids, true).unwrap(), without, "decode of {text:?} skipping special tokens");
    }

    #[test]
    fn text_round_trips_and_special_tokens_are_single_ids() {
        check("", &[]);
        check("def f(x):\n    return x + 1\n", &[]);
        check("\tindented\twith tabs\r\nand CRLF\r\n", &[]);
        check("   leading and trailing spaces   ", &[]);
        check("unicode: héllo wörld — ñ, 中文, 日本語, Ελληνικά", &[]);
        check("emoji 🦀🐍 and a ZWJ sequence 👩‍💻", &[]);
        check("control \u{0}\u{1}\u{7f} bytes", &[]);
        check("<|endoftext|>", &["<|endoftext|>"]);
        check("<fim_prefix>def f(<fim_suffix>)\n<fim_middle>", &["<fim_prefix>", "<fim_suffix>", "<fim_middle>"]);
        check("<reponame>wizard<filename>src/main.rs<gh_stars>10", &["<reponame>", "<filename>", "<gh_stars>"]);
        check("almost special: <|endoftext| and <fim_prefix", &[]);
        check("x = 1<|endoftext|>y = 2<|endoftext|>", &["<|endoftext|>", "<|endoftext|>"]);
    }

    #[test]
    fn special_tokens_hold_ids_0_to_18_and_the_vocabulary_is_bounded() {
        let tokenizer = trained();
        for (id, token) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tokenizer.token_id(token), Some(id as u32), "{token}");
        }
        assert_eq!(tokenizer.eos_id(), 0);
        assert!((MIN_VOCAB_SIZE..=400).contains(&tokenizer.vocab_size()), "{}", tokenizer.vocab_size());
        // Learned merges: a frequent word of the corpus is one token.
        assert_eq!(tokenizer.encode("counts").unwrap().len(), 1);
    }

    #[test]
    fn decoding_an_id_outside_the_vocabulary_is_an_error() {
        let tokenizer = trained();
        let error = tokenizer.decode(&[1, 100_000], false).unwrap_err().to_string();
        assert!(error.contains("token id 100000 is outside the vocabulary"), "{error}");
    }

    /// Trains on `files` (name, contents) laid out in a fresh directory, which is the only input.
    fn train_on(files: &[(&str, &[u8])], vocab_size: usize) -> (tempfile::TempDir, Result<TrainReport>) {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus");
        fs::create_dir(&corpus).unwrap();
        for (name, contents) in files {
            let path = corpus.join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, contents).unwrap();
        }
        let report = train(&TrainConfig::new(vec![corpus], vocab_size), &dir.path().join("out"));
        (dir, report)
    }

    fn check_error(files: &[(&str, &[u8])], vocab_size: usize, expected: &[&str]) {
        let error = train_on(files, vocab_size).1.expect_err("training must fail").to_string();
        for part in expected {
            assert!(error.contains(part), "{error:?} should contain {part:?}");
        }
    }

    #[test]
    fn bad_inputs_are_errors_naming_file_line_or_field() {
        let py: &[u8] = CORPUS_PY.as_bytes();
        check_error(&[("a.py", py)], 10, &["`vocab_size` is 10", "at least 275"]);
        check_error(
            &[("data.jsonl", b"{\"content\": \"x\"}\n\n{\"content\": \"y\"}\n{\"content\": ]\n")],
            400,
            &["data.jsonl: line 4: expected value at column 13"],
        );
        check_error(
            &[("data.jsonl", b"{\"content\": \"x\"}\n{\"content\": ")],
            400,
            &["data.jsonl: line 2: EOF while parsing a value at column 12"],
        );
        check_error(
            &[("data.jsonl", b"{\"content\": \"x\"}\n{\"code\": \"y\"}\n")],
            400,
            &["data.jsonl: line 2: no string field `content` or `text`"],
        );
        check_error(&[("data.jsonl", b"{\"content\": 5}\n")], 400, &["data.jsonl: line 1: invalid type", "at column"]);
        check_error(&[("data.jsonl", b"{\"content\": \"\xff\"}\n")], 400, &["data.jsonl: line 1: not UTF-8"]);
        check_error(&[("notes.unknown-extension", py)], 400, &["no source files under", "corpus"]);
        check_error(&[("latin1.py", b"caf\xe9\n")], 400, &["no documents found in", "1 non-UTF-8 files skipped"]);
        check_error(&[], 400, &["no source files under"]);
    }

    #[test]
    fn directories_are_walked_for_code_and_jsonl_skipping_hidden_and_non_utf8_files() {
        let (_dir, report) = train_on(
            &[
                ("pkg/count.py", CORPUS_PY.as_bytes()),
                ("pkg/sub/count.rs", CORPUS_RS.as_bytes()),
                ("pkg/latin1.py", b"caf\xe9\n"),
                (".git/config.py", b"hidden = True\n"),
                ("README.unknown", b"not code\n"),
                ("data.jsonl", b"{\"content\": \"ab\"}\n{\"text\": \"cde\", \"id\": 7}\n\n"),
            ],
            400,
        );
        let report = report.unwrap();
        assert_eq!(report.files, 3, "{report:?}");
        assert_eq!(report.documents, 4, "{report:?}");
        assert_eq!(report.bytes, (CORPUS_PY.len() + CORPUS_RS.len() + 5) as u64, "{report:?}");
        assert_eq!(report.skipped_non_utf8, 1, "{report:?}");
        let names: Vec<_> = report.written.iter().map(|p| p.file_name().unwrap().to_str().unwrap()).collect();
        assert_eq!(names, ["tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"]);
        let dir = report.written[0].parent().unwrap();
        let leftovers: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 3, "temporary files left behind: {leftovers:?}");
    }

    fn check_load_error(contents: Option<&str>, expected: &str) {
        let dir = tempfile::tempdir().unwrap();
        if let Some(contents) = contents {
            fs::write(dir.path().join("tokenizer.json"), contents).unwrap();
        }
        let error = Tokenizer::from_dir(dir.path()).unwrap_err();
        assert!(matches!(error, ModelError::Tokenizer { .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.contains(&dir.path().join("tokenizer.json").display().to_string()), "{message}");
        assert!(message.contains(expected), "{message:?} should contain {expected:?}");
    }

    #[test]
    fn a_missing_or_corrupt_tokenizer_json_is_named() {
        check_load_error(None, "cannot read it");
        check_load_error(Some("{\"model\": "), "not a valid tokenizer.json");
        let no_eos = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}"#;
        check_load_error(Some(no_eos), "has no <|endoftext|> token");
    }

    /// A tokenizer beside a model must not hand it ids its embedding lacks: a vocabulary past the
    /// model's is refused at load, an added token past it where a text holds it.
    #[test]
    fn a_tokenizer_with_ids_beyond_the_models_vocabulary_is_refused() {
        let tokenizer = r#"{"version": "1.0", "truncation": null, "padding": null, "normalizer": null,
            "added_tokens": [{"id": 3, "content": "[PAD]", "single_word": false, "lstrip": false, "rstrip": false,
                              "normalized": false, "special": true}],
            "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "vocab": {"<|endoftext|>": 0, "a": 1, "b": 2}, "merges": []}}"#;
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("tokenizer.json"), tokenizer).unwrap();
        for (config, refused) in [(r#"{"vocab_size": 2}"#, true), (r#"{"vocab_size": 3}"#, false), ("not json", false)]
        {
            fs::write(dir.path().join("config.json"), config).unwrap();
            match Tokenizer::from_dir(dir.path()) {
                Err(error) => {
                    let message = error.to_string();
                    assert!(refused, "{config}: {message}");
                    assert!(message.contains("token id 2") && message.contains("vocab_size is 2"), "{message}");
                }
                Ok(_) => assert!(!refused, "{config}: loaded"),
            }
        }
        fs::write(dir.path().join("config.json"), r#"{"vocab_size": 3}"#).unwrap();
        let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tokenizer.encode("ab").unwrap(), [1, 2]);
        let message = tokenizer.encode("a[PAD]").unwrap_err().to_string();
        assert!(message.contains("`[PAD]` (id 3)") && message.contains("vocab_size 3"), "{message}");
        fs::write(dir.path().join("config.json"), r#"{"vocab_size": 4}"#).unwrap();
        assert_eq!(Tokenizer::from_dir(dir.path()).unwrap().encode("a[PAD]").unwrap(), [1, 3]);
    }
}
