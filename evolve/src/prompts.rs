//! Prompt templates and the five Code Evol-Instruct methods. The defaults live in `evolve/prompts/`;
//! a directory given with `--prompts` replaces any of `evolve.txt`, `equal.txt` and `methods.txt`.
use std::path::Path;

use rand::Rng;

use crate::{EvolveError, Result};

/// A way of making an instruction harder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Add new constraints and requirements (about ten more words).
    Constraints,
    /// Replace a commonly used requirement with a less common, more specific one.
    Specific,
    /// Add reasoning steps to a task that needs only a few.
    Reasoning,
    /// Provide a piece of erroneous code as misdirection.
    Misdirection,
    /// Ask for higher time or space complexity (rare).
    Complexity,
}

impl Method {
    /// All methods, in the order of `methods.txt`.
    pub const ALL: [Method; 5] =
        [Method::Constraints, Method::Specific, Method::Reasoning, Method::Misdirection, Method::Complexity];
    /// Relative weights: the complexity method is rare, as WizardCoder asks.
    pub const WEIGHTS: [u32; 5] = [10, 10, 10, 10, 3];

    /// The name stored in the database.
    pub fn name(self) -> &'static str {
        match self {
            Method::Constraints => "constraints",
            Method::Specific => "specific",
            Method::Reasoning => "reasoning",
            Method::Misdirection => "misdirection",
            Method::Complexity => "complexity",
        }
    }

    /// Picks a method by [`Method::WEIGHTS`].
    pub fn pick(rng: &mut impl Rng) -> Method {
        let total: u32 = Method::WEIGHTS.iter().sum();
        let mut ticket = rng.random_range(0..total);
        for (method, weight) in Method::ALL.iter().zip(Method::WEIGHTS) {
            if ticket < weight {
                return *method;
            }
            ticket -= weight;
        }
        unreachable!("ticket below the total weight")
    }
}

const EVOLVE: &str = include_str!("../prompts/evolve.txt");
const EQUAL: &str = include_str!("../prompts/equal.txt");
const METHODS: &str = include_str!("../prompts/methods.txt");

/// The templates in use.
#[derive(Debug, Clone)]
pub struct Prompts {
    /// Rewrites `{question}` by `{method}`.
    pub evolve: String,
    /// Compares `{first}` and `{second}`; the answer is `Equal` or `Not Equal`.
    pub equal: String,
    /// One description per [`Method`], in [`Method::ALL`] order.
    pub methods: Vec<String>,
}

impl Default for Prompts {
    fn default() -> Self {
        Prompts::from_texts(EVOLVE, EQUAL, METHODS, "<default>").expect("the default prompts are valid")
    }
}

impl Prompts {
    /// The defaults, with any of `evolve.txt`, `equal.txt`, `methods.txt` found in `dir` instead.
    pub fn load(dir: Option<&Path>) -> Result<Prompts> {
        let Some(dir) = dir else { return Ok(Prompts::default()) };
        let read = |name: &str, default: &str| -> Result<String> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => Ok(text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(default.to_string()),
                Err(e) => Err(EvolveError::io(path, e)),
            }
        };
        Prompts::from_texts(
            &read("evolve.txt", EVOLVE)?,
            &read("equal.txt", EQUAL)?,
            &read("methods.txt", METHODS)?,
            &dir.display().to_string(),
        )
    }

    fn from_texts(evolve: &str, equal: &str, methods: &str, source: &str) -> Result<Prompts> {
        for (name, text, keys) in
            [("evolve.txt", evolve, &["{method}", "{question}"]), ("equal.txt", equal, &["{first}", "{second}"])]
        {
            if let Some(key) = keys.iter().find(|key| !text.contains(*key)) {
                return Err(EvolveError::Invalid(format!("{source}/{name}: the template has no {key}")));
            }
        }
        let methods: Vec<String> = methods
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(String::from)
            .collect();
        if methods.len() != Method::ALL.len() {
            return Err(EvolveError::Invalid(format!(
                "{source}/methods.txt: {} methods, expected {} (constraints, specific, reasoning, misdirection, complexity)",
                methods.len(),
                Method::ALL.len()
            )));
        }
        Ok(Prompts { evolve: evolve.to_string(), equal: equal.to_string(), methods })
    }

    /// The request that evolves `question` by `method`.
    pub fn evolve_prompt(&self, method: Method, question: &str) -> String {
        let index = Method::ALL.iter().position(|m| *m == method).expect("every method is listed");
        self.evolve.replace("{method}", &self.methods[index]).replace("{question}", question)
    }

    /// The request that asks whether `child` adds anything over `parent`.
    pub fn equal_prompt(&self, parent: &str, child: &str) -> String {
        self.equal.replace("{first}", parent).replace("{second}", child)
    }

    /// Phrases that betray an evolved instruction copied from the evolving prompt: the template's own
    /// headings plus the usual Evol-Instruct markers.
    pub fn copy_markers(&self) -> Vec<String> {
        let mut markers: Vec<String> =
            ["given prompt", "rewritten prompt", "#given", "#rewritten", "given question", "rewritten question"]
                .map(String::from)
                .to_vec();
        for line in self.evolve.lines() {
            let heading = line.trim().trim_start_matches('#').trim();
            if line.trim_start().starts_with('#') && heading.len() >= 6 && !heading.contains('{') {
                markers.push(heading.to_lowercase());
            }
        }
        markers
    }
}

/// The question text of an instruction with its optional input.
pub fn question(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        instruction.to_string()
    } else {
        format!("{instruction}\n\nInput:\n{input}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_in() {
        let prompts = Prompts::default();
        let text = prompts.evolve_prompt(Method::Misdirection, "Sort a list.");
        assert!(text.contains("Sort a list.") && text.contains("contains a mistake"), "{text}");
        assert!(!text.contains('{'), "{text}");
        let markers = prompts.copy_markers();
        assert!(markers.contains(&"original exercise".to_string()) && markers.contains(&"harder exercise".into()));
    }

    #[test]
    fn picks_follow_the_weights() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut counts = [0u32; 5];
        for _ in 0..43_000 {
            let method = Method::pick(&mut rng);
            counts[Method::ALL.iter().position(|m| *m == method).unwrap()] += 1;
        }
        for (count, weight) in counts.iter().zip(Method::WEIGHTS) {
            let expected = weight * 1000;
            assert!(count.abs_diff(expected) < expected / 10, "{counts:?}");
        }
    }

    #[test]
    fn bad_template_directories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("methods.txt"), "only one\n").unwrap();
        let error = Prompts::load(Some(dir.path())).unwrap_err().to_string();
        assert!(
            error.ends_with(
                "methods.txt: 1 methods, expected 5 (constraints, specific, reasoning, misdirection, complexity)"
            ),
            "{error}"
        );
        std::fs::remove_file(dir.path().join("methods.txt")).unwrap();
        std::fs::write(dir.path().join("equal.txt"), "{first} only").unwrap();
        let error = Prompts::load(Some(dir.path())).unwrap_err().to_string();
        assert!(error.ends_with("equal.txt: the template has no {second}"), "{error}");
    }
}
