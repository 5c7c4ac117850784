"""Prefill and decode tokens/s of wizard vs transformers `generate`, same machine, same run.

Usage: .wizard/python scripts/bench/generate.py [--threads N] [--prompt-tokens P] [--new-tokens N]

Builds two random GPTBigCode checkpoints (about 30M and 120M parameters, StarCoder's vocabulary of
49152 and multi-query attention) under target/bench-models, times transformers in a subprocess and
wizard's `model` bench binary in another, both fp32 on CPU with the same thread count, and
prints a Markdown table with the ratios.
"""
import argparse
import json
import math
import os
import pathlib
import subprocess
import sys

from safetensors import safe_open

REPO = pathlib.Path(__file__).resolve().parents[2]
SIZES = {
    "30M": dict(n_embd=384, n_layer=6, n_head=6),
    "120M": dict(n_embd=768, n_layer=12, n_head=12),
}

HF_TIMER = r"""
import json, sys, time, resource, torch
from transformers import AutoModelForCausalLM
directory, prompt_tokens, new_tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
device, dtype = sys.argv[5], getattr(torch, sys.argv[6])
torch.set_num_threads(threads)
if device == "cuda":
    # cuDNN attention builds a plan per new sequence length (seconds per generation); flash, as wizard uses.
    torch.backends.cuda.enable_cudnn_sdp(False)
model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
vocab = model.config.vocab_size
ids = torch.tensor([[1 + (i * 7919) % (vocab - 1) for i in range(prompt_tokens)]], device=device)
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
with torch.no_grad():
    model(ids, logits_to_keep=1); model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
    prefill, total = float("inf"), float("inf")
    for _ in range(3):
        start = time.perf_counter(); model(ids, use_cache=True, logits_to_keep=1); sync(); prefill = min(prefill, time.perf_counter() - start)
        start = time.perf_counter(); out = model.generate(ids, **kwargs); sync(); total = min(total, time.perf_counter() - start)
        assert out.shape[1] == prompt_tokens + new_tokens
print(json.dumps({
    "impl": "transformers",
    "prefill_tokens_per_s": prompt_tokens / prefill,
    "decode_tokens_per_s": new_tokens / (total - prefill),
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0,
}))
"""


def make_model(name, dims):
    directory = REPO / "target" / "bench-models" / name
    if (directory / "model.safetensors").exists():
        return directory
    import torch
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    torch.manual_seed(0)
    config = GPTBigCodeConfig(vocab_size=49152, n_positions=2048, multi_query=True, bos_token_id=0, eos_token_id=0, **dims)
    GPTBigCodeForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory


def run(command):
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--wizard-bench", help="a prebuilt bench binary (else cargo bench builds it)")
    args = parser.parse_args()
    if args.wizard_bench:
        wizard = [args.wizard_bench]
    else:
        subprocess.run(["cargo", "bench", "-p", "model", "--bench", "generate", "--no-run"], check=True, cwd=REPO)
        wizard = ["cargo", "bench", "-q", "-p", "model", "--bench", "generate", "--"]
    shape = [str(args.prompt_tokens), str(args.new_tokens), str(args.threads)]
    placement = [args.device, args.dtype]
    print(f"threads={args.threads} prompt={args.prompt_tokens} new={args.new_tokens} {args.dtype} {args.device}\n")
    print("| model | params | prefill tok/s wizard / HF (ratio) | decode tok/s wizard / HF (ratio) | peak RSS MiB wizard / HF |")
    print("| --- | --- | --- | --- | --- |")
    for name, dims in SIZES.items():
        directory = make_model(name, dims)
        with safe_open(directory / "model.safetensors", "pt") as f:
            params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        hf = run([sys.executable, "-c", HF_TIMER, str(directory), *shape, *placement])
        ours = run([*wizard, str(directory), *shape, *placement])
        prefill = ours["prefill_tokens_per_s"] / hf["prefill_tokens_per_s"]
        decode = ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
        print(
            f"| {name} | {params / 1e6:.1f}M "
            f"| {ours['prefill_tokens_per_s']:.0f} / {hf['prefill_tokens_per_s']:.0f} ({prefill:.2f}x) "
            f"| {ours['decode_tokens_per_s']:.1f} / {hf['decode_tokens_per_s']:.1f} ({decode:.2f}x) "
            f"| {ours['peak_rss_mib']:.0f} / {hf['peak_rss_mib']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
