//! MinHash signatures and LSH for near-duplicate search, as BigCode deduplicates: word 5-gram
//! shingles, 256 permutations, bands and rows chosen for the Jaccard threshold. Candidates from the
//! LSH buckets are confirmed with the exact Jaccard similarity of the shingle sets.
use std::collections::{HashMap, HashSet};

use rand::{Rng, SeedableRng};

/// Permutations per signature.
pub const NUM_PERM: usize = 256;
/// Words per shingle.
pub const SHINGLE: usize = 5;
const PRIME: u64 = (1 << 61) - 1;

/// A text's shingles as 64-bit hashes.
pub type Shingles = HashSet<u64>;

fn fnv(words: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for word in words {
        for byte in word.bytes().chain([0xff]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// Lower-cased alphanumeric words in 5-grams (a shorter text is one shingle).
pub fn shingles(text: &str) -> Shingles {
    let lowered = text.to_lowercase();
    let words: Vec<&str> = lowered.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
    if words.len() < SHINGLE {
        return if words.is_empty() { Shingles::new() } else { [fnv(&words)].into() };
    }
    words.windows(SHINGLE).map(fnv).collect()
}

/// Exact Jaccard similarity.
pub fn jaccard(a: &Shingles, b: &Shingles) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    let common = a.iter().filter(|x| b.contains(x)).count();
    common as f64 / (a.len() + b.len() - common) as f64
}

/// Universal hashing `(a x + b) mod p` with fixed seeds, so signatures are the same in every run.
pub struct MinHasher {
    params: Vec<(u64, u64)>,
}

impl Default for MinHasher {
    fn default() -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x0005_eed0_fb16_c0de);
        MinHasher { params: (0..NUM_PERM).map(|_| (rng.random_range(1..PRIME), rng.random_range(0..PRIME))).collect() }
    }
}

impl MinHasher {
    /// The signature of a shingle set.
    pub fn signature(&self, shingles: &Shingles) -> Vec<u64> {
        let mut signature = vec![u64::MAX; NUM_PERM];
        for &shingle in shingles {
            let x = u128::from(shingle % PRIME);
            for (slot, &(a, b)) in signature.iter_mut().zip(&self.params) {
                let value = ((u128::from(a) * x + u128::from(b)) % u128::from(PRIME)) as u64;
                *slot = (*slot).min(value);
            }
        }
        signature
    }
}

/// The (bands, rows) that minimise the equally weighted false-positive and false-negative areas
/// around `threshold`, as `datasketch` chooses them.
pub fn optimal_bands(threshold: f64, num_perm: usize) -> (usize, usize) {
    let integrate = |f: &dyn Fn(f64) -> f64, lo: f64, hi: f64| {
        let steps = 200;
        let width = (hi - lo) / steps as f64;
        (0..steps).map(|i| f(lo + (i as f64 + 0.5) * width) * width).sum::<f64>()
    };
    let mut best = (1, 1);
    let mut best_error = f64::MAX;
    for bands in 1..=num_perm {
        for rows in 1..=num_perm / bands {
            let candidate = |s: f64| 1.0 - (1.0 - s.powi(rows as i32)).powi(bands as i32);
            let false_positive = integrate(&candidate, 0.0, threshold);
            let false_negative = integrate(&|s| 1.0 - candidate(s), threshold, 1.0);
            let error = 0.5 * false_positive + 0.5 * false_negative;
            if error < best_error {
                best_error = error;
                best = (bands, rows);
            }
        }
    }
    best
}

/// An LSH index of shingle sets that answers "which stored entry is at least `threshold` similar?".
pub struct Index<K> {
    hasher: MinHasher,
    threshold: f64,
    bands: usize,
    rows: usize,
    buckets: Vec<HashMap<u64, Vec<usize>>>,
    entries: Vec<(K, Shingles)>,
}

impl<K> Index<K> {
    /// An empty index for a Jaccard threshold.
    pub fn new(threshold: f64) -> Index<K> {
        let (bands, rows) = optimal_bands(threshold, NUM_PERM);
        Index {
            hasher: MinHasher::default(),
            threshold,
            bands,
            rows,
            buckets: (0..bands).map(|_| HashMap::new()).collect(),
            entries: Vec::new(),
        }
    }

    fn band_keys(&self, signature: &[u64]) -> Vec<u64> {
        signature.chunks(self.rows).take(self.bands).map(|band| fnv(&[&format!("{band:?}")])).collect()
    }

    /// The signature and band keys of a shingle set, for [`Index::query`] and [`Index::insert`].
    pub fn keys(&self, shingles: &Shingles) -> Vec<u64> {
        self.band_keys(&self.hasher.signature(shingles))
    }

    /// The most similar stored entry at or above the threshold, accepted by `filter`, with its
    /// exact Jaccard similarity.
    pub fn query(&self, shingles: &Shingles, keys: &[u64], filter: impl Fn(&K) -> bool) -> Option<(&K, f64)> {
        let mut seen = HashSet::new();
        let mut best: Option<(usize, f64)> = None;
        for (band, key) in keys.iter().enumerate() {
            for &entry in self.buckets[band].get(key).into_iter().flatten() {
                if !seen.insert(entry) || !filter(&self.entries[entry].0) {
                    continue;
                }
                let similarity = jaccard(shingles, &self.entries[entry].1);
                if similarity >= self.threshold && best.is_none_or(|(_, b)| similarity > b) {
                    best = Some((entry, similarity));
                }
            }
        }
        best.map(|(entry, similarity)| (&self.entries[entry].0, similarity))
    }

    /// Stores an entry.
    pub fn insert(&mut self, key: K, shingles: Shingles, keys: &[u64]) {
        let entry = self.entries.len();
        for (band, bucket_key) in keys.iter().enumerate() {
            self.buckets[band].entry(*bucket_key).or_default().push(entry);
        }
        self.entries.push((key, shingles));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_for_bigcode_thresholds() {
        let (bands, rows) = optimal_bands(0.7, NUM_PERM);
        assert!(bands * rows <= NUM_PERM && bands > 1 && rows > 1, "{bands} x {rows}");
        // The S-curve crosses one half near the threshold.
        let half = (1.0 / bands as f64).powf(1.0 / rows as f64);
        assert!((half - 0.7).abs() < 0.1, "{bands} x {rows}: {half}");
    }

    fn check(a: &str, b: &str, threshold: f64, expected: bool) {
        let mut index = Index::new(threshold);
        let sa = shingles(a);
        let keys = index.keys(&sa);
        index.insert("a", sa, &keys);
        let sb = shingles(b);
        let found = index.query(&sb, &index.keys(&sb), |_| true).map(|(k, _)| *k);
        assert_eq!(found.is_some(), expected, "{a:?} ~ {b:?} (jaccard {})", jaccard(&shingles(a), &shingles(b)));
    }

    #[test]
    fn near_duplicates() {
        let base = "Write a Python function that takes a list of integers and returns the sum of all even \
                    numbers in the list, ignoring negative values and returning zero for an empty list.";
        check(base, base, 0.7, true);
        check(base, &base.to_uppercase().replace(',', " ,"), 0.7, true);
        check(base, &format!("{base} Use recursion."), 0.7, true);
        check(base, "Implement a binary search tree in Rust with insert, delete and in-order traversal.", 0.7, false);
        check(base, &base.replace("even", "odd").replace("negative", "positive"), 0.7, false);
        check("short text", "short text", 0.7, true);
        check("short text", "other text", 0.7, false);
    }

    #[test]
    fn signatures_estimate_jaccard() {
        let hasher = MinHasher::default();
        let a: Shingles = (0..400).collect();
        let b: Shingles = (200..600).collect();
        let (sa, sb) = (hasher.signature(&a), hasher.signature(&b));
        let estimate = sa.iter().zip(&sb).filter(|(x, y)| x == y).count() as f64 / NUM_PERM as f64;
        assert!((estimate - 1.0 / 3.0).abs() < 0.08, "{estimate}");
    }
}
