//! `config.json` of a GPTBigCode model, read and written the way Hugging Face `transformers` does.
//! Fields that change the computation are honoured or rejected by name; bookkeeping fields that
//! `transformers` itself ignores for this model are accepted and kept out of the way.
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{ModelError, Result};

/// The MLP activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `gelu_pytorch_tanh`: the tanh approximation (StarCoder's).
    GeluPytorchTanh,
    /// `gelu`: the exact erf form.
    Gelu,
    /// `gelu_new`: GPT-2's tanh approximation, the same function as `gelu_pytorch_tanh`.
    GeluNew,
}

impl Activation {
    /// The `approximate` argument of `torch.nn.functional.gelu`.
    pub fn approximate(self) -> &'static str {
        match self {
            Activation::Gelu => "none",
            Activation::GeluPytorchTanh | Activation::GeluNew => "tanh",
        }
    }
}

/// A GPTBigCode configuration, with Hugging Face's field names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Vocabulary size, including special tokens.
    pub vocab_size: i64,
    /// Context length: the number of learned positions.
    pub n_positions: i64,
    /// Hidden size.
    pub n_embd: i64,
    /// Number of transformer blocks.
    pub n_layer: i64,
    /// Number of query heads.
    pub n_head: i64,
    /// MLP inner size; `None` means `4 * n_embd`.
    pub n_inner: Option<i64>,
    /// MLP activation.
    pub activation_function: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f64,
    /// One shared K/V head (StarCoder) instead of one per query head.
    pub multi_query: bool,
    /// Scale `q·k` by `1/sqrt(head_dim)`.
    pub scale_attn_weights: bool,
    /// `lm_head` shares `wte`'s weight.
    pub tie_word_embeddings: bool,
    /// Dropout after the embeddings, in training.
    pub embd_pdrop: f64,
    /// Dropout on attention probabilities, in training.
    pub attn_pdrop: f64,
    /// Dropout on residual branches, in training.
    pub resid_pdrop: f64,
    /// Standard deviation of the initial weights.
    pub initializer_range: f64,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<i64>,
    /// End-of-sequence token id.
    pub eos_token_id: Option<i64>,
    /// Softmax in fp32 (what we always do; kept for the file).
    pub attention_softmax_in_fp32: bool,
    /// Scaled softmax in fp32 (numerically equivalent; kept for the file).
    pub scale_attention_softmax_in_fp32: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            n_inner: None,
            activation_function: Activation::GeluPytorchTanh,
            layer_norm_epsilon: 1e-5,
            multi_query: true,
            scale_attn_weights: true,
            tie_word_embeddings: true,
            embd_pdrop: 0.1,
            attn_pdrop: 0.1,
            resid_pdrop: 0.1,
            initializer_range: 0.02,
            bos_token_id: Some(50256),
            eos_token_id: Some(50256),
            attention_softmax_in_fp32: true,
            scale_attention_softmax_in_fp32: true,
        }
    }
}

/// Fields that do not change GPTBigCode's computation in `transformers` either.
const IGNORED: &[&str] = &[
    "_name_or_path",
    "quantization_config",
    "architectures",
    "auto_map",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "use_cache",
    "pad_token_id",
    "n_ctx",
    "gradient_checkpointing",
    "inference_runner",
    "max_batch_size",
    "max_sequence_length",
    "pad_key_length",
    "pre_allocate_kv_cache",
    "validate_runner_input",
    "reorder_and_upcast_attn",
    "scale_attn_by_inverse_layer_idx",
    "summary_activation",
    "summary_first_dropout",
    "summary_proj_to_labels",
    "summary_type",
    "summary_use_proj",
    "attention_type",
    "num_key_value_heads",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "is_decoder",
    "id2label",
    "label2id",
];

/// `transformers` accepts these aliases for the GPT-2 field names.
const ALIASES: &[(&str, &str)] = &[
    ("hidden_size", "n_embd"),
    ("max_position_embeddings", "n_positions"),
    ("num_attention_heads", "n_head"),
    ("num_hidden_layers", "n_layer"),
];

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = crate::files::read_regular_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Parses and validates config JSON; `path` is only used in error messages.
    pub fn from_json(text: &str, path: &Path) -> Result<ModelConfig> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| ModelError::Json { path: path.into(), message: e.to_string() })?;
        let Value::Object(mut fields) = value else {
            return Err(ModelError::Json { path: path.into(), message: "expected a JSON object".into() });
        };
        let field_error =
            |field: &str, message: String| ModelError::Config { path: path.into(), field: field.into(), message };
        match fields.remove("model_type") {
            Some(Value::String(kind)) if kind == "gpt_bigcode" => {}
            Some(other) => {
                return Err(field_error("model_type", format!("{other} is not supported; wizard runs \"gpt_bigcode\"")))
            }
            None => return Err(field_error("model_type", "missing; wizard runs \"gpt_bigcode\"".into())),
        }
        for (alias, name) in ALIASES {
            if let Some(value) = fields.remove(*alias) {
                fields.entry(name.to_string()).or_insert(value);
            }
        }
        if let Some(Value::Array(ids)) = fields.get("eos_token_id") {
            // Several EOS ids are allowed by transformers; the first one ends our generations.
            let first = ids.first().cloned().unwrap_or(Value::Null);
            fields.insert("eos_token_id".into(), first);
        }
        if fields.remove("add_cross_attention").is_some_and(|v| v == Value::Bool(true)) {
            return Err(field_error(
                "add_cross_attention",
                "cross-attention (encoder-decoder) is not supported".into(),
            ));
        }
        let mut config = ModelConfig::default();
        let mut known = serde_json::to_value(&config).expect("config serializes");
        let known_fields = known.as_object_mut().expect("config is an object");
        for (name, value) in fields {
            if known_fields.contains_key(&name) {
                known_fields.insert(name, value);
            } else if !IGNORED.contains(&name.as_str()) {
                tracing::warn!("{}: ignoring unknown field `{name}`", path.display());
            }
        }
        for (name, value) in known_fields.iter() {
            let single: Map<String, Value> = [(name.clone(), value.clone())].into_iter().collect();
            if let Err(e) = serde_json::from_value::<PartialField>(Value::Object(single)) {
                return Err(field_error(name, e.to_string()));
            }
        }
        config = serde_json::from_value(known).map_err(|e| field_error("?", e.to_string()))?;
        config.validate().map_err(|(field, message)| field_error(field, message))?;
        Ok(config)
    }

    /// Checks the relations between fields.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_inner", self.n_inner.unwrap_or(1)),
        ];
        for (field, value) in positive {
            if value <= 0 {
                return Err((field, format!("must be positive, got {value}")));
            }
        }
        if self.n_inner.is_none() && self.n_embd.checked_mul(4).is_none() {
            return Err((
                "n_embd",
                format!("{} is too large: 4 n_embd (n_inner when it is null) overflows", self.n_embd),
            ));
        }
        if self.n_embd % self.n_head != 0 {
            return Err(("n_head", format!("n_embd {} is not divisible by n_head {}", self.n_embd, self.n_head)));
        }
        // Above 1 it no longer guards a division but swamps the variance (and past fp32's range, NaN).
        if !(self.layer_norm_epsilon > 0.0 && self.layer_norm_epsilon <= 1.0) {
            return Err(("layer_norm_epsilon", format!("must be in (0, 1], got {}", self.layer_norm_epsilon)));
        }
        for (field, p) in
            [("embd_pdrop", self.embd_pdrop), ("attn_pdrop", self.attn_pdrop), ("resid_pdrop", self.resid_pdrop)]
        {
            if !(0.0..1.0).contains(&p) {
                return Err((field, format!("a dropout probability must be in [0, 1), got {p}")));
            }
        }
        for (field, id) in [("bos_token_id", self.bos_token_id), ("eos_token_id", self.eos_token_id)] {
            if let Some(id) = id.filter(|id| !(0..self.vocab_size).contains(id)) {
                return Err((field, format!("{id} is outside the vocabulary of {}", self.vocab_size)));
            }
        }
        Ok(())
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> i64 {
        self.n_embd / self.n_head
    }

    /// Number of K/V heads: 1 for multi-query attention.
    pub fn kv_heads(&self) -> i64 {
        if self.multi_query {
            1
        } else {
            self.n_head
        }
    }

    /// MLP inner size.
    pub fn inner_dim(&self) -> i64 {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// The `config.json` that `transformers` loads, with `dtype` naming the saved weights.
    pub fn to_json(&self, dtype: &str) -> String {
        let mut value = serde_json::to_value(self).expect("config serializes");
        let fields = value.as_object_mut().expect("config is an object");
        fields.insert("model_type".into(), "gpt_bigcode".into());
        fields.insert("architectures".into(), serde_json::json!(["GPTBigCodeForCausalLM"]));
        fields.insert("dtype".into(), dtype.into());
        fields.insert("use_cache".into(), true.into());
        serde_json::to_string_pretty(&value).expect("config serializes")
    }
}

/// Deserializes any one field on its own, to name the field in a type error.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct PartialField {
    vocab_size: Option<i64>,
    n_positions: Option<i64>,
    n_embd: Option<i64>,
    n_layer: Option<i64>,
    n_head: Option<i64>,
    n_inner: Option<Option<i64>>,
    activation_function: Option<Activation>,
    layer_norm_epsilon: Option<f64>,
    multi_query: Option<bool>,
    scale_attn_weights: Option<bool>,
    tie_word_embeddings: Option<bool>,
    embd_pdrop: Option<f64>,
    attn_pdrop: Option<f64>,
    resid_pdrop: Option<f64>,
    initializer_range: Option<f64>,
    bos_token_id: Option<Option<i64>>,
    eos_token_id: Option<Option<i64>>,
    attention_softmax_in_fp32: Option<bool>,
    scale_attention_softmax_in_fp32: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `json` and compares the outcome (Ok summary or the error text) with `expected`.
    fn check(json: &str, expected: &str) {
        let got = match ModelConfig::from_json(json, Path::new("m/config.json")) {
            Ok(c) => format!(
                "ok d={} L={} H={} kv={} inner={} act={:?} tied={}",
                c.n_embd,
                c.n_layer,
                c.n_head,
                c.kv_heads(),
                c.inner_dim(),
                c.activation_function,
                c.tie_word_embeddings
            ),
            Err(e) => e.to_string(),
        };
        assert_eq!(got, expected, "for {json}");
    }

    #[test]
    fn configs() {
        check(
            r#"{"model_type":"gpt_bigcode","n_embd":64,"n_layer":2,"n_head":4,"vocab_size":100,"bos_token_id":0,"eos_token_id":0}"#,
            "ok d=64 L=2 H=4 kv=1 inner=256 act=GeluPytorchTanh tied=true",
        );
        check(
            r#"{"model_type":"gpt_bigcode","hidden_size":32,"num_hidden_layers":3,"num_attention_heads":2,"multi_query":false,"n_inner":48,"activation_function":"gelu","tie_word_embeddings":false,"vocab_size":10,"eos_token_id":[1,2],"bos_token_id":1,"transformers_version":"4.40","reorder_and_upcast_attn":false}"#,
            "ok d=32 L=3 H=2 kv=2 inner=48 act=Gelu tied=false",
        );
        check(
            r#"{"model_type":"llama"}"#,
            "m/config.json: field `model_type`: \"llama\" is not supported; wizard runs \"gpt_bigcode\"",
        );
        check(r#"{"n_embd":8}"#, "m/config.json: field `model_type`: missing; wizard runs \"gpt_bigcode\"");
        check(
            r#"{"model_type":"gpt_bigcode","n_embd":30,"n_head":4}"#,
            "m/config.json: field `n_head`: n_embd 30 is not divisible by n_head 4",
        );
        check(
            r#"{"model_type":"gpt_bigcode","activation_function":"relu"}"#,
            "m/config.json: field `activation_function`: unknown variant `relu`, expected one of `gelu_pytorch_tanh`, `gelu`, `gelu_new`",
        );
        check(
            r#"{"model_type":"gpt_bigcode","n_layer":"two"}"#,
            "m/config.json: field `n_layer`: invalid type: string \"two\", expected i64",
        );
        check(
            r#"{"model_type":"gpt_bigcode","vocab_size":10,"eos_token_id":10,"bos_token_id":0}"#,
            "m/config.json: field `eos_token_id`: 10 is outside the vocabulary of 10",
        );
        check(
            r#"{"model_type":"gpt_bigcode","add_cross_attention":true}"#,
            "m/config.json: field `add_cross_attention`: cross-attention (encoder-decoder) is not supported",
        );
        check("{\"model_type\":", "m/config.json: EOF while parsing a value at line 1 column 14");
    }

    #[test]
    fn round_trips_through_json() {
        let config = ModelConfig {
            n_embd: 48,
            n_head: 3,
            vocab_size: 77,
            bos_token_id: Some(0),
            eos_token_id: Some(0),
            ..Default::default()
        };
        let again = ModelConfig::from_json(&config.to_json("float32"), Path::new("x")).unwrap();
        assert_eq!(config, again);
    }
}
