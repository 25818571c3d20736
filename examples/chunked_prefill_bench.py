"""How much a long prompt stalls the streams already decoding, with whole and chunked prefill (in process).

    .venv/bin/python examples/chunked_prefill_bench.py ARTIFACT 256 128 64

On a static-cache artifact (gqa-mid: docs/serving.md), 7 streams (64-token prompts, 96 new tokens) decode in an
8-slot batcher; once each has 16 tokens a 1,500-token prompt arrives. Printed, one JSON line per run: the streams'
inter-token gaps after that (p50, p95, max) and the long prompt's time to first token, first without the long
prompt, then with it prefilled whole, then in chunks of each size given.
"""

from __future__ import annotations

import json
import statistics
import sys

import numpy as np

from llama_export.runtime.inflight import InflightBatcher, Request


def run(artifact: str, chunk: int | None, long_prompt: bool, threads: int = 2) -> dict:
    batcher = InflightBatcher.open(artifact, slots=8, threads=threads, prefill_chunk=chunk)
    rng = np.random.default_rng(0)
    vocab = batcher.vocab_size
    streams = [batcher.submit(Request(rng.integers(100, vocab, 64).tolist(), 96, ignore_eos=True)) for _ in range(7)]
    for handle in streams:
        events = iter(handle)
        for _ in range(16):
            next(events)
    long = batcher.submit(Request(rng.integers(100, vocab, 1500).tolist(), 4, ignore_eos=True)) if long_prompt \
        else None
    done = [h.result(600) for h in streams]
    ttft = long.result(600).ttft_s if long else None
    batcher.close()
    gaps = [g for d in done for g in d.token_times_s[15:]]  # from the 16th token on
    return {"prefill": "whole" if chunk is None else f"chunks of {chunk}", "long_prompt": long_prompt,
            "p50_ms": round(1000 * statistics.median(gaps), 1),
            "p95_ms": round(1000 * statistics.quantiles(gaps, n=20)[18], 1), "max_ms": round(1000 * max(gaps), 1),
            "long_ttft_s": round(ttft, 2) if ttft else None}


def main():
    artifact, chunks = sys.argv[1], [int(c) for c in sys.argv[2:]]
    for chunk, long_prompt in [(None, False), (None, True), *[(c, True) for c in chunks]]:
        print(json.dumps(run(artifact, chunk, long_prompt)), flush=True)


if __name__ == "__main__":
    main()
