//! On AMX, whether steps of few positions (decode, verification) take bf16 weights on the tiles or
//! in dot products is timed over weights read from memory and set for the process; either way such
//! a step is one kernel, whatever rows share the call. Its own process: the setting changes the bits
//! that other tests compare.
use kernels::calibrate::{calibrate_one_row, OneRowQuestion};
use kernels::linear::{bf16_kernel, few_positions_on_amx, linear, set_few_positions_on_amx, Bf16Kernel};
use tch::{Device, Kind, Tensor};

#[test]
fn decode_steps_take_the_bf16_kernel_measured_faster() {
    if bf16_kernel() != Bf16Kernel::AmxTiles {
        eprintln!("no AMX tiles granted here ({}): one bf16 kernel at every row count", bf16_kernel().describe());
        return;
    }
    let dir = std::env::temp_dir().join(format!("wizard-few-positions-{}", std::process::id()));
    let cache = dir.join("dense-kernels.tsv");
    let opts = (Kind::Float, Device::Cpu);
    // 128 MiB of bf16 weights: a decode step reads them from memory, not from the caches.
    let weights: Vec<Tensor> = (0..4).map(|_| Tensor::randn([4096, 4096], opts).to_kind(Kind::BFloat16)).collect();
    let refs: Vec<&Tensor> = weights.iter().collect();
    let timed = |cached: bool| {
        let measured = calibrate_one_row(&refs, &[], Some(&cache));
        let tiles: Vec<_> = measured.iter().filter(|m| m.question == OneRowQuestion::AmxTiles).collect();
        assert_eq!(tiles.len(), 1, "{measured:?}");
        let m = tiles[0].clone();
        assert_eq!((m.kind, m.size_mib, m.cached), (Kind::BFloat16, 128, cached), "{m:?}");
        assert!(m.on_us > 0.0 && m.off_us > 0.0 && m.on == (m.on_us < m.off_us), "{m:?}");
        assert_eq!(few_positions_on_amx(), m.on);
        m
    };
    let first = timed(false);
    eprintln!("{first:?}");
    set_few_positions_on_amx(!first.on);
    assert_eq!(timed(true).on, first.on, "read back from the cache and set again");
    let _ = std::fs::remove_dir_all(&dir);

    let weight = weights[0].narrow(0, 0, 200).contiguous();
    let x = Tensor::randn([1, 5, 4096], opts);
    let long = Tensor::cat(&[&x, &Tensor::randn([1, 95, 4096], opts)], 1);
    let prefill = tch::no_grad(|| linear(&long, &weight, None)).narrow(1, 0, 5);
    for on_tiles in [true, false] {
        set_few_positions_on_amx(on_tiles);
        let step = tch::no_grad(|| linear(&x, &weight, None));
        for row in 0..5 {
            let alone = tch::no_grad(|| linear(&x.narrow(1, row, 1).contiguous(), &weight, None));
            assert!(alone.equal(&step.narrow(1, row, 1)), "tiles {on_tiles}: row {row} differs alone");
        }
        // Prefill (more than 64 positions) takes the tiles: the same bits, or the same sums rounded
        // otherwise.
        if on_tiles {
            assert!(prefill.equal(&step), "a step on the tiles differs from prefill");
        } else {
            let error = (&prefill - &step).abs().max().double_value(&[]);
            let scale = prefill.abs().max().double_value(&[]);
            assert!(error <= 1e-4 * scale, "dot products vs tiles: {error} of {scale}");
        }
    }
}
