"""`wizard serve` and speculative decoding on CPU, against transformers' assisted generation.

Usage: .wizard/python scripts/bench/serve.py [--threads 2] [--steps 300] [--requests 40]
                                            [--target 256:6:4] [--draft 96:2:2] [--new-tokens 32] [--train-only] [--distill]
(--target/--draft: width:layers:heads; each pair is cached in its own folder)

1. Trains a tokenizer (`wizard tokenizer train`) on the repository's Rust sources, then a target
   GPTBigCode (~5M parameters) and a draft about 1/10 of its size on the same data with transformers
   (a short CPU run; cached under target/bench-serve).
2. Latency: p50/p95 of `textDocument/inlineCompletion` through `wizard serve` over stdio, 32 tokens at
   most per completion (block rules may end one earlier; the mean is reported).
3. Speculative decoding (`cargo bench -p lsp --bench speculative`): greedy, 32 new tokens, wall time with
   no drafter, the draft model and prompt lookup, on a "code" workload (prefixes of source files) and
   an "edit" workload (re-typing a block that is already in the file); outputs must be identical.
4. transformers on the same pair and prompts: `generate` plain, with `assistant_model`, and with
   `prompt_lookup_num_tokens`.
"""
import argparse
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
WORK = REPO / "target" / "bench-serve"
WIZARD = REPO / "target" / "release" / "wizard"
SOURCES = ["model/src", "lsp/src", "src", "eval/src", "evolve/src", "kernels/src"]

def dims(text):
    n_embd, n_layer, n_head = map(int, text.split(":"))
    return dict(n_embd=n_embd, n_layer=n_layer, n_head=n_head)


def corpus_files():
    files = []
    for directory in SOURCES:
        files += sorted((REPO / directory).rglob("*.rs"))
    return files


def train_tokenizer():
    out = REPO / "target" / "bench-serve" / "tokenizer"
    if not (out / "tokenizer.json").exists():
        args = [str(WIZARD), "tokenizer", "train", "--vocab-size", "2048", "--out", str(out)]
        for directory in SOURCES:
            args += ["--input", str(REPO / directory)]
        subprocess.run(args, check=True)
    return out


def train(name, dims, tokenizer_dir, steps, threads, lr=2e-3, teacher=None):
    """With `teacher` (a model directory), the model learns the teacher's next-token distributions on
    the same batches (KL divergence, as DistillSpec does for drafts) instead of the data's next tokens."""
    out = WORK / name
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoTokenizer, GPTBigCodeConfig, GPTBigCodeForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = []
    for path in corpus_files():
        ids += tokenizer(path.read_text(errors="replace"))["input_ids"] + [0]
    data = torch.tensor(ids)
    config = GPTBigCodeConfig(vocab_size=len(tokenizer), n_positions=512, bos_token_id=0, eos_token_id=0, **dims)
    model = GPTBigCodeForCausalLM(config)
    teacher = teacher and GPTBigCodeForCausalLM.from_pretrained(teacher).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    seq, batch = 128, 16
    started = time.time()
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,))
        x = torch.stack([data[s : s + seq] for s in starts])
        if teacher is None:
            loss = model(x, labels=x).loss
        else:
            with torch.no_grad():
                wanted = torch.softmax(teacher(x).logits.float(), -1)
            guessed = torch.log_softmax(model(x).logits, -1)
            loss = torch.nn.functional.kl_div(guessed.flatten(0, 1), wanted.flatten(0, 1), reduction="batchmean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"{name}: step {step} loss {loss.item():.3f} ({time.time() - started:.0f} s)", file=sys.stderr)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    (out / "params.txt").write_text(str(params))
    return out


def prompts(seed=0):
    """Twelve prompts per workload, from the sources (the training data)."""
    rng = random.Random(seed)
    files = [p.read_text(errors="replace") for p in corpus_files()]
    files = [f for f in files if len(f) > 3000]
    out = []
    for i in range(12):
        text = rng.choice(files)
        cut = rng.randrange(1000, len(text) - 1000)
        cut = text.rfind("\n", 0, cut) + 1
        out.append({"workload": "code", "prompt": text[max(0, cut - 1000) : cut]})
        block = text[cut : cut + 400]
        out.append({"workload": "edit", "prompt": text[max(0, cut - 300) : cut] + block + "\n\n" + block[:150]})
    return out


class Lsp:
    def __init__(self, model, options):
        self.proc = subprocess.Popen(
            [str(WIZARD), "serve", "--device", "cpu", "--model", str(model)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.id = 0
        self.request("initialize", {"processId": None, "capabilities": {}, "initializationOptions": options})
        self.notify("initialized", {})

    def send(self, message):
        body = json.dumps(message).encode()
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.proc.stdin.flush()

    def read(self):
        length = None
        while True:
            line = self.proc.stdout.readline().decode().strip()
            if not line:
                break
            if line.startswith("Content-Length:"):
                length = int(line.split(":")[1])
        return json.loads(self.proc.stdout.read(length))

    def notify(self, method, params):
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def request(self, method, params):
        self.id += 1
        self.send({"jsonrpc": "2.0", "id": self.id, "method": method, "params": params})
        while True:
            message = self.read()
            if message.get("id") == self.id and "method" not in message:
                return message

    def close(self):
        self.request("shutdown", None)
        self.notify("exit", None)
        self.proc.wait(10)


def forced(model):
    """A copy of `model` with the same compute whose every prediction is "x": completions are then
    exactly `maxTokens` long, which the block rules would otherwise cut."""
    out = WORK / "target-forced"
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    net = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        wte = net.transformer.wte.weight
        net.transformer.ln_f.weight.zero_()
        net.transformer.ln_f.bias.copy_(wte[tokenizer.convert_tokens_to_ids("x")] * 100)
    net.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def lsp_latency(model, requests):
    files = [p for p in corpus_files() if p.stat().st_size > 4000]
    server = Lsp(model, {"maxTokens": 32, "contextBudget": 384, "gamma": 0})
    latencies, lengths = [], []
    rng = random.Random(1)
    for i in range(requests + 3):
        path = rng.choice(files)
        text = path.read_text(errors="replace")
        lines = text.split("\n")
        # A cursor at the end of a line of code: the rest of the line is asked for.
        line = rng.choice([n for n in range(20, len(lines) - 20) if lines[n].strip() and not lines[n].rstrip().endswith("{")])
        uri = f"file:///bench/{i}.rs"
        server.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "rust", "version": 1, "text": text}})
        column = len(lines[line].encode("utf-16-le")) // 2
        started = time.perf_counter()
        answer = server.request(
            "textDocument/inlineCompletion",
            {"textDocument": {"uri": uri}, "position": {"line": line, "character": column}, "context": {"triggerKind": 2}},
        )
        elapsed = time.perf_counter() - started
        server.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
        if i < 3:
            continue  # warm-up
        latencies.append(elapsed * 1e3)
        result = answer.get("result") or []
        lengths.append(len(result[0]["insertText"]) if result else 0)
    server.close()
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    return {"p50_ms": statistics.median(latencies), "p95_ms": p95, "mean_chars": statistics.mean(lengths), "requests": len(latencies)}


def lsp_typing(model, lines_typed, reuse_options=({"reusePrefix": True}, {"reusePrefix": False})):
    """Typing on in one document: a line of code typed a character at a time, a completion asked after
    each one (as editors do), by two servers side by side that differ only in `options`; requests
    alternate between them so both see the same machine. Returns per-server latencies and whether
    their completions agreed."""
    files = [p for p in corpus_files() if p.stat().st_size > 8000]
    base = {"maxTokens": 32, "contextBudget": 1024, "gamma": 0}
    servers = [Lsp(model, dict(base, **options)) for options in reuse_options]
    latencies = [[] for _ in servers]
    same = total = 0
    rng = random.Random(2)
    for i in range(lines_typed):
        text = rng.choice(files).read_text(errors="replace")
        lines = text.split("\n")
        line = rng.choice([n for n in range(100, len(lines) - 20) if len(lines[n].strip()) > 20])
        target_line = lines[line]
        uri = f"file:///bench/typing{i}.rs"
        for server in servers:
            doc = "\n".join(lines[:line] + [""] + lines[line + 1 :])
            server.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "rust", "version": 1, "text": doc}})
        indent = len(target_line) - len(target_line.lstrip())
        for k in range(indent + 1, len(target_line) + 1):
            doc = "\n".join(lines[:line] + [target_line[:k]] + lines[line + 1 :])
            change = {"textDocument": {"uri": uri, "version": k + 2}, "contentChanges": [{"text": doc}]}
            column = len(target_line[:k].encode("utf-16-le")) // 2
            params = {"textDocument": {"uri": uri}, "position": {"line": line, "character": column}, "context": {"triggerKind": 2}}
            answers = []
            for n, server in enumerate(servers):
                server.notify("textDocument/didChange", change)
                started = time.perf_counter()
                answer = server.request("textDocument/inlineCompletion", params)
                latencies[n].append((time.perf_counter() - started) * 1e3)
                answers.append(json.dumps(answer.get("result")))
            same += answers[0] == answers[1]
            total += 1
        for server in servers:
            server.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
    for server in servers:
        server.close()
    def summary(values):
        values = sorted(values)
        return {"p50_ms": statistics.median(values), "p95_ms": values[round(0.95 * (len(values) - 1))], "mean_ms": statistics.mean(values)}
    return {"requests": total, "identical": same, "servers": [summary(v) for v in latencies]}


HF_ASSISTED = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
target_dir, draft_dir, prompts_file, new, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
tokenizer = AutoTokenizer.from_pretrained(target_dir)
target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
draft = AutoModelForCausalLM.from_pretrained(draft_dir).eval()
prompts = [json.loads(l) for l in open(prompts_file)]
def timed(f):
    start = time.perf_counter(); f(); return time.perf_counter() - start
kinds = {"none": {}, "draft-model": {"assistant_model": draft}, "prompt-lookup": {"prompt_lookup_num_tokens": 3}}
for workload in sorted({p["workload"] for p in prompts}):
    items = [tokenizer(p["prompt"], return_tensors="pt").input_ids for p in prompts if p["workload"] == workload]
    base, outs = None, None
    for name, extra in kinds.items():
        kw = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0, **extra)
        try:
            with torch.no_grad():
                target.generate(items[0], **kw)
                seconds, results = 0.0, []
                if name == "none":
                    one = dict(kw, max_new_tokens=1, min_new_tokens=1)
                    prefill = sum(min(timed(lambda: target.generate(ids, **one)) for _ in range(3)) for ids in items)
                for ids in items:
                    best = float("inf")
                    for _ in range(3):
                        start = time.perf_counter()
                        out = target.generate(ids, **kw)[0, ids.shape[1]:].tolist()
                        best = min(best, time.perf_counter() - start)
                    seconds += best
                    results.append(out)
        except Exception as error:
            print(json.dumps({"workload": workload, "drafter": name, "error": repr(error)[:300]}))
            continue
        if name == "none":
            base, outs = seconds, results
        same = sum(a == b for a, b in zip(results, outs))
        print(json.dumps({"workload": workload, "drafter": name, "seconds": seconds, "speedup": base / seconds, "identical": same,
                          "decode_speedup": (base - prefill) / (seconds - prefill)}))
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--reuse-latency", action="store_true", help="report the last LSP latency run")
    parser.add_argument("--target", default="256:6:4", help="width:layers:heads")
    parser.add_argument("--draft", default="96:2:2", help="width:layers:heads")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--target-lr", type=float, default=2e-3)
    parser.add_argument("--target-steps", type=int, help="default: --steps")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--distill", action="store_true", help="the draft learns the target's predictions")
    parser.add_argument("--typing", type=int, metavar="LINES", help="only the typing benchmark: LINES lines typed")
    args = parser.parse_args()
    global WORK
    if (args.target, args.draft) != ("256:6:4", "96:2:2"):
        WORK = WORK / f"{args.target.replace(':', 'x')}-{args.draft.replace(':', 'x')}"
    WORK.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    tokenizer = train_tokenizer()
    target = train("target", dims(args.target), tokenizer, args.target_steps or args.steps, args.threads, args.target_lr)
    name, teacher = ("draft-distilled", target) if args.distill else ("draft", None)
    draft = train(name, dims(args.draft), tokenizer, args.steps, args.threads, teacher=teacher)
    prompts_file = WORK / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps(p) + "\n" for p in prompts()))
    if args.train_only:
        return
    if args.typing:
        for name, model in (("32 tokens (forced output)", forced(target)), ("trained target", target)):
            r = lsp_typing(model, args.typing)
            (on, off) = r["servers"]
            print(f"| {name} | {r['requests']} | {off['p50_ms']:.0f} / {off['p95_ms']:.0f} ms | {on['p50_ms']:.0f} / "
                  f"{on['p95_ms']:.0f} ms | {off['mean_ms'] / on['mean_ms']:.2f}x | {r['identical']}/{r['requests']} |")
        return
    sizes = {name: int((path / "params.txt").read_text()) for name, path in (("target", target), ("draft", draft))}

    if args.reuse_latency and (WORK / "latency.json").exists():
        latency, natural = json.loads((WORK / "latency.json").read_text())
    else:
        latency = lsp_latency(forced(target), args.requests)
        natural = lsp_latency(target, args.requests)
        (WORK / "latency.json").write_text(json.dumps([latency, natural]))
    ours = subprocess.run(
        ["cargo", "bench", "-q", "-p", "lsp", "--bench", "speculative", "--",
         str(target), str(draft), str(prompts_file), str(args.new_tokens), str(args.threads)],
        check=True, capture_output=True, text=True, cwd=REPO,
    ).stdout
    (WORK / "wizard.jsonl").write_text(ours)
    print(ours, file=sys.stderr)
    theirs = subprocess.run(
        [sys.executable, "-c", HF_ASSISTED, str(target), str(draft), str(prompts_file), str(args.new_tokens), str(args.threads)],
        check=True, stdout=subprocess.PIPE, text=True,
    ).stdout
    (WORK / "transformers.jsonl").write_text(theirs)
    ours = [json.loads(l) for l in ours.splitlines() if l.startswith("{")]
    passes = [r for r in ours if "pass_ms" in r]
    ours = [r for r in ours if "workload" in r]
    theirs = {(r["workload"], r["drafter"]): r for r in map(json.loads, theirs.splitlines()) if "error" not in r}

    print(f"target {sizes['target'] / 1e6:.1f}M parameters, draft {sizes['draft'] / 1e6:.2f}M "
          f"({sizes['draft'] / sizes['target']:.2f} of the target), {args.threads} threads, CPU, "
          f"{args.new_tokens} new tokens\n")
    print("| LSP inlineCompletion, maxTokens 32 | requests | p50 | p95 | mean completion |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in (("32 tokens (target's compute, forced output)", latency), ("trained target (block rules end early)", natural)):
        print(f"| {name} | {r['requests']} | {r['p50_ms']:.0f} ms | {r['p95_ms']:.0f} ms | {r['mean_chars']:.1f} chars |")
    if passes:
        print("\n| model | one pass over k new tokens, ms: k = " + " / ".join(passes[0]["pass_ms"]) + " |\n| --- | --- |")
    for r in passes:
        print(f"| {r['model']} | " + " / ".join(f"{ms:.2f}" for ms in r["pass_ms"].values()) + " |")
    print()
    print("| workload | drafter | wizard s | speedup (wall) | speedup (decode) | identical | acceptance "
          "| transformers s | speedup (wall) | speedup (decode) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    nan = float("nan")
    for r in ours:
        t = theirs.get((r["workload"], r["drafter"]), {})
        print(f"| {r['workload']} | {r['drafter']} | {r['seconds']:.2f} | {r['speedup']:.2f}x | {r['decode_speedup']:.2f}x "
              f"| {r['identical']}/{r['prompts']} | {r['acceptance']:.2f} | {t.get('seconds', nan):.2f} "
              f"| {t.get('speedup', nan):.2f}x | {t.get('decode_speedup', nan):.2f}x |")


if __name__ == "__main__":
    main()
