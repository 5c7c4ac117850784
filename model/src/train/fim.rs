//! Fill-in-the-middle as in BigCode's Megatron: a document is split at two random character
//! positions into prefix, middle and suffix, each re-tokenized, and laid out as PSM
//! (`<fim_prefix>` P `<fim_suffix>` S `<fim_middle>` M) or SPM (`<fim_prefix><fim_suffix>` S
//! `<fim_middle>` P M). The document keeps its token length: the suffix is truncated or padded with
//! `<fim_pad>`; if the suffix is too short to absorb the growth, the document stays as it was.
use rand::rngs::StdRng;
use rand::Rng;

use crate::tokenizer::Tokenizer;
use crate::{ModelError, Result};

/// Ids of the four FIM tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FimTokens {
    /// `<fim_prefix>`
    pub prefix: u32,
    /// `<fim_middle>`
    pub middle: u32,
    /// `<fim_suffix>`
    pub suffix: u32,
    /// `<fim_pad>`
    pub pad: u32,
}

impl FimTokens {
    /// Looks the tokens up; a tokenizer without them is an error naming the missing one.
    pub fn of(tokenizer: &Tokenizer) -> Result<FimTokens> {
        let id = |token: &str| {
            tokenizer.token_id(token).ok_or_else(|| {
                ModelError::Invalid(format!(
                    "the tokenizer has no {token} token, which FIM needs (train one with `wizard tokenizer train`, or pass --fim-rate 0)"
                ))
            })
        };
        Ok(FimTokens {
            prefix: id("<fim_prefix>")?,
            middle: id("<fim_middle>")?,
            suffix: id("<fim_suffix>")?,
            pad: id("<fim_pad>")?,
        })
    }
}

/// How often, and in which layout, documents are transformed.
#[derive(Debug, Clone, Copy)]
pub struct FimConfig {
    /// Probability that a document is transformed at all.
    pub rate: f64,
    /// Probability that a transformed document uses SPM rather than PSM.
    pub spm_rate: f64,
}

/// Lays out the pieces in `old_len` tokens, or `None` when the suffix cannot absorb the growth.
pub fn layout(
    prefix: &[u32],
    middle: &[u32],
    suffix: &[u32],
    old_len: usize,
    tokens: FimTokens,
    spm: bool,
) -> Option<Vec<u32>> {
    let new_len = prefix.len() + middle.len() + suffix.len() + 3;
    let mut suffix = suffix.to_vec();
    if new_len > old_len {
        let excess = new_len - old_len;
        if suffix.len() <= excess {
            return None;
        }
        suffix.truncate(suffix.len() - excess);
    } else {
        suffix.resize(suffix.len() + (old_len - new_len), tokens.pad);
    }
    let mut out = Vec::with_capacity(old_len);
    if spm {
        out.extend([tokens.prefix, tokens.suffix]);
        out.extend(&suffix);
        out.push(tokens.middle);
        out.extend(prefix);
        out.extend(middle);
    } else {
        out.push(tokens.prefix);
        out.extend(prefix);
        out.push(tokens.suffix);
        out.extend(&suffix);
        out.push(tokens.middle);
        out.extend(middle);
    }
    Some(out)
}

/// The document's tokens, transformed with probability `config.rate`.
pub fn apply(
    text: &str,
    encoded: Vec<u32>,
    tokenizer: &Tokenizer,
    tokens: FimTokens,
    config: FimConfig,
    rng: &mut StdRng,
) -> Result<Vec<u32>> {
    if !rng.random_bool(config.rate.clamp(0.0, 1.0)) {
        return Ok(encoded);
    }
    let boundaries: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
    let mut cut =
        [boundaries[rng.random_range(0..boundaries.len())], boundaries[rng.random_range(0..boundaries.len())]];
    cut.sort_unstable();
    let spm = rng.random_bool(config.spm_rate.clamp(0.0, 1.0));
    let (prefix, middle, suffix) = (&text[..cut[0]], &text[cut[0]..cut[1]], &text[cut[1]..]);
    let (prefix, middle, suffix) = (tokenizer.encode(prefix)?, tokenizer.encode(middle)?, tokenizer.encode(suffix)?);
    Ok(layout(&prefix, &middle, &suffix, encoded.len(), tokens, spm).unwrap_or(encoded))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: FimTokens = FimTokens { prefix: 1, middle: 2, suffix: 3, pad: 4 };

    /// Lays out P=[10,11] M=[20] S=[30,31,32] in `old_len` tokens and compares with `expected`.
    fn check(old_len: usize, spm: bool, expected: Option<&[u32]>) {
        let got = layout(&[10, 11], &[20], &[30, 31, 32], old_len, T, spm);
        assert_eq!(got.as_deref(), expected, "old_len {old_len} spm {spm}");
        if let Some(got) = got {
            assert_eq!(got.len(), old_len);
        }
    }

    #[test]
    fn layouts_keep_the_length() {
        // 6 content tokens + 3 sentinels = 9.
        check(9, false, Some(&[1, 10, 11, 3, 30, 31, 32, 2, 20]));
        check(9, true, Some(&[1, 3, 30, 31, 32, 2, 10, 11, 20]));
        // Two tokens too long: the suffix loses its tail.
        check(7, false, Some(&[1, 10, 11, 3, 30, 2, 20]));
        check(7, true, Some(&[1, 3, 30, 2, 10, 11, 20]));
        // Too short for the suffix to absorb: no transformation.
        check(6, false, None);
        // Room to spare: the suffix is padded with <fim_pad>.
        check(11, false, Some(&[1, 10, 11, 3, 30, 31, 32, 4, 4, 2, 20]));
        check(11, true, Some(&[1, 3, 30, 31, 32, 4, 4, 2, 10, 11, 20]));
    }
}
