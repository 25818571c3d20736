"""Backends run one forward step of an artifact's graph: the same small interface for each engine.

The interface speaks the portable contract (a growing `[batch, total]` attention mask, a cache the
backend returns and gets back). A backend adapts it to the graph flavour the manifest declares:
- `portable`: past/present tensors that grow by Concat (`OrtBackend`);
- `static`: fixed `[batch, kv_heads, max_sequence_length, head_dim]` buffers that the graph updates with
  TensorScatter; `StaticOrtBackend` binds each buffer as both the past input and the present output, so
  ONNX Runtime writes the new keys/values in place and no step copies the cache.
The TensorRT backend (`trt_backend.TrtBackend`) runs the engine `llama-build` adds to a trt artifact.
The `torch` backend (the reference PyTorch model on the artifact's weights, for parity and as a baseline)
lives with the reference model in `exporter` and is found through an entry point.
Every backend says its context window (`max_length`): the model's, or less where the cache or engine is
smaller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .artifact import Artifact

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
        from .trt_backend import TrtBackend

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
