"""Prefill and decode tokens/s of wizard vs llama.cpp's llama-bench on the same weights, per precision.

Usage: .wizard/python scripts/bench/decode.py [--shapes d768,1b,d64l2,d64l12] [--threads 2] [--prompt-tokens 128]
                                             [--new-tokens 128] [--depth] [--self-speculation] [--draft int8|int4]
                                             [--precisions float32,bfloat16,int8,int4]

1. Models: random GPTBigCode checkpoints made with transformers under target/bench-models, with the
   byte-level BPE tokenizer of 4000 tokens that scripts/bench/http_serve.py trains: `d768` (d768 L12
   H12 MQA, 76M parameters, http_serve.py's model) and `1b` (StarCoder-1B's shape: d2048 L24 H16 MQA,
   inner 8192, about 1.1B parameters); `d64l2` and `d64l12` (d64, 4 heads: a step's fixed costs, not its
   weights). Each is converted to f32, bf16 and q8_0 GGUFs by llama.cpp's own
   converter, and to q4_0 by llama-quantize (scripts/bench/llama_cpp.sh, which builds llama.cpp first
   if needed).
2. wizard: the `model` crate's generate bench (best of 3 rounds or more for small models; prefill = one pass over the prompt,
   decode = (generate - prefill) / new tokens) with --dtype float32, bfloat16, int8 and int4; llama.cpp:
   `llama-bench -p P -n N -t T` on the f32, bf16, q8_0 and q4_0 GGUFs (with --depth, its generation
   test runs after P tokens of context, `-d P`, where wizard's decode runs: long prompts). Each runs in its own process; peak RSS is
   its maximum resident set. "decode reads" is the GGUF's size times decode tok/s (a step streams every
   weight once) beside the rate the machine reads memory at (T threads summing 512 MiB, best of 5).
   The engines alternate twice per precision and each keeps its best figures (llama.cpp: its fastest
   repetition); wizard's peak RSS is the bench's own before the bandwidth probe.
3. With --self-speculation, the generate bench also decodes with the target's own int8 (--draft) copy drafting
   (greedy, over the target's KV cache), in rounds alternating with plain ones, and reports the speedup
   over the plain rounds beside it, the acceptance, the measured costs, and whether the tokens are the
   target's.

Prints the CPU and one Markdown table per shape with the ratios wizard / llama.cpp.
"""
import argparse
import json
import pathlib
import resource
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import http_serve  # noqa: E402  (the tokenizer, the d768 model, the CPU description)

REPO = http_serve.REPO
MODELS = REPO / "target" / "bench-models"
LLAMA_SH = http_serve.LLAMA_SH
SHAPES = {
    "d768": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    "1b": dict(n_embd=2048, n_layer=24, n_head=16, n_positions=2048, n_inner=8192),
    # Tiny shapes, where a step's fixed costs (dispatch, threads, small ops) outweigh the weights.
    "d64l2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024),
    "d64l12": dict(n_embd=64, n_layer=12, n_head=4, n_positions=1024),
}
PRECISIONS = [("float32", "f32"), ("bfloat16", "bf16"), ("int8", "q8_0"), ("int4", "q4_0")]


def model_dir(shape):
    return http_serve.MODEL if shape == "d768" else MODELS / f"bench-{shape}"


def make_model(shape, wizard):
    http_serve.make_model(wizard)  # the tokenizer (and the d768 model)
    directory = model_dir(shape)
    if not (directory / "model.safetensors").exists():
        import shutil

        import torch
        from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

        print(f"making {directory}", flush=True)
        directory.mkdir(parents=True, exist_ok=True)
        for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
            if (http_serve.MODEL / name).exists():
                shutil.copy(http_serve.MODEL / name, directory / name)
        torch.manual_seed(0)
        config = GPTBigCodeConfig(
            vocab_size=http_serve.VOCAB, multi_query=True, bos_token_id=0, eos_token_id=0, **SHAPES[shape]
        )
        GPTBigCodeForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    for _, gguf_type in PRECISIONS:
        gguf = MODELS / f"{directory.name}-{gguf_type}.gguf"
        if not gguf.exists() or gguf.stat().st_mtime < (directory / "model.safetensors").stat().st_mtime:
            print(f"converting to {gguf}", flush=True)
            converted = subprocess.run([str(LLAMA_SH), "convert", str(directory), gguf_type, str(gguf)],
                                       capture_output=True, text=True)
            if converted.returncode != 0:
                sys.exit(f"converting {directory} to {gguf_type} failed:\n{converted.stderr[-4000:]}")
    return directory


def run_measured(command):
    """stdout of `command` and its peak RSS in MiB (a fresh child per call, so the maximum is its own)."""
    probe = (
        "import resource, subprocess, sys\n"
        "out = subprocess.run(sys.argv[1:], check=True, capture_output=True, text=True).stdout\n"
        "print(out)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, *command], check=True, capture_output=True, text=True).stdout
    lines = out.rstrip().splitlines()
    return "\n".join(lines[:-1]), int(lines[-1]) / 1024


def llama_bench(gguf, args):
    bench = subprocess.run([str(LLAMA_SH), "paths"], check=True, capture_output=True, text=True).stdout
    binary = next(line.split()[1] for line in bench.splitlines() if line.startswith("llama-bench"))
    common = [binary, "-m", str(gguf), "-t", str(args.threads), "-o", "json"]
    if args.depth:
        # Decode after the prompt, as wizard's is: llama-bench's generation test at that depth.
        runs = [["-p", str(args.prompt_tokens), "-n", "0"], ["-p", "0", "-n", str(args.new_tokens),
                                                            "-d", str(args.prompt_tokens)]]
    else:
        runs = [["-p", str(args.prompt_tokens), "-n", str(args.new_tokens)]]
    rate, rss = {}, 0.0
    for run in runs:
        out, run_rss = run_measured([*common, *run])
        rss = max(rss, run_rss)
        # The fastest repetition, as wizard's figures are its fastest round.
        rate.update({("prefill" if r["n_prompt"] else "decode"): max(r.get("samples_ts") or [r["avg_ts"]])
                     for r in json.loads(out)})
    return rate["prefill"], rate["decode"], rss


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="d768,1b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--depth", action="store_true",
                        help="llama.cpp decodes after the prompt (llama-bench -d), as wizard does; without it, "
                             "llama-bench's generation test starts from an empty context")
    parser.add_argument("--self-speculation", action="store_true")
    parser.add_argument("--draft", default="int8", help="the target's own copy that drafts: int8 or int4")
    parser.add_argument("--precisions", default=",".join(d for d, _ in PRECISIONS),
                        help="which of float32,bfloat16,int8,int4 to run")
    parser.add_argument("--wizard", type=pathlib.Path, default=REPO / "target" / "release" / "wizard")
    args = parser.parse_args()
    subprocess.run(["cargo", "bench", "-p", "model", "--bench", "generate", "--no-run"], check=True, cwd=REPO,
                   stderr=subprocess.DEVNULL)
    bench = ["cargo", "bench", "-q", "-p", "model", "--bench", "generate", "--"]
    print(http_serve.cpu_description())
    print(f"threads={args.threads} prompt={args.prompt_tokens} new={args.new_tokens}"
          f"{' (llama.cpp decodes at that depth)' if args.depth else ''}\n")
    for shape in args.shapes.split(","):
        directory = make_model(shape, args.wizard)
        print(f"### {shape}\n")
        print("| precision | prefill tok/s wizard / llama.cpp (ratio) | decode tok/s wizard / llama.cpp (ratio) "
              "| decode reads GB/s wizard / llama.cpp (machine) | peak RSS MiB wizard / llama.cpp |")
        print("| --- | --- | --- | --- | --- |")
        speculation = None
        for dtype, gguf_type in [p for p in PRECISIONS if p[0] in args.precisions.split(",")]:
            quantized = dtype in ("int8", "int4")
            extra = [args.draft] if args.self_speculation and not quantized and speculation is None else []
            gguf = MODELS / f"{directory.name}-{gguf_type}.gguf"
            # The two engines alternate, twice, and each keeps its best: this VM's memory bandwidth
            # moves between minutes (28 to 74 GB/s within one run), and a single turn each compared
            # whichever moments they happened to get.
            ours, llama, rss = None, None, 0.0
            for turn in range(2):
                out, _ = run_measured([*bench, str(directory), str(args.prompt_tokens), str(args.new_tokens),
                                       str(args.threads), "cpu", dtype, *(extra if turn == 0 else [])])
                run = json.loads(out.strip().splitlines()[-1])
                if turn == 0 and extra:
                    speculation = (dtype, run)
                else:
                    # A turn that also loaded the drafting copy holds two models.
                    rss = max(rss, run["peak_rss_mib"])
                if ours is None or run["decode_tokens_per_s"] > ours["decode_tokens_per_s"]:
                    ours = {**run, "prefill_tokens_per_s": max(run["prefill_tokens_per_s"],
                                                               ours["prefill_tokens_per_s"] if ours else 0)}
                pp, tg, llama_rss = llama_bench(gguf, args)
                llama = (max(pp, llama[0]), max(tg, llama[1]), llama_rss) if llama else (pp, tg, llama_rss)
            pp, tg, llama_rss = llama
            # Each decode step streams every weight once: the GGUF's size per token, against what the
            # machine reads at most (measured by the bench beside it).
            reads = lambda tokens_per_s: gguf.stat().st_size * tokens_per_s / 1e9  # noqa: E731
            print(f"| {dtype} / {gguf_type} "
                  f"| {ours['prefill_tokens_per_s']:.0f} / {pp:.0f} ({ours['prefill_tokens_per_s'] / pp:.2f}x) "
                  f"| {ours['decode_tokens_per_s']:.1f} / {tg:.1f} ({ours['decode_tokens_per_s'] / tg:.2f}x) "
                  f"| {reads(ours['decode_tokens_per_s']):.1f} / {reads(tg):.1f} ({ours['memory_read_gb_per_s']:.1f}) "
                  f"| {rss:.0f} / {llama_rss:.0f} |", flush=True)
        if speculation:
            dtype, ours = speculation
            print(f"\nself-speculation ({dtype} target, its {args.draft} copy drafting, greedy): "
                  f"{ours['speculative_decode_tokens_per_s']:.1f} tok/s vs {ours['plain_beside_decode_tokens_per_s']:.1f} "
                  f"alone in the rounds beside ({ours['speculative_speedup']:.2f}x, medians of {ours['rounds']} "
                  f"alternated rounds), acceptance {ours['acceptance']:.3f}, {ours['target_passes']:.1f} target passes "
                  f"per 128 tokens, identical to the target: {ours['identical_to_target']}; the pair's first "
                  f"generation in the process {ours['first_speculative_speedup']:.2f}x a plain one beside it; the "
                  f"control (the loop with nothing to draft) {ours['no_drafter_speedup']:.2f}x; {ours['costs']}")
        print(flush=True)


if __name__ == "__main__":
    main()
