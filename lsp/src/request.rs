//! What a completion request at a cursor becomes, without LSP types: the tree-sitter decision, the
//! prompt window around the cursor, and the [`Job`] for the engine. The server builds every request's
//! job with [`job_at`]; `wizard eval --prompt-mode editor` calls [`complete_text`], which runs the same
//! job through the same [`CompletionModel`], so the benchmark measures exactly what editors get.
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::document::Document;
use crate::engine::{CompletionModel, EngineError, Job, Settings};
use crate::prompt::PromptParts;
use crate::syntax::{decide, window_start, Language, Mode};
use crate::text::{ceil_char_boundary, floor_char_boundary};

/// What a request carries besides the document and the cursor.
#[derive(Debug, Clone)]
pub struct Request {
    /// Settings in force (with the request's own overrides applied).
    pub settings: Settings,
    /// Fill in the middle (use the suffix) or complete the prefix alone.
    pub fim: bool,
    /// The document's path, for `<filename>`.
    pub filename: Option<String>,
    /// Seed of the sampler (the server uses 0: the same request gives the same completion).
    pub seed: u64,
    /// Set to stop decoding.
    pub cancel: Arc<AtomicBool>,
}

/// The job for a completion at byte `offset` of `document`, or `None` where the server makes none
/// (the cursor is inside a word). `snippets` (other open files, most relevant first) is asked only
/// when a job is made and the settings want snippets.
pub fn job_at(
    document: &Document,
    offset: usize,
    request: Request,
    snippets: impl FnOnce() -> Vec<(String, String)>,
) -> Option<Job> {
    let text = document.text();
    let offset = floor_char_boundary(text, offset.min(text.len()));
    let decision = decide(document.language, text, document.tree(), offset);
    if decision.mode == Mode::Skip {
        tracing::debug!("no completion inside a word");
        return None;
    }
    let Request { settings, fim, filename, seed, cancel } = request;
    let window = settings.context_budget.saturating_mul(8).max(64);
    // From a line start outside strings and comments, so that tree-sitter reads the window as the
    // document (syntax::BlockEnd), near a point on a grid, so that typing on keeps the prompt's start
    // (and its cached keys and values).
    let grid = (window / 4).max(1);
    let from = ceil_char_boundary(text, offset.saturating_sub(window) / grid * grid);
    let prefix_start = window_start(text, document.tree(), from, offset);
    let suffix_end = floor_char_boundary(text, offset.saturating_add(window).min(text.len()));
    let snippets = if settings.snippets { snippets() } else { Vec::new() };
    let parts = PromptParts {
        prefix: text[prefix_start..offset].to_string(),
        suffix: text[offset..suffix_end].to_string(),
        filename,
        snippets,
    };
    Some(Job { parts, decision, language: document.language, settings, fim, seed, cancel })
}

/// The completion `wizard serve` answers for a cursor at byte `offset` of `text`, the one document a
/// client has open (so no snippets), called `filename` and written in `language`: the same window,
/// decision, prompt, stop rules and suffix trimming as the server, through `model`. Empty where the
/// server answers no completion.
pub fn complete_text(
    model: &dyn CompletionModel,
    text: &str,
    offset: usize,
    language: Language,
    filename: Option<&str>,
    settings: &Settings,
    seed: u64,
) -> Result<String, EngineError> {
    settings.validate().map_err(EngineError::Model)?;
    let document = Document::new(text.to_string(), language, 0);
    let request = Request {
        settings: settings.clone(),
        fim: true,
        filename: filename.map(str::to_string),
        seed,
        cancel: Arc::new(AtomicBool::new(false)),
    };
    match job_at(&document, offset, request, Vec::new) {
        Some(job) => Ok(model.complete(&job)?.text),
        None => Ok(String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Figures, Output};

    /// Answers with what it was asked: the decision, the prompt parts' lengths, the seed.
    struct Echo;

    impl CompletionModel for Echo {
        fn complete(&self, job: &Job) -> Result<Output, EngineError> {
            let text = format!(
                "{:?} prefix={:?} suffix={:?} file={:?} seed={}",
                job.decision.mode, job.parts.prefix, job.parts.suffix, job.parts.filename, job.seed
            );
            Ok(Output { text, figures: Figures::default() })
        }
    }

    /// `text` with the cursor at `|`, completed through [`complete_text`] with a budget of `budget`.
    fn check(text: &str, budget: usize, expect: &str) {
        let offset = text.find('|').unwrap();
        let text = text.replacen('|', "", 1);
        let settings = Settings { context_budget: budget, ..Settings::default() };
        let got = complete_text(&Echo, &text, offset, Language::Python, Some("a.py"), &settings, 7).unwrap();
        assert_eq!(got, expect);
    }

    #[test]
    fn jobs_as_the_server_builds_them() {
        check("def f(x):\n    ret|urn x\n", 1024, "");
        check(
            "def f(x):\n|\n\ny = 1\n",
            1024,
            "MultiLine prefix=\"def f(x):\\n\" suffix=\"\\n\\ny = 1\\n\" file=Some(\"a.py\") seed=7",
        );
        check("x = (|)\n", 1024, "SingleLine prefix=\"x = (\" suffix=\")\\n\" file=Some(\"a.py\") seed=7");
        // A budget of 8 tokens looks 64 bytes each way: the prefix from the first line start after the
        // 16-byte grid point (48) below 124 - 64, the suffix cut at 64 bytes.
        let long = format!("{}y = |\n{}", "a = 1\n".repeat(20), "b = 2\n".repeat(20));
        let expect = format!(
            "SingleLine prefix={:?} suffix={:?} file=Some(\"a.py\") seed=7",
            format!("{}y = ", "a = 1\n".repeat(11)),
            format!("\n{}b =", "b = 2\n".repeat(10))
        );
        check(&long, 8, &expect);
    }
}
