"""Scoring texts (log-likelihoods, as lm-evaluation-harness asks an OpenAI-compatible server) with
`wizard serve --http` against transformers, same weights, same token ids.

Usage: .wizard/python scripts/bench/score.py [--prompts 16] [--tokens 512] [--batches 1,4] [--threads 2]
                                           [--dtype float32|bfloat16] [--wizard PATH]

1. Model: the random d768 L12 H12 MQA GPTBigCode of http_serve.py (target/bench-models/http-d768), its
   weights in --dtype on both sides.
2. Texts: --prompts windows of --tokens token ids cut from the repository's Rust sources.
3. wizard: one client sends lm-evaluation-harness's loglikelihood request, --batches prompts per request
   back to back: {"prompt": [ids, ...], "max_tokens": 1, "echo": true, "logprobs": 1, "temperature": 0};
   the answer's token_logprobs and top_logprobs give each token's log-likelihood and whether it is
   the greedy one.
4. transformers: the same batches through GPTBigCodeForCausalLM (torch threads = --threads),
   log_softmax, the ids' log-probabilities gathered and the top-1 taken, as lm-evaluation-harness's HF
   backend does.
5. Prints the CPU, then per batch size: tokens scored per second for both and the ratio
   wizard / transformers, and the largest difference between the two sets of log-probabilities.
"""
import argparse
import http.client
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import http_serve  # noqa: E402


def token_windows(count, tokens):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(http_serve.MODEL / "tokenizer.json"))
    windows = [tokenizer.encode(text).ids[:tokens] for text in http_serve.make_prompts(count, tokens + 16)]
    return [ids for ids in windows if len(ids) == tokens]


def wizard_scores(port, windows, batch):
    """Seconds, and each window's log-probabilities of its tokens after the first."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    scores = []
    begin = time.perf_counter()
    for start in range(0, len(windows), batch):
        body = {"model": "bench", "prompt": windows[start:start + batch], "max_tokens": 1, "echo": True,
                "logprobs": 1, "temperature": 0}
        answer = http_serve.complete(conn, body)
        for choice in sorted(answer["choices"], key=lambda c: c["index"]):
            scores.append(choice["logprobs"]["token_logprobs"][1:len(windows[0])])
    return time.perf_counter() - begin, scores


def transformers_scores(windows, batch, threads, dtype):
    import torch
    from transformers import GPTBigCodeForCausalLM

    torch.set_num_threads(threads)
    model = GPTBigCodeForCausalLM.from_pretrained(http_serve.MODEL, torch_dtype=getattr(torch, dtype)).eval()
    scores = []
    with torch.inference_mode():
        model(torch.tensor(windows[:1]))  # warm-up
        begin = time.perf_counter()
        for start in range(0, len(windows), batch):
            ids = torch.tensor(windows[start:start + batch])
            logprobs = model(ids).logits.float().log_softmax(-1)[:, :-1]
            chosen = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            _greedy = logprobs.argmax(-1) == ids[:, 1:]
            scores.extend(chosen.tolist())
        return time.perf_counter() - begin, scores


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--wizard", type=pathlib.Path, default=http_serve.REPO / "target" / "release" / "wizard")
    args = parser.parse_args()
    args.max_tokens = 1
    http_serve.make_model(args.wizard)
    windows = token_windows(args.prompts, args.tokens)
    print(f"CPU: {http_serve.cpu_description()}")
    print(f"{len(windows)} windows of {args.tokens} tokens, {args.threads} threads, {args.dtype}, d768 L12 (76M)\n")
    print("| batch | wizard tokens/s | transformers tokens/s | ratio | largest logprob difference |")
    print("| --- | --- | --- | --- | --- |")
    http_serve.LOGS.mkdir(parents=True, exist_ok=True)
    for batch in map(int, args.batches.split(",")):
        port = http_serve.free_port()
        command, reason = http_serve.wizard_command(args.wizard, port, args)
        if command is None:
            sys.exit(reason)
        command += ["--max-batch", str(max(batch, 1))]
        command[command.index("--dtype") + 1] = args.dtype
        with http_serve.Server("wizard", command, port, http_serve.LOGS / "score-wizard.log") as server:
            server.wait_ready()
            wizard_scores(port, windows[:batch], batch)  # warm-up
            wizard_seconds, wizard = wizard_scores(port, windows, batch)
        hf_seconds, reference = transformers_scores(windows, batch, args.threads, args.dtype)
        difference = max(abs(a - b) for ours, theirs in zip(wizard, reference) for a, b in zip(ours, theirs))
        scored = len(windows) * args.tokens
        ours, theirs = scored / wizard_seconds, scored / hf_seconds
        print(f"| {batch} | {ours:.0f} | {theirs:.0f} | **{ours / theirs:.2f}x** | {difference:.1e} |", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
