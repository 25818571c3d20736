"""The ONNX Runtime backends: the CUDA provider when onnxruntime-gpu has it, else the CPU.

`OrtBackend` runs a portable graph (past/present tensors that grow by Concat). `StaticOrtBackend` runs a
static-cache graph with each cache buffer bound as both the past input and the present output through an
IOBinding, so ONNX Runtime writes the new keys/values in place and no step copies the cache; it serves one
batch (`StaticCache`, the `Backend` contract) or a pool of sequences (`SlotCache`, the `SlotBackend` one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..artifact import Artifact
from .feeds import NUMPY_DTYPES, Past, SlotState, aligned_copy, aligned_empty, ort_feed, static_feed


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
        self.max_length = artifact.max_length

    def forward(self, input_ids, attention_mask, position_ids, past, logits_to_keep):
        out = self.session.run(None, ort_feed(input_ids, attention_mask, position_ids, past, logits_to_keep))
        return out[0], list(zip(out[1::2], out[2::2]))

    def empty_cache(self, batch: int) -> Past:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.cache_dtype)
        return [(empty, empty)] * self.num_layers

    def keep_rows(self, past: Past, rows: list[int]) -> Past:
        return [(key[rows], value[rows]) for key, value in past]


@dataclass
class StepArrays:
    """A static step's small inputs and its logits, bound once and then rewritten in place while the steps keep
    their shape (every decode step of a cache), so that a step neither binds nor allocates."""
    inputs: dict[str, np.ndarray]
    logits: np.ndarray

    def fits(self, batch: int, seq: int, kept: int) -> bool:
        return self.inputs["input_ids"].shape == (batch, seq) and self.logits.shape[1] == kept


@dataclass
class StaticCache:
    """The static flavour's cache: one preallocated buffer pair per layer and how many slots are written.
    `forward` updates the buffers in place: a cache passed to it is consumed."""
    buffers: list[tuple[Any, Any]]  # onnxruntime.OrtValue pairs
    length: int
    host: list[np.ndarray] = field(default_factory=list, repr=False)  # the CPU arrays the OrtValues wrap
    binding: Any = field(default=None, repr=False)  # an IOBinding with each buffer bound as past and present
    step: StepArrays | None = field(default=None, repr=False)  # what the binding's other names are bound to


@dataclass
class RowsBinding:
    """One contiguous range of a slot cache's rows, bound once: each layer's buffer rows as past and present, the
    cache's own mask rows, and small input and logits arrays rewritten in place by each step (the token ids and
    positions rebound when the step's length changes)."""
    binding: Any  # onnxruntime.IOBinding
    inputs: dict[str, np.ndarray]
    logits: np.ndarray


@dataclass
class SlotCache(SlotState):
    """A static cache as a pool of sequences, one per row, each at its own length (`SlotState`); the graph's attention
    mask is bound to rows of the state's own mask, so a step writes only its new tokens' entries. Stepped through the
    backend's `step_rows`, over a contiguous range of rows, each range bound once."""
    host: list[np.ndarray] = field(default_factory=list)  # per layer key, value: [rows, kv_heads, slots, head_dim]
    values: list[Any] = field(default_factory=list)  # the OrtValues holding them (on the session's device)
    bindings: dict[tuple[int, int], RowsBinding] = field(default_factory=dict, repr=False)

class StaticOrtBackend(OrtBackend):
    """ONNX Runtime on a static-cache graph, the cache updated in place through IOBinding. The binding of the
    buffers is made once per cache, and that of a step's small inputs and logits once per step shape, so a decode
    step only writes its token ids, mask, positions and write slots into arrays already bound. The logits it
    returns are such an array: valid until the next step on the same cache (copy them to keep them)."""

    def __init__(self, artifact: Artifact, threads: int | None = None, providers: list[str] | None = None):
        super().__init__(artifact, threads, providers)
        self.max_sequence_length = artifact.max_sequence_length
        self.vocab_size = artifact.config["vocab_size"]
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def _cache(self, host: list[np.ndarray], length: int) -> StaticCache:
        import onnxruntime as ort

        # On the CPU an OrtValue wraps its numpy array without copying, so each buffer has its own array,
        # kept alive by the cache.
        values = [ort.OrtValue.ortvalue_from_numpy(array, self.device) for array in host]
        binding = self.session.io_binding()
        for i in range(self.num_layers):
            for kind, buffer in (("key", values[2 * i]), ("value", values[2 * i + 1])):
                binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buffer)
                binding.bind_ortvalue_output(f"present.{i}.{kind}", buffer)
        return StaticCache(list(zip(values[0::2], values[1::2])), length, host if self.device == "cpu" else [],
                           binding)

    def empty_cache(self, batch: int) -> StaticCache:
        shape = (batch, self.kv_heads, self.max_sequence_length, self.head_dim)
        # zero-filled, since masked slots still meet the value matrix (0 × NaN would be NaN)
        buffers = [aligned_empty(shape, self.cache_dtype) for _ in range(2 * self.num_layers)]
        for buffer in buffers:
            buffer[...] = 0
        return self._cache(buffers, 0)

    def keep_rows(self, past: StaticCache, rows: list[int]) -> StaticCache:
        """New, smaller buffers holding these rows (one copy, when rows finish)."""
        arrays = past.host or [value.numpy() for pair in past.buffers for value in pair]
        return self._cache([aligned_copy(array[rows]) for array in arrays], past.length)

    def forward(self, input_ids, attention_mask, position_ids, past: StaticCache, logits_to_keep):
        import onnxruntime as ort

        batch, seq = input_ids.shape
        total = past.length + seq
        if total > self.max_sequence_length:
            raise ValueError(f"{total} tokens do not fit the static cache of {self.max_sequence_length} slots; "
                             f"re-export with a larger --max-seq-len")
        kept = seq if logits_to_keep <= 0 else min(logits_to_keep, seq)
        step = past.step
        if step is not None and step.fits(batch, seq, kept):  # rewrite the bound arrays in place
            static_feed(input_ids, attention_mask, position_ids, past.length, self.max_sequence_length, step.inputs)
        else:  # new arrays for this step shape, bound once
            inputs = static_feed(input_ids, attention_mask, position_ids, past.length, self.max_sequence_length)
            inputs["logits_to_keep"] = np.array(kept, np.int64)
            step = StepArrays(inputs, aligned_empty((batch, kept, self.vocab_size), np.float32))
            for name, array in inputs.items():
                past.binding.bind_cpu_input(name, array)
            past.binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(step.logits))
        self.session.run_with_iobinding(past.binding)
        return step.logits, StaticCache(past.buffers, total, past.host, past.binding, step)

    # ---- a pool of sequences (SlotBackend) ------------------------------------------------------------------

    def slot_cache(self, rows: int) -> SlotCache:
        import onnxruntime as ort

        shape = (rows, self.kv_heads, self.max_sequence_length, self.head_dim)
        host = [aligned_empty(shape, self.cache_dtype) for _ in range(2 * self.num_layers)]
        for buffer in host:  # zeros: masked slots still meet the value matrix (0 × NaN would be NaN)
            buffer[...] = 0
        values = [ort.OrtValue.ortvalue_from_numpy(array, self.device) for array in host]
        return SlotCache(*SlotState.arrays(rows, self.max_sequence_length), host if self.device == "cpu" else [],
                         values)

    def _bind_rows(self, cache: SlotCache, start: int, stop: int) -> RowsBinding:
        """The binding of rows start..stop-1: each buffer's rows by address (a view, no copy), as past and present."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        row_shape = (self.kv_heads, self.max_sequence_length, self.head_dim)
        row_bytes = int(np.prod(row_shape)) * np.dtype(self.cache_dtype).itemsize
        for i, value in enumerate(cache.values):
            name = f"{i // 2}.{('key', 'value')[i % 2]}"
            address = value.data_ptr() + start * row_bytes
            shape = (stop - start, *row_shape)
            binding.bind_input(f"past_key_values.{name}", self.device, 0, self.cache_dtype, shape, address)
            binding.bind_output(f"present.{name}", self.device, 0, self.cache_dtype, shape, address)
        batch = stop - start
        inputs = {"attention_mask": cache.mask[start:stop], "write_indices": np.zeros(batch, np.int64),
                  "logits_to_keep": np.array(1, np.int64)}
        for name, array in inputs.items():
            binding.bind_cpu_input(name, array)
        logits = aligned_empty((batch, 1, self.vocab_size), np.float32)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        return RowsBinding(binding, inputs, logits)

    def step_rows(self, cache: SlotCache, start: int, stop: int, input_ids: np.ndarray) -> np.ndarray:
        batch, seq = input_ids.shape
        lengths, positions = cache.begin(start, stop, input_ids)
        rows = cache.bindings.get((start, stop))
        if rows is None:
            rows = cache.bindings[start, stop] = self._bind_rows(cache, start, stop)
        inputs = rows.inputs
        if inputs.get("input_ids", np.empty(0)).shape != (batch, seq):  # a new step length: new arrays, bound once
            for name in ("input_ids", "position_ids"):
                inputs[name] = np.empty((batch, seq), np.int64)
                rows.binding.bind_cpu_input(name, inputs[name])
        inputs["input_ids"][...] = input_ids
        inputs["position_ids"][...] = positions
        inputs["write_indices"][...] = lengths
        ran = False
        try:
            self.session.run_with_iobinding(rows.binding)
            ran = True
        finally:
            cache.end(start, stop, seq, ran)
        return rows.logits[:, -1]

    def clear_row(self, cache: SlotCache, row: int) -> None:
        cache.clear(row)

    def move_row(self, cache: SlotCache, source: int, target: int) -> None:
        length = int(cache.lengths[source])
        if cache.host:
            for array in cache.host:
                array[target, :, :length] = array[source, :, :length]
        else:  # device buffers: an Identity session copies the rows on the device
            self._row_copier(cache, source, target)
        cache.move(source, target)

    def swap_rows(self, cache: SlotCache, a: int, b: int) -> None:
        if a == b:
            return
        if not cache.host:
            raise NotImplementedError("swapping rows of a device cache: only host caches keep finished rows")
        la, lb = int(cache.lengths[a]), int(cache.lengths[b])
        for array in cache.host:
            kept = array[a, :, :la].copy()
            array[a, :, :lb] = array[b, :, :lb]
            array[b, :, :la] = kept
        cache.swap(a, b)

    def copy_prefix(self, cache: SlotCache, source: int, target: int, length: int) -> None:
        if not cache.host:
            raise NotImplementedError("copying a prefix between rows of a device cache")
        for array in cache.host:
            array[target, :, :length] = array[source, :, :length]
        cache.copy_prefix(source, target, length)

    def truncate_row(self, cache: SlotCache, row: int, length: int) -> None:
        cache.truncate(row, length)  # the positions past it stay, masked, until written again

    def _row_copier(self, cache: SlotCache, source: int, target: int) -> None:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        if getattr(self, "_copier", None) is None:
            count = len(cache.values)
            element = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}[self.cache_dtype]
            shape = [1, self.kv_heads, self.max_sequence_length, self.head_dim]
            graph = helper.make_graph(
                [helper.make_node("Identity", [f"x{i}"], [f"y{i}"]) for i in range(count)], "rows",
                [helper.make_tensor_value_info(f"x{i}", element, shape) for i in range(count)],
                [helper.make_tensor_value_info(f"y{i}", element, shape) for i in range(count)])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
            self._copier = ort.InferenceSession(model.SerializeToString(), providers=self.session.get_providers())
        binding = self._copier.io_binding()
        row_bytes = self.kv_heads * self.max_sequence_length * self.head_dim * np.dtype(self.cache_dtype).itemsize
        shape = (1, self.kv_heads, self.max_sequence_length, self.head_dim)
        for i, value in enumerate(cache.values):
            binding.bind_input(f"x{i}", self.device, 0, self.cache_dtype, shape, value.data_ptr() + source * row_bytes)
            binding.bind_output(f"y{i}", self.device, 0, self.cache_dtype, shape, value.data_ptr() + target * row_bytes)
        self._copier.run_with_iobinding(binding)
