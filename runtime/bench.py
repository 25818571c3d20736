"""`llama-bench`: prefill latency, decode tokens/s, peak RSS, and the fraction of memory bandwidth used.

Decode on a CPU is bound by reading every weight (and the KV cache) once per step, so the figure
that says how good a runtime is, is bytes read per step ÷ step time, against a read bandwidth this
command measures itself in the same run, before and after the timed runs, with the same thread count:
the best run of ONNX Runtime's matrix-vector products over 256 MiB of constant weights (narrow and wide
matrices) and of a ReduceSum over the same bytes (`read_bandwidth`). With `--backend trt` the reference is
the GPU's memory (HBM) bandwidth: a device-to-device copy of 1 GiB, timed with CUDA events.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from .artifact import Artifact, ArtifactError
from .backends import BACKENDS, open_backend
from .generate import decode_one_token, prefill

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def read_bandwidth(threads: int | None, megabytes: int = 256, repeats: int = 20) -> float:
    """The best read bandwidth (bytes/s) ONNX Runtime reaches over `megabytes`, far more than the caches hold,
    with `threads` threads: the best single run (each probe run `repeats` times) of
    - decode's own access pattern: a chain of matrix-vector products over constant (prepacked) 2048×4096 and
      4096×2048 weights of distinct random values (so nothing can be shared or compressed);
    - the same chain over one 8192-row matrix (ONNX Runtime reads narrow matrices faster, wide ones slower);
    - a ReduceSum over the same bytes, fed as an input.
    The best run, not the median, so that the fraction of it a decode step reaches is not flattered by a probe
    that ran while the machine was busy."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper, save

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    opset = [helper.make_opsetid("", 18)]
    rng = np.random.default_rng(0)
    total = megabytes << 20
    sessions = []
    with tempfile.TemporaryDirectory() as scratch:  # weights as external data: a model proto holds < 2 GB
        for rows, cols in ((2048, 4096), (8192, total // (4 * 8192))):
            count = max(1, total // (4 * rows * cols))
            shapes = [(rows, cols) if i % 2 == 0 else (cols, rows) for i in range(count)]
            weights = [numpy_helper.from_array(rng.standard_normal(shape, dtype=np.float32), f"w{i}")
                       for i, shape in enumerate(shapes)]
            nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"y{i - 1}", f"w{i}"], [f"y{i}"])
                     for i in range(count)]
            graph = helper.make_graph(nodes, "gemv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
                                      [helper.make_tensor_value_info(f"y{count - 1}", TensorProto.FLOAT,
                                                                     [1, shapes[-1][1]])], weights)
            path = f"{scratch}/gemv{rows}.onnx"
            save(helper.make_model(graph, opset_imports=opset), path, save_as_external_data=True,
                 location=f"gemv{rows}.data")
            del weights, graph
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            sessions.append((session, {"x": np.full((1, rows), 0.5, np.float32)}, 4 * rows * cols * count))
    k = 8192
    n = total // (4 * k)
    reduce_graph = helper.make_graph([helper.make_node("ReduceSum", ["w"], ["y"], keepdims=0)], "reduce",
                                     [helper.make_tensor_value_info("w", TensorProto.FLOAT, [k, n])],
                                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    reduce = ort.InferenceSession(helper.make_model(reduce_graph, opset_imports=opset).SerializeToString(), options,
                                  providers=["CPUExecutionProvider"])
    sessions.append((reduce, {"w": np.full((k, n), 0.25, np.float32)}, 4 * k * n))
    best = 0.0
    for session, feed, size in sessions:
        session.run(None, feed)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, feed)
            best = max(best, size / (time.perf_counter() - start))
    return best


def probe_apart(threads: int | None) -> float:
    """`read_bandwidth` in a child process, so that its buffers never count in this process's peak RSS."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(read_bandwidth, (threads,))


def hbm_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes/s of GPU memory traffic in a device-to-device copy of `megabytes`: each byte is read once and
    written once (the median of `repeats`)."""
    import torch

    source = torch.ones(megabytes << 20, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * source.numel() / statistics.median(times)


def run_once(backend, vocab: int, batch: int, prompt_len: int, gen_len: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, prompt_len).tolist() for _ in range(batch)]
    start = time.perf_counter()
    logits, past, mask, pos = prefill(backend, prompts)
    prefill_s = time.perf_counter() - start
    tokens = logits.argmax(-1)
    start = time.perf_counter()
    for _ in range(gen_len):
        logits, past, mask, pos = decode_one_token(backend, tokens, past, mask, pos)
        tokens = logits.argmax(-1)
    return prefill_s, time.perf_counter() - start


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True,
              help="ort: ONNX Runtime. trt: the artifact's TensorRT engine (llama-build); the bandwidth figure is "
                   "then the GPU's. torch: the reference PyTorch model on the artifact's weights (a baseline).")
@click.option("--cuda-graph", is_flag=True, help="trt, static-cache artifacts: decode steps as CUDA graph replays.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--prompt-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--gen-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True, help="Timed runs (after a warm-up).")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def main(directory, backend, cuda_graph, batch, prompt_len, gen_len, runs, threads, as_json):
    """Benchmark an artifact: prefill latency, decode tokens/s, peak RSS, bandwidth fraction (medians)."""
    try:
        artifact = Artifact.open(directory)
        c = artifact.config
        engine = open_backend(artifact, backend, threads, cuda_graph)
        if prompt_len + gen_len + 1 > engine.max_length:
            raise ArtifactError(f"--prompt-len {prompt_len} + --gen-len {gen_len} exceeds the context window "
                                f"{engine.max_length}")
    except (ArtifactError, ValueError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    probe = hbm_bandwidth if backend == "trt" else lambda: probe_apart(threads)
    bandwidth = probe()
    run_once(engine, c["vocab_size"], batch, min(prompt_len, 8), 2, seed=99)  # warm-up
    results = [run_once(engine, c["vocab_size"], batch, prompt_len, gen_len, seed=i) for i in range(runs)]
    prefill_s = statistics.median(r[0] for r in results)
    decode_s = statistics.median(r[1] for r in results)
    weights = artifact.manifest["export"]["weights_bytes"]
    if not c.get("tie_word_embeddings"):  # a decode step gathers one embedding row, not the table
        weights -= c["vocab_size"] * c["hidden_size"] * BYTES[artifact.dtype]
    mean_len = prompt_len + (gen_len + 1) / 2
    per_element = BYTES[artifact.dtype]
    kv_bytes_per_token = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * artifact.head_dim * per_element
    cache = kv_bytes_per_token * mean_len * batch
    per_step = weights + cache
    bandwidth = max(bandwidth, probe())
    achieved = per_step * gen_len / decode_s
    report = {
        "artifact": str(directory), "backend": backend, "dtype": artifact.dtype, "batch": batch,
        "prompt_len": prompt_len, "gen_len": gen_len, "runs": runs, "threads": threads,
        "prefill_ms": round(prefill_s * 1e3, 1), "decode_tokens_per_s": round(batch * gen_len / decode_s, 2),
        "decode_steps_per_s": round(gen_len / decode_s, 2), "bytes_per_step": int(per_step),
        "achieved_gb_per_s": round(achieved / 1e9, 2), "measured_read_gb_per_s": round(bandwidth / 1e9, 2),
        "bandwidth_of": "GPU memory (HBM)" if backend == "trt" else "host memory",
        "bandwidth_fraction": round(achieved / bandwidth, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if as_json:
        click.echo(json.dumps(report))
    else:
        for key, value in report.items():
            click.echo(f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
