//! Prometheus text for `GET /metrics`: requests by endpoint and status, tokens, the engine's queue
//! and batch, and latency histograms.
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use model::engine::Counters;

const BUCKETS: [f64; 12] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// A latency histogram with fixed buckets (seconds).
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        for (bucket, count) in BUCKETS.iter().zip(&self.counts) {
            if seconds <= *bucket {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bucket, count) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bucket}\"}} {}", count.load(Ordering::Relaxed));
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// The server's own figures (the engine keeps the rest).
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Whole request time.
    pub latency: Histogram,
    /// Time to the first generated token.
    pub first_token: Histogram,
}

impl Metrics {
    /// Counts a request answered with `status`.
    pub fn request(&self, endpoint: &'static str, status: u16) {
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *requests.entry((endpoint, status)).or_default() += 1;
    }

    /// The exposition text.
    pub fn render(&self, engine: &Counters, in_flight: usize) -> String {
        let mut out = String::new();
        out.push_str("# HELP wizard_requests_total Requests answered, by endpoint and status.\n");
        out.push_str("# TYPE wizard_requests_total counter\n");
        for ((endpoint, status), count) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "wizard_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {count}");
        }
        let load = |value: &std::sync::atomic::AtomicUsize| value.load(Ordering::Relaxed);
        let (steps, rows) = (load(&engine.steps), load(&engine.step_rows));
        let gauges = [
            ("wizard_prompt_tokens_total", "counter", "Prompt tokens prefilled.", load(&engine.prompt_tokens) as f64),
            ("wizard_generated_tokens_total", "counter", "Tokens generated.", load(&engine.generated_tokens) as f64),
            ("wizard_requests_in_flight", "gauge", "Requests accepted and not finished.", in_flight as f64),
            ("wizard_queue_depth", "gauge", "Requests waiting for a place in the batch.", load(&engine.waiting) as f64),
            ("wizard_running_sequences", "gauge", "Sequences in the running batch.", load(&engine.running) as f64),
            ("wizard_decode_steps_total", "counter", "Batched decode steps.", steps as f64),
            ("wizard_decode_rows_total", "counter", "Sequences over all decode steps.", rows as f64),
            ("wizard_mean_batch_size", "gauge", "Mean sequences per decode step.", rows as f64 / steps.max(1) as f64),
        ];
        for (name, kind, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        self.latency.render(&mut out, "wizard_request_duration_seconds", "Time from request to last byte.");
        self.first_token.render(&mut out, "wizard_time_to_first_token_seconds", "Time from request to first token.");
        out
    }
}
