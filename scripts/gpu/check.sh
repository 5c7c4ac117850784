#!/usr/bin/env bash
# Runs on the lent GPU machine (see scripts/gpu/prepare.sh): the training benchmark (125M, bf16,
# MFU, ZeRO-3 memory), the CUDA tests, the decode benchmark on the GPU in bf16 and fp32, and
# speculative decoding on the small trained pair, and `eval run` batching (n = 20 per problem,
# --max-batch 16 vs 1); the 1B decode with CUDA graphs and without (WIZARD_CUDA_GRAPHS=0). Everything
# it prints is also written to $OUT/gpu-report.txt. Its timeouts add up to 600 s: a 15-minute lease keeps room for the machine's start and a rerun of the sections
# that failed, named as arguments (default: all of doctor train kernels cuda decode decode-1b
# speculative eval).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
kit=target/gpu-kit
out=${OUT:-/tmp}/gpu-report.txt
exec > >(tee "$out") 2>&1
for binary in wizard cuda-tests kernels-tests generate-bench speculative-bench; do # compressed by prepare.sh
    [ -x "$kit/$binary" ] || { gzip -dkf "$kit/$binary.gz" && chmod +x "$kit/$binary"; }
done
python=${WIZARD_PYTHON:-python3}
# The binaries' rpath points at this repo's .wizard/, which the GPU machine lacks: use its torch.
torch_lib=$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH=$torch_lib WIZARD_PYTHON=$python WIZARD_GPU_TESTS=1
echo "== $(date -u) torch lib: $torch_lib"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
sections=" $* "
run_section() { [ "$sections" = "  " ] || [[ $sections == *" $1 "* ]]; }
if run_section doctor; then echo "== wizard doctor"; timeout 20 "$kit/wizard" doctor; fi
if run_section train; then
    echo "== training 125M, bf16, wizard vs transformers (+ ZeRO-3 memory on 2 ranks)"
    timeout 120 "$python" scripts/bench/train.py --device cuda --model 125m --precision bf16 --batch-size 16 \
        --seq-len 1024 --steps 20 --threads 4 --wizard "$kit/wizard" --zero3-ranks 2
fi
if run_section kernels; then echo "== kernels tests"; timeout 40 "$kit/kernels-tests"; fi
if run_section cuda; then echo "== CUDA tests"; timeout 60 "$kit/cuda-tests" --nocapture; fi
if run_section decode; then
    for dtype in bfloat16 float32; do
        echo "== decode benchmark, cuda $dtype, wizard vs transformers"
        timeout 80 "$python" scripts/bench/generate.py --device cuda --dtype "$dtype" --threads 4 \
            --wizard-bench "$kit/generate-bench"
    done
fi
if run_section decode-1b; then
    echo "== decode, StarCoder-1B shape (d2048 L24 H16 MQA, random), cuda bf16, prompt 128 / 128 new"
    echo "with CUDA graphs:"
    timeout 40 "$kit/generate-bench" random:2048:24:16 128 128 4 cuda bfloat16
    echo "without (WIZARD_CUDA_GRAPHS=0):"
    WIZARD_CUDA_GRAPHS=0 timeout 40 "$kit/generate-bench" random:2048:24:16 128 128 4 cuda bfloat16
fi
if run_section speculative; then
    echo "== speculative decoding, cuda bf16, small trained pair, 32 new tokens"
    DEVICE=cuda timeout 40 "$kit/speculative-bench" "$kit/pair/target" "$kit/pair/draft-distilled" \
        "$kit/pair/prompts.jsonl" 32 4 bfloat16
fi
if run_section eval; then
    echo "== eval run batching, cuda bf16, trained target, HumanEval 8 problems x 20 samples, 128 new tokens"
    for batch in 16 1; do
        rm -rf /tmp/eval-batch-$batch
        echo "--max-batch $batch:"
        timeout 40 "$kit/wizard" eval run --model "$kit/pair/target" --benchmark humaneval \
            --data "$kit/HumanEval.jsonl.gz" --limit 8 --samples 20 --temperature 0.8 --top-p 0.95 \
            --max-new-tokens 128 --device cuda --max-batch $batch --out /tmp/eval-batch-$batch 2>&1 |
            tr '\r' '\n' | grep -E 'generated samples|^error|^pass@1'
    done
fi
echo "== done"
