"""Shared by the graph-pass tests: a traced graph to rewrite, and ONNX Runtime runs of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch

from llama_export.exporter.checkpoint import RandomCheckpoint
from llama_export.exporter.write_artifact import build_artifact
from llama_export.graphs.options import ExportOptions
from llama_export.runtime import parity
from llama_export.runtime.backends import ort_feed


from conftest import small_config

GQA = small_config(num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)


def traced(directory: Path, config=GQA, dtype: str = "float32") -> Path:
    """The exported, unoptimized portable graph of a random-weight model."""
    build_artifact(RandomCheckpoint(config, seed=3), directory, ExportOptions(dtype, optimize=False),
                   log=lambda msg: None)
    return directory / "model.onnx"


def save(model: ir.Model, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, str(path), external_data=f"{path.name}.data")
    return path


def feeds(config=GQA, np_dtype=np.float32, seed: int = 0) -> list[dict]:
    """A left-padded prefill (past 0, keep all positions) and a decode-shaped step (past 5, query 3 ≠ key 8)."""
    rng = np.random.default_rng(seed)
    kvh, d, n = config.num_key_value_heads, config.head_dim, config.num_hidden_layers
    out = []
    for past, seq, keep in ((0, 7, 0), (5, 3, 1)):
        ids = rng.integers(3, config.vocab_size, (2, seq))
        mask = np.ones((2, past + seq), np.int64)
        mask[1, :2] = 0
        pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)[:, past:]
        cache = [tuple(rng.standard_normal((2, kvh, past, d)).astype(np_dtype) for _ in range(2)) for _ in range(n)]
        out.append(ort_feed(ids, mask, pos, cache, keep))
    return out


def run(path: Path, feed: dict, optimized: bool = False) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def assert_same_outputs(before: Path, after: Path, tolerance: float = 1e-5, np_dtype=np.float32) -> float:
    """Both graphs on every feed, ORT optimizations off; every output within tolerance × its scale.
    Returns the worst relative difference."""
    worst = 0.0
    for feed in feeds(np_dtype=np_dtype):
        for a, b in zip(run(before, feed), run(after, feed)):
            scale = max(float(np.abs(a).max()), 1e-6)
            diff = parity.compare_tensors({"out": b}, {"out": a})["out"]["max_abs"] / scale
            assert diff <= tolerance, f"output differs by {diff:.3g} × its scale"
            worst = max(worst, diff)
    return worst


def assert_updates_in_place(path: Path, config=GQA, slots: int = 16) -> None:
    """A static-cache graph with one CPU buffer bound as both past and present, for a prefill of 3 and a decode
    step: ONNX Runtime writes the new keys/values into that buffer (no new output), and they equal an unbound
    run's presents."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    kvh, d, names = config.num_key_value_heads, config.head_dim, []
    for i in range(config.num_hidden_layers):
        names += [f"{i}.key", f"{i}.value"]
    host = [np.zeros((1, kvh, slots, d), np.float32) for _ in names]
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in host]
    expected = [np.zeros_like(a) for a in host]
    for written, ids in ((0, np.array([[5, 6, 7]])), (3, np.array([[8]]))):
        seq = ids.shape[1]
        mask = np.zeros((1, slots), np.int64)
        mask[:, :written + seq] = 1
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": np.arange(written, written + seq)[None],
                "logits_to_keep": np.array(1, np.int64), "write_indices": np.full(1, written, np.int64)}
        binding = session.io_binding()
        binding.bind_output("logits", "cpu")
        for name, array in feed.items():
            binding.bind_cpu_input(name, array)
        for name, value in zip(names, values):
            binding.bind_ortvalue_input(f"past_key_values.{name}", value)
            binding.bind_ortvalue_output(f"present.{name}", value)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        assert all(o.data_ptr() == v.data_ptr() for o, v in zip(outputs[1:], values))
        expected = run(path, {**feed, **{f"past_key_values.{n}": e for n, e in zip(names, expected)}})[1:]
        for array, want in zip(host, expected):  # the numpy arrays themselves now hold the presents
            np.testing.assert_array_equal(array[:, :, :written + seq], want[:, :, :written + seq])
            assert array[:, :, written:written + seq].any() and not array[:, :, written + seq:].any()


def perplexity(directory, ids) -> tuple[float, np.ndarray]:
    """Perplexity of the artifact in `directory` (ORT, optimizations on) on `ids`, and its top-1 per position."""
    empty = np.zeros((1, 4, 0, 32), np.float32)
    feed = ort_feed(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], [(empty, empty)] * 4, 0)
    logits = run(directory / "model.onnx", feed, optimized=True)[0]
    return parity.perplexity(logits, ids), logits[0].argmax(-1)


# ---- ONNX Runtime against the reference model, step by step (the export and pass tests) ----------------------

def session(directory: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"])


def padded_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """17 random tokens in 3 rows left-padded by 0, 5 and 9: ids, attention mask, positions."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab_size, (3, 17), generator=gen)
    mask = torch.ones(3, 17, dtype=torch.long)
    for row, pad in enumerate((0, 5, 9)):
        mask[row, :pad] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def run_steps(sess, model, config, np_dtype, prefill_keep: int, decode_steps: int = 8):
    """Prefill 17 tokens of a left-padded batch of 3, then greedy decode steps; yields (ours, reference,
    real-position mask, ort presents, reference presents) per step."""
    ids, mask, pos = padded_batch(config.vocab_size)
    empty = np.zeros((3, config.num_key_value_heads, 0, config.head_dim), np_dtype)
    past = [(empty, empty)] * config.num_hidden_layers
    cache = None
    keep = prefill_keep
    for step in range(decode_steps + 1):
        out = sess.run(None, ort_feed(ids.numpy(), mask.numpy(), pos.numpy(), past, keep))
        with torch.no_grad():
            ref, cache = model(ids, mask, pos, past_key_values=cache, logits_to_keep=keep)
        real = mask[:, -ref.shape[1]:].bool().numpy()
        yield out[0], ref.numpy(), real, out[1:], cache
        past = list(zip(out[1::2], out[2::2]))
        ids = torch.from_numpy(out[0][:, -1].argmax(-1)).view(3, 1)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        pos = pos[:, -1:] + 1
        keep = 1


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`llama-export ARGS` (as `python -m llama_export.exporter.cli`), its output captured."""
    return subprocess.run([sys.executable, "-m", "llama_export.exporter.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


# ---- the static cache's steps (static-cache and GroupQueryAttention pass tests) -------------------------------

SLOTS = 16


def steps(rng):
    """A left-padded prefill of 6 (row 1 padded by 2), then decode steps of 1, 2 and 1 tokens."""
    mask = np.ones((2, 6), np.int64)
    mask[1, :2] = 0
    yield rng.integers(3, GQA.vocab_size, (2, 6)), mask, 0
    for seq in (1, 2, 1):
        mask = np.concatenate([mask, np.ones((2, seq), np.int64)], axis=1)
        yield rng.integers(3, GQA.vocab_size, (2, seq)), mask, 1
