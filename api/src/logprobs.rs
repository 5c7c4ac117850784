//! Log-probabilities as OpenAI writes them: the legacy object of a completion choice (`tokens`,
//! `token_logprobs`, `top_logprobs`, `text_offset` in characters of the choice's `text`) and the
//! chat API's `content` entries.
use model::engine::TokenLogprob;
use model::tokenizer::Tokenizer;
use serde_json::{json, Value};

use crate::generation::SampleText;

/// The entries of one choice (or of one streamed chunk of it).
#[derive(Default, Clone)]
pub struct LegacyLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<usize>,
}

impl LegacyLogprobs {
    /// The echoed prompt `ids` (decoded as the echo is, special tokens written out) and `scored`,
    /// the log-probabilities of all but its first token, which nothing predicts.
    pub fn prompt(tokenizer: &Tokenizer, ids: &[i64], scored: &[TokenLogprob]) -> model::Result<LegacyLogprobs> {
        let ids: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
        let mut logprobs = LegacyLogprobs::default();
        for (index, (&id, offset)) in ids.iter().zip(tokenizer.char_offsets(&ids, false)?).enumerate() {
            let logprob = index.checked_sub(1).and_then(|before| scored.get(before));
            logprobs.push(tokenizer, id, logprob, offset);
        }
        Ok(logprobs)
    }

    /// Tokens `range` of `sample`, whose text starts at character `base` of the choice's text.
    pub fn sample(&mut self, tokenizer: &Tokenizer, sample: &SampleText, range: std::ops::Range<usize>, base: usize) {
        for (id, logprob, offset) in range.filter_map(|index| sample.entry(index)) {
            self.push(tokenizer, id, logprob, base + offset);
        }
    }

    fn push(&mut self, tokenizer: &Tokenizer, id: u32, logprob: Option<&TokenLogprob>, offset: usize) {
        let piece = |id: u32| piece(tokenizer, id);
        self.tokens.push(piece(id));
        self.token_logprobs.push(logprob.map_or(Value::Null, |l| json!(l.logprob)));
        // As OpenAI does: the chosen token among the alternatives, where it is not one of them.
        self.top_logprobs.push(logprob.map_or(Value::Null, |l| {
            let chosen = (!l.top.iter().any(|&(top, _)| top == i64::from(id))).then_some((i64::from(id), l.logprob));
            Value::Object(
                l.top.iter().chain(&chosen).map(|&(id, logprob)| (piece(id as u32), json!(logprob))).collect(),
            )
        }));
        self.text_offset.push(offset);
    }

    /// The JSON object.
    pub fn into_json(self) -> Value {
        json!({"tokens": self.tokens, "token_logprobs": self.token_logprobs,
               "top_logprobs": self.top_logprobs, "text_offset": self.text_offset})
    }
}

/// The chat API's `logprobs.content` entries of tokens `range` of `sample`.
pub fn chat_content(tokenizer: &Tokenizer, sample: &SampleText, range: std::ops::Range<usize>) -> Vec<Value> {
    let entry = |id: u32, logprob: f32| json!({"token": piece(tokenizer, id), "logprob": logprob, "bytes": tokenizer.token_bytes(id, false)});
    range
        .filter_map(|index| {
            let (id, scored, _) = sample.entry(index)?;
            let scored = scored?;
            let mut value = entry(id, scored.logprob);
            value["top_logprobs"] = scored.top.iter().map(|&(id, logprob)| entry(id as u32, logprob)).collect();
            Some(value)
        })
        .collect()
}

/// A token as text; one that is not whole characters as OpenAI writes it, `bytes:\xe6\x97`.
fn piece(tokenizer: &Tokenizer, id: u32) -> String {
    String::from_utf8(tokenizer.token_bytes(id, false)).unwrap_or_else(|error| {
        error.as_bytes().iter().fold("bytes:".to_string(), |out, byte| out + &format!("\\x{byte:02x}"))
    })
}
