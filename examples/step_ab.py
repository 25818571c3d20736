"""Two runtime set-ups, decode step by decode step: artifacts, or one artifact on two page sizes.

    .venv/bin/python examples/step_ab.py out/peers/small/ours-ort-static@4k out/peers/small/ours-ort-static
    .venv/bin/python examples/step_ab.py out/old-small out/new-small --batch 4 --rounds 4

Whole runs on this shared machine scatter by ±20%, far more than the few percent a graph change or the page size
makes, so this script does not compare whole runs. It starts one worker process per side (`DIR`, or `DIR@4k` /
`DIR@huge` for the page size: huge pages, as `llama-generate` uses, unless `@4k`) and has them take their prefills
and decode steps strictly in turn (the order swapped every step), so that whatever the machine does falls on both
alike. Each round is a prefill of `--batch` random 128-token prompts (the same for both) and `--steps` greedy decode
steps. ONNX Runtime's threads are told not to spin while waiting (`session.intra_op.allow_spinning=0`), since a
worker that has just finished would otherwise spin on the cores the other one is using. It prints each side's median
step and prefill, and the median of the per-step ratios B ÷ A (above 1, A is faster). The same set-up on both
sides measures the noise floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from llama_export.runtime.hugepages import pages_environ

WORKER = r"""
import sys, time
import numpy as np
import onnxruntime as ort

class QuietOptions(ort.SessionOptions):  # no spinning: the other worker runs while this one waits
    def __init__(self):
        super().__init__()
        self.add_session_config_entry("session.intra_op.allow_spinning", "0")

ort.SessionOptions = QuietOptions
from llama_export.runtime.artifact import Artifact
from llama_export.runtime.backends import open_backend
from llama_export.runtime.generation import decode_one_token, prefill

artifact = Artifact.open(sys.argv[1])
batch, vocab = int(sys.argv[2]), artifact.config["vocab_size"]
backend = open_backend(artifact, "ort", 2)
print("ready", flush=True)
for line in sys.stdin:
    command, seed = line.split()
    start = time.perf_counter()
    if command == "prefill":
        rng = np.random.default_rng(int(seed))
        logits, past, mask, pos = prefill(backend, [rng.integers(3, vocab, 128).tolist() for _ in range(batch)])
    else:
        logits, past, mask, pos = decode_one_token(backend, tokens, past, mask, pos)
    tokens = logits.argmax(-1)
    print(time.perf_counter() - start, flush=True)
"""


def side(spec: str) -> tuple[Path, bool]:
    """`DIR`, `DIR@huge` or `DIR@4k` → (artifact directory, huge pages)."""
    path, _, pages = spec.rpartition("@") if spec.endswith(("@4k", "@huge")) else (spec, "", "huge")
    return Path(path), pages == "huge"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="artifact directory, optionally @4k or @huge")
    parser.add_argument("b", help="the other side, the same way")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=128)
    args = parser.parse_args()
    workers = {}
    for name, spec in (("A", args.a), ("B", args.b)):
        directory, huge = side(spec)
        workers[name] = subprocess.Popen([sys.executable, "-c", WORKER, str(directory), str(args.batch)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                         env=pages_environ(huge), cwd=ROOT)
    for name, worker in workers.items():
        if worker.stdout.readline().strip() != "ready":
            sys.exit(f"side {name} ({getattr(args, name.lower())}) failed to load")

    def ask(name: str, command: str) -> float:
        workers[name].stdin.write(command + "\n")
        workers[name].stdin.flush()
        return float(workers[name].stdout.readline())

    steps: dict[str, list[float]] = {name: [] for name in workers}
    prefills: dict[str, list[float]] = {name: [] for name in workers}
    for round_ in range(args.rounds):
        for i in range(args.steps + 1):
            for name in list(workers)[::1 if (round_ + i) % 2 else -1]:
                (steps if i else prefills)[name].append(ask(name, f"{'step' if i else 'prefill'} {round_}"))
    for worker in workers.values():
        worker.stdin.close()
        worker.wait()
    ratios = [b / a for a, b in zip(steps["A"], steps["B"])]
    print(json.dumps({"A": args.a, "B": args.b, "batch": args.batch, "rounds": args.rounds,
                      "median_step_ms": {k: round(statistics.median(v) * 1e3, 3) for k, v in steps.items()},
                      "median_step_ratio_b_over_a": round(statistics.median(ratios), 4),
                      "median_prefill_ms": {k: round(statistics.median(v) * 1e3, 1) for k, v in prefills.items()}}))


if __name__ == "__main__":
    main()
