"""Named models: the published Llama 2 configurations and the built-in `tiny` default."""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import Checkpoint, RandomCheckpoint, open_checkpoint
from .config import LlamaConfig
from .errors import ExportError

TINY_DIR = Path(__file__).parent / "assets" / "tiny"

_LLAMA2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
               torch_dtype="float16", bos_token_id=1, eos_token_id=2, pretraining_tp=1)
_SIZES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
}

PRESETS: dict[str, LlamaConfig] = {}
HF_REPOS: dict[str, str] = {}
for _size, _shape in _SIZES.items():
    for _chat in (False, True):
        _name = f"{_size}-chat" if _chat else _size
        PRESETS[_name] = LlamaConfig(**_shape, **_LLAMA2)
        HF_REPOS[_name] = f"meta-llama/Llama-2-{_size}{'-chat' if _chat else ''}-hf"
PRESET_NAMES = ("tiny", *PRESETS)


def preset_config(name: str) -> LlamaConfig:
    if name == "tiny":
        return LlamaConfig.from_file(TINY_DIR / "config.json")
    return PRESETS[name]


def hf_cache_dir(name: str) -> Path:
    """The preset's snapshot in the local Hugging Face cache (HF_HUB_CACHE / HF_HOME); never touches the network."""
    import os

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo = HF_REPOS[name]
    try:
        cache = os.environ.get("HF_HUB_CACHE") or None  # read now, not when huggingface_hub was imported
        return Path(snapshot_download(repo, local_files_only=True, cache_dir=cache))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise ExportError(
            f"preset {name!r} is {repo}, which is not in the local Hugging Face cache; download it "
            f"(`huggingface-cli download {repo}`), pass its directory with --checkpoint, or use "
            f"--random-weights for structure-only work"
        ) from None


def resolve_checkpoint(model: str, checkpoint: str | Path | None = None, random_weights: bool = False,
                       seed: int = 0) -> Checkpoint:
    """MODEL (a preset or a checkpoint directory) and the optional --checkpoint → a lazy reader."""
    directory = Path(checkpoint) if checkpoint is not None else Path(model) if model not in PRESET_NAMES else None
    if random_weights and directory is not None and (directory / "config.json").is_file():
        # random weights need only the shapes: a bare config.json is enough
        source = directory / "config.json"
        try:
            raw = json.loads(source.read_text())
        except (OSError, ValueError) as err:
            raise ExportError(f"{source}: cannot read it as JSON ({err})") from None
        return RandomCheckpoint(LlamaConfig.from_hf_dict(raw, str(source)), seed=seed)
    if checkpoint is not None:
        ckpt = open_checkpoint(checkpoint)
    elif model in PRESET_NAMES:
        if random_weights:
            return RandomCheckpoint(preset_config(model), seed=seed)
        ckpt = open_checkpoint(TINY_DIR) if model == "tiny" else open_checkpoint(hf_cache_dir(model))
    elif Path(model).is_dir():
        ckpt = open_checkpoint(model)
    else:
        raise ExportError(
            f"unknown model {model!r}: not a preset ({', '.join(PRESET_NAMES)}) nor an existing checkpoint directory"
        )
    return RandomCheckpoint(ckpt.config, seed=seed) if random_weights else ckpt


def find_tokenizer(model_name: str, checkpoint: Path | None, explicit: Path | None) -> Path | None:
    """--tokenizer, else a tokenizer.model beside --checkpoint (or in its parent, Meta's layout), else the model's;
    checked to be a sentencepiece model."""
    if explicit is not None:
        if not explicit.is_file():
            raise ExportError(f"--tokenizer {explicit}: file not found")
        return _readable_tokenizer(explicit)
    dirs: list[Path] = [Path(checkpoint)] if checkpoint else []
    if checkpoint:  # only the checkpoint's own: --model (tiny by default) names another model's tokenizer
        pass
    elif model_name == "tiny":
        dirs.append(TINY_DIR)
    elif model_name in PRESET_NAMES:
        try:
            dirs.append(hf_cache_dir(model_name))
        except ExportError:
            pass
    else:
        dirs.append(Path(model_name))
    for d in dirs:
        for candidate in (d / "tokenizer.model", d.parent / "tokenizer.model"):
            if candidate.is_file():
                return _readable_tokenizer(candidate)
    return None


def check_vocabulary(tokenizer: Path, config: LlamaConfig) -> None:
    """Refuse a tokenizer whose ids can exceed the model's vocabulary (its embedding would be read out of range)."""
    from llama_export.runtime.tokenizer import LlamaTokenizer

    pieces = LlamaTokenizer(tokenizer).vocab_size
    if pieces > config.vocab_size:
        raise ExportError(f"{tokenizer} has {pieces} pieces but the model's vocabulary has {config.vocab_size}: it "
                          f"is not this model's tokenizer; pass the checkpoint's own with --tokenizer PATH")


def _readable_tokenizer(path: Path) -> Path:
    from llama_export.runtime.tokenizer import LlamaTokenizer, TokenizerError

    try:
        LlamaTokenizer(path)
    except (TokenizerError, OSError) as err:
        raise ExportError(f"{err}; or pass another with --tokenizer PATH") from None
    return path
