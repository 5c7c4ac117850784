//! Throughput of the engine against a loopback Chat Completions server with a fixed latency L per
//! request: with C requests in flight the ideal is C / L requests per second. Also reports the CPU
//! time the pipeline itself (engine, HTTP client, SQLite, clean-up) spends per item, with the fake
//! server's threads left out.
//!
//! `cargo bench -p evolve --bench throughput` (set EVOLVE_BENCH_ITEMS, EVOLVE_BENCH_LATENCY_MS,
//! EVOLVE_BENCH_CONCURRENCY to change the defaults 25 x C, 100, "16,64").
use std::sync::Arc;
use std::time::{Duration, Instant};

use evolve::engine::{run, Backends, EngineConfig};
use evolve::fake::{FakeConfig, FakeServer};
use evolve::http::{HttpBackend, HttpConfig};
use evolve::seeds::Seed;
use evolve::store::Store;
use rand::{Rng, SeedableRng};

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// CPU seconds of this process's threads, split into (fake server threads, all others).
fn cpu_seconds() -> (f64, f64) {
    let ticks = 100.0; // USER_HZ on Linux
    let (mut server, mut rest) = (0.0, 0.0);
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        let (name, fields) = stat.split_at(stat.rfind(')').unwrap());
        let fields: Vec<&str> = fields[1..].split_whitespace().collect();
        let seconds = (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / ticks;
        if name.contains("fake-llm") {
            server += seconds;
        } else {
            rest += seconds;
        }
    }
    (server, rest)
}

/// CPU seconds of the whole process (threads that ended included).
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..].split_whitespace().collect();
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
}

fn seeds(count: usize) -> Vec<Seed> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let words: Vec<String> = (0..500).map(|i| format!("w{i:03}x")).collect();
    (0..count)
        .map(|i| {
            let text: Vec<&str> = (0..24).map(|_| words[rng.random_range(0..words.len())].as_str()).collect();
            Seed {
                instruction: format!("Task {i}: write code that {}.", text.join(" ")),
                input: String::new(),
                output: Some(format!("def task_{i}():\n    return {i}\n")),
            }
        })
        .collect()
}

struct Timing(Instant);

impl evolve::engine::Progress for Timing {
    fn round_started(&self, round: u32, total: u64, _: u64) {
        if std::env::var_os("EVOLVE_BENCH_VERBOSE").is_some() {
            eprintln!("{:.2} s: round {round} starts, {total} items", self.0.elapsed().as_secs_f64());
        }
    }
    fn item_done(&self, _: u32) {}
    fn round_finished(&self, stats: &evolve::store::RoundStats) {
        if std::env::var_os("EVOLVE_BENCH_VERBOSE").is_some() {
            eprintln!("{:.2} s: round {} closed", self.0.elapsed().as_secs_f64(), stats.round);
        }
    }
}

fn main() {
    let items_setting: Option<usize> = std::env::var("EVOLVE_BENCH_ITEMS").ok().map(|n| n.parse().unwrap());
    let latency = Duration::from_millis(env("EVOLVE_BENCH_LATENCY_MS", "100").parse().unwrap());
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("fake-llm")
        .enable_all()
        .build()
        .unwrap();
    let server = server_rt.block_on(FakeServer::start(FakeConfig { latency, ..FakeConfig::default() })).unwrap();
    println!("latency {} ms, {} cores", latency.as_millis(), std::thread::available_parallelism().unwrap());
    let mut worst = f64::MAX;
    for concurrency in env("EVOLVE_BENCH_CONCURRENCY", "16,64").split(',').map(|c| c.trim().parse::<usize>().unwrap()) {
        // Enough items that the last, partly filled wave of requests weighs little.
        let items = items_setting.unwrap_or(25 * concurrency);
        let seeds = seeds(items);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("bench.db")).unwrap();
        let mut http = HttpConfig::new(server.base_url(), "fake");
        http.timeout = latency * 20;
        let backend: Arc<dyn evolve::backend::Backend> = Arc::new(HttpBackend::new(http).unwrap());
        let backends = Backends { evolver: backend.clone(), responder: backend };
        let config = EngineConfig { rounds: 1, concurrency, ..EngineConfig::default() };
        let engine_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("evolve-rt")
            .enable_all()
            .build()
            .unwrap();
        let answered_before = server.stats().answered;
        let (server_before, _) = cpu_seconds();
        let process_before = process_cpu_seconds();
        let started = Instant::now();
        engine_rt.block_on(run(store, &seeds, config, backends, Arc::new(Timing(started)))).unwrap();
        let wall = started.elapsed().as_secs_f64();
        let (server_after, _) = cpu_seconds();
        let pipeline_cpu = (process_cpu_seconds() - process_before) - (server_after - server_before);
        drop(engine_rt);
        let requests = (server.stats().answered - answered_before) as f64;
        let throughput = requests / wall;
        let ideal = concurrency as f64 / latency.as_secs_f64();
        let ratio = throughput / ideal;
        worst = worst.min(ratio);
        println!(
            "C={concurrency:<3} items {items}, requests {requests:.0} in {wall:.2} s: {throughput:.1} req/s, ideal C/L {ideal:.1} req/s, \
             ratio {:.1}%; pipeline CPU {:.2} ms per item ({:.0} us per request)",
            100.0 * ratio,
            1000.0 * pipeline_cpu / items as f64,
            1e6 * pipeline_cpu / requests
        );
    }
    println!("{} (worst ratio {:.1}%, goal >= 90%)", if worst >= 0.9 { "PASS" } else { "FAIL" }, 100.0 * worst);
    if worst < 0.9 {
        std::process::exit(1);
    }
}
