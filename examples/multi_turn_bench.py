"""Time to first token of one multi-turn conversation through an OpenAI-compatible /v1/completions endpoint (ours,
or llama.cpp's llama-server): each turn re-sends the whole conversation, as chat clients do.

    python examples/multi_turn_bench.py http://127.0.0.1:8000/v1 --turns 8 --json
    python examples/multi_turn_bench.py http://127.0.0.1:8000/v1 --no-cache     # cache_prompt: false per request

Every turn appends ~`--turn-tokens` token ids of "user text" (seeded random ids) to the conversation so far (the
previous prompt plus the previous answer's token ids), asks for `--reply-tokens` new tokens (greedy, streaming,
ignore_eos) and measures from sending the request to the first streamed piece. `--rounds` runs the conversation
that many times (other ids each time, the same lengths), cache on and off interleaved with --both, and reports
each turn's median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx
import numpy as np


def ttft(client: httpx.Client, url: str, ids: list[int], reply: int, cache: bool) -> tuple[float, list[int], int]:
    """(seconds to the first piece, the answer's token ids, the cached prompt tokens the server reported)."""
    body = {"prompt": ids, "max_tokens": reply, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}, "cache_prompt": cache, "return_tokens": True}
    started, first, tokens, cached = time.perf_counter(), None, [], 0
    with client.stream("POST", f"{url}/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                first = time.perf_counter() - started
            tokens += chunk.get("tokens", [])  # llama.cpp's return_tokens
            usage = chunk.get("usage") or {}
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", cached)
            cached = chunk.get("timings", {}).get("cache_n", cached)  # llama.cpp's
    return first if first is not None else time.perf_counter() - started, tokens, cached


def conversation(client, url, turns, turn_tokens, reply, vocab, seed, cache):
    """One conversation: per turn (prompt tokens, ttft s, cached tokens)."""
    rng = np.random.default_rng(seed)
    ids, rows = [1], []
    for turn in range(turns):
        ids = ids + rng.integers(100, vocab, turn_tokens).tolist()
        seconds, answer, cached = ttft(client, url, ids, reply, cache)
        rows.append((len(ids), seconds, cached))
        # the answer's ids, when the server gives them; else stand-ins, the same in every round
        ids = ids + (answer or rng.integers(100, vocab, reply).tolist())
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="the endpoint's /v1 URL")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--turn-tokens", type=int, default=160)
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000, help="token ids are drawn below this")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--no-cache", action="store_true", help="send cache_prompt: false")
    mode.add_argument("--both", action="store_true", help="cache on and off, interleaved round by round")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    modes = [True, False] if args.both else [not args.no_cache]
    client = httpx.Client(timeout=600, headers={"Connection": "close"})
    runs = {m: [] for m in modes}
    for round_ in range(args.rounds):
        for cache in (modes if round_ % 2 == 0 else modes[::-1]):
            # a fresh conversation per round and mode (other ids, the same lengths), so that none finds another's
            # slots
            seed = args.seed + 1000 * round_ + (0 if cache else 500)
            runs[cache].append(conversation(client, args.url, args.turns, args.turn_tokens, args.reply_tokens,
                                            args.vocab, seed, cache))
    report = {}
    for cache, rounds in runs.items():
        key = "cache" if cache else "no-cache"
        report[key] = [{"turn": t + 1, "prompt_tokens": rounds[0][t][0],
                        "ttft_ms": round(1000 * statistics.median(r[t][1] for r in rounds), 1),
                        "cached_tokens": rounds[-1][t][2]} for t in range(args.turns)]
    if args.json:
        print(json.dumps(report))
        return
    for key, rows in report.items():
        print(f"{key}: " + ", ".join(f"turn {r['turn']} ({r['prompt_tokens']} tok, {r['cached_tokens']} cached) "
                                     f"{r['ttft_ms']:.0f} ms" for r in rows))


if __name__ == "__main__":
    main()
