"""What every backend shares: the graph inputs by name (portable and static feeds) and 64-byte aligned arrays."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class SlotState:
    """What a slot cache keeps per row, as gpt-fast's KVCache does: each row's filled length and its
    `[rows, max_sequence_length]` mask of real slots, extended in place by a step (the new tokens' entries only) and
    never rebuilt. Shared by the ort and trt slot caches."""
    lengths: np.ndarray  # int64 [rows]
    mask: np.ndarray  # int64 [rows, max_sequence_length]

    @staticmethod
    def arrays(rows: int, slots: int) -> tuple[np.ndarray, np.ndarray]:
        mask = aligned_empty((rows, slots), np.int64)
        mask[...] = 0
        return np.zeros(rows, np.int64), mask

    def begin(self, start: int, stop: int, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows start..stop-1 take `input_ids` `[rows, seq]`: their new slots become real; (their lengths before the
        step, the new tokens' positions). Checked against the cache's slots."""
        batch, seq = input_ids.shape
        slots = self.mask.shape[1]
        if batch != stop - start or not 0 <= start < stop <= len(self.lengths):
            raise ValueError(f"{batch} rows of input for cache rows {start}..{stop - 1} of {len(self.lengths)}")
        lengths = self.lengths[start:stop]
        if int(lengths.max()) + seq > slots:
            raise ValueError(f"{int(lengths.max()) + seq} tokens do not fit the static cache of {slots} slots; "
                             f"re-export with a larger --max-seq-len")
        for row, length in enumerate(lengths):
            self.mask[start + row, length:length + seq] = 1
        return lengths.copy(), lengths[:, None] + np.arange(seq)

    def end(self, start: int, stop: int, seq: int, ran: bool) -> None:
        """After the step: the rows grow by `seq`, or (`ran` False: the step failed) their new slots are unmarked."""
        if ran:
            self.lengths[start:stop] += seq
            return
        for row in range(start, stop):
            self.mask[row, self.lengths[row]:self.lengths[row] + seq] = 0

    def clear(self, row: int) -> None:
        self.mask[row] = 0  # the row's keys and values stay: masked, they weigh exactly 0
        self.lengths[row] = 0

    def move(self, source: int, target: int) -> None:
        self.mask[target], self.lengths[target] = self.mask[source], self.lengths[source]
        self.clear(source)

    def swap(self, a: int, b: int) -> None:
        self.mask[[a, b]] = self.mask[[b, a]]
        self.lengths[[a, b]] = self.lengths[[b, a]]

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Row `target` holds the first `length` positions of row `source` (copied by the backend) and nothing else."""
        if not 0 < length <= self.lengths[source]:
            raise ValueError(f"row {source} holds {int(self.lengths[source])} positions; cannot copy {length}")
        self.mask[target] = 0
        self.mask[target, :length] = 1
        self.lengths[target] = length

    def truncate(self, row: int, length: int) -> None:
        """Keep the row's first `length` positions (a cached prefix): the rest is unmarked, to be written again."""
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"row {row} holds {int(self.lengths[row])} positions; cannot keep {length}")
        self.mask[row, length:] = 0
        self.lengths[row] = length
