//! Log-probabilities as OpenAI writes them: the legacy object of a completion choice (`tokens`,
//! `token_logprobs`, `top_logprobs`, `text_offset` in characters of the choice's `text`) and the
//! chat API's `content` entries.
use model::engine::TokenLogprob;
use model::tokenizer::Tokenizer;
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
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
    // The token that ended the sample is not listed: OpenAI's chat never shows it.
    range
        .filter(|&index| index < sample.tokens.len())
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

/// A response body written as OpenAI writes it: each legacy `top_logprobs` object lists its tokens
/// most likely first (clients take the first key for the top token); serde_json's objects would
/// list them by text.
pub struct Body<'a>(pub &'a Value);

impl Serialize for Body<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                items.iter().try_for_each(|item| seq.serialize_element(&Body(item)))?;
                seq.end()
            }
            Value::Object(fields) => {
                let mut map = serializer.serialize_map(Some(fields.len()))?;
                for (key, value) in fields {
                    match value {
                        Value::Array(entries) if key == "top_logprobs" => {
                            map.serialize_entry(key, &entries.iter().map(MostLikelyFirst).collect::<Vec<_>>())?
                        }
                        _ => map.serialize_entry(key, &Body(value))?,
                    }
                }
                map.end()
            }
            scalar => scalar.serialize(serializer),
        }
    }
}

/// One legacy `top_logprobs` entry (token -> logprob), most likely first; anything else (the chat
/// API's entries) as it is.
struct MostLikelyFirst<'a>(&'a Value);

impl Serialize for MostLikelyFirst<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let ranked: Option<Vec<(&String, f64)>> = match self.0 {
            Value::Object(tokens) => tokens.iter().map(|(token, value)| Some((token, value.as_f64()?))).collect(),
            _ => None,
        };
        let Some(mut ranked) = ranked else { return Body(self.0).serialize(serializer) };
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut map = serializer.serialize_map(Some(ranked.len()))?;
        ranked.into_iter().try_for_each(|(token, logprob)| map.serialize_entry(token, &logprob))?;
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: Value, expected: &str) {
        assert_eq!(serde_json::to_string(&Body(&body)).unwrap(), expected);
    }

    #[test]
    fn top_logprobs_list_the_most_likely_first() {
        check(
            json!({"text": "x", "logprobs": {"top_logprobs": [{"a": -3.0, "b": -0.5, "c": -1.0}, null]}}),
            r#"{"logprobs":{"top_logprobs":[{"b":-0.5,"c":-1.0,"a":-3.0},null]},"text":"x"}"#,
        );
        // Ties keep the text order; streamed chunks and choices are reached in arrays too.
        check(
            json!({"choices": [{"logprobs": {"top_logprobs": [{"z": -1.0, "y": -1.0, "x": 0.0}]}}]}),
            r#"{"choices":[{"logprobs":{"top_logprobs":[{"x":0.0,"y":-1.0,"z":-1.0}]}}]}"#,
        );
        // The chat API's `top_logprobs` are arrays already: left as they are.
        check(
            json!({"top_logprobs": [{"token": "a", "logprob": -2.0, "bytes": [97]}]}),
            r#"{"top_logprobs":[{"bytes":[97],"logprob":-2.0,"token":"a"}]}"#,
        );
        check(json!([1, "two", null, {"b": 1, "a": 2}]), r#"[1,"two",null,{"a":2,"b":1}]"#);
    }
}
