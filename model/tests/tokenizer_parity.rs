//! A tokenizer trained by `model::tokenizer::train` encodes and decodes exactly like the same files
//! loaded by Hugging Face `transformers.AutoTokenizer` and by `tokenizers.Tokenizer.from_file`.
#[path = "shared/tokenizer_fixture.rs"]
mod tokenizer_fixture;

use model::tokenizer::{self, TrainConfig};

/// The venv interpreter that `scripts/setup.sh` installs, with `transformers` and `tokenizers`.
const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../.wizard/python");

#[test]
fn rust_and_transformers_encode_and_decode_alike() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    tokenizer_fixture::write_corpus(&corpus);
    let out = dir.path().join("tokenizer");
    let report = tokenizer::train(&TrainConfig::new(vec![corpus], 400), &out).unwrap();
    assert_eq!(report.vocab_size, 400, "the corpus is big enough to learn 125 merges: {report:?}");
    tokenizer_fixture::check_peers_agree(PYTHON, &out, tokenizer_fixture::TEXTS);
}
