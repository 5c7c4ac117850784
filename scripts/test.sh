#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, format, lints, build, all tests. Everything is built in
# release so libtorch's C++ wrapper is compiled once.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() {
    local name=$1 start=$SECONDS
    shift
    echo "==> $name" >&2
    "$@"
    echo "==> $name: $((SECONDS - start)) s" >&2
}

step setup scripts/setup.sh
step format cargo fmt --all --check
step lints cargo clippy --release --workspace --all-targets --locked -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
    step tests cargo nextest run --release --workspace --locked --no-tests=fail
else
    step tests cargo test --release --workspace --locked
fi
# The kernels a CPU without AVX-512 (and one without AVX2) takes, on this one.
for cap in avx2 scalar; do
    step "kernels under WIZARD_CPU_MAX=$cap" env WIZARD_CPU_MAX=$cap cargo test --release -p kernels --locked --lib
done
