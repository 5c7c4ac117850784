#!/usr/bin/env bash
# Builds, here, everything the GPU check needs and puts it in target/gpu-kit (stripped binaries, a
# few MB), so that a session lent a GPU machine measures in one call:
#   scripts/gpu/prepare.sh, then the device tool's run with carry ["target/gpu-kit"] and the command
#   "bash scripts/gpu/check.sh", timeout_s 560. The report comes back as $OUT/gpu-report.txt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
kit=target/gpu-kit
rm -rf "$kit" && mkdir -p "$kit"
cargo build --release --workspace
executable() { # the test or bench binary cargo reports for a target
    cargo "$@" --no-run 2>&1 | sed -n 's/.*Executable .*(\(target\/release\/deps\/[^)]*\)).*/\1/p' | tail -1
}
cp target/release/wizard "$kit/wizard"
cp "$(executable test --release -p pipeline --test cuda)" "$kit/cuda-tests"
cp "$(executable test --release -p kernels --lib)" "$kit/kernels-tests"
cp "$(executable bench -p pipeline --bench generate)" "$kit/generate-bench"
strip "$kit"/*
du -sh "$kit"
