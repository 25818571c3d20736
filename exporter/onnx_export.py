"""Trace the reference model into an ONNX graph with the portable I/O contract, in bounded memory.

The model is traced in float32 on the meta device (no weight is materialised), saved without
initializers, and every weight is then streamed from the checkpoint into `model.onnx.data`, one tensor
at a time, converted to the export dtype on the way; for fp16/bf16 the graph then goes through the
precision pass, which leaves those weights as they are.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Callable

import onnx
import torch

from .checkpoint import Checkpoint
from .config import LlamaConfig
from .errors import ExportError
from .loading import torch_dtype
from .model import LlamaForCausalLM

OPSET = 23
DATA_FILE = "model.onnx.data"
ONNX_DTYPES = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
               torch.bfloat16: onnx.TensorProto.BFLOAT16}
ALIGN = 4096  # page-aligned weights, so that ONNX Runtime can memory-map them


def io_contract(config: LlamaConfig, dtype: str, max_seq: int | None = None) -> dict:
    """Names, element types and dimension names of the graph's inputs and outputs (`max_seq`: the static
    cache's, whose buffers have `max_seq` slots and are written at `write_indices`)."""
    kv = ["batch", config.num_key_value_heads, max_seq or "past_sequence_length", config.head_dim]
    present = ["batch", config.num_key_value_heads, max_seq or "total_sequence_length", config.head_dim]
    inputs = [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence_length"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", max_seq or "total_sequence_length"]},
        {"name": "position_ids", "dtype": "int64", "shape": ["batch", "sequence_length"]},
    ]
    if max_seq:
        inputs.append({"name": "write_indices", "dtype": "int64", "shape": ["batch"]})
    outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", "kept_positions", config.vocab_size]}]
    for i in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            inputs.append({"name": f"past_key_values.{i}.{kind}", "dtype": dtype, "shape": kv})
            outputs.append({"name": f"present.{i}.{kind}", "dtype": dtype, "shape": present})
    inputs.append({"name": "logits_to_keep", "dtype": "int64", "shape": []})
    contract = {"inputs": inputs, "outputs": outputs,
                "logits_to_keep": "N > 0 keeps the last N positions; 0 keeps all; the vocabulary projection runs "
                                  "only on kept positions"}
    if max_seq:
        contract["static_cache"] = ("present.* is past_key_values.* with this step's keys/values written at slots "
                                    "write_indices[b] + i (bind the same buffer as both to update in place); "
                                    "attention_mask marks the slots that hold real tokens; the ort target may cache "
                                    "keys rotated by slot rather than position (see export.passes): only this graph "
                                    "reads them")
    return contract


class _Flat(torch.nn.Module):
    """The contract's flat signature around the reference model."""

    def __init__(self, model: LlamaForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past_key_values, logits_to_keep):
        logits, presents = self.model(input_ids, attention_mask, position_ids, past_key_values, logits_to_keep)
        return (logits, *[t for kv in presents for t in kv])


def trace(config: LlamaConfig, path: Path) -> onnx.ModelProto:
    """The float32 graph without weights, traced with every tensor on the meta device (`path` is scratch).
    Other dtypes are a graph pass on it (`graphs.pipeline.convert_precision`), so the graph depends on the
    configuration's shape alone, never on its `torch_dtype`."""
    dt, dtype = torch.float32, "float32"
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dt).eval()
    n, kvh, d = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    b, s, p = 2, 3, 4
    meta = dict(device="meta", dtype=torch.long)
    args = (torch.zeros(b, s, **meta), torch.ones(b, s + p, **meta), torch.zeros(b, s, **meta),
            # distinct tensors: the tracer would merge one object passed twice into one graph input
            tuple(tuple(torch.zeros(b, kvh, p, d, device="meta", dtype=dt) for _ in range(2)) for _ in range(n)),
            torch.tensor(1, **meta))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence_length")
    past = torch.export.Dim("past_sequence_length", min=0)
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: torch.export.Dim.AUTO},
               "position_ids": {0: batch, 1: seq},
               "past_key_values": tuple(({0: batch, 2: past}, {0: batch, 2: past}) for _ in range(n)),
               "logits_to_keep": None}
    contract = io_contract(config, dtype)
    # torch.onnx logs a warning per torchvision operator it cannot register; none of them is used here
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _Flat(model), args, dynamo=True, optimize=False, opset_version=OPSET, dynamic_shapes=dynamic,
            input_names=[i["name"] for i in contract["inputs"]],
            output_names=[o["name"] for o in contract["outputs"]], verbose=False,
        )
        program.save(str(path), include_initializers=False)
    proto = onnx.load(str(path))
    for value in list(proto.graph.input) + list(proto.graph.output):  # name the derived dimensions
        spec = next(x for x in contract["inputs"] + contract["outputs"] if x["name"] == value.name)
        for dim, name in zip(value.type.tensor_type.shape.dim, spec["shape"]):
            if isinstance(name, str):
                dim.dim_param = name
    return proto


def _graph_weights(proto: onnx.ModelProto) -> list[str]:
    """Names the graph reads that no node, input or initializer defines: the weights to stream in."""
    defined = {i.name for i in proto.graph.input} | {i.name for i in proto.graph.initializer}
    defined |= {o for node in proto.graph.node for o in node.output}
    needed = {name: None for node in proto.graph.node for name in node.input if name and name not in defined}
    return list(needed)


def _transposed_weights(proto: onnx.ModelProto, weights: list[str]) -> dict[str, onnx.NodeProto]:
    """Weights read only through a 2-D Transpose: written pre-transposed, so the graph carries no
    Transpose of a constant for a runtime to fold at load time."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out = {}
    for name in weights:
        users = consumers.get(name, [])
        if len(users) == 1 and users[0].op_type == "Transpose":
            perm = next((list(a.ints) for a in users[0].attribute if a.name == "perm"), [1, 0])
            if perm == [1, 0]:
                out[name] = users[0]
    return out


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return memoryview(tensor.numpy()).cast("B")


def _write(data, tensor: torch.Tensor, transpose: bool, block_bytes: int = 64 << 20) -> int:
    """Write `tensor` (or its transpose) row-major, a block of rows at a time: a transposed copy
    never exists whole, so the largest tensor is held once. Returns the bytes written."""
    if not transpose:
        raw = _raw_bytes(tensor)
        data.write(raw)
        return len(raw)
    rows, cols = tensor.shape  # output row i of the transpose is input column i
    step = max(1, block_bytes // max(1, rows * tensor.element_size()))
    written = 0
    for start in range(0, cols, step):
        raw = _raw_bytes(tensor[:, start:start + step].t())
        data.write(raw)
        written += len(raw)
    return written


def write_weights(proto: onnx.ModelProto, path: Path, ckpt: Checkpoint, dtype: str,
                  progress: Callable[[str], None] = lambda name: None) -> tuple[int, int, int]:
    """Stream every weight `proto` reads into `model.onnx.data` beside `path`, then save the graph there.

    Returns (tensors, bytes written, weights stored pre-transposed)."""
    dt = torch_dtype(dtype)
    known = set(ckpt.names())
    offset = 0
    weights = _graph_weights(proto)
    transposed = _transposed_weights(proto, weights)
    renamed = {node.output[0]: f"{name}.T" for name, node in transposed.items()}
    for node in transposed.values():
        proto.graph.node.remove(node)
    for node in proto.graph.node:  # readers of each Transpose now read the stored `<weight>.T`
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    with open(path.parent / DATA_FILE, "wb") as data:
        for name in weights:
            source = name.removeprefix("model.")  # the _Flat wrapper's attribute
            if source not in known and source == "lm_head.weight" and ckpt.config.tie_word_embeddings:
                source = "model.embed_tokens.weight"
            if source not in known:
                raise ExportError(f"the traced graph needs weight {name!r}, which {ckpt.source} does not have")
            tensor = ckpt.load_as(source, dt)
            flip = name in transposed
            size = tensor.numel() * tensor.element_size()
            pad = (-offset) % (ALIGN if size >= ALIGN else 64)
            data.write(b"\0" * pad)
            offset += pad
            length = _write(data, tensor, flip)
            init = proto.graph.initializer.add()
            init.name = f"{name}.T" if flip else name
            init.data_type = ONNX_DTYPES[dt]
            init.dims.extend(reversed(tensor.shape) if flip else tensor.shape)
            init.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(length))):
                entry = init.external_data.add()
                entry.key, entry.value = key, value
            offset += length
            del tensor
            progress(name)
    onnx.save(proto, str(path))
    return len(weights), offset, len(transposed)
