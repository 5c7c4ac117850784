//! How the next token is picked: temperature, top-k and top-p, their validation, and the filtered
//! distribution they leave. Plain and speculative generation both go through here, so a setting
//! means the same thing, and is refused the same way, on every path.
use rand::rngs::StdRng;
use rand::Rng;
use tch::{Device, Kind, Tensor};

use crate::{ModelError, Result};

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

    /// Whether the settings describe a distribution: a finite temperature >= 0, top-k >= 1 and
    /// top-p in (0, 1]. Nothing is clamped: a value outside these ranges is refused.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(ModelError::Invalid(format!("temperature must be >= 0, got {}", self.temperature)));
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return Err(ModelError::Invalid(format!("top-p must be in (0, 1], got {p}")));
        }
        if self.top_k == Some(0) {
            return Err(ModelError::Invalid("top-k must be at least 1".into()));
        }
        Ok(())
    }

    /// Whether tokens are picked by argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Temperature, then top-k, then top-p (as `transformers` orders its warpers): the surviving
    /// tokens with their renormalised probabilities, in no particular order. Call on validated
    /// settings with a temperature above 0. No full sort: top-k is a partial selection and top-p
    /// sorts only the tokens near its cut (a sort of the vocabulary per token and sequence was the
    /// largest cost of batched sampling).
    fn candidates(&self, logits: &[f32]) -> Vec<(usize, f64)> {
        // Differences from the largest logit, then scaled: a tiny temperature (1e-310) sends them to
        // -inf and the largest to 0, where scaling first made every logit infinite and the draw NaN.
        let top = logits.iter().map(|&l| f64::from(l)).fold(f64::NEG_INFINITY, f64::max);
        let mut candidates: Vec<(usize, f64)> =
            logits.iter().enumerate().map(|(i, &l)| (i, (f64::from(l) - top) / self.temperature)).collect();
        if let Some(k) = self.top_k.filter(|&k| k < candidates.len()) {
            candidates.select_nth_unstable_by(k - 1, likelier);
            candidates.truncate(k);
        }
        let max = candidates.iter().map(|c| c.1).fold(f64::NEG_INFINITY, f64::max);
        for candidate in candidates.iter_mut() {
            candidate.1 = (candidate.1 - max).exp();
        }
        if let Some(p) = self.top_p.filter(|&p| p < 1.0) {
            candidates = nucleus(candidates, p);
        }
        let total: f64 = candidates.iter().map(|c| c.1).sum();
        for candidate in candidates.iter_mut() {
            candidate.1 /= total;
        }
        candidates
    }

    /// The distribution tokens are drawn from, over the whole vocabulary; greedy is a point mass on
    /// the argmax. Speculative decoding verifies against exactly this distribution.
    pub fn probabilities(&self, logits: &[f32]) -> Vec<f64> {
        let mut probs = vec![0.0; logits.len()];
        if self.is_greedy() {
            probs[argmax(logits)] = 1.0;
            return probs;
        }
        for (token, probability) in self.candidates(logits) {
            probs[token] = probability;
        }
        probs
    }

    /// The next token after `logits`: the argmax, or one draw from [`Sampling::probabilities`].
    pub fn pick(&self, logits: &[f32], rng: &mut StdRng) -> usize {
        if self.is_greedy() {
            return argmax(logits);
        }
        let candidates = self.candidates(logits);
        let mut draw = rng.random::<f64>();
        for (token, probability) in &candidates {
            draw -= probability;
            if draw <= 0.0 {
                return *token;
            }
        }
        candidates.last().map_or(0, |c| c.0)
    }
}

/// Orders (token, weight) pairs most likely first, ties to the lower token.
fn likelier(a: &(usize, f64), b: &(usize, f64)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The smallest set of the likeliest `weighted` tokens (weights in [0, 1]) whose weights reach `p`
/// of their total, ties to the lower token. Tokens are grouped by their weight's binary exponent;
/// heavier groups are kept whole and only the group where the cut falls is sorted.
fn nucleus(mut weighted: Vec<(usize, f64)>, p: f64) -> Vec<(usize, f64)> {
    const GROUPS: usize = 64;
    let group = |weight: f64| (1023 - ((weight.to_bits() >> 52) & 0x7ff) as i64).clamp(0, GROUPS as i64 - 1) as usize;
    let total: f64 = weighted.iter().map(|c| c.1).sum();
    let target = p * total;
    let mut sums = [0.0f64; GROUPS];
    for candidate in &weighted {
        sums[group(candidate.1)] += candidate.1;
    }
    let mut cumulative = 0.0;
    let mut cut = GROUPS - 1;
    for (g, sum) in sums.iter().enumerate() {
        if cumulative + sum >= target {
            cut = g;
            break;
        }
        cumulative += sum;
    }
    let mut edge: Vec<(usize, f64)> = weighted.iter().filter(|c| group(c.1) == cut).copied().collect();
    edge.sort_unstable_by(likelier);
    weighted.retain(|c| group(c.1) < cut);
    for candidate in edge {
        weighted.push(candidate);
        cumulative += candidate.1;
        if cumulative >= target {
            break;
        }
    }
    weighted
}

/// Whose logits a check names.
pub const TARGET: &str = "model";
/// The draft model of speculative decoding.
pub const DRAFT: &str = "draft model";

/// Refuses a row of logits whose largest value is not finite: NaN anywhere or +infinity
/// (activations that overflowed: an argmax over them is token 0, a distribution NaN), or no finite
/// logit at all. A token at -infinity merely cannot be picked.
pub fn check_finite(row: &[f32], model: &'static str) -> Result<()> {
    // Bit tests, which vectorize: this runs over the vocabulary at every step.
    let (mut overflowed, mut any_finite) = (false, false);
    for &logit in row {
        let bits = logit.to_bits();
        let exponent_full = bits & 0x7f80_0000 == 0x7f80_0000;
        overflowed |= exponent_full && bits != f32::NEG_INFINITY.to_bits();
        any_finite |= !exponent_full;
    }
    if overflowed || !any_finite {
        return Err(ModelError::NotFinite(model));
    }
    Ok(())
}

/// `logits` as fp32 on the host, flat, each row (the last dimension) checked by [`check_finite`].
pub fn host_logits(logits: &Tensor, model: &'static str) -> Result<Vec<f32>> {
    let vocab = logits.size().last().map_or(1, |&v| v.max(1) as usize);
    let flat = Vec::<f32>::try_from(logits.to_kind(Kind::Float).to_device(Device::Cpu).reshape([-1]))?;
    for row in flat.chunks(vocab) {
        check_finite(row, model)?;
    }
    Ok(flat)
}

/// The argmax of every row of `logits` (the last dimension), taken where they are (ties to the first,
/// as torch's argmax), refusing a row whose maximum is not finite (see [`check_finite`]).
pub fn greedy_tokens(logits: &Tensor, model: &'static str) -> Result<Vec<i64>> {
    let (best, tokens) = logits.max_dim(-1, false);
    let tokens = if logits.device() == Device::Cpu {
        if Vec::<f32>::try_from(best.to_kind(Kind::Float).reshape([-1]))?.iter().any(|b| !b.is_finite()) {
            return Err(ModelError::NotFinite(model));
        }
        tokens
    } else {
        // One copy from the device, not two: a row whose maximum is not finite comes back as -1.
        tokens.where_scalarother(&best.isfinite(), -1)
    };
    let tokens = Vec::<i64>::try_from(tokens.to_device(Device::Cpu).reshape([-1]))?;
    if tokens.contains(&-1) {
        return Err(ModelError::NotFinite(model));
    }
    Ok(tokens)
}

/// The first maximum, as torch's argmax picks.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &value) in row.iter().enumerate() {
        if value > row[best] {
            best = i;
        }
    }
    best
}

/// Draws an index with probability proportional to `weights` (which need not sum to 1).
pub fn draw(weights: &[f64], rng: &mut StdRng) -> usize {
    let total: f64 = weights.iter().sum();
    let mut left = rng.random::<f64>() * total;
    let mut last = 0;
    for (i, &w) in weights.iter().enumerate() {
        if w <= 0.0 {
            continue;
        }
        last = i;
        left -= w;
        if left <= 0.0 {
            return i;
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    /// A row of logits -> the greedy token, or `None` where it is refused as not finite; the same
    /// from the host check, the host argmax and the argmax taken on the tensor, one row or a batch.
    #[test]
    fn greedy_tokens_of_finite_rows_only() {
        let (inf, nan) = (f32::INFINITY, f32::NAN);
        let negative_nan = f32::from_bits(0xffc0_0000);
        let rows: [(&[f32], Option<i64>); 9] = [
            (&[0.5, 2.0, -1.0], Some(1)),
            (&[3.0, 1.0, 3.0], Some(0)),
            (&[-inf, 1.0, -inf], Some(1)),
            (&[-3e38, -3e38, -inf], Some(0)),
            (&[0.0, nan, 1.0], None),
            (&[nan, nan, nan], None),
            (&[1.0, 2.0, negative_nan], None),
            (&[1.0, inf, 0.0], None),
            (&[-inf, -inf, -inf], None),
        ];
        for (row, expected) in rows {
            let tensor = Tensor::from_slice(row).view([1, 3]);
            let greedy = greedy_tokens(&tensor, TARGET).ok().map(|t| t[0]);
            let host = host_logits(&tensor, TARGET).ok().map(|r| argmax(&r) as i64);
            assert_eq!((greedy, host), (expected, expected), "{row:?}");
            let batch = Tensor::cat(&[Tensor::from_slice(&[0.0f32, 9.0, 0.0]).view([1, 3]), tensor], 0);
            let greedy = greedy_tokens(&batch, DRAFT);
            assert_eq!(greedy.as_ref().ok().map(|t| t[1]), expected, "{row:?} in a batch");
            if let Err(error) = greedy {
                assert!(error.to_string().starts_with("the draft model's logits are NaN or infinite"), "{error}");
            }
            assert_eq!(host_logits(&batch, TARGET).is_ok(), expected.is_some(), "{row:?} in a batch");
        }
    }

    /// Draws many times from `logits` and returns how often each token came up.
    fn check(logits: &[f32], sampling: Sampling, expected_support: &[usize]) -> Vec<usize> {
        let mut rng = StdRng::seed_from_u64(sampling.seed);
        let mut counts = vec![0; logits.len()];
        for _ in 0..4000 {
            counts[sampling.pick(logits, &mut rng)] += 1;
        }
        let support: Vec<usize> = (0..logits.len()).filter(|&i| counts[i] > 0).collect();
        assert_eq!(support, expected_support, "{sampling:?}: counts {counts:?}");
        let exact: Vec<usize> = (0..logits.len()).filter(|&i| sampling.probabilities(logits)[i] > 0.0).collect();
        assert_eq!(exact, expected_support, "{sampling:?}: the distribution's support");
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
        check(&logits, sampling(1.0, Some(1), None), &[4]);
        // Probabilities ≈ [.23, .09, .03, .01, .64]: 0.64 + 0.23 reaches 0.8.
        check(&logits, sampling(1.0, None, Some(0.8)), &[0, 4]);
        check(&logits, sampling(1.0, None, Some(0.5)), &[4]);
        check(&logits, sampling(1.0, None, Some(1.0)), &[0, 1, 2, 3, 4]);
        check(&logits, sampling(1.0, Some(3), Some(0.99)), &[0, 1, 4]);
        check(&logits, sampling(0.0, Some(3), Some(0.5)), &[4]);
        // Temperatures whose scaled logits overflow still pick from the largest; huge ones spread
        // over every token.
        let first_largest = [3.0, 1.0, 0.0, -1.0, 2.0];
        for tiny in [1e-30, 1e-300, 1e-310, f64::MIN_POSITIVE] {
            check(&first_largest, sampling(tiny, None, None), &[0]);
            check(&first_largest, sampling(tiny, Some(2), Some(0.5)), &[0]);
        }
        check(&first_largest, sampling(1e300, None, None), &[0, 1, 2, 3, 4]);
    }

    /// top-k and top-p keep exactly the tokens the sorted definition keeps, on vocabularies from
    /// flat (a random model) to peaked (a trained one).
    #[test]
    fn warpers_keep_what_a_full_sort_keeps() {
        let mut rng = StdRng::seed_from_u64(5);
        for (spread, top_k, top_p) in
            [(0.1, None, Some(0.95)), (3.0, None, Some(0.9)), (8.0, Some(50), Some(0.5)), (1.0, Some(7), None)]
        {
            let logits: Vec<f32> = (0..4000).map(|_| (rng.random::<f64>() * spread) as f32).collect();
            let settings = sampling(0.8, top_k, top_p);
            let mut sorted: Vec<(usize, f64)> =
                logits.iter().enumerate().map(|(i, &l)| (i, f64::from(l) / 0.8)).collect();
            sorted.sort_by(likelier);
            sorted.truncate(top_k.unwrap_or(sorted.len()));
            let weights: Vec<f64> = sorted.iter().map(|c| (c.1 - sorted[0].1).exp()).collect();
            let total: f64 = weights.iter().sum();
            let mut cumulative = 0.0;
            let keep = weights.iter().position(|w| {
                cumulative += w / total;
                cumulative >= top_p.unwrap_or(1.0)
            });
            let mut expected: Vec<usize> = sorted[..keep.map_or(sorted.len(), |k| k + 1)].iter().map(|c| c.0).collect();
            expected.sort_unstable();
            let mut kept: Vec<usize> = settings.candidates(&logits).iter().map(|c| c.0).collect();
            kept.sort_unstable();
            assert_eq!(kept, expected, "spread {spread}, top-k {top_k:?}, top-p {top_p:?}");
        }
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
        let refused = |s: Sampling| s.validate().expect_err(&format!("{s:?} was accepted")).to_string();
        assert!(refused(sampling(-1.0, None, None)).contains("temperature"));
        assert!(refused(sampling(f64::NAN, None, None)).contains("temperature"));
        assert!(refused(sampling(f64::INFINITY, None, None)).contains("temperature"));
        assert!(refused(sampling(1.0, Some(0), None)).contains("top-k"));
        for p in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(refused(sampling(1.0, None, Some(p))).contains("top-p"), "top-p {p}");
        }
        // Greedy settings are validated too: the flags mean the same whatever the temperature.
        assert!(refused(sampling(0.0, Some(0), None)).contains("top-k"));
        sampling(0.7, Some(40), Some(0.95)).validate().expect("valid settings");
        sampling(0.0, None, Some(1.0)).validate().expect("valid settings");
    }
}
