"""`llama-load-bench`: in-flight batching under load, closed-loop clients against an `InflightBatcher`.

Each of N clients submits a request (a prompt of `--prompt-len` random token ids, `--gen-len` new tokens, greedy,
end-of-sequence ignored so that every request makes exactly `--gen-len` tokens), waits for its end, and submits the
next, until `--requests` requests have been made, on one batcher of `--slots` slots (default: the largest
concurrency) over the same loaded backend. Every run draws prompts of its own (the same lengths), so that no run
finds another's in the kept slots (prefix reuse, runtime/inflight.py). `--workload shared-prefix` puts one
`--shared-len`-token system prompt (its own per run) before every prompt. `--prefix-reuse both` runs every level
twice, with reuse and with `cache_prompt=False` requests (reuse off), side by side. The `sequential` row runs the
first run's requests one after another without the batcher (a prefill and the decode steps of a batch of one,
llama-bench's loop): the baseline the aggregate rates are compared with.

Reported per row: aggregate generated tokens/s (all tokens ÷ the time from the first submit to the last end), time
to first token p50/p95 (submit → first token, queueing included), inter-token latency p50/p95 (every gap between
two successive tokens of a request), mean slot occupancy (running rows per decode step ÷ slots), and the process's
peak RSS. As llama-bench does, it waits `--settle` seconds after loading and a warm-up before timing (the memory
that loading freed is handed back to the host by then; see runtime/bench.py).
"""

from __future__ import annotations

import itertools
import json
import resource
import sys
import threading
import time
from pathlib import Path

import click
import numpy as np

from .artifact import ArtifactError
from .cli import ENVIRONMENT, to_stderr
from .generation import decode_one_token, prefill
from .hugepages import relaunch_with_huge_pages
from .inflight import InflightBatcher, Request


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summary(name: str, wall: float, tokens: int, ttft: list[float], gaps: list[float], clients: int,
            occupancy: float | None) -> dict:
    ms = lambda v: round(v * 1e3, 1) if v is not None else None  # noqa: E731
    return {"mode": name, "clients": clients, "requests": len(ttft), "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "ttft_p50_ms": ms(percentile(ttft, 50)),
            "ttft_p95_ms": ms(percentile(ttft, 95)), "itl_p50_ms": ms(percentile(gaps, 50)),
            "itl_p95_ms": ms(percentile(gaps, 95)), "occupancy": occupancy}


def sequential(backend, prompts: list[list[int]], gen_len: int) -> dict:
    """The requests one after another, each a batch of one: prefill, then gen_len - 1 decode steps (greedy)."""
    ttft, gaps, tokens = [], [], 0
    start = time.perf_counter()
    for prompt in prompts:
        began = time.perf_counter()
        logits, past, mask, pos = prefill(backend, [prompt])
        token = logits.argmax(-1)
        last = time.perf_counter()
        ttft.append(last - began)
        for _ in range(gen_len - 1):
            logits, past, mask, pos = decode_one_token(backend, token, past, mask, pos)
            token = logits.argmax(-1)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        tokens += gen_len
    return summary("sequential", time.perf_counter() - start, tokens, ttft, gaps, 1, None)


def closed_loop(batcher: InflightBatcher, prompts: list[list[int]], gen_len: int, clients: int,
                ramp_up: float = 0.0, reuse: bool = True) -> dict:
    """`clients` threads, each submitting the next request once its last one ended; client k starts
    `k × ramp_up / clients` seconds after the first."""
    order = itertools.count()
    completions = [None] * len(prompts)
    failures: list[str] = []

    def client(k: int) -> None:
        time.sleep(k * ramp_up / clients)
        while (i := next(order)) < len(prompts):
            done = batcher.submit(Request(prompts[i], gen_len, ignore_eos=True, cache_prompt=reuse)).result()
            if done.finish_reason != "length":
                failures.append(f"request {i}: {done.finish_reason} {done.error or ''}")
            completions[i] = done

    before = batcher.stats()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if failures:
        raise RuntimeError("; ".join(failures))
    after = batcher.stats()
    steps = after["steps"] - before["steps"]
    rows = sum(n * count for n, count in after["rows_per_step"].items()) - \
        sum(n * count for n, count in before["rows_per_step"].items())
    row = summary(f"{clients} clients", wall, sum(len(c.tokens) for c in completions), [c.ttft_s for c in completions],
                  [gap for c in completions for gap in c.token_times_s], clients,
                  round(rows / (steps * batcher.slots), 3) if steps else None)
    row["cached_tokens"] = sum(c.cached_tokens for c in completions)
    return row


def table(report: dict) -> str:
    columns = [("mode", "mode", 22), ("tokens_per_s", "tok/s", 8), ("speedup", "× seq", 6),
               ("ttft_p50_ms", "TTFT p50 ms", 12), ("ttft_p95_ms", "TTFT p95 ms", 12),
               ("itl_p50_ms", "ITL p50 ms", 11), ("itl_p95_ms", "ITL p95 ms", 11), ("occupancy", "occupancy", 10),
               ("cached_tokens", "cached", 7), ("wall_s", "wall s", 8)]
    lines = ["  ".join(f"{title:>{width}}" for _, title, width in columns)]
    for row in report["runs"]:
        lines.append("  ".join(f"{'' if row.get(key) is None else row[key]!s:>{width}}" for key, _, width in columns))
    shared = f"{report['shared_len']} shared + " if report["workload"] == "shared-prefix" else ""
    lines.append(f"{report['requests']} requests of {shared}{report['prompt_len']} prompt + {report['gen_len']} new "
                 f"tokens, {report['slots']} slots, {report['threads']} threads, prefill ≤ "
                 f"{report['prefill_tokens_per_step']} prompt tokens per step (at least one prompt), clients started "
                 f"over {report['ramp_up_s']} s; peak RSS {report['peak_rss_mb']} MB")
    return "\n".join(lines)


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise click.BadParameter(f"{text!r}: give client counts ≥ 1 separated by commas, e.g. 1,4,8,16")
    return levels


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=ENVIRONMENT)
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--concurrency", default="1,4,8,16", show_default=True,
              help="Closed-loop client counts, one run each (comma-separated).")
@click.option("--requests", type=click.IntRange(min=1), default=16, show_default=True,
              help="Requests per run (the same ones in every run).")
@click.option("--prompt-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--gen-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--slots", type=click.IntRange(min=1), default=None,
              help="Cache slots of the batcher (default: the largest concurrency).")
@click.option("--prefill-tokens-per-step", type=click.IntRange(min=1), default=None,
              help="Prompt tokens prefilled per batcher step, at least one prompt (default: the batcher's, 256).")
@click.option("--ramp-up", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds over which the clients start, evenly spread (0: all at once, a burst of N arrivals).")
@click.option("--sequential/--no-sequential", "sequential_run", default=True, show_default=True,
              help="Also run the requests one after another without the batcher (the baseline).")
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--settle", type=click.FloatRange(min=0), default=3.0, show_default=True,
              help="Seconds to wait after loading and the warm-up, before the timed runs (see llama-bench).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random prompts.")
@click.option("--workload", type=click.Choice(["random", "shared-prefix"]), default="random", show_default=True,
              help="random: prompts share nothing. shared-prefix: one --shared-len-token system prompt before each.")
@click.option("--shared-len", type=click.IntRange(min=1), default=1000, show_default=True,
              help="The shared system prompt's tokens (--workload shared-prefix).")
@click.option("--prefix-reuse", type=click.Choice(["on", "off", "both"]), default="on", show_default=True,
              help="Whether requests may reuse a prefix kept in the cache; both: each level with and without.")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=None,
              help="Prefill longer prompts this many tokens per step (default: whole prompts).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def main(directory, concurrency, requests, prompt_len, gen_len, slots, prefill_tokens_per_step, ramp_up, sequential_run,
         backend, threads, settle, seed, workload, shared_len, prefix_reuse, prefill_chunk, as_json):
    """Load benchmark of in-flight batching: aggregate tokens/s, TTFT and inter-token latency under N clients.

    \b
    Example (the random-weight gqa-mid of examples/peers.py, exported with --kv-cache static):
      llama-load-bench out/peers/gqa-mid/ours-ort-static --concurrency 1,4,8,16 --requests 16
    """
    relaunch_with_huge_pages()
    levels = parse_levels(concurrency)
    slots = slots or max(levels)
    try:
        batcher = InflightBatcher.open(directory, slots, max_queue=max(levels), backend=backend, threads=threads,
                                       prefill_tokens_per_step=prefill_tokens_per_step, log=to_stderr,
                                       prefill_chunk=prefill_chunk)
    except (ArtifactError, ValueError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    runner = batcher.backend
    total = prompt_len + (shared_len if workload == "shared-prefix" else 0)
    if total + gen_len > runner.max_length:
        batcher.close()
        click.echo(f"error: the prompt ({total} tokens) + --gen-len {gen_len} exceeds the context window "
                   f"{runner.max_length}", err=True)
        sys.exit(2)
    rng = np.random.default_rng(seed)

    def draw() -> list[list[int]]:
        """A run's prompts: its own random ids (and with shared-prefix its own system prompt before each)."""
        shared = rng.integers(3, batcher.vocab_size, shared_len).tolist() if workload == "shared-prefix" else []
        return [shared + rng.integers(3, batcher.vocab_size, prompt_len).tolist() for _ in range(requests)]

    modes = {"on": [True], "off": [False], "both": [True, False]}[prefix_reuse]
    try:
        warm = [batcher.submit(Request(rng.integers(3, batcher.vocab_size, 8).tolist(), 4, ignore_eos=True))
                for _ in range(slots)]
        for handle in warm:
            handle.result()
        if sequential_run:
            sequential(runner, [rng.integers(3, batcher.vocab_size, 8).tolist()], 4)
        time.sleep(settle)
        runs = [sequential(runner, draw(), gen_len)] if sequential_run else []
        for clients in levels:
            for reuse in modes:
                to_stderr(f"{clients} clients{'' if reuse else ', reuse off'} …")
                row = closed_loop(batcher, draw(), gen_len, clients, ramp_up, reuse)
                if len(modes) > 1 or not reuse:
                    row["mode"] += ", reuse on" if reuse else ", reuse off"
                runs.append(row)
    finally:
        batcher.close()
    base = runs[0]["tokens_per_s"] if sequential_run else None
    for row in runs:
        row["speedup"] = round(row["tokens_per_s"] / base, 2) if base else None
    report = {"artifact": str(directory), "backend": backend, "requests": requests, "workload": workload,
              "shared_len": shared_len if workload == "shared-prefix" else 0, "prefix_reuse": prefix_reuse,
              "prefill_chunk": prefill_chunk,
              "prompt_len": prompt_len, "gen_len": gen_len, "slots": slots, "threads": threads,
              "prefill_tokens_per_step": batcher.prefill_tokens_per_step, "ramp_up_s": ramp_up, "settle_s": settle,
              "runs": runs,
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    click.echo(json.dumps(report) if as_json else table(report))


if __name__ == "__main__":
    main()
