//! Decode attention alone: one sequence's new positions over a multi-query KV cache, every layer
//! of a step, as the fused decode block runs it.
//!
//! `cargo bench -p kernels --bench decode_attention -- HEADS HEAD_DIM DEPTH LAYERS [POSITIONS]`
//! prints one JSON line: the fastest and the median of 100 steps, in milliseconds.
use std::time::Instant;

use tch::{Device, Kind, Tensor};

const STEPS: usize = 100;

fn main() {
    let args: Vec<i64> = std::env::args()
        .skip(1)
        .filter(|arg| arg != "--bench")
        .map(|arg| arg.parse().expect("HEADS HEAD_DIM DEPTH LAYERS [POSITIONS] are integers"))
        .collect();
    let [heads, head_dim, depth, layers] = args[..4] else {
        panic!("usage: decode_attention HEADS HEAD_DIM DEPTH LAYERS [POSITIONS]")
    };
    let positions = args.get(4).copied().unwrap_or(1);
    tch::manual_seed(0);
    let options = (Kind::Float, Device::Cpu);
    let cache = || Tensor::randn([1, 1, depth + positions, head_dim], options);
    let keys: Vec<Tensor> = (0..layers).map(|_| cache()).collect();
    let values: Vec<Tensor> = (0..layers).map(|_| cache()).collect();
    let query = Tensor::randn([1, heads, positions, head_dim], options);
    let (new_keys, new_values) =
        (Tensor::randn([1, 1, positions, head_dim], options), Tensor::randn([1, 1, positions, head_dim], options));
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut times: Vec<f64> = (0..STEPS)
        .map(|_| {
            let started = Instant::now();
            for (k, v) in keys.iter().zip(&values) {
                let _ =
                    kernels::attention::decode_attention(&query, &new_keys, &new_values, &[k], &[v], &[depth], scale);
            }
            started.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    println!(
        "{{\"heads\":{heads},\"head_dim\":{head_dim},\"depth\":{depth},\"layers\":{layers},\"positions\":{positions},\
         \"threads\":{},\"fastest_ms\":{:.4},\"median_ms\":{:.4}}}",
        tch::get_num_threads(),
        times[0],
        times[STEPS / 2]
    );
}
