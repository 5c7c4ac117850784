//! Request bodies as OpenAI and llama.cpp define them. Unknown fields are ignored (as OpenAI does);
//! a field of the wrong type is refused with serde's message and the field's path. The shared
//! [`Knobs`] are read from the same body as the endpoint's own fields (not flattened into them, so
//! that errors keep naming the field).
use serde::Deserialize;

/// One string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// `"text"`.
    One(String),
    /// `["a", "b"]`.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The strings.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(text) => vec![text],
            OneOrMany::Many(texts) => texts,
        }
    }
}

/// `null` as the field's default, as OpenAI takes it (clients write unset fields as `null`).
fn null_is_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// A prompt as text or as token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Text to tokenize.
    Text(String),
    /// Token ids as given.
    Tokens(Vec<i64>),
}

/// The prompts of a `prompt` field, or why it is not one.
pub fn prompts(value: &serde_json::Value) -> Result<Vec<Prompt>, String> {
    use serde_json::Value;
    let tokens = |items: &[Value]| items.iter().map(Value::as_i64).collect::<Option<Vec<i64>>>();
    let bad = || "prompt must be a string, an array of strings, an array of token ids or an array of those".to_string();
    match value {
        Value::String(text) => Ok(vec![Prompt::Text(text.clone())]),
        Value::Array(items) if items.iter().all(Value::is_string) && !items.is_empty() => {
            Ok(items.iter().filter_map(Value::as_str).map(|s| Prompt::Text(s.to_string())).collect())
        }
        Value::Array(items) if items.iter().all(Value::is_array) && !items.is_empty() => items
            .iter()
            .map(|item| item.as_array().and_then(|ids| tokens(ids)).map(Prompt::Tokens).ok_or_else(bad))
            .collect(),
        Value::Array(items) => tokens(items).map(|ids| vec![Prompt::Tokens(ids)]).ok_or_else(bad),
        _ => Err(bad()),
    }
}

/// Sampling and length settings every endpoint shares.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Knobs {
    /// Most new tokens.
    pub max_tokens: Option<i64>,
    /// 0 is greedy.
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    pub top_p: Option<f64>,
    /// Keep the k most likely tokens (an extension OpenAI does not have; llama.cpp and vLLM do).
    pub top_k: Option<i64>,
    /// Samples per prompt.
    pub n: Option<i64>,
    /// Stop sequences (at most 16).
    pub stop: Option<OneOrMany>,
    /// Seed of the first sample.
    #[serde(default, deserialize_with = "any_seed")]
    pub seed: Option<u64>,
    /// Server-sent events.
    #[serde(default, deserialize_with = "null_is_default")]
    pub stream: bool,
    /// Only `include_usage`.
    pub stream_options: Option<StreamOptions>,
    // OpenAI's fields this server does not implement: a request that sets one to other than its
    // neutral value is refused, not answered as if it had not.
    /// Penalties (0 is neutral).
    pub presence_penalty: Option<f64>,
    /// Penalties (0 is neutral).
    pub frequency_penalty: Option<f64>,
    /// Per-token biases (empty is neutral).
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    /// Candidates per choice (n is neutral).
    pub best_of: Option<i64>,
    /// Forced tool calls (`none` and `auto` are neutral: the model answers in text).
    pub tool_choice: Option<serde_json::Value>,
    /// Structured output (`text` is neutral).
    pub response_format: Option<serde_json::Value>,
}

/// `stream_options`.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default, deserialize_with = "null_is_default")]
    pub include_usage: bool,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The text to continue: a string, strings, token ids, or lists of token ids.
    pub prompt: serde_json::Value,
    /// Text after the insertion point: fill-in-the-middle.
    pub suffix: Option<String>,
    /// Include the prompt in the answer.
    #[serde(default, deserialize_with = "null_is_default")]
    pub echo: bool,
    /// Log-probabilities of the chosen token and this many alternatives (0-5).
    pub logprobs: Option<i64>,
}

/// A chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    /// `system` (or `developer`, its newer name), `user` or `assistant`.
    pub role: String,
    /// Its text: a string, text parts (`[{"type": "text", "text": ...}]`, joined), or null.
    #[serde(default, deserialize_with = "content_text")]
    pub content: String,
}

/// A message's `content` as text.
fn content_text<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    use serde::de::Error;
    let text_of = |part: &serde_json::Value| match (part["type"].as_str(), part["text"].as_str()) {
        (Some("text"), Some(text)) => Ok(text.to_string()),
        (kind, _) => Err(D::Error::custom(format!(
            "only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported, got a part of type {}",
            kind.unwrap_or("(none)")
        ))),
    };
    match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::Null => Ok(String::new()),
        serde_json::Value::String(text) => Ok(text),
        serde_json::Value::Array(parts) => parts.iter().map(text_of).collect(),
        other => {
            Err(D::Error::custom(format!("content must be a string, an array of text parts or null, got {other}")))
        }
    }
}

/// A seed as OpenAI takes it (a signed 64-bit integer), or any unsigned one, as the bits of a u64.
fn any_seed<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    use serde::de::Error;
    match Option::<serde_json::Value>::deserialize(deserializer)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) if n.is_u64() || n.is_i64() => {
            Ok(n.as_u64().or_else(|| n.as_i64().map(|i| i as u64)))
        }
        Some(other) => Err(D::Error::custom(format!("seed must be an integer, got {other}"))),
    }
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// OpenAI's newer name for max_tokens.
    pub max_completion_tokens: Option<i64>,
    /// Report the chosen tokens' log-probabilities.
    pub logprobs: Option<bool>,
    /// With `logprobs`, this many alternatives per token (0-20).
    pub top_logprobs: Option<i64>,
}

/// One file of `input_extra`.
#[derive(Debug, Clone, Deserialize)]
pub struct ExtraFile {
    /// Its path.
    #[serde(default, deserialize_with = "null_is_default")]
    pub filename: String,
    /// Its text.
    pub text: String,
}

/// `POST /infill`, as llama.cpp's server takes it.
#[derive(Debug, Clone, Deserialize)]
pub struct InfillRequest {
    /// Text before the cursor.
    #[serde(default, deserialize_with = "null_is_default")]
    pub input_prefix: String,
    /// Text after the cursor.
    #[serde(default, deserialize_with = "null_is_default")]
    pub input_suffix: String,
    /// Other files for context.
    #[serde(default, deserialize_with = "null_is_default")]
    pub input_extra: Vec<ExtraFile>,
    /// Text added after the prefix.
    #[serde(default, deserialize_with = "null_is_default")]
    pub prompt: String,
    /// Most new tokens (-1: as many as the limit allows).
    pub n_predict: Option<i64>,
    /// 0 is greedy.
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    pub top_p: Option<f64>,
    /// Top-k (0: off, as in llama.cpp).
    pub top_k: Option<i64>,
    /// Seed.
    #[serde(default, deserialize_with = "any_seed")]
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Option<Vec<String>>,
    /// Server-sent events.
    #[serde(default, deserialize_with = "null_is_default")]
    pub stream: bool,
}
