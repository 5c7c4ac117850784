#!/usr/bin/env bash
# Runs on the lent GPU machine (see scripts/gpu/prepare.sh): the training benchmark (125M, bf16,
# MFU, ZeRO-3 memory), the CUDA tests, the decode benchmark on the GPU in bf16 and fp32, and
# speculative decoding on the small trained pair, and `eval run` batching (n = 20 per problem,
# --max-batch 16 vs 1). Everything it prints is also written to $OUT/gpu-report.txt. Its timeouts
# add up to 585 s.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
kit=target/gpu-kit
out=${OUT:-/tmp}/gpu-report.txt
exec > >(tee "$out") 2>&1
python=${WIZARD_PYTHON:-python3}
# The binaries' rpath points at this repo's .wizard/, which the GPU machine lacks: use its torch.
torch_lib=$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH=$torch_lib WIZARD_PYTHON=$python WIZARD_GPU_TESTS=1
echo "== $(date -u) torch lib: $torch_lib"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
echo "== wizard doctor"; timeout 30 "$kit/wizard" doctor
echo "== training 125M, bf16, wizard vs transformers (+ ZeRO-3 memory on 2 ranks)"
timeout 200 "$python" scripts/bench/train.py --device cuda --model 125m --precision bf16 --batch-size 16 \
    --seq-len 1024 --steps 20 --threads 4 --wizard "$kit/wizard" --zero3-ranks 2
echo "== kernels tests";  timeout 45 "$kit/kernels-tests"
echo "== CUDA tests";     timeout 80 "$kit/cuda-tests" --nocapture
if "$python" -c 'import transformers' 2>/dev/null; then
    for dtype in bfloat16 float32; do
        echo "== decode benchmark, cuda $dtype, wizard vs transformers"
        timeout 50 "$python" scripts/bench/generate.py --device cuda --dtype "$dtype" --threads 4 --wizard-bench "$kit/generate-bench"
    done
else
    echo "== transformers is not installed here: wizard-only GPU benchmark"
    for dims in 384:6:6 768:12:12; do
        for dtype in bfloat16 float32; do
            echo "random:$dims cuda $dtype: $(timeout 25 "$kit/generate-bench" "random:$dims" 128 128 4 cuda $dtype)"
        done
    done
fi
echo "== speculative decoding, cuda bf16, small trained pair, 32 new tokens"
DEVICE=cuda timeout 40 "$kit/speculative-bench" "$kit/pair/target" "$kit/pair/draft-distilled" \
    "$kit/pair/prompts.jsonl" 32 4 bfloat16
echo "== eval run batching, cuda bf16, trained target, HumanEval 8 problems x 20 samples, 128 new tokens"
for batch in 16 1; do
    rm -rf /tmp/eval-batch-$batch
    echo "--max-batch $batch: $(timeout 45 "$kit/wizard" eval run --model "$kit/pair/target" --benchmark humaneval \
        --limit 8 --samples 20 --temperature 0.8 --top-p 0.95 --max-new-tokens 128 --device cuda \
        --max-batch $batch --out /tmp/eval-batch-$batch 2>&1 | tr '\r' '\n' | grep 'generated samples' | tail -1)"
done
echo "== done"
