//! Elimination rules: when an evolved instruction or its response is thrown away, and why.
//! Each rule returns a [`Rejection`] whose `reason` is a stable short code for `status` tables.

/// Why an item was eliminated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// A stable short code (`equal-to-parent`, `sorry-short`, ...).
    pub reason: &'static str,
    /// The particulars, for people.
    pub detail: String,
}

fn reject(reason: &'static str, detail: impl Into<String>) -> Option<Rejection> {
    Some(Rejection { reason, detail: detail.into() })
}

/// The judge's answer to "does the evolved instruction equal its parent?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The evolution added nothing: eliminated.
    Equal,
    /// The evolution is new.
    NotEqual,
    /// Neither phrase exactly: the evolution is kept (only an explicit `Equal` eliminates) and the
    /// verdict is counted in `status`.
    Unclear,
}

impl Verdict {
    /// The name stored in the database.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Equal => "equal",
            Verdict::NotEqual => "not-equal",
            Verdict::Unclear => "unclear",
        }
    }
}

/// Parses the judge's answer exactly: after trimming whitespace, quotes, markdown emphasis, final
/// punctuation and an optional `Answer:`/`Judgement:` label, it must be `Equal` or `Not Equal`
/// (any case). "Not Equal" is never read as "Equal", and "Equally hard" is neither.
pub fn parse_verdict(text: &str) -> Verdict {
    let lowered = text.trim().to_lowercase();
    let mut answer = lowered.as_str();
    for label in ["your judgement:", "your judgment:", "judgement:", "judgment:", "answer:", "verdict:"] {
        if let Some(rest) = answer.strip_prefix(label) {
            answer = rest;
        }
    }
    let answer = answer.trim_matches(|c: char| c.is_whitespace() || "*_`\"'.!".contains(c));
    let words: Vec<&str> = answer.split_whitespace().collect();
    match words.as_slice() {
        ["equal"] => Verdict::Equal,
        ["not", "equal"] => Verdict::NotEqual,
        _ => Verdict::Unclear,
    }
}

/// Limits for [`check_instruction`] and [`check_response`].
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest evolved instruction, in characters.
    pub max_instruction_chars: usize,
    /// Longest response, in characters.
    pub max_response_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_instruction_chars: 4000, max_response_chars: 32_000 }
    }
}

/// Rules on an evolved instruction alone: empty, over-long, or copying the evolving prompt.
pub fn check_instruction(text: &str, copy_markers: &[String], limits: &Limits) -> Option<Rejection> {
    let text = text.trim();
    if text.is_empty() {
        return reject("empty-instruction", "the evolved instruction is empty");
    }
    let chars = text.chars().count();
    if chars > limits.max_instruction_chars {
        return reject("long-instruction", format!("{chars} characters, limit {}", limits.max_instruction_chars));
    }
    let lowered = text.to_lowercase();
    if let Some(marker) = copy_markers.iter().find(|marker| lowered.contains(marker.as_str())) {
        return reject("copies-prompt", format!("contains the evolving prompt's wording {marker:?}"));
    }
    None
}

/// Rules on a response: empty, cut at the token limit, over-long, "sorry" and short, or nothing but
/// punctuation and stop words.
pub fn check_response(text: &str, finish: &str, limits: &Limits) -> Option<Rejection> {
    let text = text.trim();
    if text.is_empty() {
        return reject("empty-response", "the response is empty");
    }
    if finish == "length" {
        return reject("truncated-response", "the response was cut at the token limit");
    }
    let chars = text.chars().count();
    if chars > limits.max_response_chars {
        return reject("long-response", format!("{chars} characters, limit {}", limits.max_response_chars));
    }
    let lowered = text.to_lowercase();
    let words: Vec<&str> =
        lowered.split(|c: char| !c.is_alphanumeric() && c != '\'').filter(|w| !w.is_empty()).collect();
    if lowered.contains("sorry") && text.split_whitespace().count() < 80 {
        return reject("sorry-short", format!("says sorry in {} words", text.split_whitespace().count()));
    }
    if words.iter().all(|word| STOP_WORDS.contains(&word.trim_matches('\''))) {
        return reject("no-content", "only punctuation and stop words");
    }
    None
}

/// English stop words (NLTK's list).
pub const STOP_WORDS: &[&str] = &[
    "i",
    "me",
    "my",
    "myself",
    "we",
    "our",
    "ours",
    "ourselves",
    "you",
    "your",
    "yours",
    "yourself",
    "yourselves",
    "he",
    "him",
    "his",
    "himself",
    "she",
    "her",
    "hers",
    "herself",
    "it",
    "its",
    "itself",
    "they",
    "them",
    "their",
    "theirs",
    "themselves",
    "what",
    "which",
    "who",
    "whom",
    "this",
    "that",
    "these",
    "those",
    "am",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "being",
    "have",
    "has",
    "had",
    "having",
    "do",
    "does",
    "did",
    "doing",
    "a",
    "an",
    "the",
    "and",
    "but",
    "if",
    "or",
    "because",
    "as",
    "until",
    "while",
    "of",
    "at",
    "by",
    "for",
    "with",
    "about",
    "against",
    "between",
    "into",
    "through",
    "during",
    "before",
    "after",
    "above",
    "below",
    "to",
    "from",
    "up",
    "down",
    "in",
    "out",
    "on",
    "off",
    "over",
    "under",
    "again",
    "further",
    "then",
    "once",
    "here",
    "there",
    "when",
    "where",
    "why",
    "how",
    "all",
    "any",
    "both",
    "each",
    "few",
    "more",
    "most",
    "other",
    "some",
    "such",
    "no",
    "nor",
    "not",
    "only",
    "own",
    "same",
    "so",
    "than",
    "too",
    "very",
    "s",
    "t",
    "can",
    "will",
    "just",
    "don",
    "should",
    "now",
    "ok",
    "okay",
    "yes",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let check = |text: &str, expected: Verdict| assert_eq!(parse_verdict(text), expected, "{text:?}");
        check("Equal", Verdict::Equal);
        check("  equal.\n", Verdict::Equal);
        check("**Equal**", Verdict::Equal);
        check("Answer: Equal", Verdict::Equal);
        check("Not Equal", Verdict::NotEqual);
        check("NOT EQUAL.", Verdict::NotEqual);
        check("Your Judgement: Not  Equal", Verdict::NotEqual);
        check("not equal", Verdict::NotEqual);
        check("Unequal", Verdict::Unclear);
        check("Equally hard", Verdict::Unclear);
        check("They are equal", Verdict::Unclear);
        check("Equal, Not Equal", Verdict::Unclear);
        check("", Verdict::Unclear);
    }

    fn check(instruction: Option<&str>, response: Option<(&str, &str)>, expected: Option<&str>) {
        let limits = Limits { max_instruction_chars: 60, max_response_chars: 200 };
        let markers = crate::prompts::Prompts::default().copy_markers();
        let got = match (instruction, response) {
            (Some(text), None) => check_instruction(text, &markers, &limits),
            (None, Some((text, finish))) => check_response(text, finish, &limits),
            _ => unreachable!(),
        };
        assert_eq!(got.as_ref().map(|r| r.reason), expected, "{instruction:?} {response:?}: {got:?}");
    }

    #[test]
    fn instruction_rules() {
        check(Some("Write a function that reverses a string in place."), None, None);
        check(Some("  \n"), None, Some("empty-instruction"));
        check(Some(&"word ".repeat(20)), None, Some("long-instruction"));
        check(Some("Rewritten Prompt: sort it"), None, Some("copies-prompt"));
        check(Some("### Harder exercise\nSort"), None, Some("copies-prompt"));
        check(Some("As in the given prompt, sort"), None, Some("copies-prompt"));
    }

    #[test]
    fn response_rules() {
        let code = ("def f(x):\n    return x[::-1]\n", "stop");
        check(None, Some(code), None);
        check(None, Some(("", "stop")), Some("empty-response"));
        check(None, Some(("def f(x): return", "length")), Some("truncated-response"));
        check(None, Some((&"x = 1\n".repeat(40), "stop")), Some("long-response"));
        check(None, Some(("Sorry, I cannot help with that.", "stop")), Some("sorry-short"));
        check(None, Some(("I'm sorry; here it is: def f(): pass", "stop")), Some("sorry-short"));
        check(None, Some(("... ? !! -- and the, of it.", "stop")), Some("no-content"));
        check(None, Some(("Yes.", "stop")), Some("no-content"));
        check(None, Some(("The answer is 42.", "stop")), None);
    }

    #[test]
    fn long_sorry_is_kept() {
        let text = format!("Sorry for the long answer. {}", "word ".repeat(90));
        assert_eq!(check_response(&text, "stop", &Limits::default()), None);
    }
}
