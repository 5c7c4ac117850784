#!/usr/bin/env bash
# llama.cpp, the reference CPU inference engine that wizard's serving benchmark (http_serve.py) compares
# against, built from source and fed the same weights.
#
# Usage: scripts/bench/llama_cpp.sh build
#        scripts/bench/llama_cpp.sh convert MODEL_DIR f32|bf16|q8_0|q4_0 OUT.gguf
#        scripts/bench/llama_cpp.sh paths
#
# build    Builds `llama-server`, `llama-bench` and `llama-quantize` from the llama.cpp that the pinned llama-cpp-python
#          sdist on PyPI vendors (PyPI being the only package index this project may reach) into
#          ${WIZARD_CACHE:-~/.cache/wizard}/llama.cpp-<version>/build-<isa>/bin, with cmake and ninja from a
#          venv beside it. CPU only, static, compiled for AVX2 plus the AVX-512 (F, VNNI, BF16) parts
#          this CPU has rather than -march=native (which turns on AMX: SIGILL in these VMs), AMX off; the
#          build directory is named after that instruction set, so a cache moved to another CPU
#          rebuilds. About 7 minutes on 2 cores (JOBS=N to change -j); a finished build is recognised
#          and skipped. Compiler output goes to build.log there. Prints the paths.
# convert  Converts a Hugging Face GPTBigCode directory (config.json, model.safetensors, tokenizer.json)
#          to GGUF with the vendored convert_hf_to_gguf.py, run by wizard's torch venv (the converter
#          imports torch and transformers; its gguf package is the vendored gguf-py). The converter only
#          accepts BPE tokenizers whose pre-tokenizer it knows by a hash of encoded test text; for any
#          other tokenizer (such as one from `wizard tokenizer train`) the pre-tokenizer is named from
#          tokenizer.json instead: ByteLevel alone is llama.cpp's `gpt-2`, Digits then ByteLevel (as in
#          StarCoder's own tokenizer) is `starcoder`. q4_0, which the converter does not write, is the
#          f32 conversion quantized by llama-quantize.
# paths    Prints the paths of a finished build.
set -euo pipefail

VERSION=0.3.36
CACHE=${WIZARD_CACHE:-$HOME/.cache/wizard}
ROOT=$CACHE/llama.cpp-$VERSION
VENV=$ROOT/venv
SRC=$ROOT/llama_cpp_python-$VERSION
LLAMA=$SRC/vendor/llama.cpp
# The AVX-512 options this CPU can run; a build with one it lacks dies with SIGILL.
AVX512_OPTIONS=()
ISA=avx2
if grep -qw avx512f /proc/cpuinfo; then
    ISA=avx512
    AVX512_OPTIONS+=(-DGGML_AVX512=ON)
    grep -qw avx512_vnni /proc/cpuinfo && { ISA+=-vnni; AVX512_OPTIONS+=(-DGGML_AVX512_VNNI=ON); }
    grep -qw avx512_bf16 /proc/cpuinfo && { ISA+=-bf16; AVX512_OPTIONS+=(-DGGML_AVX512_BF16=ON); }
fi
BUILD=$ROOT/build-$ISA
BIN=$BUILD/bin
TORCH_PYTHON=${WIZARD_PYTHON:-$CACHE/venv-torch-2.11.0/bin/python}
JOBS=${JOBS:-2}

paths() {
    echo "llama-server        $BIN/llama-server"
    echo "llama-bench         $BIN/llama-bench"
    echo "llama-quantize      $BIN/llama-quantize"
    echo "convert_hf_to_gguf  $LLAMA/convert_hf_to_gguf.py"
    echo "gguf-py             $LLAMA/gguf-py"
}

build() {
    if [[ -x $BIN/llama-server && -x $BIN/llama-bench && -x $BIN/llama-quantize ]]; then
        echo "llama.cpp of llama-cpp-python $VERSION is already built"
        paths
        return
    fi
    mkdir -p "$ROOT"
    if [[ ! -x $VENV/bin/cmake || ! -x $VENV/bin/ninja ]]; then
        echo "== build tools: scikit-build-core, cmake, ninja into $VENV"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet --upgrade pip
        "$VENV/bin/pip" install --quiet scikit-build-core cmake ninja
    fi
    if [[ ! -f $LLAMA/CMakeLists.txt ]]; then
        echo "== llama-cpp-python $VERSION sdist from PyPI"
        local downloads=$ROOT/downloads
        mkdir -p "$downloads"
        # --no-build-isolation: pip reads the sdist's metadata with this venv's scikit-build-core rather
        # than installing a build environment of its own.
        PATH=$VENV/bin:$PATH "$VENV/bin/pip" download --quiet --no-deps --no-binary llama-cpp-python \
            --no-build-isolation --dest "$downloads" "llama-cpp-python==$VERSION"
        tar -xzf "$downloads/llama_cpp_python-$VERSION.tar.gz" -C "$ROOT"
    fi
    local log=$ROOT/build.log
    echo "== configure and build llama-server, llama-bench, llama-quantize (ninja -j$JOBS, log: $log)"
    if ! {
        PATH=$VENV/bin:$PATH nice -n 10 cmake -S "$LLAMA" -B "$BUILD" -G Ninja \
            -DCMAKE_BUILD_TYPE=Release \
            -DBUILD_SHARED_LIBS=OFF \
            -DLLAMA_CURL=OFF \
            -DLLAMA_BUILD_TESTS=OFF \
            -DLLAMA_BUILD_EXAMPLES=OFF \
            -DGGML_NATIVE=OFF \
            -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
            "${AVX512_OPTIONS[@]}" \
            -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF &&
        PATH=$VENV/bin:$PATH nice -n 10 cmake --build "$BUILD" --target llama-server llama-bench llama-quantize -- -j"$JOBS"
    } >"$log" 2>&1; then
        grep -E "error|Error|FAILED" "$log" | head -40 >&2 || true
        echo "error: the llama.cpp build failed; see $log" >&2
        exit 1
    fi
    grep -E "Adding CPU backend variant" "$log" || true
    paths
}

# Runs convert_hf_to_gguf.py's main with get_vocab_base_pre falling back to tokenizer.json's
# pre-tokenizer when the hash of the converter's test text is not one it lists.
CONVERT_PY='
import json, logging, pathlib, runpy, sys
llama, model = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
sys.path[:0] = [str(llama), str(llama / "gguf-py")]
from conversion import base

known = base.TextModel.get_vocab_base_pre

def kinds(node):
    if node is None:
        return []
    if node["type"] == "Sequence":
        return [k for child in node["pretokenizers"] for k in kinds(child)]
    return [(node["type"], node)]

def get_vocab_base_pre(self, tokenizer):
    logger = logging.getLogger("hf-to-gguf")
    level = logger.level
    logger.setLevel(logging.ERROR)  # the unknown-hash banner, which the fallback answers
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        pre = kinds(json.loads((model / "tokenizer.json").read_text()).get("pre_tokenizer"))
        names = [kind for kind, _ in pre]
        if names == ["ByteLevel"] and pre[0][1].get("use_regex", True):
            res = "gpt-2"
        elif names == ["Digits", "ByteLevel"] and pre[0][1].get("individual_digits"):
            res = "starcoder"
        else:
            raise NotImplementedError(f"pre-tokenizer {names} is neither gpt-2 (ByteLevel) nor starcoder (Digits, ByteLevel)")
        print(f"pre-tokenizer: not one llama.cpp knows by hash; tokenizer.json has {names}: {res!r}", file=sys.stderr)
        return res
    finally:
        logger.setLevel(level)

base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [str(llama / "convert_hf_to_gguf.py"), *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
'

convert() {
    if [[ $# -ne 3 ]]; then
        echo "usage: $0 convert MODEL_DIR f32|bf16|q8_0|q4_0 OUT.gguf" >&2
        exit 2
    fi
    local model=$1 outtype=$2 out=$3
    case $outtype in f32|bf16|q8_0|q4_0) ;; *) echo "error: outtype must be f32, bf16, q8_0 or q4_0, not $outtype" >&2; exit 2 ;; esac
    [[ -f $LLAMA/convert_hf_to_gguf.py && -x $BIN/llama-quantize ]] || build
    for file in config.json tokenizer.json; do
        [[ -f $model/$file ]] || { echo "error: $model/$file is missing" >&2; exit 1; }
    done
    [[ -x $TORCH_PYTHON ]] || { echo "error: no $TORCH_PYTHON; run scripts/setup.sh" >&2; exit 1; }
    mkdir -p "$(dirname "$out")"
    if [[ $outtype == q4_0 ]]; then
        # llama-quantize's default q4_0, as users run it (it keeps the output/token table in q6_K).
        local f32=$out.f32.tmp
        trap "rm -f '$f32'" EXIT  # expanded now: the local is gone when the shell exits
        "$TORCH_PYTHON" -c "$CONVERT_PY" "$LLAMA" "$model" --outtype f32 --outfile "$f32"
        "$BIN/llama-quantize" "$f32" "$out" q4_0 >/dev/null
    else
        "$TORCH_PYTHON" -c "$CONVERT_PY" "$LLAMA" "$model" --outtype "$outtype" --outfile "$out"
    fi
    echo "wrote $out"
}

case ${1:-} in
    build) build ;;
    convert) shift; convert "$@" ;;
    paths) paths ;;
    *) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 2 ;;  # the header
esac
