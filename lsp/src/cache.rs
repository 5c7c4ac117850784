//! Completions already computed: an LRU keyed by (document, prefix, suffix), and "typed as
//! suggested": when the user types the start of the completion last shown for a document, the rest
//! of it is served without the model.
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::num::NonZeroUsize;

use lru::LruCache;

/// How much of the prefix end a shown completion remembers, to recognise typing after it.
const PREFIX_TAIL: usize = 256;

/// The last completion shown in a document.
struct Shown {
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
            && prefix[..shown.prefix_len].ends_with(&shown.prefix_tail)
            && suffix == shown.suffix
            && !rest.is_empty();
        same_place.then(|| Hit::Typed(rest.to_string()))
    }

    /// Remembers `completion`, shown at the cursor between `prefix` and `suffix`.
    pub fn put(&mut self, uri: &str, prefix: &str, suffix: &str, settings: u64, completion: &str) {
        self.entries.put(Cache::key(uri, prefix, suffix, settings), completion.to_string());
        let mut tail_start = prefix.len().saturating_sub(PREFIX_TAIL);
        while !prefix.is_char_boundary(tail_start) {
            tail_start += 1;
        }
        self.shown.insert(
            uri.to_string(),
            Shown {
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

    /// Runs `steps` of (prefix, suffix, completion to store or None to look up, expected hit).
    fn check(steps: &[(&str, &str, Option<&str>, Option<Hit>)]) {
        let mut cache = Cache::new(2);
        for (i, (prefix, suffix, store, expected)) in steps.iter().enumerate() {
            match store {
                Some(completion) => cache.put("file:///a.py", prefix, suffix, 0, completion),
                None => assert_eq!(&cache.get("file:///a.py", prefix, suffix, 0), expected, "step {i}"),
            }
        }
    }

    #[test]
    fn exact_and_typed_hits() {
        let typed = |s: &str| Some(Hit::Typed(s.into()));
        let exact = |s: &str| Some(Hit::Exact(s.into()));
        check(&[
            ("x = ", "\n", Some("foo(1)"), None),
            ("x = ", "\n", None, exact("foo(1)")),
            ("x = f", "\n", None, typed("oo(1)")),
            ("x = foo(", "\n", None, typed("1)")),
            // Typed something else, a different suffix, or everything: no hit.
            ("x = g", "\n", None, None),
            ("x = f", "\n\ny", None, None),
            ("x = foo(1)", "\n", None, None),
            ("y = ", "\n", None, None),
        ]);
        // LRU: the oldest of three is evicted from a cache of two.
        check(&[
            ("a", "", Some("1"), None),
            ("b", "", Some("2"), None),
            ("c", "", Some("3"), None),
            ("a", "", None, None),
            ("b", "", None, exact("2")),
        ]);
    }
}
