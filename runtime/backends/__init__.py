"""Backends run one forward step of an artifact's graph: the same small interface for ONNX Runtime, TensorRT and torch.

The interface speaks the portable contract (a growing `[batch, total]` attention mask, a cache the
backend returns and gets back). A backend adapts it to the graph flavour the manifest declares:
- `portable`: past/present tensors that grow by Concat (`ort.OrtBackend`);
- `static`: fixed `[batch, kv_heads, max_sequence_length, head_dim]` buffers that the graph updates with
  TensorScatter; `ort.StaticOrtBackend` binds each buffer as both the past input and the present output, so
  ONNX Runtime writes the new keys/values in place and no step copies the cache.
The TensorRT backend (`trt.TrtBackend`) runs the engine `llama-build` adds to a trt artifact.
The `torch` backend (the reference PyTorch model on the artifact's weights, for parity and as a baseline)
lives with the reference model in `exporter` and is found through an entry point.
Every backend says its context window (`max_length`): the model's, or less where the cache or the TensorRT engine is
smaller.

Static backends (ort and trt) also serve a pool of sequences (`SlotBackend`): a slot cache whose rows each hold
one sequence at its own length, stepped over a contiguous range of rows at a time. The in-flight batcher
(`runtime.inflight`) and `llama-generate`'s batches on static artifacts run on it.

Modules: `feeds` (the graph inputs by name, aligned arrays; shared), `ort` (ONNX Runtime), `trt` (TensorRT,
imported only when asked for).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..artifact import Artifact
from .feeds import NUMPY_DTYPES, Past, aligned_copy, aligned_empty, ort_feed, static_feed
from .ort import OrtBackend, SlotCache, StaticCache, StaticOrtBackend

__all__ = ["BACKENDS", "Backend", "NUMPY_DTYPES", "OrtBackend", "Past", "SlotBackend", "SlotCache", "StaticCache",
           "StaticOrtBackend", "aligned_copy", "aligned_empty", "open_backend", "ort_feed", "serves_slots",
           "static_feed"]


class Backend(Protocol):
    max_length: int
    num_layers: int
    kv_heads: int
    head_dim: int
    cache_dtype: type

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: Past,
                logits_to_keep: int) -> tuple[np.ndarray, Past]:
        """float32 logits `[batch, kept, vocab]` and the present cache. The logits may be the backend's own array,
        rewritten by the next step on the same cache: copy them to keep them."""

    def empty_cache(self, batch: int) -> Past:
        """The past of a first step: length 0."""

    def keep_rows(self, past: Past, rows: list[int]) -> Past:
        """The cache of only these batch rows (finished sequences leave the batch)."""


class SlotBackend(Backend, Protocol):
    """A static-cache backend serving a pool of sequences, one per row of its cache (the cache owns each row's
    length and mask: see `ort.SlotCache`)."""

    def slot_cache(self, rows: int):
        """A cache of `rows` empty rows."""

    def step_rows(self, cache, start: int, stop: int, input_ids: np.ndarray) -> np.ndarray:
        """Append `input_ids` `[stop - start, seq]` to rows start..stop-1, each at its own length; float32 logits
        `[stop - start, vocab]` of each row's last new token (valid until the next step on these rows)."""

    def clear_row(self, cache, row: int) -> None:
        """Empty one row (its sequence left)."""

    def move_row(self, cache, source: int, target: int) -> None:
        """Put row `source`'s sequence in row `target` (source is left empty)."""

    def swap_rows(self, cache, a: int, b: int) -> None:
        """Exchange the sequences of rows `a` and `b` (a finished sequence kept for its prefix, say)."""

    def truncate_row(self, cache, row: int, length: int) -> None:
        """Keep the first `length` positions of a row's sequence; the next step on it writes from there."""

    def copy_prefix(self, cache, source: int, target: int, length: int) -> None:
        """Row `target` (free) takes a copy of the first `length` positions of row `source` (a running sequence
        whose prompt another prompt starts with)."""


def serves_slots(backend) -> bool:
    """Whether the backend serves a pool of sequences (`SlotBackend`): a static-cache ort or trt backend."""
    return hasattr(backend, "slot_cache") and getattr(backend, "flavour", "static") == "static"


BACKENDS = ("ort", "trt", "torch")
PLUGINS = "llama_export.backends"  # entry points of backends that live outside the runtime (torch)


def _plugin(name: str):
    from importlib.metadata import entry_points

    found = entry_points(group=PLUGINS, name=name)
    if not found:
        raise ValueError(f"the {name} backend is not installed: it comes with llama-export's reference model "
                         f"(`pip install -e .` registers it under the {PLUGINS} entry points)")
    return next(iter(found)).load()


def open_backend(artifact: Artifact, name: str = "ort", threads: int | None = None, cuda_graph: bool = False):
    """The backend `name` for the artifact's graph flavour (`cuda_graph`: trt only)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; this runtime has: {', '.join(BACKENDS)}")
    if name == "torch":  # the reference PyTorch model on the artifact's weights, whatever its flavour
        if cuda_graph:
            raise ValueError("--cuda-graph is for the trt backend")
        return _plugin(name)(artifact, threads)
    if name == "trt":
        from .trt import TrtBackend

        return TrtBackend(artifact, cuda_graph)
    if cuda_graph:
        raise ValueError("--cuda-graph is for the trt backend")
    flavour = artifact.flavour
    if flavour == "portable":
        return OrtBackend(artifact, threads)
    if flavour == "static":
        return StaticOrtBackend(artifact, threads)
    raise ValueError(f"{artifact.directory}: graph flavour {flavour!r} is not one this runtime runs "
                     f"(portable, static); re-export with this llama-export")
