"""Shared by the graph-pass tests: a traced graph to rewrite, and ONNX Runtime runs of it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch

from exporter.artifact import build_artifact
from exporter.checkpoint import RandomCheckpoint
from runtime.backends import ort_feed

from conftest import small_config

GQA = small_config(num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)


def traced(directory: Path, config=GQA, dtype: str = "float32") -> Path:
    """The exported, unoptimized portable graph of a random-weight model."""
    build_artifact(RandomCheckpoint(config, seed=3), directory, dtype, log=lambda msg: None)
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
            diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) / scale
            assert diff <= tolerance, f"output differs by {diff:.3g} × its scale"
            worst = max(worst, diff)
    return worst


def perplexity(directory, ids) -> tuple[float, np.ndarray]:
    """Perplexity of the artifact in `directory` (ORT, optimizations on) on `ids`, and its top-1 per position."""
    empty = np.zeros((1, 4, 0, 32), np.float32)
    feed = ort_feed(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], [(empty, empty)] * 4, 0)
    logits = run(directory / "model.onnx", feed, optimized=True)[0][0]
    nll = torch.nn.functional.cross_entropy(torch.from_numpy(logits[:-1]), torch.from_numpy(ids[0, 1:])).item()
    return math.exp(nll), logits.argmax(-1)
