//! The StarCoder fill-in-the-middle prompt, `<fim_prefix>prefix<fim_suffix>suffix<fim_middle>`, built
//! in token ids under a token budget counted after templating: the FIM tokens always stay; the budget
//! left is split between the end of the prefix and the start of the suffix (what one side does not
//! use goes to the other); `<filename>` and snippets of other open files take at most a fixed share.
use model::tokenizer::Tokenizer;

use crate::text::floor_char_boundary;

/// Share of the budget (after the template) that the file name and snippets may take. It is decided
/// before the prefix, so that typing on never drops a snippet, which would move the prompt's start.
const CONTEXT_SHARE: f64 = 0.25;

/// Other open files put in the prompt, and how much of each.
const SNIPPETS: usize = 3;
const SNIPPET_BYTES: usize = 1500;

/// An open document that may lend a snippet.
pub struct SnippetSource<'a> {
    /// Its path.
    pub path: String,
    /// Its text.
    pub text: &'a str,
    /// When it was last opened or edited (larger is later).
    pub touched: u64,
}

/// The snippets for a prompt: the most recently touched documents first, ties by path, so the
/// choice does not depend on the order documents are held in and stays put while the user types in
/// the current document; the start of each, cut at a character boundary.
pub fn choose_snippets<'a>(sources: impl IntoIterator<Item = SnippetSource<'a>>) -> Vec<(String, String)> {
    let mut sources: Vec<SnippetSource> = sources.into_iter().collect();
    sources.sort_by(|a, b| b.touched.cmp(&a.touched).then_with(|| a.path.cmp(&b.path)));
    sources
        .into_iter()
        .take(SNIPPETS)
        .map(|source| (source.path, source.text[..floor_char_boundary(source.text, SNIPPET_BYTES)].to_string()))
        .collect()
}

/// What goes around the cursor.
#[derive(Debug, Clone, Default)]
pub struct PromptParts {
    /// Text before the cursor (its end matters most).
    pub prefix: String,
    /// Text after the cursor (its start matters most).
    pub suffix: String,
    /// The document's path, written after `<filename>`.
    pub filename: Option<String>,
    /// Other open files: (path, text), most relevant first.
    pub snippets: Vec<(String, String)>,
}

/// How the budget is spent.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Most prompt tokens in all.
    pub tokens: usize,
    /// Share of the tokens left after the template that the suffix may take.
    pub suffix_share: f64,
    /// Whether to use FIM at all (without it: the prefix alone).
    pub fim: bool,
}

/// Token ids of the prompt (all within `budget.tokens`, unless the template alone exceeds it).
pub fn build(tokenizer: &Tokenizer, parts: &PromptParts, budget: Budget) -> model::Result<Vec<i64>> {
    let special = |name: &str| tokenizer.token_id(name).map(i64::from);
    let encode =
        |text: &str| -> model::Result<Vec<i64>> { Ok(tokenizer.encode(text)?.into_iter().map(i64::from).collect()) };
    let fim = match (special("<fim_prefix>"), special("<fim_suffix>"), special("<fim_middle>")) {
        (Some(p), Some(s), Some(m)) if budget.fim => Some((p, s, m)),
        _ => None,
    };
    let template = if fim.is_some() { 3 } else { 0 };
    let mut left = budget.tokens.saturating_sub(template);
    // The file name, then snippets, within their share; what they leave goes to the prefix and suffix.
    let mut context_left = (left as f64 * CONTEXT_SHARE) as usize;
    let filename = match (special("<filename>"), &parts.filename) {
        (Some(id), Some(name)) => {
            let mut ids = vec![id];
            ids.extend(encode(&format!("{name}\n"))?);
            Some(ids).filter(|ids| ids.len() <= context_left)
        }
        _ => None,
    };
    context_left -= filename.as_ref().map_or(0, Vec::len);
    let mut context = Vec::new();
    if let (Some(file_id), Some(eos)) = (special("<filename>"), special("<|endoftext|>")) {
        for (path, text) in &parts.snippets {
            let mut ids = vec![file_id];
            ids.extend(encode(&format!("{path}\n"))?);
            ids.extend(encode(text)?);
            ids.push(eos);
            if ids.len() <= context_left {
                context_left -= ids.len();
                context.extend(ids);
            }
        }
    }
    left -= context.len() + filename.as_ref().map_or(0, Vec::len);
    let mut prefix = encode(&parts.prefix)?;
    let mut suffix = if fim.is_some() { encode(&parts.suffix)? } else { Vec::new() };
    // The suffix's quota, then whatever the prefix leaves.
    let suffix_quota = ((left as f64) * budget.suffix_share) as usize;
    let suffix_len = suffix.len().min(suffix_quota.max(left.saturating_sub(prefix.len())));
    suffix.truncate(suffix_len);
    left -= suffix_len;
    if prefix.len() > left {
        // Cut in steps, so that the prompt's start stays put while the user types on and the keys
        // and values of the previous request stay reusable (engine `reuse_prefix`).
        let step = (left / 16).clamp(1, 64);
        let cut = (prefix.len() - left).div_ceil(step) * step;
        prefix.drain(..cut.min(prefix.len()));
    }
    let mut out = context;
    match fim {
        Some((p, s, m)) => {
            out.push(p);
            out.extend(filename.unwrap_or_default());
            out.extend(prefix);
            out.push(s);
            out.extend(suffix);
            out.push(m);
        }
        None => {
            out.extend(filename.unwrap_or_default());
            out.extend(prefix);
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::OnceLock;

    use model::tokenizer::{train, TrainConfig};

    use super::*;

    /// A small tokenizer trained once for the crate's tests.
    pub(crate) fn tokenizer() -> &'static Tokenizer {
        static TOKENIZER: OnceLock<(tempfile::TempDir, Tokenizer)> = OnceLock::new();
        &TOKENIZER
            .get_or_init(|| {
                let dir = tempfile::tempdir().unwrap();
                let corpus = dir.path().join("corpus.py");
                let code: String = (0..50).map(|i| format!("def f_{i}(x):\n    return x + {i}\n\n")).collect();
                std::fs::write(&corpus, code).unwrap();
                train(&TrainConfig::new(vec![corpus], 300), &dir.path().join("tok")).unwrap();
                let tokenizer = Tokenizer::from_dir(&dir.path().join("tok")).unwrap();
                (dir, tokenizer)
            })
            .1
    }

    fn check(parts: PromptParts, tokens: usize, expected: &str) {
        let budget = Budget { tokens, suffix_share: 0.25, fim: true };
        let ids = build(tokenizer(), &parts, budget).unwrap();
        assert!(ids.len() <= tokens, "{} tokens over a budget of {tokens}", ids.len());
        let ids: Vec<u32> = ids.into_iter().map(|id| id as u32).collect();
        assert_eq!(tokenizer().decode(&ids, false).unwrap(), expected, "budget {tokens}");
    }

    fn parts(prefix: &str, suffix: &str) -> PromptParts {
        PromptParts { prefix: prefix.into(), suffix: suffix.into(), ..PromptParts::default() }
    }

    /// Typing on at the end of a long prefix keeps the prompt's first tokens, except when a step
    /// of the cut is crossed.
    #[test]
    fn typing_on_keeps_the_start() {
        let text: String = (0..40).map(|i| format!("def f_{i}(x):\n    return x + {i}\n\n")).collect();
        let budget = Budget { tokens: 200, suffix_share: 0.25, fim: true };
        let typed = "def g(x):\n    return f_1(x) + f_2(x) + f_3(x)";
        let mut previous: Option<Vec<i64>> = None;
        let (mut kept, mut moved) = (0, 0);
        for end in 1..=typed.len() {
            let parts = PromptParts { filename: Some("a.py".into()), ..parts(&format!("{text}{}", &typed[..end]), "") };
            let ids = build(tokenizer(), &parts, budget).unwrap();
            assert!(ids.len() <= budget.tokens);
            if let Some(previous) = previous {
                if ids[..100] == previous[..100] {
                    kept += 1;
                } else {
                    moved += 1;
                }
            }
            previous = Some(ids);
        }
        assert!(kept > 4 * moved, "the start moved {moved} times in {} keystrokes", kept + moved);
    }

    /// Snippets and the file name stay in the prompt, unchanged, while the prefix grows past the
    /// budget: the prompt's start does not move as the user types.
    #[test]
    fn snippets_stay_while_typing() {
        let budget = Budget { tokens: 200, suffix_share: 0.25, fim: true };
        let snippets = vec![("b.py".to_string(), "x = 1\n".to_string()), ("c.py".to_string(), "y = 2\n".to_string())];
        let mut prefix = String::new();
        for i in 0..60 {
            prefix.push_str(&format!("z_{i} = {i}\n"));
            let parts = PromptParts {
                filename: Some("a.py".into()),
                snippets: snippets.clone(),
                ..parts(&prefix, "\nw = 3\n")
            };
            let ids = build(tokenizer(), &parts, budget).unwrap();
            assert!(ids.len() <= budget.tokens, "{} tokens", ids.len());
            let ids: Vec<u32> = ids.into_iter().map(|id| id as u32).collect();
            let text = tokenizer().decode(&ids, false).unwrap();
            let start =
                "<filename>b.py\nx = 1\n<|endoftext|><filename>c.py\ny = 2\n<|endoftext|><fim_prefix><filename>a.py\n";
            assert!(text.starts_with(start), "after {i} lines: {text:?}");
        }
    }

    /// The same documents give the same snippets whatever order they are held in: latest first.
    #[test]
    fn snippets_are_chosen_deterministically() {
        let documents = [("/d.py", 4), ("/a.py", 1), ("/c.py", 3), ("/b.py", 3), ("/e.py", 0)];
        let long = format!("x{}", "é".repeat(SNIPPET_BYTES));
        let chosen = |order: &[usize]| {
            choose_snippets(order.iter().map(|&i| SnippetSource {
                path: documents[i].0.to_string(),
                text: if i == 0 { &long } else { "x" },
                touched: documents[i].1,
            }))
        };
        let expected: Vec<&str> = vec!["/d.py", "/b.py", "/c.py"];
        for order in [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 4, 0, 3, 1]] {
            let snippets = chosen(&order);
            assert_eq!(snippets.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(), expected, "order {order:?}");
            assert_eq!(snippets[0].1.len(), SNIPPET_BYTES - 1, "cut at the character boundary before the limit");
        }
    }

    #[test]
    fn budgets() {
        let prefix = "def f_1(x):\n    return x + 1\n\ndef f_2(x):\n    ";
        let suffix = "\n\ndef f_3(x):\n    return x + 3\n";
        // Everything fits.
        check(parts(prefix, suffix), 200, &format!("<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"));
        // The template alone: never cut.
        check(parts(prefix, suffix), 3, "<fim_prefix><fim_suffix><fim_middle>");
        // A tight budget keeps the end of the prefix and the start of the suffix.
        let ids = |text: &str| tokenizer().encode(text).unwrap().len();
        let budget = 3 + 12;
        let ids_prefix =
            build(tokenizer(), &parts(prefix, suffix), Budget { tokens: budget, suffix_share: 0.25, fim: true })
                .unwrap();
        assert_eq!(ids_prefix.len(), budget);
        let text = tokenizer().decode(&ids_prefix.iter().map(|&i| i as u32).collect::<Vec<_>>(), false).unwrap();
        assert!(text.starts_with("<fim_prefix>") && text.ends_with("<fim_middle>"), "{text}");
        let (p, s) = text["<fim_prefix>".len()..text.len() - "<fim_middle>".len()].split_once("<fim_suffix>").unwrap();
        assert!(prefix.ends_with(p) && suffix.starts_with(s), "{p:?} / {s:?}");
        assert_eq!(ids(s), 3, "a quarter of 12 for the suffix: {s:?}");
        // A short suffix leaves its share to the prefix.
        check(parts(prefix, "\n"), ids(prefix) + 4, &format!("<fim_prefix>{prefix}<fim_suffix>\n<fim_middle>"));
        // Filename and snippets when there is room.
        let with_context = PromptParts {
            filename: Some("a.py".into()),
            snippets: vec![("b.py".into(), "x = 1\n".into())],
            ..parts("y = ", "")
        };
        check(
            with_context.clone(),
            200,
            "<filename>b.py\nx = 1\n<|endoftext|><fim_prefix><filename>a.py\ny = <fim_suffix><fim_middle>",
        );
        check(with_context, 3 + ids("y = "), "<fim_prefix>y = <fim_suffix><fim_middle>");
        // Without FIM: the prefix alone.
        let ids_plain =
            build(tokenizer(), &parts(prefix, suffix), Budget { tokens: 100, suffix_share: 0.25, fim: false }).unwrap();
        assert_eq!(ids_plain.len(), ids(prefix));
    }
}
