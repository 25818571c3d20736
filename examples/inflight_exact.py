"""Check on a real model that in-flight batching changes no token: requests of different prompt lengths, decoded
together at their own positions in one slot pool, against each one's solo run (a batch of one, no engine).

    .venv/bin/python examples/inflight_exact.py out/peers/gqa-mid/ours-ort-static --slots 8

Prints the batcher's statistics (rows per decode step) and, per request, whether its greedy tokens equal its solo
run's; exits 1 if any differ. tests/test_inflight.py makes the same check on small configs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from llama_export.runtime.generation import generate
from llama_export.runtime.inflight import InflightBatcher, Request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="a static-cache artifact directory")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    with InflightBatcher.open(args.artifact, slots=args.slots, threads=args.threads) as batcher:
        rng = np.random.default_rng(args.seed)
        shapes = [(int(rng.integers(3, 65)), int(rng.integers(6, 13))) for _ in range(args.slots)]
        work = [Request(rng.integers(3, batcher.vocab_size, n).tolist(), m) for n, m in shapes]
        start = time.perf_counter()
        solo = [generate(batcher.backend, batcher.tokenizer, [list(r.prompt)], batcher.max_length, r.max_new_tokens)[0]
                for r in work]
        print(f"solo runs: {time.perf_counter() - start:.1f} s")
        results = [h.result() for h in batcher.submit_many(work)]
        print(batcher.stats())
    same = [got.tokens == want.tokens for got, want in zip(results, solo)]
    for (n, m), ok in zip(shapes, same):
        print(f"prompt {n:3d} tokens, {m:2d} new: {'equal' if ok else 'DIFFERENT'}")
    sys.exit(0 if all(same) else 1)


if __name__ == "__main__":
    main()
