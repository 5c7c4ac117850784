//! Export to instruction-tuning JSONL (`{"instruction", "input", "output"}` per line) for
//! `wizard train --mode sft`: round 0 (the seeds) merged with the chosen rounds, as WizardCoder did.
use std::io::Write;
use std::path::Path;

use crate::store::Store;
use crate::{EvolveError, Result};

/// Parses a round selection: `N`, `A..B` (inclusive), or a comma list of those.
pub fn parse_rounds(text: &str) -> Result<Vec<u32>> {
    let bad = || EvolveError::Invalid(format!("--rounds {text:?}: use N, A..B or a comma list such as 0..2,4"));
    let mut rounds = Vec::new();
    for part in text.split(',').map(str::trim) {
        match part.split_once("..") {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                rounds.extend(a..=b);
            }
            None => rounds.push(part.parse().map_err(|_| bad())?),
        }
    }
    rounds.sort_unstable();
    rounds.dedup();
    Ok(rounds)
}

/// Writes the accepted items of round 0 and `rounds` (all rounds when `None`) to `out`, and
/// returns how many lines were written. The file is written whole or not at all.
pub fn export(store: &Store, rounds: Option<&[u32]>, out: &Path) -> Result<usize> {
    let all = store.rounds()?;
    let rounds = rounds.unwrap_or(&all);
    let items = store.exportable(rounds)?;
    let mut text = String::new();
    for item in &items {
        // Written by hand to keep the field order of Code Alpaca: instruction, input, output.
        let field = |value: &str| serde_json::Value::from(value).to_string();
        let line = format!(
            "{{\"instruction\": {}, \"input\": {}, \"output\": {}}}",
            field(item.instruction.as_deref().unwrap_or_default()),
            field(&item.input),
            field(item.response.as_deref().unwrap_or_default())
        );
        text.push_str(&line);
        text.push('\n');
    }
    let io = |e| EvolveError::io(out, e);
    if out.as_os_str() == "-" {
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(text.as_bytes()).map_err(io)?;
        stdout.flush().map_err(io)?;
    } else {
        model::files::write_atomically(out, text.as_bytes()).map_err(io)?;
    }
    Ok(items.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_selections() {
        let check = |text: &str, expected: std::result::Result<Vec<u32>, ()>| {
            assert_eq!(parse_rounds(text).map_err(|_| ()), expected, "{text}");
        };
        check("0..3", Ok(vec![0, 1, 2, 3]));
        check("2", Ok(vec![2]));
        check("3,1..2, 1", Ok(vec![1, 2, 3]));
        check("3..1", Err(()));
        check("a", Err(()));
        check("1..", Err(()));
    }
}
