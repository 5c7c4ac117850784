//! How likely the model finds each problem's reference solution: the mean log-likelihood per token of
//! the reference given the prompt. pass@k of a small model is 0 round after round; this moves with
//! every step of training, so the pipeline can still tell a better round from a worse one.
use model::gpt_bigcode::{Dropout, GptBigCode};
use model::tokenizer::Tokenizer;
use serde::Serialize;
use tch::{Kind, Tensor};

use crate::error::Result;

/// Log-likelihood of reference tokens, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Likelihood {
    /// Reference tokens scored.
    pub tokens: usize,
    /// Sum of their natural-log probabilities.
    pub total: f64,
}

impl Likelihood {
    /// Mean log-likelihood per token; none when nothing was scored (no references), which must not
    /// read as the perfect 0.
    pub fn per_token(&self) -> Option<f64> {
        (self.tokens > 0).then(|| self.total / self.tokens as f64)
    }
}

/// Scores each `(prompt, reference)` pair: the log-probability of every reference token after the
/// prompt and the reference tokens before it, the two tokenized apart as generation sees them.
/// Where a pair is longer than the context, the reference keeps its start and the prompt its end.
pub fn reference_likelihood<'a>(
    model: &GptBigCode,
    tokenizer: &Tokenizer,
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Likelihood> {
    let context = model.config().n_positions as usize;
    let mut sum = Likelihood::default();
    for (prompt, reference) in pairs {
        let encode =
            |text: &str| -> Result<Vec<i64>> { Ok(tokenizer.encode(text)?.into_iter().map(i64::from).collect()) };
        let mut reference = encode(reference)?;
        let mut prompt = encode(prompt)?;
        if reference.is_empty() || prompt.is_empty() {
            continue;
        }
        reference.truncate(context - 1);
        prompt.drain(..prompt.len().saturating_sub(context - reference.len()));
        let ids: Vec<i64> = prompt.iter().chain(&reference).copied().collect();
        let input = Tensor::from_slice(&ids).to_device(model.device()).unsqueeze(0);
        let logits = tch::no_grad(|| model.forward_full(&input, Dropout::Off))?;
        // Position i predicts token i + 1: the reference's tokens are predicted from prompt.len() - 1 on.
        let predicting = logits.get(0).narrow(0, prompt.len() as i64 - 1, reference.len() as i64);
        let log_probs = predicting.to_kind(Kind::Float).log_softmax(-1, Kind::Float);
        let targets = Tensor::from_slice(&reference).to_device(model.device()).unsqueeze(1);
        let total = log_probs.gather(1, &targets, false).sum(Kind::Double).double_value(&[]);
        if total.is_nan() {
            return Err(model::ModelError::NotFinite(model::sampling::TARGET).into());
        }
        sum.total += total;
        sum.tokens += reference.len();
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use model::config::ModelConfig;
    use tch::Device;

    use super::*;

    /// A tokenizer trained on `text`, and a model of random weights over it.
    fn fixture(dir: &std::path::Path, text: &str) -> (Tokenizer, GptBigCode) {
        let corpus = dir.join("corpus.py");
        std::fs::write(&corpus, text).unwrap();
        model::tokenizer::train(&model::tokenizer::TrainConfig::new(vec![corpus], 300), dir).unwrap();
        let tokenizer = Tokenizer::from_dir(dir).unwrap();
        tch::manual_seed(0);
        let config = ModelConfig {
            vocab_size: tokenizer.vocab_size() as i64,
            n_positions: 32,
            n_embd: 32,
            n_layer: 2,
            n_head: 2,
            bos_token_id: Some(0),
            eos_token_id: Some(0),
            ..ModelConfig::default()
        };
        (tokenizer, GptBigCode::new(config, Device::Cpu).unwrap())
    }

    /// The sum equals the log-probabilities read off a full forward pass by hand, pairs add up, and
    /// a pair longer than the context is cut rather than refused.
    #[test]
    fn scores_the_reference_tokens_only() {
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..40).map(|i| format!("def f_{i}(x):\n    return x + {i}\n")).collect();
        let (tokenizer, model) = fixture(dir.path(), &text);
        let (prompt, reference) = ("def f_3(x):\n", "    return x + 3\n");
        let one = reference_likelihood(&model, &tokenizer, [(prompt, reference)]).unwrap();
        let prompt_ids: Vec<i64> = tokenizer.encode(prompt).unwrap().into_iter().map(i64::from).collect();
        let reference_ids: Vec<i64> = tokenizer.encode(reference).unwrap().into_iter().map(i64::from).collect();
        let ids: Vec<i64> = prompt_ids.iter().chain(&reference_ids).copied().collect();
        let logits = model.forward_full(&Tensor::from_slice(&ids).unsqueeze(0), Dropout::Off).unwrap();
        let log_probs = logits.get(0).log_softmax(-1, Kind::Double);
        let by_hand: f64 = (0..reference_ids.len())
            .map(|i| log_probs.double_value(&[(prompt_ids.len() + i - 1) as i64, reference_ids[i]]))
            .sum();
        assert_eq!(one.tokens, reference_ids.len());
        assert!((one.total - by_hand).abs() < 1e-3, "{} vs {by_hand}", one.total);
        assert!(one.per_token().is_some_and(|l| l < 0.0), "{one:?}");
        let two = reference_likelihood(&model, &tokenizer, [(prompt, reference), (prompt, reference)]).unwrap();
        assert_eq!(two.tokens, 2 * one.tokens);
        assert!((two.per_token().unwrap() - one.per_token().unwrap()).abs() < 1e-9, "{two:?} vs {one:?}");
        let long = reference.repeat(20);
        let cut = reference_likelihood(&model, &tokenizer, [(prompt, long.as_str())]).unwrap();
        assert_eq!(cut.tokens, 31, "the context keeps one prompt token: {cut:?}");
        let none = reference_likelihood(&model, &tokenizer, [(prompt, "")]).unwrap();
        assert_eq!((none, none.per_token()), (Likelihood::default(), None));
        // Weights whose activations overflow give NaN, refused rather than summed.
        tch::no_grad(|| {
            let vars = model.vars().variables();
            let _ = vars["transformer.ln_f.weight"].shallow_clone().fill_(3e38);
            let _ = vars["transformer.ln_f.bias"].shallow_clone().fill_(3e38);
        });
        let error = reference_likelihood(&model, &tokenizer, [(prompt, reference)]).unwrap_err().to_string();
        assert!(error.contains("logits are NaN or infinite"), "{error}");
    }
}
