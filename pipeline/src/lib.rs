//! The model pipeline: the GPTBigCode model, its tokenizer, training data (corpus, packing,
//! fill-in-the-middle, instruction format), the training loop with ZeRO, and generation
//! (KV cache, sampling, speculative decoding). Tensor work below tch lives in `kernels`.
#![deny(missing_docs)]
