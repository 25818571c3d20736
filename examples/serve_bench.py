"""Closed-loop streaming clients against a server: aggregate tokens/s, time to first token and inter-token
latency (p50/p95), and the server's memory (RSS of its process tree) before and after a run of many requests.

Each of C clients sends a request, reads its stream to the end, and sends the next, until the level's requests
are done; the prompts are llama-load-bench's (`--prompt-tokens` random token ids, seeded: the same requests as the
in-process benchmark and across servers), each asking for `--new-tokens` tokens, greedy, past end-of-sequence
(`ignore_eos`). The figures are llama-load-bench's, named the same, so the rows compare side by side. Targets:

  triton  Triton's gRPC streaming (tritonclient.grpc) to a llama-triton model, prompts as `input_ids`
  openai  an OpenAI-compatible /v1/completions with "stream": true and the prompt as a list of token ids
          (llama-serve --openai, llama.cpp's server, llama_cpp.server)

  python examples/serve_bench.py triton 127.0.0.1:8001 --model llama --clients 1,4,8,16 --server-pid PID --json
  python examples/serve_bench.py openai http://127.0.0.1:8080/v1 --clients 8 --vocab 32000
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np

from llama_export.runtime.load_bench import summary  # the same figures, named the same, as the in-process benchmark


def prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """llama-load-bench's prompts (the same seed gives the same requests): `length` random ids from 3..vocab-1."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, length).tolist() for _ in range(count)]


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants (the server and its Python stubs), MB."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def triton_stream(url: str, model: str):
    """A function(ids, new_tokens) -> list of (time, tokens) per response, over one gRPC stream per client."""
    import tritonclient.grpc as grpcclient

    from llama_export.runtime.serving.client import infer_inputs, is_final

    client = grpcclient.InferenceServerClient(url)
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((time.perf_counter(), result, error)))

    def run(ids, new_tokens):
        inputs = infer_inputs(grpcclient, input_ids=ids, max_tokens=new_tokens, stream=True, ignore_eos=True)
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        marks = []
        while True:
            t, result, error = got.get(timeout=600)
            if error is not None:
                raise RuntimeError(str(error))
            tokens = result.as_numpy("token_ids")
            if tokens is not None and tokens.size:
                marks.append((t, int(tokens.size)))
            if is_final(result):
                return marks
    run.close = lambda: (client.stop_stream(), client.close())
    return run


def openai_stream(url: str, model: str):
    import httpx

    # a connection per request: llama.cpp's server closes idle keep-alive connections, and a request sent on one
    # is lost ("Server disconnected without sending a response")
    http = httpx.Client(timeout=600, headers={"Connection": "close"})

    def run(ids, new_tokens):
        # cache_prompt: false — llama.cpp's server otherwise reuses a slot's cached prompt when the same request
        # comes again (these requests repeat across levels), skipping the prefill the other servers do; others
        # ignore the field
        body = {"model": model, "prompt": ids, "max_tokens": new_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "cache_prompt": False}
        marks = []
        with http.stream("POST", f"{url}/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        marks.append((time.perf_counter(), 1))
        return marks
    run.close = http.close
    return run


def level(connect, clients: int, requests: int, ids: list[list[int]], new_tokens: int) -> dict:
    """`requests` requests through `clients` closed-loop clients; the figures of the run."""
    todo = iter(range(requests))  # request i is prompt i, in every level (as llama-load-bench runs them)
    lock, ttft, gaps, tokens, failed = threading.Lock(), [], [], [0], []

    def client():
        run = connect()
        try:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                start = time.perf_counter()
                try:
                    marks = run(ids[i % len(ids)], new_tokens)
                except Exception as err:  # counted and reported; the client goes on with its next request
                    with lock:
                        failed.append(repr(err))
                    continue
                with lock:
                    if marks:
                        ttft.append(marks[0][0] - start)
                        gaps.extend(b[0] - a[0] for a, b in zip(marks, marks[1:]))
                    tokens[0] += sum(n for _, n in marks)
        finally:
            run.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start

    result = summary(f"{clients} clients", wall, tokens[0], ttft, gaps, clients, None)
    result["failed"] = len(failed)
    if failed:
        print(f"{clients} clients: {len(failed)} of {requests} requests failed, e.g. {failed[0]}", file=sys.stderr)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", choices=["triton", "openai"])
    ap.add_argument("url", help="triton: host:grpc_port; openai: http://host:port/v1")
    ap.add_argument("--model", default="llama")
    ap.add_argument("--clients", default="1,4,8,16", help="Concurrency levels, comma separated.")
    ap.add_argument("--requests", type=int, default=16, help="Requests per level, the same ones in every level.")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=32000, help="Prompt ids are drawn from 3..vocab-1.")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the random prompts (llama-load-bench's --seed).")
    ap.add_argument("--warmup", type=int, default=2, help="Requests before the first level (not measured).")
    ap.add_argument("--server-pid", type=int, default=None, help="Report the RSS of this process tree.")
    ap.add_argument("--rss-requests", type=int, default=0,
                    help="After the levels: this many more requests (at the largest level's concurrency), with the "
                         "server's RSS before and after them (needs --server-pid).")
    ap.add_argument("--rss-new-tokens", type=int, default=None,
                    help="New tokens per request of that run (default: --new-tokens): a leak grows per request.")
    ap.add_argument("--json", action="store_true", help="One JSON object instead of a table.")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    connect = (lambda: triton_stream(args.url, args.model)) if args.target == "triton" else \
        (lambda: openai_stream(args.url, args.model))
    ids = prompts(args.requests, args.prompt_tokens, args.vocab, args.seed)
    report = {"target": args.target, "url": args.url, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "levels": []}
    if args.warmup:
        level(connect, 1, args.warmup, ids, args.new_tokens)
    for clients in levels:
        report["levels"].append(level(connect, clients, args.requests, ids, args.new_tokens))
        if not args.json:
            print(json.dumps(report["levels"][-1]), file=sys.stderr)
    if args.rss_requests and args.server_pid:
        before = tree_rss_mb(args.server_pid)
        run = level(connect, max(levels), args.rss_requests, ids, args.rss_new_tokens or args.new_tokens)
        after = tree_rss_mb(args.server_pid)
        report["rss"] = {"requests": args.rss_requests, "before_mb": round(before, 1), "after_mb": round(after, 1),
                         "growth_pct": round(100 * (after - before) / before, 2), "run": run,
                         "new_tokens": args.rss_new_tokens or args.new_tokens}
    elif args.server_pid:
        report["rss_mb"] = round(tree_rss_mb(args.server_pid), 1)
    failed = sum(r["failed"] for r in report["levels"]) + (report["rss"]["run"]["failed"] if "rss" in report else 0)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{'clients':>7} {'tok/s':>9} {'ttft p50':>9} {'ttft p95':>9} {'itl p50':>8} {'itl p95':>8}  (ms)")
        for r in report["levels"]:
            print(f"{r['clients']:>7} {r['tokens_per_s']:>9} {r['ttft_p50_ms']:>9} {r['ttft_p95_ms']:>9} "
                  f"{r['itl_p50_ms']:>8} {r['itl_p95_ms']:>8}")
        if "rss" in report:
            print(f"RSS {report['rss']['before_mb']} MB -> {report['rss']['after_mb']} MB after "
                  f"{args.rss_requests} requests ({report['rss']['growth_pct']:+}%)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
