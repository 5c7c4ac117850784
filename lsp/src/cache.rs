//! Completions already computed: an LRU keyed by (document, prefix, suffix, everything else that
//! shapes the completion), and "typed as suggested": when the user types the start of the completion
//! last shown for a document, under the same settings, the rest of it is served without the model.
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::num::NonZeroUsize;

use lru::LruCache;

use crate::engine::Settings;
use crate::prompt::PromptParts;
use crate::text::ceil_char_boundary;

/// A fingerprint of everything besides the text around the cursor that shapes a completion: every
/// setting (all fields, through their serialised form, so that a new one cannot be left out), FIM
/// on or off, and the prompt's file name and snippets of other files.
pub fn fingerprint(settings: &Settings, fim: bool, parts: &PromptParts) -> u64 {
    let mut hasher = DefaultHasher::new();
    serde_json::to_string(settings).unwrap_or_default().hash(&mut hasher);
    (fim, &parts.filename, &parts.snippets).hash(&mut hasher);
    hasher.finish()
}

/// How much of the prefix end a shown completion remembers, to recognise typing after it.
const PREFIX_TAIL: usize = 256;

/// The last completion shown in a document.
struct Shown {
    settings: u64,
    prefix_len: usize,
    prefix_tail: String,
    suffix: String,
    completion: String,
}

/// Completions by (document, prefix, suffix), bounded in entries.
pub struct Cache {
    entries: LruCache<u64, String>,
    shown: HashMap<String, Shown>,
}

/// A cached answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hit {
    /// The same document, prefix and suffix were completed before.
    Exact(String),
    /// The user typed the start of the shown completion; this is the rest.
    Typed(String),
}

impl Cache {
    /// At most `capacity` completions.
    pub fn new(capacity: usize) -> Cache {
        Cache { entries: LruCache::new(NonZeroUsize::new(capacity.max(1)).unwrap()), shown: HashMap::new() }
    }

    fn key(uri: &str, prefix: &str, suffix: &str, settings: u64) -> u64 {
        let mut hasher = DefaultHasher::new();
        (uri, prefix, suffix, settings).hash(&mut hasher);
        hasher.finish()
    }

    /// A cached completion for the cursor between `prefix` and `suffix` of `uri`. `settings` is a
    /// fingerprint of whatever else changes completions.
    pub fn get(&mut self, uri: &str, prefix: &str, suffix: &str, settings: u64) -> Option<Hit> {
        if let Some(text) = self.entries.get(&Cache::key(uri, prefix, suffix, settings)) {
            return Some(Hit::Exact(text.clone()));
        }
        let shown = self.shown.get(uri)?;
        let typed = prefix.get(shown.prefix_len..)?;
        let rest = shown.completion.strip_prefix(typed)?;
        let same_place = !typed.is_empty()
            && shown.settings == settings
            && prefix[..shown.prefix_len].ends_with(&shown.prefix_tail)
            && suffix == shown.suffix
            && !rest.is_empty();
        same_place.then(|| Hit::Typed(rest.to_string()))
    }

    /// Remembers `completion`, shown at the cursor between `prefix` and `suffix`.
    pub fn put(&mut self, uri: &str, prefix: &str, suffix: &str, settings: u64, completion: &str) {
        self.entries.put(Cache::key(uri, prefix, suffix, settings), completion.to_string());
        let tail_start = ceil_char_boundary(prefix, prefix.len().saturating_sub(PREFIX_TAIL));
        self.shown.insert(
            uri.to_string(),
            Shown {
                settings,
                prefix_len: prefix.len(),
                prefix_tail: prefix[tail_start..].to_string(),
                suffix: suffix.to_string(),
                completion: completion.to_string(),
            },
        );
    }

    /// Forgets what was shown in a closed document.
    pub fn close(&mut self, uri: &str) {
        self.shown.remove(uri);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (prefix, suffix, settings fingerprint, completion to store or None to look up, expected hit).
    type Step<'a> = (&'a str, &'a str, u64, Option<&'a str>, Option<Hit>);

    fn check(steps: &[Step]) {
        let mut cache = Cache::new(2);
        for (i, (prefix, suffix, settings, store, expected)) in steps.iter().enumerate() {
            match store {
                Some(completion) => cache.put("file:///a.py", prefix, suffix, *settings, completion),
                None => assert_eq!(&cache.get("file:///a.py", prefix, suffix, *settings), expected, "step {i}"),
            }
        }
    }

    #[test]
    fn exact_and_typed_hits() {
        let typed = |s: &str| Some(Hit::Typed(s.into()));
        let exact = |s: &str| Some(Hit::Exact(s.into()));
        check(&[
            ("x = ", "\n", 0, Some("foo(1)"), None),
            ("x = ", "\n", 0, None, exact("foo(1)")),
            ("x = f", "\n", 0, None, typed("oo(1)")),
            ("x = foo(", "\n", 0, None, typed("1)")),
            // Other settings: neither the stored completion nor its rest.
            ("x = ", "\n", 1, None, None),
            ("x = f", "\n", 1, None, None),
            // Typed something else, a different suffix, or everything: no hit.
            ("x = g", "\n", 0, None, None),
            ("x = f", "\n\ny", 0, None, None),
            ("x = foo(1)", "\n", 0, None, None),
            ("y = ", "\n", 0, None, None),
        ]);
        // LRU: the oldest of three is evicted from a cache of two.
        check(&[
            ("a", "", 0, Some("1"), None),
            ("b", "", 0, Some("2"), None),
            ("c", "", 0, Some("3"), None),
            ("a", "", 0, None, None),
            ("b", "", 0, None, exact("2")),
        ]);
    }

    /// Changing any one setting, FIM, the file name or a snippet changes the fingerprint. Settings
    /// are changed field by field through their serialised form, so a field added later is covered.
    #[test]
    fn every_setting_changes_the_fingerprint() {
        let settings = Settings::default();
        let parts = PromptParts {
            filename: Some("a.py".into()),
            snippets: vec![("b.py".into(), "x = 1".into())],
            ..PromptParts::default()
        };
        let base = fingerprint(&settings, true, &parts);
        let serde_json::Value::Object(fields) = serde_json::to_value(&settings).unwrap() else { unreachable!() };
        for (name, value) in &fields {
            let changed = match value {
                serde_json::Value::Bool(b) => serde_json::json!(!b),
                serde_json::Value::Number(n) if n.is_u64() => serde_json::json!(n.as_u64().unwrap() + 1),
                serde_json::Value::Number(n) => serde_json::json!(n.as_f64().unwrap() / 2.0 + 0.1),
                serde_json::Value::Null if name == "topK" => serde_json::json!(5),
                serde_json::Value::Null => serde_json::json!(0.5),
                serde_json::Value::Array(_) => serde_json::json!(["rust"]),
                other => panic!("no change defined for {name} = {other}"),
            };
            let mut object = fields.clone();
            object.insert(name.clone(), changed);
            let other: Settings = serde_json::from_value(serde_json::Value::Object(object)).unwrap();
            assert_ne!(other, settings, "{name} did not change");
            assert_ne!(fingerprint(&other, true, &parts), base, "{name} is left out of the fingerprint");
        }
        assert_ne!(fingerprint(&settings, false, &parts), base, "fim");
        let renamed = PromptParts { filename: Some("c.py".into()), ..parts.clone() };
        assert_ne!(fingerprint(&settings, true, &renamed), base, "file name");
        let edited = PromptParts { snippets: vec![("b.py".into(), "x = 2".into())], ..parts.clone() };
        assert_ne!(fingerprint(&settings, true, &edited), base, "snippet text");
    }
}
