//! Autoregressive generation with a KV cache: greedy or sampled ([`Sampling`]) with
//! seeds that make every sample reproducible on its own, EOS, a token budget, and stop criteria that
//! are checked inside the decode loop. Several samples of one prompt share its prefill.
use rand::rngs::StdRng;
use rand::SeedableRng;
use tch::Tensor;

use crate::gpt_bigcode::GptBigCode;
pub use crate::sampling::Sampling;
use crate::sampling::{greedy_tokens, host_logits, TARGET};
use crate::{ModelError, Result};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    /// Most tokens to add per sample.
    pub max_new_tokens: usize,
    /// Samples to draw from the one prompt.
    pub num_samples: usize,
    /// Token picking.
    pub sampling: Sampling,
    /// Stop when this token is produced (not included in the output).
    pub eos_token_id: Option<i64>,
}

/// Why a sample ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model produced EOS.
    Eos,
    /// A stop criterion matched.
    Stop,
    /// `max_new_tokens` were produced.
    Length,
}

/// One sample's new tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated token ids, without the prompt and without EOS.
    pub tokens: Vec<i64>,
    /// Why it ended.
    pub finish: Finish,
}

/// Decides, after each new token, whether a sample is complete (e.g. a stop sequence appeared).
pub trait StopCriterion {
    /// `tokens` are the sample's generated tokens so far.
    fn should_stop(&mut self, sample: usize, tokens: &[i64]) -> bool;
}

/// Never stops early.
pub struct NoStop;

impl StopCriterion for NoStop {
    fn should_stop(&mut self, _: usize, _: &[i64]) -> bool {
        false
    }
}

/// Generates up to `max_new_tokens` for `num_samples` samples of `prompt`.
pub fn generate(
    model: &GptBigCode,
    prompt: &[i64],
    config: &GenerateConfig,
    stop: &mut dyn StopCriterion,
) -> Result<Vec<Generation>> {
    config.sampling.validate()?;
    if prompt.is_empty() {
        return Err(ModelError::Invalid("the prompt is empty".into()));
    }
    let context = model.config().n_positions;
    let prompt_len = prompt.len() as i64;
    if prompt_len >= context {
        return Err(ModelError::Invalid(format!(
            "the prompt has {prompt_len} tokens; the model's context (n_positions) is {context}"
        )));
    }
    let samples = config.num_samples.max(1);
    let capacity = prompt.len().saturating_add(config.max_new_tokens).min(context as usize) as i64;
    tch::no_grad(|| {
        let mut cache = model.new_cache(1, capacity)?;
        let input = Tensor::from_slice(prompt).to_device(model.device()).unsqueeze(0);
        let mut last = model.forward_next(&input, &mut cache)?.repeat([samples as i64, 1]);
        cache.repeat_batch(samples as i64);

        let mut rngs: Vec<StdRng> =
            (0..samples).map(|i| StdRng::seed_from_u64(config.sampling.seed.wrapping_add(i as u64))).collect();
        let mut out: Vec<Generation> = vec![Generation { tokens: Vec::new(), finish: Finish::Length }; samples];
        let mut done = vec![false; samples];
        for step in 0..config.max_new_tokens {
            if cache.len() >= capacity {
                break;
            }
            let next = pick(&last, &config.sampling, &mut rngs)?;
            for (i, &token) in next.iter().enumerate() {
                if done[i] {
                    continue;
                }
                if Some(token) == config.eos_token_id {
                    (done[i], out[i].finish) = (true, Finish::Eos);
                    continue;
                }
                out[i].tokens.push(token);
                if stop.should_stop(i, &out[i].tokens) {
                    (done[i], out[i].finish) = (true, Finish::Stop);
                }
            }
            // The last token needs no pass after it.
            if done.iter().all(|d| *d) || step + 1 == config.max_new_tokens || cache.len() + 1 > capacity {
                break;
            }
            let step = Tensor::from_slice(&next).to_device(model.device()).unsqueeze(1);
            last = model.forward_next(&step, &mut cache)?;
        }
        Ok(out)
    })
}

/// The next token of every sample, from logits `[samples, vocab]`.
fn pick(logits: &Tensor, sampling: &Sampling, rngs: &mut [StdRng]) -> Result<Vec<i64>> {
    if sampling.is_greedy() {
        return greedy_tokens(logits, TARGET);
    }
    let (_, vocab) = logits.size2()?;
    let flat = host_logits(logits, TARGET)?;
    Ok(flat.chunks(vocab as usize).zip(rngs).map(|(row, rng)| sampling.pick(row, rng) as i64).collect())
}
