"""What every backend shares: the graph inputs by name (portable and static feeds) and 64-byte aligned arrays."""

from __future__ import annotations

import numpy as np

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
Past = list[tuple[np.ndarray, np.ndarray]]
ALIGN = 64  # bytes: a cache line, and one AVX-512 load


def aligned_empty(shape: tuple[int, ...], dtype, align: int = ALIGN) -> np.ndarray:
    """An uninitialised array whose data starts on an `align`-byte boundary, like ONNX Runtime's own buffers.
    numpy's large arrays start 16 bytes past one, so that a kernel's 64-byte loads of a cache row or of the logits
    each straddle two cache lines."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(size + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + size].view(dtype).reshape(shape)


def aligned_copy(array: np.ndarray) -> np.ndarray:
    out = aligned_empty(array.shape, array.dtype)
    out[...] = array
    return out


def ort_feed(input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: Past,
             logits_to_keep: int) -> dict[str, np.ndarray]:
    """The portable graph's inputs by name."""
    feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "logits_to_keep": np.array(logits_to_keep, dtype=np.int64)}
    for i, (k, v) in enumerate(past):
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k, v
    return feed


def static_feed(input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, written: int,
                slots: int, into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The static graph's step inputs besides the cache and logits_to_keep: the portable `[batch, written +
    sequence]` mask placed on the first of `slots` slots, and the slot each row writes first. Written into the
    arrays of `into` (a feed of the same shapes) when given, else into new ones."""
    batch, seq = input_ids.shape
    total = written + seq
    if attention_mask.shape != (batch, total):
        raise ValueError(f"attention_mask is {attention_mask.shape}, expected {(batch, total)}")
    feed = into if into is not None else {
        "input_ids": np.empty((batch, seq), np.int64), "attention_mask": np.empty((batch, slots), np.int64),
        "position_ids": np.empty((batch, seq), np.int64), "write_indices": np.empty(batch, np.int64)}
    feed["input_ids"][...] = input_ids
    feed["attention_mask"][:, :total] = attention_mask
    feed["attention_mask"][:, total:] = 0
    feed["position_ids"][...] = position_ids
    feed["write_indices"][...] = written
    return feed
