//! pass@k: the unbiased estimator of Chen et al. (2021), `1 - C(n-c, k) / C(n, k)`, in its numerically stable
//! product form `1 - prod_{i=n-c+1}^{n} (1 - k / i)`, which never forms a binomial coefficient.

/// The ks reported: each one for which every problem has at least k samples.
pub const KS: [usize; 3] = [1, 10, 100];

/// Probability that at least one of k samples drawn without replacement from n samples, c of them
/// correct, is correct. `None` when n < k.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> Option<f64> {
    if k == 0 || n < k || c > n {
        return None;
    }
    if n - c < k {
        return Some(1.0);
    }
    Some(1.0 - ((n - c + 1)..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>())
}

/// Mean pass@k over problems given as (n, c), for each k of `ks` that every problem allows.
pub fn mean_pass_at_k(problems: &[(usize, usize)], ks: &[usize]) -> Vec<(usize, f64)> {
    ks.iter()
        .filter(|&&k| !problems.is_empty() && problems.iter().all(|&(n, _)| n >= k))
        .map(|&k| {
            let sum: f64 = problems.iter().map(|&(n, c)| pass_at_k(n, c, k).unwrap_or(0.0)).sum();
            (k, sum / problems.len() as f64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1 - C(n-c, k)/C(n, k) with exact integer binomials (small n only).
    fn by_binomials(n: usize, c: usize, k: usize) -> f64 {
        fn choose(n: usize, k: usize) -> f64 {
            if k > n {
                return 0.0;
            }
            (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
        }
        1.0 - choose(n - c, k) / choose(n, k)
    }

    fn check(n: usize, c: usize, k: usize, expect: Option<f64>) {
        let got = pass_at_k(n, c, k);
        match (got, expect) {
            (Some(got), Some(expect)) => {
                assert!((got - expect).abs() < 1e-12, "pass@{k}(n={n}, c={c}) = {got}, not {expect}")
            }
            _ => assert_eq!(got, expect, "pass@{k}(n={n}, c={c})"),
        }
    }

    #[test]
    fn known_values() {
        check(1, 1, 1, Some(1.0));
        check(1, 0, 1, Some(0.0));
        check(10, 3, 1, Some(0.3));
        check(10, 0, 10, Some(0.0));
        check(10, 1, 10, Some(1.0));
        check(5, 1, 2, Some(0.4)); // 1 - C(4,2)/C(5,2) = 1 - 6/10
        check(200, 0, 100, Some(0.0));
        check(9, 9, 10, None);
        check(3, 4, 1, None);
        check(3, 1, 0, None);
    }

    #[test]
    fn agrees_with_binomials() {
        for n in 1..=30 {
            for c in 0..=n {
                for k in 1..=n {
                    check(n, c, k, Some(by_binomials(n, c, k)));
                }
            }
        }
    }

    #[test]
    fn stable_where_binomials_overflow() {
        // C(2000, 100) overflows f64; the product form still gives a probability, monotone in c.
        let values: Vec<f64> = (0..=20).map(|c| pass_at_k(2000, c, 100).unwrap()).collect();
        assert!(values.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)), "{values:?}");
        assert!(values.windows(2).all(|w| w[0] < w[1]), "{values:?}");
        check(2000, 1, 100, Some(0.05));
    }

    #[test]
    fn means_only_for_ks_every_problem_allows() {
        assert_eq!(mean_pass_at_k(&[(10, 10), (10, 0)], &KS), vec![(1, 0.5), (10, 0.5)]);
        assert_eq!(mean_pass_at_k(&[(1, 1), (10, 0)], &KS), vec![(1, 0.5)]);
        assert_eq!(mean_pass_at_k(&[], &KS), vec![]);
    }
}
