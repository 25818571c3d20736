"""Shared helpers: small configurations, transformers twins of the reference model, checkpoint writers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from llama_export.exporter.config import LlamaConfig

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def verified_files_cache(tmp_path_factory):
    """The runtime's record of verified artifact files (runtime/artifact.py) in a directory of the test session's
    own, for this process and the commands it starts, not in the user's cache."""
    os.environ["LLAMA_EXPORT_CACHE"] = str(tmp_path_factory.mktemp("llama-export-cache"))


@pytest.fixture(scope="session", autouse=True)
def one_trace_per_configuration():
    """Each model configuration traced once per test process. torch's exporter takes tens of seconds per trace, and
    the suite exports the same few configurations a hundred times; the graph depends on the configuration's shape
    alone (`exporter.onnx_export.trace`), so every export gets a fresh copy of the first
    trace. A command exports once per process, so this memo lives with the tests, not in the exporter."""
    import onnx

    from llama_export.exporter import onnx_export, write_artifact

    traces: dict[str, bytes] = {}

    def trace(config: LlamaConfig, path: Path) -> onnx.ModelProto:
        key = json.dumps(config.replace(torch_dtype="float32").to_hf_dict(), sort_keys=True)
        if key not in traces:
            traces[key] = onnx_export.trace(config, path).SerializeToString()
        return onnx.ModelProto.FromString(traces[key])

    patch = pytest.MonkeyPatch()
    patch.setattr(write_artifact, "trace", trace)
    yield
    patch.undo()


def small_config(**overrides) -> LlamaConfig:
    base = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=160, max_position_embeddings=64, torch_dtype="float32")
    base.update(overrides)
    return LlamaConfig(**base)


def state_dict(ckpt) -> dict[str, torch.Tensor]:
    return {name: ckpt.load(name) for name in ckpt.names()}


def transformers_model(config: LlamaConfig, weights: dict[str, torch.Tensor]):
    """transformers' LlamaForCausalLM with exactly these weights (fp32, eval)."""
    import transformers

    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_dict())).eval().float()
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    assert not unexpected and set(missing) <= allowed, (missing, unexpected)
    return hf


def write_safetensors_checkpoint(directory: Path, config: LlamaConfig, weights: dict[str, torch.Tensor],
                                 shards: int = 1) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict()))
    names = list(weights)
    if shards == 1:
        save_file({n: weights[n].contiguous() for n in names}, str(directory / "model.safetensors"))
        return directory
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: weights[n].contiguous() for n in part}, str(directory / file))
        weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def hf_to_meta(weights: dict[str, torch.Tensor], config: LlamaConfig, shards: int) -> list[dict[str, torch.Tensor]]:
    """Split Hugging Face weights into Meta's model-parallel consolidated.NN.pth layout."""
    names = {
        "model.embed_tokens.weight": ("tok_embeddings.weight", 1), "model.norm.weight": ("norm.weight", None),
        "lm_head.weight": ("output.weight", 0),
    }
    per_layer = {
        "self_attn.q_proj": ("attention.wq", 0), "self_attn.k_proj": ("attention.wk", 0),
        "self_attn.v_proj": ("attention.wv", 0), "self_attn.o_proj": ("attention.wo", 1),
        "mlp.gate_proj": ("feed_forward.w1", 0), "mlp.down_proj": ("feed_forward.w2", 1),
        "mlp.up_proj": ("feed_forward.w3", 0), "input_layernorm": ("attention_norm", None),
        "post_attention_layernorm": ("ffn_norm", None),
    }
    for i in range(config.num_hidden_layers):
        for hf, (meta, axis) in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = (f"layers.{i}.{meta}.weight", axis)

    def unpermute(w, n_heads):  # Hugging Face rotate-half rows back to Meta's interleaved pairs
        d1, d2 = w.shape
        return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)

    out = [{} for _ in range(shards)]
    for name, tensor in weights.items():
        meta, axis = names[name]
        if name.endswith("q_proj.weight"):
            tensor = unpermute(tensor, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            tensor = unpermute(tensor, config.num_key_value_heads)
        parts = [tensor] * shards if axis is None else tensor.chunk(shards, dim=axis)
        for shard, part in zip(out, parts):
            shard[meta] = part.clone()
    for shard in out:
        shard["rope.freqs"] = torch.ones(config.head_dim // 2)
    return out


@pytest.fixture(scope="session")
def llama_sp_model() -> Path:
    """A real Llama-family sentencepiece model (32000 pieces, byte fallback) from mistral-common."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    assert path.is_file(), path
    return path


os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer():
    """The runtime's tokenizer on the trained `tiny` preset's sentencepiece model."""
    from llama_export.exporter.presets import TINY_DIR
    from llama_export.runtime.tokenizer import LlamaTokenizer

    return LlamaTokenizer(TINY_DIR / "tokenizer.model")


@pytest.fixture(scope="session")
def heldout_ids():
    """1024 tokens of the trained `tiny` preset's held-out text, [1, 1024]."""
    import numpy as np

    from llama_export.exporter.presets import TINY_DIR
    from llama_export.runtime.tokenizer import LlamaTokenizer

    tok = LlamaTokenizer(TINY_DIR / "tokenizer.model")
    return np.array([tok.encode((TINY_DIR / "heldout.txt").read_text()[:20000])[:1024]])


# ---- the runtime's configurations and transformers' greedy tokens (runtime and TensorRT tests) ----------------

RUNTIME_CONFIGS = {
    "mha": small_config(vocab_size=4096, max_position_embeddings=128),  # head_dim 16 (and gqa)
    "gqa": small_config(vocab_size=4096, max_position_embeddings=128, hidden_size=128, num_attention_heads=8,
                        num_key_value_heads=2)}
PROMPTS = ["A list comprehension", "The tutorial explains how", "Hello"]


def hf_greedy(ckpt, prompts: list[list[int]], new: int) -> list[list[int]]:
    """transformers generate(do_sample=False) on a left-padded batch; new tokens up to (not incl.) EOS."""
    model = transformers_model(ckpt.config, state_dict(ckpt))
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                             pad_token_id=0, eos_token_id=2)
    rows = []
    for row in out[:, longest:].tolist():
        rows.append(row[:row.index(2)] if 2 in row else row)
    return rows
