"""`llama-bench`: prefill latency, decode tokens/s, peak RSS, and the fraction of memory bandwidth used.

Decode on a CPU is bound by reading every weight (and the KV cache) once per step, so the figure
that says how good a runtime is, is bytes read per step ÷ step time, against the read bandwidth the machine
gives at the same time, measured by this command with the same thread count (`BandwidthProbe`): ONNX
Runtime's matrix-vector products over 256 MiB of constant weights (narrow and wide matrices, as MatMul and as
1×1 Conv) and a ReduceSum over the same bytes, each run 20 times back to back, in a child process built once
(so that its buffers never count in this process's peak RSS). The probe reads before the first timed run and
after each one, and a run's reference is the mean of the readings on either side of it, so that the shared
machine's drift falls on both. Both sides use the same statistic, robust to the other tenants' bursts: the
decode's median step and the best probe's median run. `bandwidth_fraction` is the median of the runs' fractions.
The best single probe run is reported beside it (`peak_read_gb_per_s`, `bandwidth_fraction_of_peak`: decode
tokens/s against it), a burst that a whole run does not sustain on this shared machine. With `--backend trt` the
reference is the GPU's memory (HBM) bandwidth: a device-to-device copy of 1 GiB, timed with CUDA events.

With `--batch` rows every weight is multiplied by that many rows, and ONNX Runtime's kernels read a weight more
slowly with some row counts than with one: its x86 AVX2 1×1 Conv kernel (MLAS) computes at most three outputs per
pass over a block of weights, so four rows take a second pass. So the ort backend's probe also times the 1×1 Conv
chain with one row and with `--batch` rows (an image that many pixels wide), in turn, in each reading:
`kernel_read_ratio` is the median of those pairs' read-rate ratios (batch rows ÷ one row; 1 at batch 1), what the ort
target's own kernel keeps of its one-row rate at this batch, and `fraction_of_kernel_ceiling` is
`bandwidth_fraction` ÷ that ratio. They say how much of a shortfall against the bandwidth is the kernel's;
`bandwidth_fraction` stays the figure against the machine.

Loading frees memory: ONNX Runtime's copies of the weights it reorders or prepacks, and the probe's. A virtual
machine with free page reporting (virtio-balloon, as on this project's machines) hands memory that stays free to its
host about 2 s later, and the host's reclaim stops the guest's CPUs for tens of milliseconds (seen as steal time),
which a short run's figure cannot absorb (measured in docs/benchmarks.md). So after the warm-up, llama-bench waits `--settle`
seconds (default 3) before its timed runs, which then measure decoding rather than that one-time aftermath of the
load. `examples/peer_bench.py` waits the same time for each peer.
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
from .cli import ENVIRONMENT, to_stderr
from .generation import decode_one_token, prefill
from .hugepages import anon_huge_pages_bytes, huge_pages_state, relaunch_with_huge_pages

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


_PROBES: list = []  # the child process's probe sessions: (session, feed, bytes read per run)
_KERNEL: list = []  # the 1×1 Conv chain's (session, input channels)


def _build_probes(threads: int | None, megabytes: int = 256) -> None:
    """In the probe's child process: ONNX Runtime sessions that each read `megabytes`, far more than the caches
    hold, with `threads` threads:
    - a chain of matrix-vector products over constant (prepacked) 2048×4096 and 4096×2048 weights of distinct
      random values (so nothing can be shared or compressed);
    - the same chain over one 8192-row matrix (ONNX Runtime reads narrow matrices faster, wide ones slower);
    - the first chain as 1×1 Convs on a one-pixel image, the ort target's access pattern (the NCHWc kernel,
      weights reordered at load; see graphs/passes/pointwise_conv.py), which reads faster still (its image's width,
      the rows, is left free, for the kernel reading at a batch's rows);
    - a ReduceSum over the same bytes, fed as an input."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper, save

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    opset = [helper.make_opsetid("", 18)]
    rng = np.random.default_rng(0)
    total = megabytes << 20
    with tempfile.TemporaryDirectory() as scratch:  # weights as external data: a model proto holds < 2 GB
        for op, rows, cols in (("MatMul", 2048, 4096), ("MatMul", 8192, total // (4 * 8192)), ("Conv", 2048, 4096)):
            count = max(1, total // (4 * rows * cols))
            shapes = [(rows, cols) if i % 2 == 0 else (cols, rows) for i in range(count)]
            # a 1×1 Conv's weight is [out, in, 1, 1] and its one row a [1, in, 1, 1] image
            weights = [numpy_helper.from_array(rng.standard_normal(shape if op == "MatMul" else shape[::-1] + (1, 1),
                                                                   dtype=np.float32), f"w{i}")
                       for i, shape in enumerate(shapes)]
            nodes = [helper.make_node(op, ["x" if i == 0 else f"y{i - 1}", f"w{i}"], [f"y{i}"]) for i in range(count)]
            row = [1, rows] if op == "MatMul" else [1, rows, 1, "width"]
            out = [1, shapes[-1][1]] if op == "MatMul" else [1, shapes[-1][1], 1, "width"]
            graph = helper.make_graph(nodes, "gemv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, row)],
                                      [helper.make_tensor_value_info(f"y{count - 1}", TensorProto.FLOAT, out)], weights)
            path = f"{scratch}/{op}{rows}.onnx"
            save(helper.make_model(graph, opset_imports=opset), path, save_as_external_data=True,
                 location=f"{op}{rows}.data")
            del weights, graph
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            one_row = [1 if d == "width" else d for d in row]
            _PROBES.append((session, {"x": np.full(one_row, 0.5, np.float32)}, 4 * rows * cols * count))
            if op == "Conv":
                _KERNEL.append((session, rows))
    k = 8192
    n = total // (4 * k)
    reduce_graph = helper.make_graph([helper.make_node("ReduceSum", ["w"], ["y"], keepdims=0)], "reduce",
                                     [helper.make_tensor_value_info("w", TensorProto.FLOAT, [k, n])],
                                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    reduce = ort.InferenceSession(helper.make_model(reduce_graph, opset_imports=opset).SerializeToString(), options,
                                  providers=["CPUExecutionProvider"])
    _PROBES.append((reduce, {"w": np.full((k, n), 0.25, np.float32)}, 4 * k * n))
    for session, feed, _ in _PROBES:
        session.run(None, feed)  # warm-up (prepacking)


def _seconds(session, feed: dict) -> float:
    start = time.perf_counter()
    session.run(None, feed)
    return time.perf_counter() - start


def _read_window(repeats: int, rows: int) -> tuple[float, float, float]:
    """In the child: (the best probe's bytes/s in its median run of `repeats` back-to-back runs, the best single
    run's, and the median over `repeats` pairs of runs of the 1×1 Conv chain's read rate with `rows` rows ÷ with
    one row, the two taken in turn)."""
    typical = peak = 0.0
    for session, feed, size in _PROBES:
        times = [_seconds(session, feed) for _ in range(repeats)]
        typical, peak = max(typical, size / statistics.median(times)), max(peak, size / min(times))
    ratio = 1.0
    if rows > 1:
        session, channels = _KERNEL[0]
        one, many = ({"x": np.full((1, channels, 1, width), 0.5, np.float32)} for width in (1, rows))
        ratio = statistics.median(_seconds(session, one) / _seconds(session, many) for _ in range(repeats))
    return typical, peak, ratio


class BandwidthProbe:
    """The host's read bandwidth, measured by ONNX Runtime in a child process built once (see the module's
    docstring). `read()` gives (bytes/s in the best probe's median run, bytes/s in the best single run, the 1×1 Conv
    chain's read rate with `rows` rows ÷ with one row)."""

    def __init__(self, threads: int | None, rows: int = 1, repeats: int = 20):
        self.repeats, self.rows = repeats, rows
        self.pool = multiprocessing.get_context("spawn").Pool(1, initializer=_build_probes, initargs=(threads,))

    def read(self) -> tuple[float, float, float]:
        return self.pool.apply(_read_window, (self.repeats, self.rows))

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


class HbmProbe:
    """Bytes/s of GPU memory traffic in a device-to-device copy of `megabytes`: each byte is read once and
    written once. `read()` gives (the median of `repeats` copies, the best one) and no kernel reading."""

    def __init__(self, megabytes: int = 1024, repeats: int = 5):
        import torch

        self.repeats = repeats
        self.source = torch.ones(megabytes << 20, dtype=torch.uint8, device="cuda")
        self.target = torch.empty_like(self.source)
        self.target.copy_(self.source)  # warm-up

    def read(self) -> tuple[float, float]:
        import torch

        times = []
        for _ in range(self.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.target.copy_(self.source)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        size = 2 * self.source.numel()
        return size / statistics.median(times), size / min(times)

    def close(self) -> None:
        del self.source, self.target


def bytes_per_step(artifact: Artifact, batch: int, prompt_len: int, gen_len: int) -> int:
    """Bytes a decode step reads, averaged over `gen_len` steps after `prompt_len` tokens: every weight but the
    embedding table (a step gathers one row of it, unless it is tied to the output projection), and the cache."""
    c = artifact.config
    per_element = BYTES[artifact.dtype]
    weights = artifact.manifest.export.weights_bytes
    if not c.get("tie_word_embeddings"):
        weights -= c["vocab_size"] * c["hidden_size"] * per_element
    mean_len = prompt_len + (gen_len + 1) / 2
    kv_bytes_per_token = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * artifact.head_dim * per_element
    return int(weights + kv_bytes_per_token * mean_len * batch)


def bracketed_fractions(achieved: list[float], readings: list[float]) -> tuple[list[float], list[float]]:
    """Each run's reference (the mean of the probe readings before and after it; `readings` has one more entry
    than `achieved`) and its achieved fraction of that."""
    if len(readings) != len(achieved) + 1:
        raise ValueError(f"{len(achieved)} runs need {len(achieved) + 1} probe readings, not {len(readings)}")
    references = [(before + after) / 2 for before, after in zip(readings, readings[1:])]
    return references, [a / r for a, r in zip(achieved, references)]


def run_once(backend, vocab: int, batch: int, prompt_len: int, gen_len: int,
             seed: int) -> tuple[float, float, float]:
    """Seconds of the prefill, of the whole decode, and of its median step."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, prompt_len).tolist() for _ in range(batch)]
    start = time.perf_counter()
    logits, past, mask, pos = prefill(backend, prompts)
    prefill_s = time.perf_counter() - start
    tokens = logits.argmax(-1)
    steps = []
    for _ in range(gen_len):
        start = time.perf_counter()
        logits, past, mask, pos = decode_one_token(backend, tokens, past, mask, pos)
        tokens = logits.argmax(-1)
        steps.append(time.perf_counter() - start)
    return prefill_s, sum(steps), statistics.median(steps)


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=ENVIRONMENT)
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
@click.option("--settle", type=click.FloatRange(min=0), default=3.0, show_default=True,
              help="Seconds to wait after loading and the warm-up, before the timed runs: a virtual machine with "
                   "free page reporting hands the memory the load freed back to its host about 2 s later, which "
                   "stalls its CPUs for tens of milliseconds (README, peers section). 0: no wait.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def main(directory, backend, cuda_graph, batch, prompt_len, gen_len, runs, threads, settle, as_json):
    """Benchmark an artifact: prefill latency, decode tokens/s, peak RSS, bandwidth fraction (medians)."""
    relaunch_with_huge_pages()  # once, before any weight is loaded
    try:
        start = time.perf_counter()
        artifact = Artifact.open(directory, log=to_stderr)
        checked = time.perf_counter()
        c = artifact.config
        runner = open_backend(artifact, backend, threads, cuda_graph)
        loaded = time.perf_counter()
        if prompt_len + gen_len + 1 > runner.max_length:
            raise ArtifactError(f"--prompt-len {prompt_len} + --gen-len {gen_len} exceeds the context window "
                                f"{runner.max_length}")
    except (ArtifactError, ValueError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    probe = HbmProbe() if backend == "trt" else BandwidthProbe(threads, rows=batch)
    try:
        run_once(runner, c["vocab_size"], batch, min(prompt_len, 8), 2, seed=99)  # warm-up
        readings = [probe.read()]  # the probe's buffers are built (and its load's leftovers freed) by now
        time.sleep(settle)
        results = []
        for i in range(runs):
            results.append(run_once(runner, c["vocab_size"], batch, prompt_len, gen_len, seed=i))
            readings.append(probe.read())
    finally:
        probe.close()
    prefill_s = statistics.median(r[0] for r in results)
    decode_s = statistics.median(r[1] for r in results)
    per_step = bytes_per_step(artifact, batch, prompt_len, gen_len)
    pages = huge_pages_state()
    achieved = [per_step / r[2] for r in results]  # in the median step, as the probe's reading is its median run
    references, fractions = bracketed_fractions(achieved, [reading[0] for reading in readings])
    peak = max(reading[1] for reading in readings)
    report = {
        "artifact": str(directory), "backend": backend, "dtype": artifact.dtype, "batch": batch,
        "prompt_len": prompt_len, "gen_len": gen_len, "runs": runs, "threads": threads, "settle_s": settle,
        "check_s": round(checked - start, 3), "load_s": round(loaded - checked, 2),
        "prefill_ms": round(prefill_s * 1e3, 1), "decode_tokens_per_s": round(batch * gen_len / decode_s, 2),
        "decode_steps_per_s": round(gen_len / decode_s, 2),
        "decode_median_step_ms": round(statistics.median(r[2] for r in results) * 1e3, 3), "bytes_per_step": per_step,
        "achieved_gb_per_s": round(per_step * gen_len / decode_s / 1e9, 2),
        "measured_read_gb_per_s": round(statistics.median(references) / 1e9, 2),
        "bandwidth_of": "GPU memory (HBM)" if backend == "trt" else "host memory",
        "bandwidth_fraction": round(statistics.median(fractions), 3),
        "peak_read_gb_per_s": round(peak / 1e9, 2),
        "bandwidth_fraction_of_peak": round(per_step * gen_len / decode_s / peak, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "huge_pages": pages.on, "huge_pages_why": pages.reason,
        "anon_huge_pages_mb": round((anon_huge_pages_bytes() or 0) / 2**20, 1),
    }
    if backend != "trt":  # the host probe's 1×1 Conv chain at this batch's rows against one row
        ratio = statistics.median(reading[2] for reading in readings)
        report |= {"kernel_read_ratio": round(ratio, 3),
                   "fraction_of_kernel_ceiling": round(statistics.median(fractions) / ratio, 3)}
    if as_json:
        click.echo(json.dumps(report))
    else:
        for key, value in report.items():
            click.echo(f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
