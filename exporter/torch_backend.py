"""The `torch` runtime backend: the reference PyTorch model on an artifact's own weights.

It reads only the artifact directory — `config.json` and the graph's initializers (memory-mapped by
onnx-ir) — and maps them back to the reference model's parameters: `<name>.T` weights are transposed
back, `<name>.T.conv` ones (the ort target's 1×1 Convs) reshaped (`<name>.T.conv.<i>`, the vocabulary
projection's Convs by output channels, joined), packed `qkv_proj` / `gateup_proj` weights split. It
lives beside the reference model, and the runtime finds it through the `llama_export.backends` entry
point, so `runtime` itself never imports `exporter` or torch. It runs float artifacts (fp32/fp16/bf16)
of any flavour with its own growing cache: a parity reference for the other backends and an
eager-PyTorch baseline for `llama-bench`.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx_ir as ir
import torch

from .checkpoint import Checkpoint, expected_tensors
from .config import LlamaConfig
from .loading import load_model, torch_dtype

Past = list[tuple[torch.Tensor, torch.Tensor]]
FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


def _as_torch(tensor: ir.TensorProtocol) -> torch.Tensor:
    """A view of the memory-mapped weight (read-only: the model never writes its weights)."""
    array = np.ascontiguousarray(tensor.numpy())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if tensor.dtype == ir.DataType.BFLOAT16:  # numpy has no bfloat16: reinterpret the bits
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)


def reference_weights(graph_path, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """The reference model's parameters (Hugging Face names) from the graph's initializers."""
    graph = ir.load(str(graph_path)).graph
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    unpack = {"self_attn.qkv_proj": (("q_proj", q), ("k_proj", kv), ("v_proj", kv)),
              "mlp.gateup_proj": (("gate_proj", config.intermediate_size), ("up_proj", config.intermediate_size))}
    quantized = next((v for v in graph.initializers.values()
                      if v.dtype in (ir.DataType.INT8, ir.DataType.UINT8) and v.shape is not None and v.shape.rank()),
                     None)
    if quantized is not None:
        raise ValueError(f"the torch backend runs float weights; {quantized.name} is {quantized.dtype.name} (an "
                         f"int8 artifact): use the ort backend, or export without --int8")
    weights: dict[str, torch.Tensor] = {}
    tensors: list[tuple[str, torch.Tensor]] = []
    chunks: dict[str, list[tuple[int, torch.Tensor]]] = {}  # a Conv weight in output-channel chunks, by name
    for value in graph.initializers.values():
        name = value.name.removeprefix("model.")
        if value.dtype not in FLOAT_TYPES:
            continue
        whole, _, index = name.rpartition(".")
        if whole.endswith(".weight.T.conv") and index.isdigit():
            chunks.setdefault(whole, []).append((int(index), _as_torch(value.const_value)))
        elif name.endswith((".weight", ".weight.T", ".weight.T.conv", ".bias")):
            tensors.append((name, _as_torch(value.const_value)))
    tensors += [(name, torch.cat([t for _, t in sorted(parts, key=lambda part: part[0])]))
                for name, parts in chunks.items()]
    for name, tensor in tensors:
        if name.endswith(".T.conv"):  # a 1×1 Conv's [out, in, 1, 1]: the parameter's own layout
            name, tensor = name.removesuffix(".T.conv"), tensor.flatten(1)
        elif name.endswith(".T"):
            name, tensor = name.removesuffix(".T"), tensor.t()
        for packed, parts in unpack.items():
            if f".{packed}." in name:
                pieces = torch.split(tensor, [size for _, size in parts], dim=0 if tensor.dim() == 2 else -1)
                for (part, _), piece in zip(parts, pieces):
                    weights[name.replace(packed, f"{packed.split('.')[0]}.{part}")] = piece
                break
        else:
            weights[name] = tensor
    missing = set(expected_tensors(config)) - set(weights)
    if missing:
        raise ValueError(f"{graph_path}: no weights for {sorted(missing)[:3]}{' …' if len(missing) > 3 else ''}; "
                         f"the torch backend reads artifacts written by llama-export")
    return weights


class ArtifactWeights(Checkpoint):
    """An artifact's float weights as a checkpoint (Hugging Face names), for `load_model`."""

    def __init__(self, graph_path, config: LlamaConfig):
        self.config, self.source = config, str(graph_path)
        self._weights = reference_weights(graph_path, config)

    def names(self) -> list[str]:
        return list(self._weights)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._weights[name].shape)

    def load(self, name: str) -> torch.Tensor:
        return self._weights[name]


class TorchBackend:
    """Implements `runtime.backends.Backend` with the reference model; the cache is torch tensors."""

    def __init__(self, artifact, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        config = LlamaConfig.from_hf_dict(artifact.config, str(artifact.directory / "config.json"))
        self.model = load_model(ArtifactWeights(artifact.graph_path, config), artifact.dtype)
        self.dtype = self.cache_dtype = torch_dtype(artifact.dtype)
        self.num_layers, self.kv_heads, self.head_dim = config.num_hidden_layers, config.num_key_value_heads, \
            config.head_dim
        self.max_length = config.max_position_embeddings

    def forward(self, input_ids, attention_mask, position_ids, past: Past, logits_to_keep):
        with torch.inference_mode():
            logits, present = self.model(torch.from_numpy(np.ascontiguousarray(input_ids)),
                                         torch.from_numpy(np.ascontiguousarray(attention_mask)),
                                         torch.from_numpy(np.ascontiguousarray(position_ids)), past,
                                         int(logits_to_keep))
        return logits.numpy(), list(present)

    def empty_cache(self, batch: int) -> Past:
        empty = torch.zeros(batch, self.kv_heads, 0, self.head_dim, dtype=self.dtype)
        return [(empty, empty)] * self.num_layers

    def keep_rows(self, past: Past, rows: list[int]) -> Past:
        index = torch.tensor(rows)
        return [(key[index], value[index]) for key, value in past]
