"""Backends run one forward step of the portable graph: the same small interface for each engine."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .artifact import Artifact

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
Past = list[tuple[np.ndarray, np.ndarray]]


def ort_feed(input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: Past,
             logits_to_keep: int) -> dict[str, np.ndarray]:
    """The portable graph's inputs by name."""
    feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "logits_to_keep": np.array(logits_to_keep, dtype=np.int64)}
    for i, (k, v) in enumerate(past):
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k, v
    return feed


class Backend(Protocol):
    num_layers: int
    kv_heads: int
    head_dim: int
    cache_dtype: type

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: Past,
                logits_to_keep: int) -> tuple[np.ndarray, Past]:
        """float32 logits `[batch, kept, vocab]` and the present cache."""

    def empty_cache(self, batch: int) -> Past:
        """The past of a first step: length 0."""


class OrtBackend:
    """ONNX Runtime: the CUDA provider when onnxruntime-gpu has it, else the CPU."""

    def __init__(self, artifact: Artifact, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort

        if artifact.dtype not in NUMPY_DTYPES:
            raise ValueError(f"the ort backend runs float32/float16 artifacts; {artifact.directory} is {artifact.dtype}")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(artifact.graph_path), options, providers=providers)
        c = artifact.config
        self.num_layers, self.kv_heads = c["num_hidden_layers"], c["num_key_value_heads"]
        self.head_dim = artifact.head_dim
        self.cache_dtype = NUMPY_DTYPES[artifact.dtype]

    def forward(self, input_ids, attention_mask, position_ids, past, logits_to_keep):
        out = self.session.run(None, ort_feed(input_ids, attention_mask, position_ids, past, logits_to_keep))
        return out[0], list(zip(out[1::2], out[2::2]))

    def empty_cache(self, batch: int) -> Past:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.cache_dtype)
        return [(empty, empty)] * self.num_layers
