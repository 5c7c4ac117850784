"""Completion throughput and latency of `wizard serve --http` vs llama.cpp's `llama-server`, same weights.

Usage: .wizard/python scripts/bench/http_serve.py [--clients 1,4,16] [--requests 8] [--prompt-tokens 128]
                                                 [--max-tokens 64] [--threads 2] [--slots N]
                                                 [--only wizard|llama] [--wizard PATH]

1. Model: a random GPTBigCode with d768, 12 layers, 12 heads, multi-query attention, n_positions 1024
   (76M parameters), made with transformers under target/bench-models/http-d768 beside a
   byte-level BPE tokenizer of 4000 tokens (StarCoder's special tokens) trained on the repository's Rust
   sources, and converted to an f32 GGUF by scripts/bench/llama_cpp.sh (which builds llama.cpp first
   if needed). Both servers run it in fp32 on the CPU with --threads threads.
2. Load: for each client count C, a fresh server of each kind, then C client threads (the standard
   library's http.client, one keep-alive connection each) each send --requests requests back to back:
   POST /v1/completions with a prompt of about --prompt-tokens tokens of source text (a different one
   for every request; the same set for both servers), max_tokens --max-tokens, temperature 0, not
   streamed. llama-server gets `ignore_eos` and runs with -np C slots (--slots to fix the count) and a
   context of n_positions per slot; wizard's completions may end at EOS, so throughput counts
   usage.completion_tokens, never max_tokens.
3. Prints the CPU, then a Markdown table per client count: generated tokens/s (all completion tokens
   over the wall time from the first request to the last response), p50/p95 request latency, and the
   ratios wizard / llama-server; mean completion tokens per request; how many greedy completions the
   two servers agree on (wizard's text a prefix of llama-server's: same weights, fp32, both greedy); and
   the CPU time other processes took during the run, as a share of all CPUs. Both servers spin-wait
   between parallel regions, so a competing build or test run slows them far more than its share:
   numbers taken beside one are not comparable.

wizard is skipped, with a message, if its binary has no `serve --http`. Server logs go to
target/bench-http/.
"""
import argparse
import http.client
import json
import os
import pathlib
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
MODEL = REPO / "target" / "bench-models" / "http-d768"
GGUF = REPO / "target" / "bench-models" / "http-d768-f32.gguf"
LOGS = REPO / "target" / "bench-http"
LLAMA_SH = REPO / "scripts" / "bench" / "llama_cpp.sh"
SOURCES = ["model/src", "lsp/src", "src", "eval/src", "evolve/src", "kernels/src"]
DIMS = dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024)
VOCAB = 4000
SPECIAL_TOKENS = [
    "<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<gh_stars>",
    "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
    "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>", "<commit_after>", "<reponame>",
]


def source_files():
    files = []
    for directory in SOURCES:
        files += sorted((REPO / directory).rglob("*.rs"))
    return files


def train_tokenizer(wizard):
    """`wizard tokenizer train` on the Rust sources; without a wizard binary, the same recipe (byte-level
    BPE, StarCoder's special tokens at ids 0-18) with the `tokenizers` package."""
    if wizard.exists():
        args = [str(wizard), "tokenizer", "train", "--vocab-size", str(VOCAB), "--out", str(MODEL)]
        for directory in SOURCES:
            args += ["--input", str(REPO / directory)]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(f) for f in source_files()], trainer)
    MODEL.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(MODEL / "tokenizer.json"))
    config = dict(tokenizer_class="GPT2TokenizerFast", model_max_length=DIMS["n_positions"], bos_token=SPECIAL_TOKENS[0],
                  eos_token=SPECIAL_TOKENS[0], unk_token=SPECIAL_TOKENS[0], add_prefix_space=False,
                  additional_special_tokens=SPECIAL_TOKENS[1:])
    (MODEL / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def make_model(wizard):
    if not (MODEL / "model.safetensors").exists():
        print(f"making {MODEL}", flush=True)
        train_tokenizer(wizard)
        import torch
        from transformers import AutoTokenizer, GPTBigCodeConfig, GPTBigCodeForCausalLM

        assert len(AutoTokenizer.from_pretrained(MODEL)) == VOCAB
        torch.manual_seed(0)
        config = GPTBigCodeConfig(vocab_size=VOCAB, multi_query=True, bos_token_id=0, eos_token_id=0, **DIMS)
        GPTBigCodeForCausalLM(config).save_pretrained(MODEL, safe_serialization=True)
    if not GGUF.exists() or GGUF.stat().st_mtime < (MODEL / "model.safetensors").stat().st_mtime:
        print(f"converting to {GGUF}", flush=True)
        subprocess.run([str(LLAMA_SH), "convert", str(MODEL), "f32", str(GGUF)], check=True, stdout=subprocess.DEVNULL)


def make_prompts(count, tokens, seed=0):
    """`count` different windows of about `tokens` tokens cut from the Rust sources."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    encoded = [tokenizer.encode(f.read_text(errors="replace")).ids for f in source_files()]
    encoded = [ids for ids in encoded if len(ids) > tokens]
    rng = random.Random(seed)
    prompts = []
    while len(prompts) < count:
        ids = rng.choice(encoded)
        start = rng.randrange(len(ids) - tokens)
        text = tokenizer.decode(ids[start:start + tokens])
        if "<|endoftext|>" not in text and text.strip() and text not in prompts:
            prompts.append(text)
    return prompts


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess (its own process group) that is ready once GET /health answers 200."""

    def __init__(self, name, command, port, log):
        self.name, self.port = name, port
        self.log = open(log, "w")
        print(f"  $ {' '.join(command)}", file=sys.stderr, flush=True)
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.log_path = log

    def wait_ready(self, timeout=300):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout} s; see {self.log_path}")

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def complete(conn, body):
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {data[:500]!r}")
    return json.loads(data)


def load(port, prompts, clients, extra):
    """`clients` threads, each sending its share of `prompts` back to back on one connection; returns
    (wall seconds, per-request latencies, completion tokens, prompt tokens, completions)."""
    shares = [prompts[i::clients] for i in range(clients)]
    latencies, completion_tokens, prompt_tokens = [], [], []
    texts = [None] * len(prompts)
    errors = []
    start = threading.Barrier(clients + 1)
    lock = threading.Lock()

    def client(index):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        start.wait()
        try:
            for j, prompt in enumerate(shares[index]):
                body = {"model": "bench", "prompt": prompt, **extra}
                begin = time.perf_counter()
                result = complete(conn, body)
                elapsed = time.perf_counter() - begin
                with lock:
                    latencies.append(elapsed)
                    completion_tokens.append(result["usage"]["completion_tokens"])
                    prompt_tokens.append(result["usage"]["prompt_tokens"])
                    texts[index + j * clients] = result["choices"][0]["text"]
        except Exception as error:  # reported by the caller
            errors.append(error)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    begin = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - begin
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed, first: {errors[0]}")
    return wall, latencies, completion_tokens, prompt_tokens, texts


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def cpu_seconds(pid=None):
    """CPU seconds used by all processes (from /proc/stat), or by process `pid` with all its threads."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        if pid is None:
            fields = pathlib.Path("/proc/stat").read_text().split("\n")[0].split()[1:]
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[:8])
            return (user + nice + system + irq + softirq + steal) / tick
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    except (OSError, ValueError, IndexError):
        return 0.0


def measure(server, warmup, prompts, clients, args, extra):
    """The warm-up prompt is not among `prompts`: llama-server would reuse its cached KV."""
    body = {"max_tokens": args.max_tokens, "temperature": 0, "stream": False, **extra}
    server.wait_ready()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    complete(conn, {"model": "bench", "prompt": warmup, **body})
    conn.close()
    before = cpu_seconds(), cpu_seconds(server.process.pid), cpu_seconds(os.getpid())
    wall, latencies, completion, prompt, texts = load(server.port, prompts, clients, body)
    after = cpu_seconds(), cpu_seconds(server.process.pid), cpu_seconds(os.getpid())
    total, served, client = (b - a for a, b in zip(before, after))
    return dict(
        # Busy CPU time of everything else (another build, tests) as a share of all CPUs: the
        # servers spin-wait between OpenMP regions, and a competitor makes them collapse.
        others=max(0.0, total - served - client) / (wall * os.cpu_count()),
        tokens_per_s=sum(completion) / wall,
        p50=percentile(latencies, 50),
        p95=percentile(latencies, 95),
        completion_tokens=sum(completion) / len(completion),
        prompt_tokens=sum(prompt) / len(prompt),
        wall=wall,
        texts=texts,
    )


def wizard_command(wizard, port, args):
    """`wizard serve --http` with the benchmark's threads, dtype and token limit (where the binary has the
    flag), or the reason it cannot run."""
    if not wizard.exists():
        return None, f"{wizard} does not exist (cargo build --release)"
    help_text = subprocess.run([str(wizard), "serve", "--help"], capture_output=True, text=True).stdout
    def has(flag):
        return re.search(rf"\s{flag}[\s<=,]", help_text) is not None

    if not has("--http"):
        return None, f"{wizard} has no `serve --http` (rebuild it: cargo build --release)"
    command = [str(wizard), "serve", "--http", f"127.0.0.1:{port}", "--model", str(MODEL)]
    # `serve` defaults to half the cores (an editor's machine is busy); the benchmark gives both servers
    # the same threads.
    for flag, value in [("--threads", args.threads), ("--device", "cpu"), ("--dtype", "float32"),
                        ("--max-tokens", args.max_tokens)]:
        if has(flag):
            command += [flag, str(value)]
    return command, None


def cpu_description():
    model, flags = "unknown", []
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            if key.strip() == "flags" and not flags:
                flags = value.split()
    except OSError:
        pass
    simd = [f for f in flags if any(w in f for w in ("avx", "fma", "f16c", "amx", "vnni", "bf16"))]
    return f"{model}, {os.cpu_count()} logical CPUs; SIMD flags: {' '.join(simd) or 'none'}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,16", help="comma-separated concurrent client counts")
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--slots", type=int, help="llama-server -np (default: the client count)")
    parser.add_argument("--only", choices=["wizard", "llama"], help="run one server only")
    parser.add_argument("--wizard", type=pathlib.Path, default=REPO / "target" / "release" / "wizard")
    args = parser.parse_args()
    # `kill` (and SIGINT, which a shell ignores in background jobs) unwinds the `with` blocks that stop the
    # servers, instead of leaving them running.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda number, frame: sys.exit(128 + number))
    clients_list = [int(c) for c in args.clients.split(",")]

    wizard_problem = "not asked for (--only llama)"
    if args.only != "llama":
        _, wizard_problem = wizard_command(args.wizard, 0, args)
    if wizard_problem:
        print(f"wizard skipped: {wizard_problem}", file=sys.stderr)
    run_llama = args.only != "wizard"
    if args.only == "wizard" and wizard_problem:
        sys.exit(1)
    if run_llama:
        subprocess.run([str(LLAMA_SH), "build"], check=True, stdout=subprocess.DEVNULL)
        llama_server = pathlib.Path(subprocess.run([str(LLAMA_SH), "paths"], check=True, capture_output=True,
                                                   text=True).stdout.split()[1])
        version = subprocess.run([str(llama_server), "--version"], capture_output=True, text=True)
        llama_version = (version.stdout + version.stderr).strip().splitlines()[0] if version.returncode == 0 else "?"

    make_model(args.wizard)
    LOGS.mkdir(parents=True, exist_ok=True)

    print(f"CPU: {cpu_description()}")
    print(f"model: GPTBigCode d{DIMS['n_embd']} L{DIMS['n_layer']} H{DIMS['n_head']} MQA, vocab {VOCAB}, fp32; "
          f"threads={args.threads} prompt~{args.prompt_tokens} max_tokens={args.max_tokens} "
          f"requests/client={args.requests}")
    if run_llama:
        print(f"llama-server: {llama_version}, -np {'= clients' if args.slots is None else args.slots}, "
              f"-c {DIMS['n_positions']} per slot, ignore_eos")
    print()
    rows = []
    for clients in clients_list:
        warmup, *prompts = make_prompts(1 + clients * args.requests, args.prompt_tokens, seed=clients)
        results = {}
        if not wizard_problem:
            port = free_port()
            command, _ = wizard_command(args.wizard, port, args)
            with Server("wizard", command, port, LOGS / f"wizard-{clients}.log") as server:
                results["wizard"] = measure(server, warmup, prompts, clients, args, {})
        if run_llama:
            slots = args.slots or clients
            port = free_port()
            command = [str(llama_server), "-m", str(GGUF), "--host", "127.0.0.1", "--port", str(port),
                       "-np", str(slots), "-t", str(args.threads), "-c", str(DIMS["n_positions"] * slots),
                       "--no-webui"]
            with Server("llama-server", command, port, LOGS / f"llama-server-{clients}.log") as server:
                results["llama"] = measure(server, warmup, prompts, clients, args, {"ignore_eos": True})
        rows.append((clients, results))
        for name, r in results.items():
            print(f"  {clients:>2} clients {name:>6}: {r['tokens_per_s']:.1f} tok/s, p50 {r['p50']:.2f} s, "
                  f"p95 {r['p95']:.2f} s, {r['prompt_tokens']:.0f} prompt / {r['completion_tokens']:.1f} "
                  f"completion tokens per request, {r['wall']:.1f} s, other processes {r['others']:.0%} of the CPUs",
                  file=sys.stderr, flush=True)

    def cell(results, key, fmt):
        w, l = results.get("wizard"), results.get("llama")
        parts = [fmt.format(w[key]) if w else "-", fmt.format(l[key]) if l else "-"]
        ratio = f" ({w[key] / l[key]:.2f}x)" if w and l else ""
        return " / ".join(parts) + ratio

    print("| clients | tokens/s wizard / llama-server (ratio) | p50 latency s wizard / llama-server (ratio) "
          "| p95 latency s wizard / llama-server (ratio) | completion tokens/request | same greedy text "
          "| CPU used by other processes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for clients, results in rows:
        same = "-"
        if "wizard" in results and "llama" in results:
            # wizard's completion may end early at EOS; llama-server ignores EOS.
            pairs = list(zip(results["wizard"]["texts"], results["llama"]["texts"]))
            same = f"{sum(b.startswith(a) for a, b in pairs)}/{len(pairs)}"
        tokens = " / ".join(f"{results[k]['completion_tokens']:.1f}" if k in results else "-" for k in ("wizard", "llama"))
        others = " / ".join(f"{results[k]['others']:.0%}" if k in results else "-" for k in ("wizard", "llama"))
        print(f"| {clients} | {cell(results, 'tokens_per_s', '{:.1f}')} | {cell(results, 'p50', '{:.2f}')} "
              f"| {cell(results, 'p95', '{:.2f}')} | {tokens} | {same} | {others} |")


if __name__ == "__main__":
    main()
