//! The model pipeline: the GPTBigCode model, its tokenizer, training data (corpus, packing,
//! fill-in-the-middle, instruction format), the training loop with ZeRO, and generation
//! (KV cache, sampling, speculative decoding). Tensor work below tch lives in `kernels`.
#![deny(missing_docs)]

pub mod checkpoint;
pub mod complete;
pub mod config;
mod error;
pub mod generate;
pub mod kv_cache;
pub mod model;
pub mod speculative;
pub mod tokenizer;
pub mod train;

pub use error::{PipelineError, Result};
