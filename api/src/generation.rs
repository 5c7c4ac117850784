//! From a validated request to the engine and back: prompts in tokens, the engine requests, the
//! merged event stream, and each sample's text as it grows (held back while it could still become
//! a stop sequence or an unfinished UTF-8 character).
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use model::complete::{first_stop, StopSequences};
use model::engine::{Engine, Event, Request, Reservation, SubmitError, TokenLogprob};
use model::generate::Finish;
use model::sampling::Sampling;
use model::text_offsets::TextOffsets;
use model::tokenizer::Tokenizer;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;
use crate::schema::Knobs;

/// What one request asks the engine for, checked.
#[derive(Clone)]
pub struct Plan {
    /// Token ids of each prompt.
    pub prompts: Vec<Vec<i64>>,
    /// Most new tokens per sample.
    pub max_new_tokens: usize,
    /// Samples per prompt.
    pub n: usize,
    /// Token picking (seed of sample 0 of prompt 0).
    pub sampling: Sampling,
    /// Stop sequences.
    pub stops: Vec<String>,
    /// Tokens that end a sample.
    pub stop_tokens: Vec<i64>,
    /// Alternatives to report per token, when log-probabilities are asked for.
    pub logprobs: Option<usize>,
    /// Alternatives to report per prompt token, when the prompt's log-probabilities are asked for.
    pub prompt_logprobs: Option<usize>,
}

impl Plan {
    /// Prompt tokens in all.
    pub fn prompt_tokens(&self) -> usize {
        self.prompts.iter().map(Vec::len).sum()
    }
}

/// Limits the server enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most new tokens a request may ask for.
    pub max_tokens: usize,
    /// Tokens when a request does not say.
    pub default_max_tokens: usize,
}

/// Seeds of requests that name none: from the OS's randomness, so they differ across restarts too.
static NEXT_SEED: LazyLock<AtomicU64> = LazyLock::new(|| {
    use std::hash::{BuildHasher, Hasher};
    AtomicU64::new(std::collections::hash_map::RandomState::new().build_hasher().finish())
});

/// Sampling from the shared knobs; every value is checked, none clamped.
pub fn sampling(knobs: &Knobs) -> Result<Sampling, ApiError> {
    let temperature = knobs.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            Some("temperature"),
            format!("temperature must be in [0, 2], got {temperature}"),
        ));
    }
    // 0 and -1 turn top-k off (llama.cpp's and vLLM's conventions).
    let top_k = match knobs.top_k {
        None | Some(0 | -1) => None,
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => return Err(ApiError::invalid(Some("top_k"), format!("top_k must be >= -1, got {k}"))),
    };
    // top_p 0, which OpenAI takes, keeps the most likely token alone.
    let top_p = knobs.top_p.map(|p| if p == 0.0 { f64::MIN_POSITIVE } else { p });
    // Without a seed, each request draws differently (as OpenAI does).
    let seed = knobs.seed.unwrap_or_else(|| NEXT_SEED.fetch_add(0x9e37_79b9, Ordering::Relaxed));
    let sampling = Sampling { temperature, top_k, top_p, seed };
    sampling.validate().map_err(|e| ApiError::invalid(Some("top_p"), e.to_string()))?;
    Ok(sampling)
}

/// `n` (1 up to the batch).
pub fn samples(knobs: &Knobs, max_batch: usize) -> Result<usize, ApiError> {
    match knobs.n.unwrap_or(1) {
        n if n >= 1 && n as usize <= max_batch => Ok(n as usize),
        n => Err(ApiError::invalid(Some("n"), format!("n must be between 1 and {max_batch}, got {n}"))),
    }
}

/// OpenAI takes 4; editors' fill-in-the-middle setups send more (Continue's list of block
/// openers), as llama.cpp's and vLLM's servers take.
const MAX_STOPS: usize = 16;

/// Stop sequences: at most [`MAX_STOPS`], none empty.
pub fn stops(knobs: &Knobs) -> Result<Vec<String>, ApiError> {
    let stops = knobs.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stops.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            Some("stop"),
            format!("at most {MAX_STOPS} stop sequences, got {}", stops.len()),
        ));
    }
    Ok(stops.into_iter().filter(|s| !s.is_empty()).collect())
}

/// The new-token budget: asked (or the default), within the limit and what the context leaves.
/// `max_tokens: 0` only scores the prompt, which may then fill the context.
pub fn max_new_tokens(
    asked: Option<i64>,
    limits: &Limits,
    context: usize,
    longest_prompt: usize,
) -> Result<usize, ApiError> {
    let (asked, room_needed) = match asked {
        None => {
            let asked = limits.default_max_tokens.min(context.saturating_sub(longest_prompt));
            (asked, asked.max(1))
        }
        Some(m) if m < 0 => {
            return Err(ApiError::invalid(Some("max_tokens"), format!("max_tokens must be >= 0, got {m}")))
        }
        Some(m) => (m as usize, m as usize),
    };
    if asked > limits.max_tokens {
        return Err(ApiError::invalid(
            Some("max_tokens"),
            format!("max_tokens is {asked}; this server allows at most {}", limits.max_tokens),
        ));
    }
    if longest_prompt + room_needed > context {
        return Err(ApiError::context(format!(
            "This model's maximum context length is {context} tokens, however you requested {} tokens \
             ({longest_prompt} in your prompt; {room_needed} for the completion)",
            longest_prompt + room_needed
        )));
    }
    Ok(asked)
}

/// Token ids of `text` (on a blocking thread: a prompt may be megabytes).
pub async fn encode(tokenizer: &Arc<Tokenizer>, texts: Vec<String>) -> Result<Vec<Vec<i64>>, ApiError> {
    let tokenizer = tokenizer.clone();
    tokio::task::spawn_blocking(move || {
        texts
            .iter()
            .map(|text| Ok(tokenizer.encode(text)?.into_iter().map(i64::from).collect()))
            .collect::<model::Result<Vec<Vec<i64>>>>()
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| ApiError::invalid(Some("prompt"), e.to_string()))
}

/// An event of one of the request's prompts; sample indices are choice indices
/// (`prompt * n + sample`).
pub type Merged = UnboundedReceiver<Event>;

/// Submits one engine request per prompt and merges their events; dropping the receiver cancels
/// them all within a step. A request of more prompts than fit the batch reserves up to a batch's
/// worth of places in the engine's queue and submits the next prompt into its place as each ends (to
/// the back of the queue), so any number of prompts is served and other clients' load cannot starve it.
pub fn start(engine: &Engine, tokenizer: &Arc<Tokenizer>, plan: &Plan) -> Result<Merged, ApiError> {
    let cancel = Arc::new(AtomicBool::new(false));
    if plan.prompts.len() == 1 {
        return engine.submit(engine_request(plan, tokenizer, &cancel, 0)).map_err(submit_error);
    }
    let wanted = (engine.config().max_batch / plan.n).max(1).min(plan.prompts.len());
    // Taken now, with the first window submitted: a busy engine refuses the request before it is
    // answered; a busier one gives it fewer places, so fewer of its prompts run at once.
    let reservation = Arc::new(engine.reserve(wanted).map_err(submit_error)?);
    let window = reservation.places();
    let mut first = Vec::new();
    for index in 0..window {
        match engine.submit_reserved(engine_request(plan, tokenizer, &cancel, index), &reservation) {
            Ok(events) => first.push((index * plan.n, events)),
            Err(error) => {
                cancel.store(true, Ordering::Relaxed);
                // The places stay taken until the engine has dropped the prompts already queued.
                tokio::spawn(async move {
                    for (_, events) in first {
                        drain(events).await;
                    }
                    drop(reservation);
                });
                return Err(submit_error(error));
            }
        }
    }
    let (merged, out) = unbounded_channel();
    let places = Arc::new(Semaphore::new(window));
    let failed = Arc::new(AtomicBool::new(false));
    let forwarding = Forwarding { reservation, merged, cancel: cancel.clone(), failed, n: plan.n };
    for (offset, events) in first {
        let place = places.clone().try_acquire_owned().expect("a place per submitted prompt");
        tokio::spawn(forward(events, offset, forwarding.clone(), place));
    }
    if plan.prompts.len() > window {
        let (engine, plan, tokenizer) = (engine.clone(), plan.clone(), tokenizer.clone());
        tokio::spawn(async move {
            for index in window..plan.prompts.len() {
                let Ok(place) = places.clone().acquire_owned().await else { return };
                if cancel.load(Ordering::Relaxed) || forwarding.merged.is_closed() {
                    cancel.store(true, Ordering::Relaxed);
                    return;
                }
                let request = engine_request(&plan, &tokenizer, &cancel, index);
                let events = match engine.submit_reserved(request, &forwarding.reservation) {
                    Ok(events) => events,
                    Err(error) => {
                        cancel.store(true, Ordering::Relaxed);
                        if !forwarding.failed.swap(true, Ordering::SeqCst) {
                            let _ = forwarding.merged.send(Event::Failed(error.to_string()));
                        }
                        return;
                    }
                };
                tokio::spawn(forward(events, index * plan.n, forwarding.clone(), place));
            }
        });
    }
    Ok(out)
}

/// What each prompt's forwarding shares.
#[derive(Clone)]
struct Forwarding {
    /// The request's places in the engine's queue: back once every prompt's forwarding let go.
    reservation: Arc<Reservation>,
    merged: UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
    /// A prompt failed and said so: the request's last event was sent.
    failed: Arc<AtomicBool>,
    /// Samples per prompt.
    n: usize,
}

/// The engine request for prompt `index` of `plan`.
fn engine_request(plan: &Plan, tokenizer: &Arc<Tokenizer>, cancel: &Arc<AtomicBool>, index: usize) -> Request {
    Request {
        prompt: plan.prompts[index].clone(),
        max_new_tokens: plan.max_new_tokens,
        n: plan.n,
        sampling: Sampling { seed: plan.sampling.seed.wrapping_add((index * plan.n) as u64), ..plan.sampling.clone() },
        stop_tokens: plan.stop_tokens.clone(),
        stop: (!plan.stops.is_empty()).then(|| Box::new(StopSequences::new(tokenizer.clone(), &plan.stops)) as _),
        logprobs: plan.logprobs,
        prompt_logprobs: plan.prompt_logprobs,
        speculation: None,
        cancel: cancel.clone(),
    }
}

fn submit_error(error: SubmitError) -> ApiError {
    match error {
        SubmitError::Busy(_) => ApiError::busy(error.to_string()),
        SubmitError::Invalid(message) => ApiError::invalid(None, message),
        SubmitError::Stopped => ApiError::unavailable(error.to_string()),
    }
}

/// Passes one prompt's events on as the request's, its samples numbered from `offset`. Holds
/// `place` and its share of the reservation until the prompt ends, and lets go of them before the
/// client hears so. A client gone while the prompt still waits in the queue (no events yet) cancels
/// the request at once; the places stay taken until the engine has dropped it. After a failure,
/// nothing more is passed on.
async fn forward(mut events: UnboundedReceiver<Event>, offset: usize, to: Forwarding, place: OwnedSemaphorePermit) {
    let Forwarding { reservation, merged, cancel, failed, n } = to;
    let mut held = Some((place, reservation));
    let mut open_samples = n;
    let client_gone = loop {
        let event = tokio::select! {
            event = events.recv() => match event {
                Some(event) => event,
                None => break false,
            },
            () = merged.closed() => break true,
        };
        let ends = match event {
            Event::Finished { .. } => {
                open_samples = open_samples.saturating_sub(1);
                open_samples == 0
            }
            Event::Failed(_) => true,
            _ => false,
        };
        if ends {
            held = None;
        }
        let pass_on = match event {
            Event::Failed(_) => !failed.swap(true, Ordering::SeqCst),
            _ => !failed.load(Ordering::SeqCst),
        };
        if !pass_on {
            continue;
        }
        let event = match event {
            Event::Token { sample, token, logprob } => Event::Token { sample: sample + offset, token, logprob },
            Event::Finished { sample, finish } => Event::Finished { sample: sample + offset, finish },
            Event::PromptLogprobs { sample, logprobs } => Event::PromptLogprobs { sample: sample + offset, logprobs },
            Event::StopToken { sample, token, logprob } => Event::StopToken { sample: sample + offset, token, logprob },
            other => other,
        };
        if merged.send(event).is_err() {
            break true;
        }
    };
    if client_gone {
        cancel.store(true, Ordering::Relaxed);
        drain(events).await;
    }
    drop(held);
}

/// Waits for the engine to drop a cancelled prompt (it closes the channel within a step).
async fn drain(mut events: UnboundedReceiver<Event>) {
    while events.recv().await.is_some() {}
}

/// One sample's text as its tokens arrive.
#[derive(Debug, Default)]
pub struct SampleText {
    /// Its tokens.
    pub tokens: Vec<u32>,
    /// Their log-probabilities, when asked for.
    pub logprobs: Vec<TokenLogprob>,
    /// Where each token starts in the text.
    offsets: TextOffsets,
    /// The stop token that ended it and its log-probability, when asked for.
    stop_token: Option<(u32, TokenLogprob)>,
    /// Tokens whose log-probabilities were handed out: those whose text was.
    released: usize,
    /// Bytes of the decoded text already handed out.
    sent: usize,
    /// What was handed out: the answer, streamed or whole, is exactly this.
    output: String,
    /// A stop sequence was found.
    pub stopped: bool,
    /// Why it ended, once it has.
    pub finish: Option<Finish>,
}

impl SampleText {
    /// Adds a token; returns the text that became final.
    pub fn push(
        &mut self,
        token: i64,
        logprob: Option<TokenLogprob>,
        tokenizer: &Tokenizer,
        stops: &[String],
    ) -> String {
        self.tokens.push(token as u32);
        self.logprobs.extend(logprob);
        self.offsets.push(&tokenizer.token_bytes(token as u32, true));
        self.take(tokenizer, stops, false)
    }

    /// The stop token that is about to end the sample, with its log-probability.
    pub fn stop_token(&mut self, token: i64, logprob: TokenLogprob) {
        self.stop_token = Some((token as u32, logprob));
    }

    /// The sample ended: the rest of its text.
    pub fn end(&mut self, finish: Finish, tokenizer: &Tokenizer, stops: &[String]) -> String {
        self.finish = Some(finish);
        self.offsets.finish();
        self.take(tokenizer, stops, true)
    }

    /// The text handed out so far (all of it once the sample ended), cut before any stop sequence.
    pub fn text(&self) -> &str {
        &self.output
    }

    /// `finish_reason` as OpenAI spells it.
    pub fn finish_reason(&self) -> &'static str {
        match (self.stopped, self.finish) {
            (_, Some(Finish::Length)) if !self.stopped => "length",
            _ => "stop",
        }
    }

    /// Token `index` (the stop token after the others), its log-probability and the character of
    /// [`text`](Self::text) where it starts.
    pub fn entry(&self, index: usize) -> Option<(u32, Option<&TokenLogprob>, usize)> {
        if index == self.tokens.len() {
            let (token, logprob) = self.stop_token.as_ref()?;
            return Some((*token, Some(logprob), self.output.chars().count()));
        }
        Some((self.tokens[index], self.logprobs.get(index), self.offsets.offset(index)?))
    }

    /// Tokens whose text has begun to be handed out, since the last call; once the sample ended
    /// without a stop sequence, all the rest with its stop token (a stop sequence's own tokens
    /// never are).
    pub fn release(&mut self) -> std::ops::Range<usize> {
        let handed_out = self.output.chars().count();
        let ended = self.finish.is_some() && !self.stopped;
        let end = self.tokens.len() + usize::from(ended && self.stop_token.is_some());
        let start = self.released;
        while self.released < end
            && (ended || self.offsets.offset(self.released).is_some_and(|offset| offset < handed_out))
        {
            self.released += 1;
        }
        start..self.released
    }

    fn take(&mut self, tokenizer: &Tokenizer, stops: &[String], last: bool) -> String {
        if self.stopped {
            return String::new();
        }
        let text = tokenizer.decode(&self.tokens, true).unwrap_or_default();
        // An unfinished character reads U+FFFD for now: no stop sequence is looked for in it.
        let settled = if last { text.as_str() } else { text.trim_end_matches('\u{fffd}') };
        let (mut end, stopped) = cut(settled, stops);
        self.stopped = stopped;
        if !stopped && !last {
            // Hold back an unfinished character and what could still grow into a stop sequence.
            end = text.trim_end_matches('\u{fffd}').len();
            let held = stops
                .iter()
                .flat_map(|stop| {
                    (1..stop.len().min(end + 1)).filter(|&k| stop.is_char_boundary(k)).map(move |k| &stop[..k])
                })
                .filter(|start| text[..end].ends_with(start))
                .map(str::len)
                .max()
                .unwrap_or(0);
            end -= held;
        }
        if end <= self.sent {
            return String::new();
        }
        let piece = text[self.sent..end].to_string();
        self.sent = end;
        self.output.push_str(&piece);
        piece
    }
}

/// Where the first stop sequence starts (or the end), and whether there was one.
fn cut(text: &str, stops: &[String]) -> (usize, bool) {
    first_stop(text, stops).map_or((text.len(), false), |at| (at, true))
}

#[cfg(test)]
mod tests {
    use super::cut;

    #[test]
    fn stops_cut_at_the_earliest() {
        let stops = vec!["\n\n".to_string(), "def".to_string()];
        assert_eq!(cut("a = 1\ndef f", &stops), (6, true));
        assert_eq!(cut("a\n\nb def", &stops), (1, true));
        assert_eq!(cut("abc", &stops), (3, false));
    }
}
