//! A deterministic Chat Completions server on loopback, for trying `wizard evolve` without an LLM:
//! `cargo run --release -p evolve --example fake_server -- [PORT_FILE] [SECONDS]` prints its base
//! URL (and writes it to PORT_FILE when given), and stops after SECONDS (default 600).
use std::time::Duration;

use evolve::fake::{FakeConfig, FakeServer};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seconds: u64 = args.get(1).map_or(600, |s| s.parse().expect("SECONDS is a number"));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    runtime.block_on(async {
        let config = FakeConfig { latency: Duration::from_millis(20), ..FakeConfig::default() };
        let server = FakeServer::start(config).await.expect("cannot listen on 127.0.0.1");
        println!("{}", server.base_url());
        if let Some(path) = args.first() {
            std::fs::write(path, server.base_url()).expect("cannot write the port file");
        }
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let stats = server.stats();
        eprintln!("served {} requests", stats.requests);
    });
}
