"""Training tokens/s: `wizard train` vs a Python loop with transformers' GPTBigCodeForCausalLM and
torch.optim.AdamW, same model shape (StarCoder vocabulary), batch, sequence length and threads, one run.
Prints Markdown rows with the ratio and MFU.

CPU (fp32, ~30M):   .wizard/python scripts/bench/train.py --threads 2
GPU (bf16, ~125M):  python3 scripts/bench/train.py --device cuda --model 125m --precision bf16 \
                        --batch-size 16 --seq-len 1024 --steps 20 --wizard target/gpu-kit/wizard --zero3-ranks 2
On CUDA the peer runs under torch.autocast(bfloat16) with AdamW(fused=True) and SDPA attention, as
a tuned transformers user would; MFU is 6 * parameters * tokens/s over a measured bf16 matmul peak.
--zero3-ranks N also trains N ranks on the device(s) with ZeRO-3 and prints each rank's peak memory.
"""
import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]
SHAPES = {"30m": dict(n_embd=384, n_layer=6, n_head=6), "125m": dict(n_embd=768, n_layer=12, n_head=12)}

HF_LOOP = r"""
import json, sys, time, torch
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM
config, args = json.loads(sys.argv[1]), json.loads(sys.argv[2])
torch.set_num_threads(args["threads"])
torch.manual_seed(0)
device = torch.device(args["device"])
config.pop("model_type")
model = GPTBigCodeForCausalLM._from_config(GPTBigCodeConfig(**config), attn_implementation="sdpa").to(device).train()
decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or ".ln_" in n)]
rest = [p for n, p in model.named_parameters() if n.endswith("bias") or ".ln_" in n]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=3e-4,
                        betas=(0.9, 0.95), fused=device.type == "cuda")
ids = torch.randint(1, config["vocab_size"], (args["batch"], args["seq"] + 1), device=device)
bf16 = args["precision"] == "bf16"
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
times = []
for step in range(args["steps"]):
    sync()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(ids[:, :-1], labels=ids[:, :-1]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    loss.item()
    times.append(time.perf_counter() - start)
peak_flops = None
if device.type == "cuda":
    n, kind = 8192, torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=kind), torch.randn(n, n, device=device, dtype=kind)
    a @ b; sync(); start = time.perf_counter()
    for _ in range(40): a @ b
    sync(); peak_flops = 2 * n ** 3 * 40 / (time.perf_counter() - start)
params = sum(p.numel() for p in model.parameters())
memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
print(json.dumps({"tokens_per_s": [args["batch"] * args["seq"] / t for t in times], "peak_flops": peak_flops,
                  "params": params, "peak_memory": memory}))
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="30m", choices=sorted(SHAPES))
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--wizard", help="a built wizard binary (default: cargo build --release here)")
    parser.add_argument("--zero3-ranks", type=int, default=0)
    args = parser.parse_args()
    if args.wizard:
        wizard = pathlib.Path(args.wizard).resolve()
    else:
        subprocess.run(["cargo", "build", "--release", "-q"], check=True, cwd=REPO)
        wizard = REPO / "target" / "release" / "wizard"
    config = dict(model_type="gpt_bigcode", vocab_size=49152, n_positions=max(1024, args.seq_len),
                  embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                  **SHAPES[args.model])
    skip = 1 if args.device == "cpu" else 3  # warm-up steps left out of the medians
    with tempfile.TemporaryDirectory() as work:
        work = pathlib.Path(work)
        corpus = work / "corpus"
        corpus.mkdir()
        for i in range(200):
            (corpus / f"m{i}.py").write_text("".join(f"def f_{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(60)))
        subprocess.run([wizard, "tokenizer", "train", "--input", corpus, "--vocab-size", "2000", "--out", work / "tok"],
                       check=True, capture_output=True)
        (work / "config.json").write_text(json.dumps(config))
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))

        def wizard_train(out, steps, extra=()):
            command = [wizard, "train", "--model-config", work / "config.json", "--tokenizer", work / "tok",
                       "--data", corpus, "--out", out, "--steps", str(steps), "--seq-len", str(args.seq_len),
                       "--batch-size", str(args.batch_size), "--save-every", "100000", "--fim-rate", "0",
                       "--device", args.device, "--precision", args.precision, *extra]
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(f"wizard train failed:\n{done.stderr}")
            return done.stderr

        def wizard_run(round):
            out = work / f"out{round}"
            stderr = wizard_train(out, args.steps)
            metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            last_line = (stderr.strip().splitlines() or [""])[-1]
            print(f"wizard run {round}: loss {metrics[0]['loss']:.3f} -> {metrics[-1]['loss']:.3f}; {last_line}", flush=True)
            metrics = metrics[skip:]
            memory = re.findall(r"peak CUDA memory ([\d.]+) MiB", stderr)
            return (statistics.median(m["tokens_per_s"] for m in metrics), statistics.median(m["mfu"] for m in metrics),
                    float(memory[0]) if memory else None)

        def hf_run():
            settings = dict(threads=args.threads, device=args.device, precision=args.precision, steps=args.steps,
                            batch=args.batch_size, seq=args.seq_len)
            out = subprocess.run([sys.executable, "-c", HF_LOOP, json.dumps(config), json.dumps(settings)],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(f"transformers loop failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
                return None
            result = json.loads(out.stdout)
            result["median"] = statistics.median(result["tokens_per_s"][skip:])
            return result

        # Alternate the two, twice, and keep each one's best: a busy moment hurts neither side alone.
        runs = [(wizard_run(r), hf_run()) for r in range(2)]
        ours, mfu, our_memory = max(r[0] for r in runs)
        peers = [r[1] for r in runs if r[1]]
        print(f"{args.device} {args.precision}, {args.model}, batch={args.batch_size} seq={args.seq_len} "
              f"steps={args.steps} threads={args.threads}")
        if not peers:
            print(f"wizard: {ours:.0f} tok/s, MFU {100 * mfu:.1f}% (against its measured matmul peak)")
        else:
            theirs = max(peers, key=lambda r: r["median"])
            params = theirs["params"]
            their_mfu = "n/a"
            if theirs["peak_flops"]:
                their_mfu = f"{100 * 6 * params * theirs['median'] / theirs['peak_flops']:.1f}%"
            print("| wizard tok/s | transformers+AdamW tok/s | ratio | wizard MFU | transformers MFU |")
            print("| --- | --- | --- | --- | --- |")
            print(f"| {ours:.0f} | {theirs['median']:.0f} | {ours / theirs['median']:.2f}x | {100 * mfu:.1f}% "
                  f"| {their_mfu} |")
            if theirs["peak_flops"]:
                print(f"{params / 1e6:.1f}M parameters; measured matmul peak (transformers side): "
                      f"{theirs['peak_flops'] / 1e12:.0f} TFLOPS")
            if our_memory is not None and theirs["peak_memory"]:
                print(f"peak CUDA memory: wizard {our_memory:.0f} MiB, transformers {theirs['peak_memory'] / 2**20:.0f} MiB")
        if args.zero3_ranks:
            stderr = wizard_train(work / "zero3", 3, ["--nproc", str(args.zero3_ranks), "--zero", "3"])
            print(f"ZeRO-3 on {args.zero3_ranks} ranks:")
            for line in stderr.splitlines():
                if re.match(r"rank \d+/\d+ zero 3", line):
                    print("  " + line)


if __name__ == "__main__":
    main()
