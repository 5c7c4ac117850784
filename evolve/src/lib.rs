//! Evol-Instruct: evolves code instructions round by round through an LLM backend, eliminates
//! failed evolutions, and keeps every item's lineage in SQLite.
#![deny(missing_docs)]
