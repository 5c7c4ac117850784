//! Evaluation: HumanEval and MBPP prompts, sample generation, sandboxed execution and pass@k.
#![deny(missing_docs)]
