//! Autoregressive generation with a KV cache: greedy or sampled (temperature, top-k, top-p) with
//! seeds that make every sample reproducible on its own, EOS, a token budget, and stop criteria that
//! are checked inside the decode loop. Several samples of one prompt share its prefill.
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::{Kind, Tensor};

use crate::model::GptBigCode;
use crate::{PipelineError, Result};

/// How the next token is picked.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 means greedy (argmax); otherwise logits are divided by it.
    pub temperature: f64,
    /// Keep only the k most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p.
    pub top_p: Option<f64>,
    /// Seed of sample 0; sample i uses `seed + i`.
    pub seed: u64,
}

impl Sampling {
    /// Argmax decoding.
    pub fn greedy() -> Sampling {
        Sampling { temperature: 0.0, top_k: None, top_p: None, seed: 0 }
    }

    fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(PipelineError::Invalid(format!("temperature must be >= 0, got {}", self.temperature)));
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return Err(PipelineError::Invalid(format!("top-p must be in (0, 1], got {p}")));
        }
        if self.top_k == Some(0) {
            return Err(PipelineError::Invalid("top-k must be at least 1".into()));
        }
        Ok(())
    }
}

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
        return Err(PipelineError::Invalid("the prompt is empty".into()));
    }
    let context = model.config().n_positions;
    let prompt_len = prompt.len() as i64;
    if prompt_len >= context {
        return Err(PipelineError::Invalid(format!(
            "the prompt has {prompt_len} tokens; the model's context (n_positions) is {context}"
        )));
    }
    let samples = config.num_samples.max(1);
    let capacity = (prompt_len + config.max_new_tokens as i64).min(context);
    tch::no_grad(|| {
        let mut cache = model.new_cache(1, capacity)?;
        let input = Tensor::from_slice(prompt).to_device(model.device()).unsqueeze(0);
        let mut last = model.forward_next(&input, &mut cache)?.repeat([samples as i64, 1]);
        cache.repeat_batch(samples as i64);

        let mut rngs: Vec<StdRng> =
            (0..samples).map(|i| StdRng::seed_from_u64(config.sampling.seed.wrapping_add(i as u64))).collect();
        let mut out: Vec<Generation> = vec![Generation { tokens: Vec::new(), finish: Finish::Length }; samples];
        let mut done = vec![false; samples];
        for _ in 0..config.max_new_tokens {
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
            if done.iter().all(|d| *d) || cache.len() + 1 > capacity {
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
    if sampling.temperature == 0.0 {
        return Ok(Vec::<i64>::try_from(logits.argmax(-1, false).to_device(tch::Device::Cpu))?);
    }
    let rows = logits.to_kind(Kind::Float).to_device(tch::Device::Cpu);
    let (samples, vocab) = rows.size2()?;
    let flat = Vec::<f32>::try_from(rows.reshape([-1]))?;
    Ok((0..samples as usize)
        .map(|i| sample_row(&flat[i * vocab as usize..(i + 1) * vocab as usize], sampling, &mut rngs[i]) as i64)
        .collect())
}

/// Temperature, then top-k, then top-p (as `transformers` orders its warpers): the surviving
/// tokens with their renormalised probabilities, most likely first. Speculative decoding verifies
/// against exactly this distribution.
pub(crate) fn warped_candidates(logits: &[f32], sampling: &Sampling) -> Vec<(usize, f64)> {
    let mut candidates: Vec<(usize, f64)> =
        logits.iter().enumerate().map(|(i, &l)| (i, f64::from(l) / sampling.temperature)).collect();
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if let Some(k) = sampling.top_k {
        candidates.truncate(k.max(1));
    }
    let max = candidates[0].1;
    let mut total = 0.0;
    for candidate in candidates.iter_mut() {
        candidate.1 = (candidate.1 - max).exp();
        total += candidate.1;
    }
    if let Some(p) = sampling.top_p {
        let mut cumulative = 0.0;
        let keep = candidates
            .iter()
            .position(|c| {
                cumulative += c.1 / total;
                cumulative >= p
            })
            .map_or(candidates.len(), |last| last + 1);
        candidates.truncate(keep);
        total = candidates.iter().map(|c| c.1).sum();
    }
    for candidate in candidates.iter_mut() {
        candidate.1 /= total;
    }
    candidates
}

/// One draw from the warped distribution of `logits`.
fn sample_row(logits: &[f32], sampling: &Sampling, rng: &mut StdRng) -> usize {
    let candidates = warped_candidates(logits, sampling);
    let mut draw = rng.random::<f64>();
    for (token, probability) in &candidates {
        draw -= probability;
        if draw <= 0.0 {
            return *token;
        }
    }
    candidates.last().map_or(0, |c| c.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Draws many times from `logits` and returns how often each token came up.
    fn check(logits: &[f32], sampling: Sampling, expected_support: &[usize]) -> Vec<usize> {
        let mut rng = StdRng::seed_from_u64(sampling.seed);
        let mut counts = vec![0; logits.len()];
        for _ in 0..4000 {
            counts[sample_row(logits, &sampling, &mut rng)] += 1;
        }
        let support: Vec<usize> = (0..logits.len()).filter(|&i| counts[i] > 0).collect();
        assert_eq!(support, expected_support, "{sampling:?}: counts {counts:?}");
        counts
    }

    fn sampling(temperature: f64, top_k: Option<usize>, top_p: Option<f64>) -> Sampling {
        Sampling { temperature, top_k, top_p, seed: 11 }
    }

    #[test]
    fn warpers_restrict_the_support() {
        let logits = [2.0, 1.0, 0.0, -1.0, 3.0];
        check(&logits, sampling(1.0, None, None), &[0, 1, 2, 3, 4]);
        check(&logits, sampling(1.0, Some(2), None), &[0, 4]);
        // Probabilities ≈ [.23, .09, .03, .01, .64]: 0.64 + 0.23 reaches 0.8.
        check(&logits, sampling(1.0, None, Some(0.8)), &[0, 4]);
        check(&logits, sampling(1.0, None, Some(0.5)), &[4]);
        check(&logits, sampling(1.0, Some(3), Some(0.99)), &[0, 1, 4]);
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        let counts = check(&[0.0, (3.0f32).ln()], sampling(1.0, None, None), &[0, 1]);
        let share = counts[1] as f64 / 4000.0;
        assert!((share - 0.75).abs() < 0.03, "{share}");
        // Temperature 2 flattens 1:3 into 1:sqrt(3).
        let counts = check(&[0.0, (3.0f32).ln()], sampling(2.0, None, None), &[0, 1]);
        let share = counts[1] as f64 / 4000.0;
        let expected = 3f64.sqrt() / (1.0 + 3f64.sqrt());
        assert!((share - expected).abs() < 0.03, "{share} vs {expected}");
    }

    #[test]
    fn bad_settings_are_rejected() {
        assert!(sampling(-1.0, None, None).validate().is_err());
        assert!(sampling(1.0, Some(0), None).validate().is_err());
        assert!(sampling(1.0, None, Some(0.0)).validate().is_err());
        assert!(sampling(1.0, None, Some(1.5)).validate().is_err());
        assert!(sampling(0.7, Some(40), Some(0.95)).validate().is_ok());
    }
}
