//! Text in, text out: tokenizes a prompt, generates, and cuts each sample at the first stop
//! sequence. Stop sequences are checked inside the decode loop on the newest tokens only, so a
//! sample ends on the step its stop sequence appears.
use std::borrow::Borrow;

use crate::generate::{generate, Finish, GenerateConfig, StopCriterion};
use crate::gpt_bigcode::GptBigCode;
use crate::speculative::{self, Drafter, SpeculativeConfig, SpeculativeStats};
use crate::tokenizer::Tokenizer;
use crate::Result;

/// Stops a sample once its generated text contains one of the stop sequences. Made once per
/// request: a step costs the decoding of the newest tokens, whatever the stops' length.
pub struct StopSequences<T: Borrow<Tokenizer>> {
    tokenizer: T,
    stops: Vec<String>,
    /// Enough trailing tokens to contain any stop sequence that ends in the newest token.
    window: usize,
}

impl<T: Borrow<Tokenizer>> StopSequences<T> {
    /// Stops on any of `stops` (empty strings are ignored).
    pub fn new(tokenizer: T, stops: &[String]) -> StopSequences<T> {
        let stops: Vec<String> = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        // Every token decodes to at least one byte, so a stop of n bytes spans at most n + 1 tokens.
        let window = stops.iter().map(|s| s.len() + 1).max().unwrap_or(0);
        StopSequences { tokenizer, stops, window }
    }

    /// The text before the first stop sequence, and whether one was found.
    pub fn cut<'a>(&self, text: &'a str) -> (&'a str, bool) {
        match first_stop(text, &self.stops) {
            Some(at) => (&text[..at], true),
            None => (text, false),
        }
    }
}

/// Where the first of `stops` in `text` starts. A stop longer than the text is not looked for
/// (finding one costs its length).
pub fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|stop| !stop.is_empty() && stop.len() <= text.len())
        .filter_map(|stop| text.find(stop.as_str()))
        .min()
}

impl<T: Borrow<Tokenizer>> StopCriterion for StopSequences<T> {
    fn should_stop(&mut self, _: usize, tokens: &[i64]) -> bool {
        if self.stops.is_empty() {
            return false;
        }
        let tail: Vec<u32> = tokens[tokens.len().saturating_sub(self.window)..].iter().map(|&t| t as u32).collect();
        // An unfinished character reads U+FFFD for now: no stop sequence is looked for in it.
        self.tokenizer.borrow().decode(&tail, false).is_ok_and(|text| self.cut(text.trim_end_matches('\u{fffd}')).1)
    }
}

/// One sample as text.
#[derive(Debug, Clone, PartialEq)]
pub struct TextCompletion {
    /// The completion, cut before any stop sequence.
    pub text: String,
    /// Why it ended.
    pub finish: Finish,
    /// Tokens generated (including those of a cut stop sequence).
    pub tokens: usize,
}

/// Generates completions of `prompt` and decodes them, cutting at the first stop sequence.
pub fn complete(
    model: &GptBigCode,
    tokenizer: &Tokenizer,
    prompt: &str,
    config: &GenerateConfig,
    stops: &[String],
) -> Result<Vec<TextCompletion>> {
    let prompt_ids: Vec<i64> = tokenizer.encode(prompt)?.into_iter().map(i64::from).collect();
    let mut stop = StopSequences::new(tokenizer, stops);
    let generations = generate(model, &prompt_ids, config, &mut stop)?;
    generations
        .into_iter()
        .map(|generation| {
            let ids: Vec<u32> = generation.tokens.iter().map(|&t| t as u32).collect();
            let text = tokenizer.decode(&ids, false)?;
            let (kept, stopped) = stop.cut(&text);
            let finish = if stopped { Finish::Stop } else { generation.finish };
            Ok(TextCompletion { text: kept.to_string(), finish, tokens: ids.len() })
        })
        .collect()
}

/// One completion with speculative decoding (a draft model or prompt lookup), cut at the first stop
/// sequence, with the drafting counters.
pub fn complete_speculative(
    target: &GptBigCode,
    drafter: &Drafter,
    tokenizer: &Tokenizer,
    prompt: &str,
    config: &SpeculativeConfig,
    stops: &[String],
) -> Result<(TextCompletion, SpeculativeStats)> {
    let prompt_ids: Vec<i64> = tokenizer.encode(prompt)?.into_iter().map(i64::from).collect();
    let mut stop = StopSequences::new(tokenizer, stops);
    let out = speculative::generate(target, drafter, &prompt_ids, config, &mut stop)?;
    let ids: Vec<u32> = out.generation.tokens.iter().map(|&t| t as u32).collect();
    let text = tokenizer.decode(&ids, false)?;
    let (kept, stopped) = stop.cut(&text);
    let finish = if stopped { Finish::Stop } else { out.generation.finish };
    Ok((TextCompletion { text: kept.to_string(), finish, tokens: ids.len() }, out.stats))
}
