//! How many tokens to draft, by a cost model measured per model pair on this machine: a target pass
//! over k new tokens costs `c(k)`, a draft step `d`; with a per-token acceptance `a`, a draft of
//! `g` tokens yields `1 + a + … + a^g` tokens for `g·d + c(g + 1)`. The length with the most tokens
//! per second wins, and 0 (no draft, one target step per token) whenever drafting would not pay,
//! so speculation never makes a request slower than the target alone by the model's own figures.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tch::Tensor;

use crate::gpt_bigcode::GptBigCode;
use crate::Result;

/// Drafting must promise this much over plain steps to be chosen: what the model leaves out
/// (sampling the draft, rolling caches back) costs a few percent.
const REQUIRED_GAIN: f64 = 1.05;

/// What the acceptance is taken to be before a generation has verified anything, and how many
/// draft tokens that belief weighs.
const PRIOR_ACCEPTANCE: f64 = 0.8;
const PRIOR_WEIGHT: f64 = 4.0;

/// Positions the scratch caches hold before a timed pass (decoding happens after a prompt).
const MEASURED_CONTEXT: i64 = 32;

/// Timed runs per figure; the fastest counts (the others met interruptions).
const RUNS: usize = 3;

/// Seconds of a target pass per width and of one draft step.
#[derive(Debug, Clone, PartialEq)]
pub struct Costs {
    /// (width, seconds) of measured target passes, by increasing width; at least width 1.
    target: Vec<(usize, f64)>,
    /// One draft step (0 for prompt lookup).
    draft_step: f64,
}

impl Costs {
    /// Costs from figures: target passes as (width, seconds) with width 1 among them, and a draft step.
    pub fn new(mut target: Vec<(usize, f64)>, draft_step: f64) -> Costs {
        target.sort_by_key(|&(width, _)| width);
        assert!(target.first().is_some_and(|&(width, _)| width == 1), "the cost of a one-token pass is needed");
        Costs { target, draft_step }
    }

    /// Times `target` over 1, 2, half of `max_width` and `max_width` new tokens and one step of `draft` (none for prompt
    /// lookup), on scratch caches after a short context.
    pub fn measure(target: &GptBigCode, draft: Option<&GptBigCode>, max_width: usize) -> Result<Costs> {
        // The middle width too: how a pass's cost grows with its width bends with the kernel's tiles.
        let mut widths = vec![1, 2, max_width.div_ceil(2), max_width.max(1)];
        widths.sort_unstable();
        widths.dedup();
        widths.retain(|&w| w <= max_width.max(1));
        let target_costs = tch::no_grad(|| {
            widths.iter().map(|&width| Ok((width, fastest_pass(target, width)?))).collect::<Result<Vec<_>>>()
        })?;
        let draft_step = match draft {
            Some(draft) => tch::no_grad(|| fastest_pass(draft, 1))?,
            None => 0.0,
        };
        Ok(Costs::new(target_costs, draft_step))
    }

    /// Seconds of a target pass over `width` new tokens: linear between measured widths, and past
    /// the widest along its last segment.
    pub fn target_pass(&self, width: usize) -> f64 {
        let points = &self.target;
        let upper = points.iter().position(|&(w, _)| w >= width).unwrap_or(points.len() - 1).max(1);
        if points.len() == 1 {
            return points[0].1;
        }
        let ((w0, c0), (w1, c1)) = (points[upper - 1], points[upper]);
        let slope = (c1 - c0) / (w1 - w0) as f64;
        (c0 + slope * (width as f64 - w0 as f64)).max(0.0)
    }

    /// Seconds of a round that drafts `gamma` tokens and verifies them in one target pass.
    pub fn round_seconds(&self, gamma: usize) -> f64 {
        gamma as f64 * self.draft_step + self.target_pass(gamma + 1)
    }

    /// The draft length (at most `max_gamma`) with the most expected tokens per second at per-token
    /// acceptance `acceptance`, when drafting rounds take `overrun` times what the model says; 0
    /// when plain steps are as fast.
    pub fn best_gamma(&self, acceptance: f64, overrun: f64, max_gamma: usize) -> usize {
        let plain = 1.0 / self.target_pass(1);
        let mut best = (0, plain * REQUIRED_GAIN);
        let (mut tokens, mut kept) = (1.0, 1.0);
        for gamma in 1..=max_gamma {
            kept *= acceptance;
            tokens += kept;
            let rate = tokens / (self.round_seconds(gamma) * overrun);
            if rate > best.1 {
                best = (gamma, rate);
            }
        }
        best.0
    }
}

/// The fastest of a few passes of `width` new tokens after [`MEASURED_CONTEXT`] positions.
fn fastest_pass(model: &GptBigCode, width: usize) -> Result<f64> {
    let context = MEASURED_CONTEXT.min(model.config().n_positions - width as i64 - 1).max(0);
    let mut cache = model.new_cache(1, context + width as i64)?;
    let token = |len: i64| Tensor::zeros([1, len], (tch::Kind::Int64, model.device()));
    if context > 0 {
        let _ = model.forward_next(&token(context), &mut cache)?;
    }
    let mut fastest = f64::INFINITY;
    for _ in 0..RUNS {
        let started = Instant::now();
        let logits = model.forward(&token(width as i64), &mut cache)?;
        // Reading a value waits for queued GPU work.
        let _ = logits.reshape([-1]).double_value(&[0]);
        fastest = fastest.min(started.elapsed().as_secs_f64());
        cache.truncate(context);
    }
    Ok(fastest)
}

/// (target id, draft id, widest pass) -> what was measured for them.
type Measured = HashMap<(u64, Option<u64>, usize), Arc<Costs>>;

/// Costs per (target, draft) pair, measured at first use in this process ([`GptBigCode::id`]).
pub fn costs_for(target: &GptBigCode, draft: Option<&GptBigCode>, max_width: usize) -> Result<Arc<Costs>> {
    static MEASURED: Mutex<Option<Measured>> = Mutex::new(None);
    let key = (target.id(), draft.map(GptBigCode::id), max_width);
    if let Some(costs) = MEASURED.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_default().get(&key) {
        return Ok(costs.clone());
    }
    let costs = Arc::new(Costs::measure(target, draft, max_width)?);
    tracing::debug!(?costs, "speculation costs measured");
    MEASURED.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_default().insert(key, costs.clone());
    Ok(costs)
}

/// How much longer drafting rounds took than [`Costs::round_seconds`] in one generation so far:
/// the work the model leaves out (sampling the draft, copying logits, rolling caches back) weighs
/// most on small models, where a step takes a fraction of a millisecond. A running mean that
/// halves the weight of the past at each round; 1 before any round.
#[derive(Debug, Clone)]
pub struct Overrun {
    ratio: f64,
}

impl Default for Overrun {
    fn default() -> Overrun {
        Overrun { ratio: 1.0 }
    }
}

impl Overrun {
    /// Counts a drafting round the model priced at `predicted` seconds that took `actual`.
    pub fn observe(&mut self, predicted: f64, actual: f64) {
        if predicted > 0.0 && actual.is_finite() {
            self.ratio = 0.5 * self.ratio + 0.5 * (actual / predicted);
        }
    }

    /// The estimate.
    pub fn ratio(&self) -> f64 {
        self.ratio
    }
}

/// Plain rounds before the first probe, and how many tokens a probe drafts.
const PROBE_AFTER: usize = 8;
const PROBE_GAMMA: usize = 2;

/// Probes while the estimates say not to draft: a few rejections early on (or one slow round) would
/// otherwise stop the drafting for the rest of a generation, as estimates only move when something
/// is drafted. A probe drafts [`PROBE_GAMMA`] tokens after [`PROBE_AFTER`] plain rounds, then after
/// twice as many each time, so a pair that never pays loses a probe round per doubling of the
/// output; a chosen draft resets the wait.
#[derive(Debug, Clone)]
pub struct Probe {
    plain_rounds: usize,
    wait: usize,
}

impl Default for Probe {
    fn default() -> Probe {
        Probe { plain_rounds: 0, wait: PROBE_AFTER }
    }
}

impl Probe {
    /// The draft length for this round given the cost model's `chosen` one.
    pub fn gamma(&mut self, chosen: usize) -> usize {
        if chosen > 0 {
            *self = Probe::default();
            return chosen;
        }
        self.plain_rounds += 1;
        if self.plain_rounds < self.wait {
            return 0;
        }
        self.plain_rounds = 0;
        self.wait *= 2;
        PROBE_GAMMA
    }
}

/// The per-token acceptance of one generation so far: accepted draft tokens over the draft tokens
/// the target ruled on (each round rules on its accepted ones and the first rejected one), starting
/// from a prior belief: what earlier generations of the same pair saw ([`Acceptance::for_pair`]),
/// or [`PRIOR_ACCEPTANCE`] for a new pair. Without that memory a few early rejections could talk a
/// generation out of drafting with a pair that usually pays.
#[derive(Debug, Clone)]
pub struct Acceptance {
    accepted: usize,
    ruled: usize,
    prior: f64,
    prior_weight: f64,
}

impl Default for Acceptance {
    fn default() -> Acceptance {
        Acceptance { accepted: 0, ruled: 0, prior: PRIOR_ACCEPTANCE, prior_weight: PRIOR_WEIGHT }
    }
}

/// (target id, draft id) -> draft tokens accepted and ruled on in past generations (halved as they
/// pass [`HISTORY_TOKENS`], so recent ones count most).
type History = HashMap<(u64, Option<u64>), (f64, f64)>;
static HISTORY: Mutex<Option<History>> = Mutex::new(None);
const HISTORY_TOKENS: f64 = 512.0;
/// How many draft tokens the remembered acceptance weighs at the start of a generation.
const HISTORY_WEIGHT: f64 = 24.0;

impl Acceptance {
    /// The estimate for a new generation with this (target, draft) pair: the acceptance its earlier
    /// generations in this process saw, if any.
    pub fn for_pair(pair: (u64, Option<u64>)) -> Acceptance {
        let history = HISTORY.lock().unwrap_or_else(|e| e.into_inner());
        match history.as_ref().and_then(|h| h.get(&pair)) {
            Some(&(accepted, ruled)) if ruled > 0.0 => {
                Acceptance { prior: accepted / ruled, prior_weight: ruled.min(HISTORY_WEIGHT), ..Acceptance::default() }
            }
            _ => Acceptance::default(),
        }
    }

    /// Adds what this generation saw to the pair's history.
    pub fn remember(&self, pair: (u64, Option<u64>)) {
        let mut history = HISTORY.lock().unwrap_or_else(|e| e.into_inner());
        let (accepted, ruled) = history.get_or_insert_default().entry(pair).or_insert((0.0, 0.0));
        *accepted += self.accepted as f64;
        *ruled += self.ruled as f64;
        while *ruled > HISTORY_TOKENS {
            *accepted /= 2.0;
            *ruled /= 2.0;
        }
    }

    /// Counts a round: `accepted` of `drafted` draft tokens kept.
    pub fn observe(&mut self, accepted: usize, drafted: usize) {
        self.accepted += accepted;
        self.ruled += (accepted + 1).min(drafted);
    }

    /// The estimate.
    pub fn estimate(&self) -> f64 {
        (self.accepted as f64 + self.prior * self.prior_weight) / (self.ruled as f64 + self.prior_weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (target pass per width, draft step, acceptance) -> the chosen length (at most 12).
    fn check(target: &[(usize, f64)], draft_step: f64, acceptance: f64, expected: usize) {
        let costs = Costs::new(target.to_vec(), draft_step);
        assert_eq!(costs.best_gamma(acceptance, 1.0, 12), expected, "{costs:?}, acceptance {acceptance}");
    }

    #[test]
    fn drafts_only_where_it_pays() {
        // A memory-bound target: wider passes cost little more.
        let flat = [(1, 1.0), (2, 1.05), (13, 1.6)];
        check(&flat, 0.1, 0.9, 8);
        check(&flat, 0.1, 0.6, 2);
        check(&flat, 0.5, 0.5, 0); // a slow draft that is often wrong
        check(&flat, 1.0, 1.0, 0); // the target drafting for itself
        check(&flat, 0.0, 0.3, 2); // prompt lookup: free drafts pay even when often wrong
                                   // A compute-bound target: a k-token pass costs k steps, so nothing pays.
        check(&[(1, 1.0), (2, 2.0), (13, 13.0)], 0.05, 0.95, 0);
    }

    #[test]
    fn rounds_slower_than_priced_stop_the_drafting() {
        let costs = Costs::new(vec![(1, 1.0), (2, 1.05), (13, 1.6)], 0.1);
        let mut overrun = Overrun::default();
        assert_eq!(costs.best_gamma(0.9, overrun.ratio(), 12), 8);
        overrun.observe(costs.round_seconds(8), 1.1 * costs.round_seconds(8));
        assert!(costs.best_gamma(0.9, overrun.ratio(), 12) > 0, "a little slower still pays");
        for _ in 0..3 {
            overrun.observe(costs.round_seconds(8), 4.0 * costs.round_seconds(8));
        }
        assert_eq!(costs.best_gamma(0.9, overrun.ratio(), 12), 0);
        overrun.observe(0.0, 1.0);
        assert!(overrun.ratio().is_finite());
    }

    #[test]
    fn probes_come_at_doubling_waits_until_drafting_pays() {
        let mut probe = Probe::default();
        let probes: Vec<usize> = (1..=60).filter(|_| probe.gamma(0) > 0).collect();
        assert_eq!(probes, [8, 24, 56]);
        assert_eq!(probe.gamma(5), 5);
        let probes: Vec<usize> = (1..=10).filter(|_| probe.gamma(0) > 0).collect();
        assert_eq!(probes, [8], "a chosen draft resets the wait");
    }

    #[test]
    fn target_cost_is_interpolated_between_widths() {
        let costs = Costs::new(vec![(13, 2.2), (1, 1.0), (2, 1.1)], 0.0);
        let close = |width: usize, expected: f64| {
            let got = costs.target_pass(width);
            assert!((got - expected).abs() < 1e-9, "width {width}: {got}, expected {expected}");
        };
        close(1, 1.0);
        close(2, 1.1);
        close(7, 1.6);
        close(13, 2.2);
        close(24, 3.3);
        assert_eq!(Costs::new(vec![(1, 0.5)], 0.0).target_pass(9), 0.5);
    }

    #[test]
    fn acceptance_counts_what_the_target_ruled_on() {
        let mut acceptance = Acceptance::default();
        assert_eq!(acceptance.estimate(), PRIOR_ACCEPTANCE);
        for _ in 0..50 {
            acceptance.observe(2, 4); // two kept, the third rejected, the fourth never ruled on
        }
        assert!((acceptance.estimate() - (100.0 + 3.2) / (150.0 + 4.0)).abs() < 1e-12);
        let mut all = Acceptance::default();
        all.observe(4, 4);
        assert!(all.estimate() > PRIOR_ACCEPTANCE);
    }

    /// A pair's next generation starts from what its earlier ones saw, recent ones weighing most.
    #[test]
    fn a_pair_remembers_its_acceptance() {
        let pair = (u64::MAX - 7, Some(u64::MAX - 8));
        assert_eq!(Acceptance::for_pair(pair).estimate(), PRIOR_ACCEPTANCE);
        let mut seen = Acceptance::for_pair(pair);
        for _ in 0..10 {
            seen.observe(9, 10); // 9 kept, the tenth rejected: 0.9
        }
        seen.remember(pair);
        let next = Acceptance::for_pair(pair);
        assert!((next.estimate() - 0.9).abs() < 1e-12, "{next:?}");
        // Early rejections move it, but do not sink it the way they sink the default prior.
        let (mut fresh, mut remembered) = (Acceptance::default(), Acceptance::for_pair(pair));
        for estimate in [&mut fresh, &mut remembered] {
            estimate.observe(0, 4);
            estimate.observe(0, 4);
        }
        assert!(remembered.estimate() > 0.8 && fresh.estimate() < 0.55, "{remembered:?} {fresh:?}");
        let mut poor = Acceptance::for_pair(pair);
        for _ in 0..300 {
            poor.observe(1, 4); // 0.5
        }
        poor.remember(pair);
        let after = Acceptance::for_pair(pair).estimate();
        assert!(after < 0.6, "recent generations weigh most: {after}");
        assert_eq!(Acceptance::for_pair((pair.0, None)).estimate(), PRIOR_ACCEPTANCE, "another pair");
    }
}
