"""Activation statistics for quantization: run real token sequences through the graph in ONNX Runtime.

The graph (weights included) is saved once to a scratch directory with the requested intermediate values
added as outputs; each sequence is one prefill from an empty cache. The statistic kept per value is the
per-channel peak `max |x[..., k]|` over every position of every sequence.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

def _feed(model: ir.Model, ids: np.ndarray) -> dict[str, np.ndarray]:
    """A prefill of `ids` ([1, T]) from an empty cache, for the portable I/O contract."""
    batch, length = ids.shape
    feed = {}
    for value in model.graph.inputs:
        name = value.name
        if name == "input_ids":
            feed[name] = ids.astype(np.int64)
        elif name == "attention_mask":
            feed[name] = np.ones((batch, length), np.int64)
        elif name == "position_ids":
            feed[name] = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()
        elif name == "logits_to_keep":
            feed[name] = np.array(1, np.int64)
        elif name.startswith("past_key_values."):
            heads, head_dim = value.shape[1], value.shape[3]
            feed[name] = np.zeros((batch, heads, 0, head_dim), value.dtype.numpy())
        else:
            raise ValueError(f"cannot calibrate: the graph has an input {name!r} outside the portable contract")
    return feed


def channel_peaks(model: ir.Model, values: Sequence[ir.Value], sequences: Sequence[np.ndarray], scratch: Path,
                  threads: int = 0, log: Callable[[str], None] = lambda msg: None) -> dict[str, np.ndarray]:
    """{value name: float32 [channels] peak |x|} over `sequences` (each int64 [1, T])."""
    if not sequences:
        raise ValueError("calibration needs at least one token sequence")
    work = Path(tempfile.mkdtemp(prefix=".calibration-", dir=scratch))
    added = [v for v in values if v not in model.graph.outputs]
    model.graph.outputs.extend(added)
    try:
        path = work / "model.onnx"
        ir.save(model, str(path), external_data="model.onnx.data")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [v.name for v in values]
        peaks = {name: None for name in names}
        for i, ids in enumerate(sequences):
            outputs = session.run(names, _feed(model, ids))
            for name, x in zip(names, outputs):
                peak = np.abs(x.astype(np.float32)).reshape(-1, x.shape[-1]).max(axis=0)
                peaks[name] = peak if peaks[name] is None else np.maximum(peaks[name], peak)
            log(f"    calibration sequence {i + 1}/{len(sequences)} ({ids.shape[1]} tokens)")
        return peaks
    finally:
        for v in added:
            model.graph.outputs.remove(v)
        shutil.rmtree(work, ignore_errors=True)
