//! How many tokens to draft, by a cost model measured per model pair on this machine: a target pass
//! over k new tokens costs `c(k)`, a draft step `d`; with a per-token acceptance `a`, a draft of
//! `g` tokens yields `1 + a + … + a^g` tokens for `g·d + c(g + 1)`. The length with the most tokens
//! per second wins, and 0 (no draft, one target step per token) whenever drafting would not pay,
//! so speculation never makes a request slower than the target alone by the model's own figures.
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tch::Tensor;

use crate::gpt_bigcode::GptBigCode;
use crate::pair_history::{non_negative, HistoryFile, Saved, MEAN_SQUARE_STRAY_MAX};
use crate::Result;
use kernels::calibrate::whole_lines;

/// Drafting must promise this much over plain steps to be chosen: what the model leaves out
/// (sampling the draft, rolling caches back) costs a few percent.
const REQUIRED_GAIN: f64 = 1.05;

/// What the acceptance is taken to be before a generation has verified anything, and how many
/// draft tokens that belief weighs.
const PRIOR_ACCEPTANCE: f64 = 0.8;
const PRIOR_WEIGHT: f64 = 4.0;

/// Positions the scratch caches hold before a timed pass (decoding happens after a prompt).
const MEASURED_CONTEXT: i64 = 32;

/// Timed runs per figure (the fastest counts: the others met interruptions): at least `RUNS`, more
/// while they take under `MEASURING_SECONDS`.
const RUNS: usize = 3;
const MAX_RUNS: usize = 64;
const MEASURING_SECONDS: f64 = 0.02;

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
    /// A wider pass is taken to cost at least what a narrower one does: a figure that says otherwise
    /// met noise (on an H200, 8 tokens timed 2.6 ms after 3 tokens' 3.5 ms, and drafting 7 tokens
    /// that the timing priced low made prompt lookup 0.89x the target alone).
    pub fn new(mut target: Vec<(usize, f64)>, draft_step: f64) -> Costs {
        target.sort_by_key(|&(width, _)| width);
        target.dedup_by_key(|&mut (width, _)| width);
        assert!(target.first().is_some_and(|&(width, _)| width == 1), "the cost of a one-token pass is needed");
        for i in 1..target.len() {
            target[i].1 = target[i].1.max(target[i - 1].1);
        }
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
        let seconds = tch::no_grad(|| fastest_passes(target, &widths))?;
        let draft_step = match draft {
            Some(draft) => tch::no_grad(|| fastest_passes(draft, &[1]))?[0],
            None => 0.0,
        };
        Ok(Costs::new(widths.into_iter().zip(seconds).collect(), draft_step))
    }

    /// [`Costs::measure`], unless `cache` (a file) holds this machine's costs for models that run as
    /// fast ([`GptBigCode::speed_key`]) up to `max_width`: a 1B pair took seconds to time, more than
    /// a short completion. What is measured is added to the file. Returns whether the costs were read.
    /// CUDA costs are always measured (the file knows the CPU, not the GPU).
    pub fn measure_or_read(
        target: &GptBigCode,
        draft: Option<&GptBigCode>,
        max_width: usize,
        cache: Option<&Path>,
    ) -> Result<(Costs, bool)> {
        let on_cpu = target.device() == tch::Device::Cpu && draft.is_none_or(|d| d.device() == tch::Device::Cpu);
        let cache = cache.filter(|_| on_cpu);
        let (machine, pair) = (kernels::calibrate::machine_key(), pair_key(target, draft));
        if let Some(costs) = cache.and_then(|path| read_costs(path, &machine, &pair)) {
            if costs.widest() >= max_width && (draft.is_none() || costs.draft_step > 0.0) {
                return Ok((costs, true));
            }
        }
        let costs = Costs::measure(target, draft, max_width)?;
        if let Some(path) = cache {
            if let Err(error) = append_costs(path, &machine, &pair, &costs) {
                tracing::warn!(path = %path.display(), %error, "speculation costs not kept");
            }
        }
        Ok((costs, false))
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

    /// The widest measured pass.
    pub fn widest(&self) -> usize {
        self.target.last().map_or(1, |&(width, _)| width)
    }

    /// The draft length (at most `max_gamma`) with the most expected tokens per second at per-token
    /// acceptance `acceptance`, when rounds take `overrun` times what the model says; 0 when plain
    /// steps are as fast.
    pub fn best_gamma(&self, acceptance: f64, overrun: &Overrun, max_gamma: usize) -> usize {
        let plain = 1.0 / (self.target_pass(1) * overrun.plain);
        let mut best = (0, plain * REQUIRED_GAIN);
        for gamma in 1..=max_gamma {
            let rate = self.tokens_per_second(acceptance, gamma) / overrun.drafting();
            if rate > best.1 {
                best = (gamma, rate);
            }
        }
        best.0
    }

    /// Expected tokens per second of rounds drafting `gamma` tokens at per-token `acceptance`.
    fn tokens_per_second(&self, acceptance: f64, gamma: usize) -> f64 {
        let tokens: f64 = (0..=gamma).map(|kept| acceptance.powi(kept as i32)).sum();
        tokens / self.round_seconds(gamma)
    }
}

/// Noise samples needed before [`LeadNoise`] judges a token.
const LEAD_NOISE_SAMPLES: f64 = 16.0;

/// How far the draft's lead at a token (its top logit over its runner-up) strays from the
/// target's lead of the same two tokens. A quantized copy disagrees with its target almost only
/// where the two top tokens are near a tie: on the 1B pair the strays were Gaussian-like with a
/// spread of 0.030 logits, and the chance that the target kept a token, predicted from its lead
/// as the chance that the stray is smaller, matched what was seen (0.69 predicted, 0.65 seen for
/// leads of 0.01-0.02; 0.83 and 0.89 for 0.02-0.04). Every verified token gives a sample,
/// rejected or not, so a few rounds suffice.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LeadNoise {
    squares: f64,
    samples: f64,
}

impl LeadNoise {
    /// Counts the draft's and the target's leads at the same tokens.
    pub fn observe(&mut self, draft_leads: &[f32], target_leads: &[f32]) {
        for (&draft, &target) in draft_leads.iter().zip(target_leads) {
            let stray = f64::from(draft - target);
            if stray.is_finite() {
                self.squares += stray * stray;
                self.samples += 1.0;
            }
        }
    }

    /// The chance that the target ranks the draft's top token above its runner-up, given the
    /// draft's `lead`; `None` before [`LEAD_NOISE_SAMPLES`] samples.
    pub fn acceptance(&self, lead: f32) -> Option<f64> {
        if self.samples < LEAD_NOISE_SAMPLES {
            return None;
        }
        let spread = (self.squares / self.samples).sqrt();
        if spread == 0.0 {
            return Some(1.0);
        }
        // The normal distribution's CDF, in its logistic approximation (within 0.01).
        Some(1.0 / (1.0 + (-1.702 * f64::from(lead) / spread).exp()))
    }
}

/// The fastest of a few passes of each of `widths` new tokens after [`MEASURED_CONTEXT`] positions
/// (filled once): at least [`RUNS`], and more while they take under [`MEASURING_SECONDS`] (a small
/// model's fraction of a millisecond is at the mercy of the machine's noise).
fn fastest_passes(model: &GptBigCode, widths: &[usize]) -> Result<Vec<f64>> {
    let widest = widths.iter().copied().max().unwrap_or(1) as i64;
    let context = MEASURED_CONTEXT.min(model.config().n_positions - widest - 1).max(0);
    let mut cache = model.new_cache(1, context + widest)?;
    let token = |len: i64| Tensor::zeros([1, len], (tch::Kind::Int64, model.device()));
    if context > 0 {
        let _ = model.forward_next(&token(context), &mut cache)?;
    }
    let mut fastest_of = |width: usize| -> Result<f64> {
        let (mut fastest, measuring) = (f64::INFINITY, Instant::now());
        for run in 0..MAX_RUNS {
            if run >= RUNS && measuring.elapsed().as_secs_f64() > MEASURING_SECONDS {
                break;
            }
            let started = Instant::now();
            // One token goes the way single steps go (on CUDA, a replayed graph once recorded).
            let logits = if width == 1 {
                model.forward_next(&token(1), &mut cache)?
            } else {
                model.forward(&token(width as i64), &mut cache)?
            };
            // Reading a value waits for queued GPU work.
            let _ = logits.reshape([-1]).double_value(&[0]);
            fastest = fastest.min(started.elapsed().as_secs_f64());
            cache.truncate(context);
        }
        Ok(fastest)
    };
    widths.iter().map(|&width| fastest_of(width)).collect()
}

/// How costs are timed: a change to it makes earlier figures another pair's.
const COSTS_VERSION: u32 = 1;

/// The models of a pair as [`Costs`] in the cache file know them.
fn pair_key(target: &GptBigCode, draft: Option<&GptBigCode>) -> String {
    format!("costs v{COSTS_VERSION}: {}", drafted_by(target.speed_key(), draft.map(GptBigCode::speed_key)))
}

/// A pair's key from its models' keys (none for prompt lookup).
fn drafted_by(target: String, draft: Option<String>) -> String {
    format!("{target} drafted by {}", draft.as_deref().unwrap_or("prompt lookup"))
}

/// Lines `machine \t pair \t width:seconds … \t draft step seconds`, widths increasing from 1;
/// the last whole line of this machine and pair counts. Lines of others, that do not parse, or
/// cut short (no newline: a write under way or interrupted) are skipped.
fn read_costs(path: &Path, machine: &str, pair: &str) -> Option<Costs> {
    whole_lines(path)?.iter().rev().find_map(|line| {
        let [line_machine, line_pair, target, draft_step] = line.split('\t').collect::<Vec<_>>()[..] else {
            return None;
        };
        if line_machine != machine || line_pair != pair {
            return None;
        }
        let target = target
            .split(' ')
            .map(|pass| {
                let (width, time) = pass.split_once(':')?;
                Some((width.parse::<usize>().ok().filter(|&w| w > 0)?, seconds(time).filter(|&s| s > 0.0)?))
            })
            .collect::<Option<Vec<_>>>()?;
        if target.first().map(|&(width, _)| width) != Some(1) || target.windows(2).any(|w| w[0].0 >= w[1].0) {
            return None;
        }
        Some(Costs::new(target, seconds(draft_step)?))
    })
}

/// A time as a cache file may give it: nothing (prompt lookup's draft step), or from a tenth of a
/// microsecond to an hour (what lies outside would be kept and trusted for good, as costs are
/// timed again only for a wider draft).
fn seconds(text: &str) -> Option<f64> {
    non_negative(text).filter(|&s| s == 0.0 || (1e-7..=3600.0).contains(&s))
}

fn append_costs(path: &Path, machine: &str, pair: &str, costs: &Costs) -> std::io::Result<()> {
    let passes: Vec<String> = costs.target.iter().map(|(width, seconds)| format!("{width}:{seconds}")).collect();
    let line = format!("{machine}\t{pair}\t{}\t{}\n", passes.join(" "), costs.draft_step);
    kernels::calibrate::append_lines(path, &line)
}

/// How much longer rounds took than [`Costs`] says: drafting rounds than
/// [`Costs::round_seconds`], plain ones than a one-token pass. The work the model leaves out
/// (sampling, copying logits, rolling caches back, the caller's stop check) weighs most on small
/// models, where a step takes a fraction of a millisecond. Running geometric means, each round
/// weighing [`OVERRUN_WEIGHT`] and its ratio clamped to [`OVERRUN_CLAMP`] (one round preempted by
/// the machine says little about the next); 1 before any round, and drafting rounds as plain ones
/// until one is seen (a drafting round's price left unadjusted while plain rounds took 1.5 times
/// theirs made a pair that never pays draft again in each new process).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Overrun {
    /// None until a drafting round is seen.
    drafting: Option<f64>,
    plain: f64,
}

const OVERRUN_WEIGHT: f64 = 0.2;
const OVERRUN_CLAMP: (f64, f64) = (0.5, 4.0);

impl Default for Overrun {
    fn default() -> Overrun {
        Overrun { drafting: None, plain: 1.0 }
    }
}

impl Overrun {
    /// How much longer drafting rounds take than priced.
    fn drafting(&self) -> f64 {
        self.drafting.unwrap_or(self.plain)
    }

    /// Counts a round the model priced at `predicted` seconds that took `actual`.
    pub fn observe(&mut self, drafted: bool, predicted: f64, actual: f64) {
        let ratio = if drafted { self.drafting.get_or_insert(self.plain) } else { &mut self.plain };
        if predicted > 0.0 && actual.is_finite() {
            let seen = (actual / predicted).clamp(OVERRUN_CLAMP.0, OVERRUN_CLAMP.1);
            *ratio = (ratio.ln() * (1.0 - OVERRUN_WEIGHT) + seen.ln() * OVERRUN_WEIGHT).exp();
        }
    }
}

/// Plain rounds before the first probe, how many tokens a probe drafts, and the longest wait.
const PROBE_AFTER: usize = 8;
const PROBE_GAMMA: usize = 2;
const PROBE_WAIT_MAX: usize = 1024;

/// The newest tokens a probe's draft model catches up on (at their positions, attending to nothing
/// earlier) when it has fallen further behind: catching up on the whole sequence since it last
/// drafted cost the trained quickstart draft a 150-250-token prefill, up to 25 target steps, per
/// probe. So do the drafts before a pair has shown its acceptance ([`EXPLORED_TOKENS`]): a pair's
/// first draft caught up on the whole prompt, and a one-shot generation of the quickstart pair, which
/// never pays, took 1.3-1.5x the target alone. A draft the planner chooses knowing the pair catches
/// up on the whole sequence.
pub const PROBE_CONTEXT: usize = 64;

/// Draft tokens the target must rule on (beyond a remembered history) before the acceptance counts as known.
const EXPLORED_TOKENS: f64 = 8.0;

/// Probes while the estimates say not to draft: a few rejections early on (or one slow round) would
/// otherwise stop the drafting for good, as estimates only move when something is drafted. A probe
/// drafts [`PROBE_GAMMA`] tokens after [`PROBE_AFTER`] plain rounds, then after twice as many each
/// time (up to [`PROBE_WAIT_MAX`]), so a pair that never pays loses a probe round per doubling of
/// its output; a chosen draft resets the wait.
#[derive(Debug, Clone, PartialEq)]
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
        self.wait = (self.wait * 2).min(PROBE_WAIT_MAX);
        PROBE_GAMMA
    }
}

/// The per-token acceptance seen so far: accepted draft tokens over the draft tokens the target
/// ruled on (each round rules on its accepted ones and the first rejected one), starting from a
/// prior belief of some weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Acceptance {
    accepted: f64,
    ruled: f64,
    prior: f64,
    prior_weight: f64,
}

impl Default for Acceptance {
    fn default() -> Acceptance {
        Acceptance { accepted: 0.0, ruled: 0.0, prior: PRIOR_ACCEPTANCE, prior_weight: PRIOR_WEIGHT }
    }
}

impl Acceptance {
    /// Counts a round: `accepted` of `drafted` draft tokens kept.
    pub fn observe(&mut self, accepted: usize, drafted: usize) {
        self.accepted += accepted as f64;
        self.ruled += (accepted + 1).min(drafted) as f64;
    }

    /// Whether the draft tokens ruled on, with a remembered history's weight, are too few to
    /// judge the pair by.
    fn unknown(&self) -> bool {
        self.ruled + self.prior_weight < PRIOR_WEIGHT + EXPLORED_TOKENS
    }

    /// The estimate.
    pub fn estimate(&self) -> f64 {
        let weight = self.ruled + self.prior_weight;
        if weight > 0.0 {
            (self.accepted + self.prior * self.prior_weight) / weight
        } else {
            self.prior
        }
    }

    /// What a later generation starts from: this estimate, weighing as many draft tokens as were
    /// ruled on (at most [`HISTORY_WEIGHT`]).
    fn carried(&self) -> Acceptance {
        let ruled = self.ruled + self.prior_weight;
        Acceptance { prior: self.estimate(), prior_weight: ruled.min(HISTORY_WEIGHT), ..Acceptance::default() }
    }
}

/// How many draft tokens a pair's remembered acceptance weighs at the start of a generation.
const HISTORY_WEIGHT: f64 = 24.0;

/// How many samples of the lead noise a later process starts from, at most.
const LEAD_SAMPLES_KEPT: f64 = 1024.0;

/// [`Planner::judge`]'s ruling on a proposed draft token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// Whether the token goes into the draft.
    pub keep: bool,
    /// Whether the draft model proposes another token after it.
    pub go_on: bool,
    /// The chance that the target keeps this token and every one before it.
    pub reach: f64,
}

/// (target id, draft id): a pair of models ([`GptBigCode::id`]); no draft for prompt lookup.
pub type Pair = (u64, Option<u64>);

/// What drafting with one pair has shown: the measured costs, the acceptance, the overruns and the
/// probe schedule. Kept in the process between generations, so that one generation's bad start
/// (or a pair that never pays) is not learnt anew by each.
#[derive(Debug, Clone)]
pub struct Planner {
    pair: Pair,
    costs: Arc<Costs>,
    acceptance: Acceptance,
    lead_noise: LeadNoise,
    overrun: Overrun,
    probe: Probe,
    max_gamma: usize,
    /// The draft length of the round under way, and whether it is a probe's.
    planned: usize,
    probing: bool,
    /// Whether any draft could pay, were every token accepted: probes are wasted otherwise.
    could_pay: bool,
    /// Where what the pair shows is kept for later processes, and the pair's key there.
    history: Option<(HistoryFile, String)>,
}

static PLANNERS: Mutex<Option<HashMap<Pair, Planner>>> = Mutex::new(None);

/// The file in [`kernels::calibrate::cache_dir`] that keeps measured costs.
const COSTS_FILE: &str = "speculation-costs.tsv";

fn remembered(pair: Pair) -> Option<Planner> {
    PLANNERS.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_default().get(&pair).cloned()
}

impl Planner {
    /// The planner of `target` drafting with `draft` (prompt lookup when `None`), drafts of at most
    /// `max_gamma` tokens: as the pair's last generation in this process left it, else as the
    /// pair's history in the cache folder says, with the costs measured at first use (or read).
    pub fn for_pair(target: &GptBigCode, draft: Option<&GptBigCode>, max_gamma: usize) -> Result<Planner> {
        // Unit tests keep nothing: what one run's random pairs showed must not steer the next.
        let cache_dir = if cfg!(test) { None } else { kernels::calibrate::cache_dir() };
        Planner::for_pair_in(target, draft, max_gamma, cache_dir.as_deref())
    }

    /// [`Planner::for_pair`] with its files in `cache_dir` (none read or kept without one).
    pub fn for_pair_in(
        target: &GptBigCode,
        draft: Option<&GptBigCode>,
        max_gamma: usize,
        cache_dir: Option<&Path>,
    ) -> Result<Planner> {
        let pair = (target.id(), draft.map(GptBigCode::id));
        let in_process = remembered(pair);
        let costs = match &in_process {
            Some(planner) if planner.costs.widest() > max_gamma => planner.costs.clone(),
            _ => {
                let file = cache_dir.map(|dir| dir.join(COSTS_FILE));
                let (costs, cached) = Costs::measure_or_read(target, draft, max_gamma + 1, file.as_deref())?;
                tracing::debug!(?costs, cached, "speculation costs");
                Arc::new(costs)
            }
        };
        let history = match (&in_process, cache_dir) {
            (Some(planner), _) => planner.history.clone(),
            // A model too short for the digest's input keeps no history.
            (None, Some(dir)) => {
                let draft = draft.map(GptBigCode::content_key).transpose().ok();
                let key = target.content_key().ok().zip(draft).map(|(target, draft)| drafted_by(target, draft));
                key.map(|key| (HistoryFile::in_dir(dir), key))
            }
            (None, None) => None,
        };
        let before = in_process.or_else(|| {
            let (file, key) = history.as_ref()?;
            let saved = file.read(key)?;
            tracing::debug!(?saved, "what the draft pair showed before");
            Some(Planner::from_saved(pair, &saved, costs.clone(), max_gamma))
        });
        let mut planner = Planner::resumed(pair, before, costs, max_gamma);
        planner.history = history;
        Ok(planner)
    }

    /// [`Planner::for_pair`] with given costs (what the pair showed before in this process is kept).
    pub fn with_costs(pair: Pair, costs: Arc<Costs>, max_gamma: usize) -> Planner {
        Planner::resumed(pair, remembered(pair), costs, max_gamma)
    }

    /// A planner with `costs` that carries on from `before` (the pair's last planner), if any.
    fn resumed(pair: Pair, before: Option<Planner>, costs: Arc<Costs>, max_gamma: usize) -> Planner {
        let could_pay = costs.best_gamma(1.0, &Overrun::default(), max_gamma) > 0;
        match before {
            Some(before) => Planner { costs, acceptance: before.acceptance.carried(), max_gamma, could_pay, ..before },
            None => Planner {
                pair,
                costs,
                acceptance: Acceptance::default(),
                lead_noise: LeadNoise::default(),
                overrun: Overrun::default(),
                probe: Probe::default(),
                max_gamma,
                planned: 0,
                probing: false,
                could_pay,
                history: None,
            },
        }
    }

    /// A planner that knows what an earlier process kept of the pair.
    fn from_saved(pair: Pair, saved: &Saved, costs: Arc<Costs>, max_gamma: usize) -> Planner {
        let acceptance = Acceptance {
            prior: saved.acceptance,
            prior_weight: saved.weight.clamp(1.0, HISTORY_WEIGHT),
            ..Acceptance::default()
        };
        let wait = saved.probe_wait.clamp(PROBE_AFTER, PROBE_WAIT_MAX);
        // The noise as a mean over at most LEAD_SAMPLES_KEPT samples, so that new ones still move it.
        let scale = (LEAD_SAMPLES_KEPT / saved.lead_samples).min(1.0);
        let lead_noise = LeadNoise { squares: saved.lead_squares * scale, samples: saved.lead_samples * scale };
        Planner {
            acceptance,
            lead_noise,
            probe: Probe { plain_rounds: saved.plain_rounds.min(wait), wait },
            ..Planner::resumed(pair, None, costs, max_gamma)
        }
    }

    /// What later processes are to know of the pair.
    fn saved(&self) -> Saved {
        let carried = self.acceptance.carried();
        Saved {
            acceptance: carried.prior,
            weight: carried.prior_weight,
            // What a reader takes: strays wilder than that would lose the whole history.
            lead_squares: self.lead_noise.squares.min(MEAN_SQUARE_STRAY_MAX * self.lead_noise.samples),
            lead_samples: self.lead_noise.samples,
            plain_rounds: self.probe.plain_rounds,
            probe_wait: self.probe.wait,
        }
    }

    /// The measured costs.
    pub fn costs(&self) -> &Costs {
        &self.costs
    }

    /// The acceptance estimate.
    pub fn acceptance(&self) -> f64 {
        self.acceptance.estimate()
    }

    /// The length of the next draft: the cost model's choice, or a probe.
    pub fn gamma(&mut self) -> usize {
        let chosen = self.costs.best_gamma(self.acceptance.estimate(), &self.overrun, self.max_gamma);
        self.planned = if self.could_pay { self.probe.gamma(chosen) } else { chosen };
        self.probing = chosen == 0 && self.planned > 0;
        self.planned
    }

    /// Whether the round under way drafts over the newest [`PROBE_CONTEXT`] tokens only: a probe,
    /// or a draft before the pair's acceptance is known.
    pub fn windowed(&self) -> bool {
        self.probing || self.acceptance.unknown()
    }

    /// What becomes of a token the draft model has just proposed, `drafted` tokens into the round,
    /// whose lead (the draft's top logit over its runner-up) is `lead`, when the target keeps all
    /// the round's earlier tokens with chance `reach`. The token adds one only if the target keeps
    /// it and every one before it; its draft step is paid already, so it is kept when that chance
    /// buys a token at the rate the planned round makes them for its share of the wider pass (the
    /// round's average: a pass of 2 costs much more than one of 1 where a pass of 7 costs little
    /// more than one of 6). Another step is taken when the next token, kept as often as drafts
    /// are, would also pay for its draft step. Before the noise is known every token is kept.
    pub fn judge(&self, drafted: usize, reach: f64, lead: f32) -> Verdict {
        let Some(chance) = self.lead_noise.acceptance(lead) else {
            return Verdict { keep: true, go_on: true, reach };
        };
        let (costs, planned) = (&self.costs, self.planned.max(drafted + 1));
        let share = (costs.target_pass(planned + 1) - costs.target_pass(1)) / planned as f64;
        let acceptance = self.acceptance.estimate();
        let rate = costs.tokens_per_second(acceptance, planned);
        let reach = reach * chance;
        let keep = reach >= rate * share;
        Verdict { keep, go_on: keep && reach * acceptance >= rate * (costs.draft_step + share), reach }
    }

    /// Counts a round that kept `accepted` of `drafted` draft tokens in `seconds`.
    pub fn observe(&mut self, drafted: usize, accepted: usize, seconds: f64) {
        if drafted > 0 {
            self.acceptance.observe(accepted, drafted);
        }
        self.overrun.observe(drafted > 0, self.costs.round_seconds(drafted), seconds);
    }

    /// Counts the draft's and the target's leads at a draft's tokens.
    pub fn observe_leads(&mut self, draft_leads: &[f32], target_leads: &[f32]) {
        self.lead_noise.observe(draft_leads, target_leads);
    }

    /// Keeps what this generation showed for the pair's next one, in this process and (at most
    /// once a minute) in the cache folder.
    pub fn remember(&self) {
        tracing::debug!(acceptance = self.acceptance.estimate(), overrun = ?self.overrun, probe = ?self.probe, "drafting plan");
        PLANNERS.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_default().insert(self.pair, self.clone());
        if let Some((file, key)) = &self.history {
            file.write(key, &self.saved());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (target pass per width, draft step, acceptance) -> the chosen length (at most 12).
    fn check(target: &[(usize, f64)], draft_step: f64, acceptance: f64, expected: usize) {
        let costs = Costs::new(target.to_vec(), draft_step);
        assert_eq!(
            costs.best_gamma(acceptance, &Overrun::default(), 12),
            expected,
            "{costs:?}, acceptance {acceptance}"
        );
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
        // A launch-bound GPU target whose widest pass timed below narrower ones (the H200's figures
        // in ms): priced at the narrower passes' cost, prompt lookup at acceptance 0.4 does not pay.
        let gpu = [(1, 1.83), (2, 3.21), (3, 3.55), (5, 3.34), (8, 2.62)];
        check(&gpu, 0.0, 0.4, 0);
        check(&gpu, 0.0, 0.95, 12);
    }

    #[test]
    fn rounds_slower_than_priced_stop_the_drafting() {
        let costs = Costs::new(vec![(1, 1.0), (2, 1.05), (13, 1.6)], 0.1);
        // Plain rounds slower than priced say nothing for drafting until a drafting round is seen.
        let mut unseen = Overrun::default();
        for _ in 0..20 {
            unseen.observe(false, 1.0, 3.0);
        }
        assert_eq!([costs.best_gamma(0.2, &Overrun::default(), 12), costs.best_gamma(0.2, &unseen, 12)], [0, 0]);
        let mut overrun = Overrun::default();
        assert_eq!(costs.best_gamma(0.9, &overrun, 12), 8);
        overrun.observe(true, costs.round_seconds(8), 1.1 * costs.round_seconds(8));
        assert!(costs.best_gamma(0.9, &overrun, 12) > 0, "a little slower still pays");
        for _ in 0..10 {
            overrun.observe(true, costs.round_seconds(8), 4.0 * costs.round_seconds(8));
        }
        assert_eq!(costs.best_gamma(0.9, &overrun, 12), 0);
        // Plain steps slower than priced as well: drafting pays again.
        for _ in 0..10 {
            overrun.observe(false, costs.round_seconds(0), 4.0 * costs.round_seconds(0));
        }
        assert!(costs.best_gamma(0.9, &overrun, 12) > 0, "{overrun:?}");
        overrun.observe(true, 0.0, 1.0);
        assert!(overrun.drafting().is_finite());
        // A round the machine preempted (50 times its price) moves the estimate a little, briefly.
        let mut steady = Overrun::default();
        steady.observe(false, 1.0, 50.0);
        assert!(steady.plain <= 4f64.powf(OVERRUN_WEIGHT) + 1e-12, "{steady:?}");
        for _ in 0..10 {
            steady.observe(false, 1.0, 1.0);
        }
        assert!(steady.plain < 1.05, "{steady:?}");
    }

    #[test]
    fn probes_come_at_doubling_waits_until_drafting_pays() {
        let mut probe = Probe::default();
        let probes: Vec<usize> = (1..=60).filter(|_| probe.gamma(0) > 0).collect();
        assert_eq!(probes, [8, 24, 56]);
        let waits: Vec<usize> = (0..8).map(|_| (1..).find(|_| probe.gamma(0) > 0).unwrap()).collect();
        assert_eq!(waits, [60, 128, 256, 512, 1024, 1024, 1024, 1024], "at most {PROBE_WAIT_MAX}");
        assert_eq!(probe.gamma(5), 5);
        let probes: Vec<usize> = (1..=10).filter(|_| probe.gamma(0) > 0).collect();
        assert_eq!(probes, [8], "a chosen draft resets the wait");
    }

    fn tiny_model(seed: i64, layers: i64, embd: i64) -> GptBigCode {
        tch::manual_seed(seed);
        let config = crate::config::ModelConfig {
            vocab_size: 64,
            n_positions: 64,
            n_embd: embd,
            n_layer: layers,
            n_head: 2,
            bos_token_id: Some(0),
            eos_token_id: Some(0),
            ..Default::default()
        };
        GptBigCode::new(config, tch::Device::Cpu).unwrap()
    }

    /// A pair's costs are timed once per machine and read back by the next process, for any
    /// checkpoints that run as fast; lines of other machines or pairs, lines that do not parse, and
    /// figures narrower than needed are not taken.
    #[test]
    fn costs_are_measured_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nested").join(COSTS_FILE);
        let (target, draft) = (tiny_model(1, 2, 32), tiny_model(2, 1, 16));
        let (first, cached) = Costs::measure_or_read(&target, Some(&draft), 5, Some(&file)).unwrap();
        assert!(!cached && first.widest() == 5 && first.draft_step > 0.0, "{first:?}");
        let same_shapes = (tiny_model(3, 2, 32), tiny_model(4, 1, 16));
        let (read, cached) = Costs::measure_or_read(&same_shapes.0, Some(&same_shapes.1), 5, Some(&file)).unwrap();
        assert!(cached && read == first, "{read:?} against {first:?}");
        let (narrower, cached) = Costs::measure_or_read(&target, Some(&draft), 3, Some(&file)).unwrap();
        assert!(cached && narrower == first, "a wider measurement serves a narrower need");
        let (wider, cached) = Costs::measure_or_read(&target, Some(&draft), 7, Some(&file)).unwrap();
        assert!(!cached && wider.widest() == 7, "a narrower one does not serve a wider need");
        let deeper = tiny_model(5, 3, 32);
        assert!(!Costs::measure_or_read(&deeper, Some(&draft), 5, Some(&file)).unwrap().1, "another shape");
        assert!(Costs::measure_or_read(&deeper, Some(&draft), 5, Some(&file)).unwrap().1);

        let machine = kernels::calibrate::machine_key();
        let pair = pair_key(&target, Some(&draft));
        let check = |lines: &str, expected: Option<Costs>| {
            let file = dir.path().join("edited.tsv");
            std::fs::write(&file, lines).unwrap();
            assert_eq!(read_costs(&file, &machine, &pair), expected, "{lines:?}");
        };
        let good = Costs::new(vec![(1, 0.5), (2, 0.6), (5, 0.9)], 0.1);
        check(&format!("{machine}\t{pair}\t1:0.5 2:0.6 5:0.9\t0.1\n"), Some(good.clone()));
        // A line still being written (or cut by a crash) is not read: 0.1 might be 0.15.
        check(&format!("{machine}\t{pair}\t1:0.5 2:0.6 5:0.9\t0.1"), None);
        check(
            &format!("{machine}\t{pair}\t1:0.5 2:0.6 5:0.9\t0.1\n{machine}\t{pair}\t1:0.7\t0\n"),
            Some(Costs::new(vec![(1, 0.7)], 0.0)),
        );
        let other_machine = format!("another CPU\t{pair}\t1:0.5\t0.1\n");
        let other_pair = format!("{machine}\t{}\t1:0.5\t0.1\n", pair_key(&target, None));
        let broken = [
            "not a line".to_string(),
            format!("{machine}\t{pair}\t2:0.6 5:0.9\t0.1"),
            format!("{machine}\t{pair}\t1:NaN\t0.1"),
            format!("{machine}\t{pair}\t1:0.5\t-1"),
            format!("{machine}\t{pair}\t1:1e-300\t0.1"),
            format!("{machine}\t{pair}\t1:0.5\t1e9"),
            format!("{machine}\t{pair}\t0:0.5 1:0.5\t0.1"),
            format!("{machine}\t{pair}\t1:0.5\t0.1\textra"),
            format!("{machine}\t{pair}\t1:0.5 1:0.6 5:0.9\t0.1"),
            format!("{machine}\t{pair}\t1:0.5 5:0.9 2:0.6\t0.1"),
        ];
        for lines in [other_machine, other_pair].iter().chain(&broken) {
            check(&format!("{lines}\n"), None);
            check(&format!("{machine}\t{pair}\t1:0.5 2:0.6 5:0.9\t0.1\n{lines}\n"), Some(good.clone()));
        }
        // Prompt lookup is a pair of its own, and its costs are kept too.
        let (lookup, cached) = Costs::measure_or_read(&target, None, 5, Some(&file)).unwrap();
        assert!(!cached && lookup.draft_step == 0.0);
        assert!(Costs::measure_or_read(&target, None, 5, Some(&file)).unwrap().1);
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
        let noisy = Costs::new(vec![(1, 1.0), (2, 2.0), (5, 1.5), (9, 2.5)], 0.0);
        assert_eq!([noisy.target_pass(5), noisy.target_pass(7)], [2.0, 2.25], "never below a narrower pass");
    }

    #[test]
    fn acceptance_counts_what_the_target_ruled_on() {
        let mut acceptance = Acceptance::default();
        assert_eq!(acceptance.estimate(), PRIOR_ACCEPTANCE);
        for _ in 0..50 {
            acceptance.observe(2, 4); // two kept, the third rejected, the fourth never ruled on
        }
        assert!((acceptance.estimate() - (100.0 + 3.2) / (150.0 + 4.0)).abs() < 1e-12);
        acceptance.observe(0, 0); // a plain round rules on nothing
        assert!((acceptance.estimate() - (100.0 + 3.2) / (150.0 + 4.0)).abs() < 1e-12);
        let mut all = Acceptance::default();
        all.observe(4, 4);
        assert!(all.estimate() > PRIOR_ACCEPTANCE);
    }

    /// A pair's next generation starts from what its earlier ones saw, recent ones weighing most; a
    /// pair that could not pay even if every draft were kept is not probed.
    #[test]
    fn a_pair_remembers_its_acceptance() {
        let pair = (u64::MAX - 7, Some(u64::MAX - 8));
        let costs = Arc::new(Costs::new(vec![(1, 1.0), (2, 1.05), (13, 1.6)], 0.1));
        let planner = || Planner::with_costs(pair, costs.clone(), 12);
        assert_eq!(planner().acceptance(), PRIOR_ACCEPTANCE);
        let mut seen = planner();
        for _ in 0..10 {
            seen.observe(10, 9, costs.round_seconds(10)); // 9 kept, the tenth rejected: 0.9
        }
        seen.remember();
        let next = planner();
        assert!((next.acceptance() - 0.9).abs() < 0.01, "{next:?}");
        // Early rejections move it, but do not sink it the way they sink the default prior.
        let (mut fresh, mut remembered) = (Acceptance::default(), planner());
        for _ in 0..2 {
            fresh.observe(0, 4);
            remembered.observe(4, 0, costs.round_seconds(4));
        }
        assert!(remembered.acceptance() > 0.8 && fresh.estimate() < 0.55, "{remembered:?} {fresh:?}");
        let mut poor = planner();
        for _ in 0..300 {
            poor.observe(4, 1, costs.round_seconds(4)); // 0.5
        }
        poor.remember();
        let after = planner().acceptance();
        assert!(after < 0.6, "recent generations weigh most: {after}");
        let other = Planner::with_costs((pair.0, None), costs.clone(), 12);
        assert_eq!(other.acceptance(), PRIOR_ACCEPTANCE, "another pair");
        // A draft step as slow as a target step never pays: no probes.
        let mut hopeless = Planner::with_costs((pair.0, Some(pair.0)), Arc::new(Costs::new(vec![(1, 1.0)], 1.0)), 12);
        assert!((0..100).all(|_| hopeless.gamma() == 0));
    }

    /// What a pair showed is read by the next process that loads the same checkpoints (at most
    /// once a minute per pair and process is it written), not by another pair of the same shapes.
    #[test]
    fn a_pair_is_known_to_the_next_process() {
        let dir = tempfile::tempdir().unwrap();
        let (target, draft) = (tiny_model(1, 2, 32), tiny_model(2, 1, 16));
        let mut first = Planner::for_pair_in(&target, Some(&draft), 12, Some(dir.path())).unwrap();
        assert_eq!(first.acceptance(), PRIOR_ACCEPTANCE);
        for _ in 0..20 {
            first.observe(4, 1, 1.0);
            first.observe_leads(&[0.5], &[0.4]);
        }
        for _ in 0..30 {
            first.gamma();
        }
        first.remember();
        let next = Planner::for_pair_in(&target.reloaded(), Some(&draft.reloaded()), 12, Some(dir.path())).unwrap();
        assert!((next.acceptance() - first.acceptance.carried().estimate()).abs() < 1e-12, "{next:?}");
        assert_eq!((&next.lead_noise, &next.probe), (&first.lead_noise, &first.probe));
        assert!(!next.windowed(), "known");
        let other = Planner::for_pair_in(&target, Some(&tiny_model(3, 1, 16)), 12, Some(dir.path())).unwrap();
        assert_eq!(other.acceptance(), PRIOR_ACCEPTANCE, "other weights of the same shape");
        let lookup = Planner::for_pair_in(&target.reloaded(), None, 12, Some(dir.path())).unwrap();
        assert_eq!(lookup.acceptance(), PRIOR_ACCEPTANCE, "prompt lookup is another pair");
        let elsewhere = Planner::for_pair_in(&target.reloaded(), Some(&draft.reloaded()), 12, None).unwrap();
        assert_eq!(elsewhere.acceptance(), PRIOR_ACCEPTANCE, "no folder, no history");
        // A checkpoint that differs from another in one layer's weights only is another.
        let tuned = draft.reloaded();
        tch::no_grad(|| {
            let mut weight = tuned.vars().variables()["transformer.h.0.attn.c_attn.weight"].shallow_clone();
            let changed = &weight * 2.0;
            weight.copy_(&changed);
        });
        assert_ne!(tuned.content_key().unwrap(), draft.content_key().unwrap());
        assert_eq!(draft.reloaded().content_key().unwrap(), draft.content_key().unwrap());
        // What a file says is taken within bounds: a weight of at most a history's, a mean of the
        // lead noise over at most LEAD_SAMPLES_KEPT samples, a wait within the probe schedule's.
        let wild = Saved {
            acceptance: 0.5,
            weight: 1e9,
            lead_squares: 1e6,
            lead_samples: 1e8,
            plain_rounds: 5000,
            probe_wait: 1,
        };
        let costs = Arc::new(Costs::new(vec![(1, 1.0)], 0.5));
        let tamed = Planner::from_saved((u64::MAX - 17, None), &wild, costs, 12);
        assert_eq!(tamed.acceptance.prior_weight, HISTORY_WEIGHT);
        assert_eq!((tamed.lead_noise.samples, tamed.lead_noise.squares), (LEAD_SAMPLES_KEPT, 10.24));
        assert_eq!(tamed.probe, Probe { plain_rounds: PROBE_AFTER, wait: PROBE_AFTER });
    }

    /// A pair drafts over a window of the newest tokens until the target has ruled on a few of its
    /// draft tokens, in this generation or remembered from earlier ones, and in every probe.
    #[test]
    fn drafts_are_windowed_until_the_pair_is_known() {
        let pair = (u64::MAX - 13, Some(u64::MAX - 14));
        let costs = Arc::new(Costs::new(vec![(1, 1.0), (2, 1.05), (13, 1.6)], 0.1));
        let mut planner = Planner::with_costs(pair, costs.clone(), 12);
        let mut windows = Vec::new();
        for _ in 0..4 {
            assert!(planner.gamma() > 0, "the prior drafts");
            windows.push(planner.windowed());
            planner.observe(3, 2, costs.round_seconds(3)); // 3 ruled on each round
        }
        assert_eq!(windows, [true, true, true, false], "known after 8 ruled tokens");
        planner.remember();
        let mut next = Planner::with_costs(pair, costs.clone(), 12);
        assert!(next.gamma() > 0 && !next.windowed(), "known from the last generation");
        // A pair that stopped drafting probes over a window.
        let mut poor = Planner::with_costs((u64::MAX - 15, Some(u64::MAX - 16)), costs.clone(), 12);
        for _ in 0..30 {
            poor.observe(4, 0, costs.round_seconds(4));
        }
        let probe = (0..PROBE_AFTER).map(|_| poor.gamma()).find(|&gamma| gamma > 0);
        assert_eq!(probe, Some(PROBE_GAMMA));
        assert!(poor.windowed());
        assert!(poor.gamma() == 0 && !poor.windowed());
    }

    #[test]
    fn a_near_tie_ends_the_draft_once_the_noise_is_known() {
        // A quantized copy's step costs 0.3 of the target's, and a pass of 7 what 1.7 steps do.
        let costs = Arc::new(Costs::new(vec![(1, 1.0), (2, 1.2), (7, 1.7), (13, 2.6)], 0.3));
        let mut planner = Planner::with_costs((u64::MAX - 9, Some(u64::MAX - 10)), costs.clone(), 12);
        for _ in 0..20 {
            planner.observe(6, 6, costs.round_seconds(6)); // every token kept
        }
        assert!(planner.gamma() > 0);
        let unknown = planner.judge(0, 1.0, 0.0);
        assert!(unknown.keep && unknown.go_on, "nothing is known of the noise yet");
        for _ in 0..8 {
            // The draft's leads stray from the target's by 0.03 either way.
            planner.observe_leads(&[0.53, 0.2], &[0.5, 0.23]);
        }
        let chance = |lead| planner.lead_noise.acceptance(lead).unwrap();
        assert!((chance(0.0) - 0.5).abs() < 1e-9 && chance(0.03) > 0.8 && chance(0.15) > 0.99);
        for drafted in [0, 3, 6] {
            // A near tie costs only its share of the pass once drafted, but the next token would
            // seldom be reached.
            let tie = planner.judge(drafted, 1.0, 0.005);
            assert!(tie.keep && !tie.go_on && (tie.reach - chance(0.005)).abs() < 1e-12, "{tie:?}");
            let clear = planner.judge(drafted, 1.0, 0.15);
            assert!(clear.keep && clear.go_on, "a clear lead, {drafted} tokens in: {clear:?}");
            let unlikely = planner.judge(drafted, 0.3, 0.15);
            assert!(unlikely.keep && !unlikely.go_on, "{unlikely:?}");
        }
        // Where each token widens the pass by as much as a step costs, a token the round seldom
        // reaches is not worth its share.
        let costly = Arc::new(Costs::new(vec![(1, 1.0), (2, 2.0), (13, 13.0)], 0.05));
        let mut wide = Planner::with_costs((u64::MAX - 11, Some(u64::MAX - 12)), costly, 12);
        wide.observe_leads(&[0.53; 16], &[0.5; 16]);
        wide.planned = 4;
        assert!(!wide.judge(2, 0.5, 0.005).keep);
        assert!(wide.judge(0, 1.0, 1.0).keep);
        // Nothing strays (a draft that is the target): every token is worth drafting.
        let mut same = LeadNoise::default();
        same.observe(&[0.0; 16], &[0.0; 16]);
        assert_eq!(same.acceptance(0.0), Some(1.0));
        // Leads that are not numbers are not samples.
        let mut broken = LeadNoise::default();
        broken.observe(&[f32::NAN; 16], &[f32::INFINITY; 16]);
        assert_eq!(broken.acceptance(0.5), None);
    }
}
