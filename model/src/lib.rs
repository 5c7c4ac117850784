//! The model: GPTBigCode, its tokenizer, training data (corpus, packing,
//! fill-in-the-middle, instruction format), the training loop with ZeRO, and generation
//! (KV cache, sampling, speculative decoding). Tensor work below tch lives in `kernels`.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod chart;
pub mod checkpoint;
pub mod complete;
pub mod config;
pub mod corpus;
pub mod draft_length;
pub mod engine;
mod error;
pub mod files;
pub mod generate;
pub mod gpt_bigcode;
pub mod jsonl;
pub mod kv_cache;
mod load;
pub mod pair_history;
pub mod sampling;
pub mod speculative;
pub mod text_offsets;
pub mod tokenizer;
pub mod train;

pub use error::{ModelError, Result};
