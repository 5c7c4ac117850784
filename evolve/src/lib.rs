//! Evol-Instruct: evolves code instructions round by round through an LLM backend, eliminates
//! failed evolutions, and keeps every item's lineage in SQLite.
//!
//! A run reads seed instructions ([`seeds`]) into round 0 of a [`store::Store`]. Each later round
//! gives every live instruction one evolution method ([`prompts::Method`]); the [`engine`] asks a
//! [`backend::Backend`] (an OpenAI-compatible server through [`http`], or wizard's own model through
//! [`local`]) to rewrite it, to judge whether the rewrite adds anything, and to answer it. The
//! [`rules`] eliminate failed evolutions; [`clean`] removes duplicates, near-duplicates
//! ([`minhash`]) and benchmark contamination. Every answer is stored before progress is marked, so a
//! killed run resumes without losing, duplicating or re-asking anything. [`export`] writes the
//! result as instruction-tuning JSONL. [`fake`] is a Chat Completions server for tests and benchmarks.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod backend;
pub mod clean;
pub mod engine;
mod error;
pub mod export;
pub mod fake;
pub mod http;
pub mod local;
pub mod minhash;
pub mod prompts;
pub mod rules;
pub mod seeds;
pub mod store;

pub use error::{EvolveError, Result};
