"""Checkpoint readers: one tensor at a time, under Hugging Face state-dict names.

Every reader offers the same small interface (`config`, `names`, `shape`, `load`) over a different
layout: Hugging Face safetensors (single or sharded), Hugging Face `pytorch_model*.bin`, Meta's
`params.json` + `consolidated.NN.pth` (model-parallel shards merged, wq/wk permuted to the Hugging
Face rotary layout), and seeded random weights for structure-only work. Nothing reads the whole
model at once: safetensors are opened with `safe_open`, pickles with `torch.load(mmap=True)`.
"""

from __future__ import annotations

import copy
import pickle
import re
import zlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from .config import LlamaConfig, read_json
from .errors import ExportError

if TYPE_CHECKING:  # torch is imported where a tensor is read, so that resolving a model (and its errors) is quick
    import torch


def expected_tensors(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config holds, with its shape (Hugging Face names)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        attn = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}
        for proj, shape in attn.items():
            out[f"{p}self_attn.{proj}.weight"] = shape
            if config.attention_bias:
                out[f"{p}self_attn.{proj}.bias"] = shape[:1]
        for proj, shape in {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}.items():
            out[f"{p}mlp.{proj}.weight"] = shape
            if config.mlp_bias:
                out[f"{p}mlp.{proj}.bias"] = shape[:1]
        out[f"{p}input_layernorm.weight"] = (h,)
        out[f"{p}post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    return out


class Checkpoint(ABC):
    """A lazily read set of weights under Hugging Face names."""

    config: LlamaConfig
    source: str  # what to name in messages

    @abstractmethod
    def names(self) -> list[str]: ...

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abstractmethod
    def load(self, name: str) -> torch.Tensor:
        """The tensor, as stored (dtype unchanged)."""

    def load_as(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor converted to `dtype` (one conversion, one tensor at a time)."""
        return self.load(name).to(dtype)

    def where(self, name: str) -> str:
        return self.source

    def validate(self) -> None:
        """Every tensor the config implies is present with the shape it implies."""
        present = set(self.names())
        for name, shape in expected_tensors(self.config).items():
            if name not in present:
                raise ExportError(
                    f"{self.source}: tensor {name!r} is missing; the checkpoint does not match its config "
                    f"({self.config.num_hidden_layers} layers) or is incomplete"
                )
            found = tuple(self.shape(name))
            if found != shape:
                raise ExportError(
                    f"{self.where(name)}: tensor {name!r} has shape {list(found)} but the config implies "
                    f"{list(shape)}; config.json and the weights disagree"
                )


def _check_float(name: str, tensor: torch.Tensor, where: str) -> torch.Tensor:
    import torch

    if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ExportError(
            f"{where}: tensor {name!r} has dtype {tensor.dtype}, which cannot be converted to a float "
            f"model dtype; export an unquantized float32/float16/bfloat16 checkpoint"
        )
    return tensor


def _file_map(directory: Path, index_name: str, pattern: str, names_in) -> dict[str, Path]:
    """tensor name → file: from the sharded checkpoint's index, else by listing each matching file."""
    index = directory / index_name
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ExportError(f"{index}: no 'weight_map' object; re-download the index file")
        return {name: directory / file for name, file in weight_map.items()}
    return {name: file for file in sorted(directory.glob(pattern)) for name in names_in(file)}


class SafetensorsCheckpoint(Checkpoint):
    def __init__(self, directory: Path, config: LlamaConfig):
        self.config, self.source = config, str(directory)
        self._handles: dict[Path, object] = {}
        self._file_of = _file_map(directory, "model.safetensors.index.json", "*.safetensors",
                                  lambda file: self._open(file).keys())

    def _open(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise ExportError(f"{file}: shard named in the index is missing; re-download the checkpoint")
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as err:
                raise ExportError(f"{file}: not a readable safetensors file ({err}); re-download it") from None
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self._file_of)

    def where(self, name: str) -> str:
        return str(self._file_of.get(name, self.source))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._file_of[name]).get_slice(name).get_shape())

    def load(self, name: str) -> torch.Tensor:
        try:
            tensor = self._open(self._file_of[name]).get_tensor(name)
        except SafetensorError as err:
            raise ExportError(f"{self.where(name)}: cannot read tensor {name!r} ({err}); re-download it") from None
        return _check_float(name, tensor, self.where(name))


def torch_load_lazy(file: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, memory-mapped, refusing anything that is not plain tensors."""
    import torch

    if not file.is_file():
        raise ExportError(f"{file}: file not found")
    try:
        try:
            data = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as err:
            if "mmap" not in str(err) and "zipfile" not in str(err):
                raise
            data = torch.load(file, map_location="cpu", weights_only=True)  # legacy, non-zip format
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unpickling failed"
        raise ExportError(
            f"{file}: not a plain weights file: {first}. Refusing to unpickle arbitrary objects; "
            f"convert the checkpoint to safetensors or save only tensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ExportError(f"{file}: corrupt or truncated checkpoint ({err}); re-download it") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ExportError(f"{file}: expected a dict of tensors; this is not a weights file")
    return data


class BinCheckpoint(Checkpoint):
    """Hugging Face `pytorch_model.bin` or its shards, each memory-mapped on first use."""

    def __init__(self, directory: Path, config: LlamaConfig):
        self.config, self.source = config, str(directory)
        self._shards: dict[Path, dict[str, torch.Tensor]] = {}
        self._file_of = _file_map(directory, "pytorch_model.bin.index.json", "pytorch_model*.bin", self._shard)

    def _shard(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._shards:
            self._shards[file] = torch_load_lazy(file)
        return self._shards[file]

    def names(self) -> list[str]:
        return [n for n in self._file_of if not n.endswith("rotary_emb.inv_freq")]

    def where(self, name: str) -> str:
        return str(self._file_of.get(name, self.source))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._shard(self._file_of[name])[name].shape)

    def load(self, name: str) -> torch.Tensor:
        return _check_float(name, self._shard(self._file_of[name])[name], self.where(name))


_META_NAMES = [
    (r"tok_embeddings\.weight", "model.embed_tokens.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"layers\.(\d+)\.attention\.wq\.weight", "model.layers.{}.self_attn.q_proj.weight"),
    (r"layers\.(\d+)\.attention\.wk\.weight", "model.layers.{}.self_attn.k_proj.weight"),
    (r"layers\.(\d+)\.attention\.wv\.weight", "model.layers.{}.self_attn.v_proj.weight"),
    (r"layers\.(\d+)\.attention\.wo\.weight", "model.layers.{}.self_attn.o_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w1\.weight", "model.layers.{}.mlp.gate_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w2\.weight", "model.layers.{}.mlp.down_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w3\.weight", "model.layers.{}.mlp.up_proj.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", "model.layers.{}.input_layernorm.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", "model.layers.{}.post_attention_layernorm.weight"),
]
# Model-parallel layout of Meta's reference: column-parallel layers are split along the outputs
# (dim 0), row-parallel ones (wo, w2) along the inputs (dim 1); norms are replicated.
_ROW_PARALLEL = ("attention.wo.", "feed_forward.w2.")


def meta_to_hf_name(name: str) -> str | None:
    for pattern, target in _META_NAMES:
        match = re.fullmatch(pattern, name)
        if match:
            return target.format(*match.groups())
    return None


def rotary_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary pairs → Hugging Face's rotate-half layout (per head)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


class MetaCheckpoint(Checkpoint):
    def __init__(self, directory: Path):
        self.source = str(directory)
        self._files = sorted(directory.glob("consolidated.*.pth"))
        if not self._files:
            raise ExportError(f"{directory}: params.json found but no consolidated.*.pth shards")
        self._shards = [torch_load_lazy(f) for f in self._files]
        self._meta_name: dict[str, str] = {}
        for name in self._shards[0]:
            hf = meta_to_hf_name(name)
            if hf is not None:
                self._meta_name[hf] = name
        for file, shard in zip(self._files[1:], self._shards[1:]):
            if set(shard) != set(self._shards[0]):
                raise ExportError(f"{file}: holds different tensors from {self._files[0].name}; shards are mixed")
        params = read_json(directory / "params.json")
        if "tok_embeddings.weight" not in self._shards[0]:
            raise ExportError(f"{self._files[0]}: no 'tok_embeddings.weight'; not a Meta Llama checkpoint")
        vocab = self._shards[0]["tok_embeddings.weight"].shape[0]
        self.config = LlamaConfig.from_meta_params(params, vocab, source=str(directory / "params.json"))

    def names(self) -> list[str]:
        return list(self._meta_name)

    def _axis(self, meta_name: str) -> int | None:
        parts = [s[meta_name] for s in self._shards]
        if len(parts) == 1 or parts[0].dim() == 1:
            return None
        if meta_name == "tok_embeddings.weight":  # Llama 2 splits the embedding width, Llama 3 the vocabulary
            return 1 if sum(p.shape[1] for p in parts) == self.config.hidden_size else 0
        return 1 if any(tag in meta_name for tag in _ROW_PARALLEL) else 0

    def shape(self, name: str) -> tuple[int, ...]:
        meta = self._meta_name[name]
        shape = list(self._shards[0][meta].shape)
        axis = self._axis(meta)
        if axis is not None:
            shape[axis] = sum(s[meta].shape[axis] for s in self._shards)
        return tuple(shape)

    def where(self, name: str) -> str:
        return f"{self._files[0]} ({self._meta_name.get(name, name)})"

    def load(self, name: str) -> torch.Tensor:
        import torch

        meta = self._meta_name[name]
        axis = self._axis(meta)
        parts = [s[meta] for s in self._shards]
        tensor = parts[0] if axis is None else torch.cat(parts, dim=axis)
        _check_float(name, tensor, self.where(name))
        if name.endswith("q_proj.weight"):
            tensor = rotary_permute(tensor, self.config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            tensor = rotary_permute(tensor, self.config.num_key_value_heads)
        return tensor


class RandomCheckpoint(Checkpoint):
    """Seeded random weights for structure and memory work; each tensor made only when asked for."""

    def __init__(self, config: LlamaConfig, seed: int = 0, std: float = 0.02):
        self.config, self.seed, self.std = config, seed, std
        self.source = f"random weights (seed {seed})"
        self._shapes = expected_tensors(config)

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def load(self, name: str) -> torch.Tensor:
        import torch

        return self.load_as(name, torch.float32)

    def load_as(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Generated directly in `dtype`, so a 70B embedding never exists in float32 as well."""
        import torch

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        tensor = torch.randn(self._shapes[name], generator=gen, dtype=dtype)
        if name.endswith("norm.weight"):
            return tensor.mul_(0.1).add_(1.0)
        return tensor.mul_(self.std)


def open_checkpoint(directory: str | Path) -> Checkpoint:
    """The reader for whatever layout `directory` holds; validates names and shapes against the config."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ExportError(f"{directory}: checkpoint directory not found")
    if (directory / "params.json").is_file() and not (directory / "config.json").is_file():
        ckpt: Checkpoint = MetaCheckpoint(directory)
    elif (directory / "config.json").is_file():
        config = LlamaConfig.from_file(directory / "config.json")
        if (directory / "model.safetensors.index.json").is_file() or any(directory.glob("*.safetensors")):
            ckpt = SafetensorsCheckpoint(directory, config)
        elif (directory / "pytorch_model.bin.index.json").is_file() or any(directory.glob("pytorch_model*.bin")):
            ckpt = BinCheckpoint(directory, config)
        else:
            raise ExportError(
                f"{directory}: config.json found but no weights (*.safetensors or pytorch_model*.bin); "
                f"download the weight files too"
            )
    else:
        raise ExportError(
            f"{directory}: neither a Hugging Face checkpoint (config.json + *.safetensors) nor a Meta "
            f"one (params.json + consolidated.*.pth)"
        )
    ckpt.validate()
    return ckpt


def truncate_layers(ckpt: Checkpoint, num_layers: int | None) -> Checkpoint:
    """The same reader, seen through a config with only the first `num_layers` layers."""
    total = ckpt.config.num_hidden_layers
    if num_layers is None or num_layers == total:
        return ckpt
    if not 1 <= num_layers <= total:
        raise ExportError(f"--num-layers {num_layers} is out of range: the model has {total} layers (use 1..{total})")
    view = copy.copy(ckpt)  # readers only look tensors up by name: the later layers are never read
    view.config = ckpt.config.replace(num_hidden_layers=num_layers)
    return view
