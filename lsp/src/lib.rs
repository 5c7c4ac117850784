//! The language server: the only crate that knows LSP types. Completions come from `pipeline`
//! generation running on a dedicated inference thread, never on the async runtime.
#![deny(missing_docs)]
