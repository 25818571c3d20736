"""The TensorRT backend: an artifact's engine (built by `llama-build`) on a CUDA GPU.

Every buffer is a torch CUDA tensor allocated once per request batch; a step only sets shapes and
addresses and enqueues the engine (`execute_async_v3`) on a stream of its own. `logits_to_keep` is a
shape tensor TensorRT reads on the host.
- portable graph: the `context` profile runs a prompt (no past), the `generation` profile one token
  with past; each has an execution context of its own. The cache ping-pongs between two
  preallocated buffers per tensor (the graph's Concat writes past + new into the other one).
- static graph: one profile; each present output aliases its past input (the same address), so the
  engine's KV-cache update writes the new keys/values in place. `cuda_graph=True` captures a decode
  step per batch (after one run at its shapes, which warms it up) and replays it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..artifact import Artifact
from ..artifact_format import DTYPES, EngineRecord
from .feeds import SlotState, static_feed

KEEP = "logits_to_keep"


def engine_mismatch(record: EngineRecord, tensorrt_version: str, gpu_name: str,
                    capability: tuple[int, int]) -> str | None:
    """Why an engine built as `record` says cannot run with this TensorRT and GPU (None: it can)."""
    if record.tensorrt_version != tensorrt_version:
        return f"built with TensorRT {record.tensorrt_version}, this is TensorRT {tensorrt_version}"
    built = record.gpu
    here = f"{capability[0]}.{capability[1]}"
    if record.hardware_compatible:
        if capability < (8, 0):
            return f"built for Ampere or newer GPUs, this {gpu_name} has compute capability {here}"
        return None
    if built["name"] != gpu_name or built["compute_capability"] != here:
        return (f"built for {built['name']} (compute capability {built['compute_capability']}), this is {gpu_name} "
                f"({here}); an engine runs only on the GPU model it was built on (or build with --hardware-compatible)")
    return None


def pick_profile(profiles: list[dict], batch: int, seq: int, past: int, rebuild: str) -> int:
    """The index of the profile whose ranges hold this step; a clear error naming the flag otherwise."""
    step = {"batch": batch, "sequence_length": seq, "past_sequence_length": past, "total_sequence_length": past + seq}
    for index, spec in enumerate(profiles):
        dims = spec["dimensions"]
        if all(lo <= step[d] <= hi for d, (lo, _, hi) in dims.items() if d in step):
            return index
    limits = {d: max(spec["dimensions"][d][2] for spec in profiles if d in spec["dimensions"]) for d in step
              if any(d in spec["dimensions"] for spec in profiles)}
    flags = {"batch": "--max-batch", "sequence_length": "--max-input-len", "total_sequence_length": "--max-seq-len"}
    for dim in ("batch", "sequence_length", "total_sequence_length"):
        if dim in limits and step[dim] > limits[dim] and not (dim == "sequence_length" and past):
            raise ValueError(f"{dim.replace('_', ' ')} {step[dim]} exceeds the engine's {limits[dim]}; rebuild "
                             f"with: {rebuild} {flags[dim]} {step[dim]}")
    raise ValueError(f"no profile of the engine runs {seq} new tokens after {past} cached ones: its profiles run a "
                     f"prompt without past, or one token at a time after it")


def cuda_graph_refusal(weight_streaming: bool, budget: int, streamable: int) -> str | None:
    """Why a CUDA graph cannot be captured on this engine (None: it can). An engine whose weight-streaming
    budget is below its streamable weights copies weights in during `enqueueV3`, which is then synchronous
    and cannot be captured."""
    if weight_streaming and 0 <= budget < streamable:
        return (f"--cuda-graph cannot capture this engine: it streams weights (budget {budget} B of "
                f"{streamable} B streamable), so each enqueue is synchronous; drop --cuda-graph, or rebuild without "
                f"--weight-streaming on a GPU that holds the weights")
    return None


def expect(ok: bool, call: str, name: str, value: Any) -> None:
    """Raise naming the tensor and what was asked, when a TensorRT setter returns False (it does not raise)."""
    if not ok:
        raise RuntimeError(f"TensorRT refused {call}({name!r}, {value}): outside the engine's profile or not one of "
                           f"its tensors")


def changed_bindings(captured: dict[tuple, Any], current: dict[tuple, Any]) -> list[tuple]:
    """What was set on a context (("shape" | "address" | "keep", tensor) → value) since a CUDA graph was
    captured on it: a captured graph replays only on the shapes and addresses it was captured at."""
    return sorted(key for key in captured.keys() | current.keys() if captured.get(key) != current.get(key))


@dataclass
class TrtCache:
    """One request batch's cache on the GPU and how many positions it holds. Portable graphs: two buffers
    per tensor, `current` says which holds the past. Static graphs: one buffer per tensor."""
    buffers: list[list[Any]]  # per past tensor: torch CUDA tensors
    length: int
    current: int = 0
    graphs: dict = field(default_factory=dict, repr=False)  # captured decode steps of this cache


@dataclass
class TrtSlotCache(SlotState):
    """A static engine's cache as a pool of sequences (`SlotState`): one `[rows, kv_heads, slots, head_dim]` CUDA
    tensor per past tensor; a step binds the rows it runs (a contiguous range: a view, no copy)."""
    buffers: list[Any] = field(default_factory=list)


class TrtBackend:
    def __init__(self, artifact: Artifact, cuda_graph: bool = False):
        rebuild = f"llama-build {artifact.directory}"
        record = artifact.manifest.tensorrt.engine if artifact.manifest.tensorrt else None
        if record is None:
            raise ValueError(f"{artifact.directory} has no TensorRT engine; build it with: {rebuild}")
        try:
            import tensorrt as trt
        except ImportError as err:
            raise ValueError(f"the trt backend needs TensorRT 11 (pip install tensorrt): {err}") from None
        import torch

        if not torch.cuda.is_available():
            raise ValueError("the trt backend needs an NVIDIA GPU, and torch sees none")
        problem = engine_mismatch(record, trt.__version__, torch.cuda.get_device_name(0),
                                  torch.cuda.get_device_capability(0))
        if problem:
            raise ValueError(f"{artifact.directory / record.file}: {problem}; rebuild it here with: {rebuild}")
        if artifact.dtype not in DTYPES:
            raise ValueError(f"{artifact.directory}: dtype {artifact.dtype} is not one the trt backend runs")
        if cuda_graph and artifact.flavour != "static":
            raise ValueError("--cuda-graph needs fixed shapes and addresses: a static-cache artifact (llama-export "
                             "--kv-cache static)")
        self.torch, self.rebuild, self.cuda_graph = torch, rebuild, cuda_graph
        self.device = torch.device("cuda", 0)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine((artifact.directory / record.file).read_bytes())
        if self.engine is None:
            raise ValueError(f"{artifact.directory / record.file}: TensorRT could not deserialize the engine (see "
                             f"its message above); rebuild it with: {rebuild}")
        if record.weight_streaming:  # keep on the GPU what TensorRT judges fits; stream the rest
            self.engine.weight_streaming_budget_v2 = self.engine.get_weight_streaming_automatic_budget()
        if cuda_graph:
            refusal = cuda_graph_refusal(record.weight_streaming, self.engine.weight_streaming_budget_v2,
                                         self.engine.streamable_weights_size)
            if refusal:
                raise ValueError(f"{artifact.directory}: {refusal}")
        self.stream = torch.cuda.Stream(self.device)
        self.profiles, self.flavour = record.profiles, artifact.flavour
        self.contexts = []
        for index in range(len(self.profiles)):  # one execution context per profile, each set once
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(index, self.stream.cuda_stream)
            self.contexts.append(context)
        self.stream.synchronize()
        self.keep_on_host = self.engine.is_shape_inference_io(KEEP)
        c = artifact.config
        self.num_layers, self.kv_heads = c["num_hidden_layers"], c["num_key_value_heads"]
        self.head_dim = artifact.head_dim
        self.vocab = c["vocab_size"]
        self.cache_dtype = getattr(torch, artifact.dtype)
        self.max_length = min(artifact.max_length, record.limits.max_seq_len)
        self.slots = artifact.max_sequence_length
        self.names = [(f"past_key_values.{i}.{kind}", f"present.{i}.{kind}") for i in range(self.num_layers)
                      for kind in ("key", "value")]
        self._keep = np.zeros((), np.int64)  # the host shape tensor; alive as long as the backend
        self._outputs: dict[int, Any] = {}
        self._bound: dict[int, dict[tuple, Any]] = {id(c): {} for c in self.contexts}  # what is set, per context

    def empty_cache(self, batch: int) -> TrtCache:
        torch = self.torch
        with torch.cuda.stream(self.stream):  # every buffer is made and used on the engine's stream
            if self.flavour == "static":
                shape = (batch, self.kv_heads, self.slots, self.head_dim)  # zeros: masked slots still meet V
                return TrtCache([[torch.zeros(shape, dtype=self.cache_dtype, device=self.device)]
                                 for _ in self.names], 0)
            size = batch * self.kv_heads * self.max_length * self.head_dim
            return TrtCache([[torch.empty(size, dtype=self.cache_dtype, device=self.device) for _ in range(2)]
                             for _ in self.names], 0)

    def keep_rows(self, past: TrtCache, rows: list[int]) -> TrtCache:
        """A cache of only these rows (one copy on the GPU, when rows finish)."""
        smaller = self.empty_cache(len(rows))
        with self.torch.cuda.stream(self.stream):
            index = self.torch.tensor(rows, device=self.device)
            for old, new in zip(past.buffers, smaller.buffers):
                if self.flavour == "static":
                    new[0].copy_(old[0].index_select(0, index))
                else:
                    batch = old[past.current].numel() // (self.kv_heads * self.max_length * self.head_dim)
                    shape = (batch, self.kv_heads, past.length, self.head_dim)
                    size = len(rows) * self.kv_heads * past.length * self.head_dim
                    current = old[past.current][:batch * self.kv_heads * past.length * self.head_dim].view(shape)
                    new[0][:size].copy_(current.index_select(0, index).reshape(-1))
        return TrtCache(smaller.buffers, past.length, 0)

    def _shape(self, context, name: str, shape: tuple) -> None:
        expect(context.set_input_shape(name, shape), "set_input_shape", name, shape)
        self._bound[id(context)]["shape", name] = shape

    def _address(self, context, name: str, address: int, shape: tuple = ()) -> None:
        expect(context.set_tensor_address(name, address), "set_tensor_address", name, f"shape {shape}")
        self._bound[id(context)]["address", name] = address

    def _bind(self, context, name: str, tensor) -> None:
        self._shape(context, name, tuple(tensor.shape))
        self._address(context, name, tensor.data_ptr(), tuple(tensor.shape))

    def _inputs(self, context, feeds: dict[str, np.ndarray], keep: int) -> dict:
        """Copy the step's small inputs to the GPU and bind them; returns the tensors (alive until the run)."""
        tensors = {name: self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for name, a in feeds.items()}
        for name, tensor in tensors.items():
            self._bind(context, name, tensor)
        if self.keep_on_host:
            self._keep[...] = keep
            self._bound[id(context)]["keep", KEEP] = keep
            self._address(context, KEEP, self._keep.ctypes.data)
        else:
            tensors[KEEP] = self.torch.tensor(keep, dtype=self.torch.int64, device=self.device)
            self._address(context, KEEP, tensors[KEEP].data_ptr())
        return tensors

    def _logits(self, context, batch: int, kept: int):
        """The logits buffer: one per batch size for the usual one kept position, allocated on first use and
        reused (each step copies it out); a fresh one for other shapes."""
        logits = self._outputs.get(batch) if kept == 1 else None
        if logits is None:
            logits = self.torch.empty((batch, kept, self.vocab), dtype=self.torch.float32, device=self.device)
            if kept == 1:
                self._outputs[batch] = logits
        shape = tuple(context.get_tensor_shape("logits"))
        if shape != tuple(logits.shape):
            raise RuntimeError(f"the engine's logits are {shape}, expected {tuple(logits.shape)}")
        self._address(context, "logits", logits.data_ptr(), shape)
        return logits

    def _run(self, context) -> None:
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT failed to enqueue the step (see its message above)")

    def forward(self, input_ids, attention_mask, position_ids, past: TrtCache, logits_to_keep):
        batch, seq = input_ids.shape
        total = past.length + seq
        if total > self.max_length:
            raise ValueError(f"{total} tokens exceed the engine's window of {self.max_length}; rebuild with: "
                             f"{self.rebuild} --max-seq-len {total}")
        index = pick_profile(self.profiles, batch, seq, past.length, self.rebuild)
        context = self.contexts[index]
        kept = seq if logits_to_keep == 0 else min(logits_to_keep, seq)
        with self.torch.cuda.stream(self.stream):
            if self.flavour == "static":
                return self._forward_static(context, input_ids, attention_mask, position_ids, past, logits_to_keep,
                                            kept)
            tensors = self._inputs(context, {"input_ids": input_ids, "attention_mask": attention_mask,
                                             "position_ids": position_ids}, logits_to_keep)
            src, dst = past.current, 1 - past.current
            for (past_name, present_name), pair in zip(self.names, past.buffers):
                shape = (batch, self.kv_heads, past.length, self.head_dim)
                self._shape(context, past_name, shape)
                self._address(context, past_name, pair[src].data_ptr(), shape)
                self._address(context, present_name, pair[dst].data_ptr(), shape)
            logits = self._logits(context, batch, kept)
            self._run(context)
            host = logits.cpu().numpy()  # waits for the stream
            tensors.clear()
        return host, TrtCache(past.buffers, total, dst, past.graphs)

    def _forward_static(self, context, input_ids, attention_mask, position_ids, past, keep, kept):
        batch, seq = input_ids.shape
        feeds = static_feed(input_ids, attention_mask, position_ids, past.length, self.slots)
        if self.cuda_graph and seq == 1:
            host = self._replay(context, feeds, past, keep, kept).cpu().numpy()
        else:
            tensors = self._inputs(context, feeds, keep)  # alive until the copy below has waited for the run
            self._bind_cache(context, past)
            logits = self._logits(context, batch, kept)
            self._run(context)
            host = logits.cpu().numpy()
            tensors.clear()
        return host, TrtCache(past.buffers, past.length + seq, 0, past.graphs)

    def _bind_cache(self, context, past: TrtCache) -> None:
        for (past_name, present_name), (buffer,) in zip(self.names, past.buffers):
            self._bind(context, past_name, buffer)
            self._address(context, present_name, buffer.data_ptr(), tuple(buffer.shape))  # aliases its input

    def _restore(self, context, tensors: dict, past: TrtCache, logits, keep: int) -> None:
        """Set back on `context` the shapes and addresses a CUDA graph was captured with, so that the context
        agrees with what the graph replays (TensorRT's state for the next enqueue included)."""
        for name, tensor in tensors.items():
            if name == KEEP:
                self._address(context, KEEP, tensor.data_ptr())
            else:
                self._bind(context, name, tensor)
        if self.keep_on_host:
            self._keep[...] = keep
            self._bound[id(context)]["keep", KEEP] = keep
            self._address(context, KEEP, self._keep.ctypes.data)
        self._bind_cache(context, past)
        self._address(context, "logits", logits.data_ptr(), tuple(logits.shape))

    def _replay(self, context, feeds: dict[str, np.ndarray], past: TrtCache, keep: int, kept: int):
        """A decode step through a CUDA graph captured for this cache and batch (inputs copied in place)."""
        torch = self.torch
        key = (feeds["input_ids"].shape[0], keep)
        if key not in past.graphs:
            tensors = self._inputs(context, feeds, keep)
            self._bind_cache(context, past)
            logits = self._logits(context, feeds["input_ids"].shape[0], kept)
            self._run(context)  # the warm-up at these shapes; the captured replay repeats the same writes
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self._run(context)
            past.graphs[key] = (graph, tensors, logits, dict(self._bound[id(context)]))
        graph, tensors, logits, bound = past.graphs[key]
        if changed_bindings(bound, self._bound[id(context)]):  # a prefill, another batch or cache ran here
            self._restore(context, tensors, past, logits, keep)
        for name, array in feeds.items():
            tensors[name].copy_(torch.from_numpy(np.ascontiguousarray(array)), non_blocking=False)
        graph.replay()
        return logits

    # ---- a pool of sequences (SlotBackend), static engines only ----------------------------------------------

    def slot_cache(self, rows: int) -> TrtSlotCache:
        if self.flavour != "static":
            raise ValueError("in-flight batching needs a static-cache engine: re-export with `llama-export ... "
                             "--kv-cache static --max-seq-len N` and rebuild it with llama-build")
        return TrtSlotCache(*SlotState.arrays(rows, self.slots),
                            [pair[0] for pair in self.empty_cache(rows).buffers])

    def step_rows(self, cache: TrtSlotCache, start: int, stop: int, input_ids: np.ndarray) -> np.ndarray:
        batch, seq = input_ids.shape
        lengths, positions = cache.begin(start, stop, input_ids)
        ran = False
        try:
            if int(lengths.max()) + seq > self.max_length:
                raise ValueError(f"{int(lengths.max()) + seq} tokens exceed the engine's window of {self.max_length}; "
                                 f"rebuild with: {self.rebuild} --max-seq-len {int(lengths.max()) + seq}")
            context = self.contexts[pick_profile(self.profiles, batch, seq, int(lengths.max()), self.rebuild)]
            feeds = {"input_ids": input_ids, "attention_mask": cache.mask[start:stop], "position_ids": positions,
                     "write_indices": lengths}
            with self.torch.cuda.stream(self.stream):
                tensors = self._inputs(context, feeds, 1)  # alive until the copy below has waited for the run
                for (past_name, present_name), buffer in zip(self.names, cache.buffers):
                    rows = buffer[start:stop]  # contiguous: the rows' own memory
                    self._bind(context, past_name, rows)
                    context.set_tensor_address(present_name, rows.data_ptr())
                logits = self._logits(context, batch, 1)
                self._run(context)
                host = logits[:, -1].cpu().numpy()
                tensors.clear()
            ran = True
        finally:
            cache.end(start, stop, seq, ran)
        return host

    def clear_row(self, cache: TrtSlotCache, row: int) -> None:
        cache.clear(row)

    def move_row(self, cache: TrtSlotCache, source: int, target: int) -> None:
        with self.torch.cuda.stream(self.stream):
            for buffer in cache.buffers:
                buffer[target].copy_(buffer[source])
        cache.move(source, target)

    def swap_rows(self, cache: TrtSlotCache, a: int, b: int) -> None:
        if a == b:
            return
        with self.torch.cuda.stream(self.stream):
            for buffer in cache.buffers:
                kept = buffer[a].clone()
                buffer[a].copy_(buffer[b])
                buffer[b].copy_(kept)
        cache.swap(a, b)

    def copy_prefix(self, cache: TrtSlotCache, source: int, target: int, length: int) -> None:
        with self.torch.cuda.stream(self.stream):
            for buffer in cache.buffers:
                buffer[target, :, :length].copy_(buffer[source, :, :length])
        cache.copy_prefix(source, target, length)

    def truncate_row(self, cache: TrtSlotCache, row: int, length: int) -> None:
        cache.truncate(row, length)

