"""Presets: published Llama 2 shapes, the trained built-in `tiny`, and offline Hugging Face cache lookup."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llama_export.exporter.checkpoint import RandomCheckpoint, SafetensorsCheckpoint
from llama_export.exporter.errors import ExportError
from llama_export.exporter.loading import load_model
from llama_export.exporter.presets import HF_REPOS, PRESET_NAMES, PRESETS, TINY_DIR, preset_config, resolve_checkpoint
from llama_export.runtime.tokenizer import LlamaTokenizer
from conftest import small_config, state_dict, write_safetensors_checkpoint

# The config.json files of meta-llama/Llama-2-{7b,13b,70b}-hf (the -chat repositories publish the same shapes),
# written out here independently of exporter/presets.py
COMMON = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2,
          "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 4096, "pretraining_tp": 1,
          "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
          "use_cache": True, "vocab_size": 32000}
PUBLISHED = {
    "7b": {**COMMON, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
           "num_hidden_layers": 32, "num_key_value_heads": 32},
    "13b": {**COMMON, "hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
            "num_hidden_layers": 40, "num_key_value_heads": 40},
    "70b": {**COMMON, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
            "num_hidden_layers": 80, "num_key_value_heads": 8},
}
# parameter counts Meta and Hugging Face publish for these checkpoints
PUBLISHED_PARAMETERS = {"7b": 6_738_415_616, "13b": 13_015_864_320, "70b": 68_976_648_192}


def transformers_parameters(config: dict) -> int:
    """transformers' own LlamaForCausalLM for a config.json, built on the meta device, its parameters counted."""
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", [n for n in PRESET_NAMES if n != "tiny"])
def test_llama2_presets(name):
    size = name.split("-")[0]
    ours = PRESETS[name].to_hf_dict()
    assert {key: ours[key] for key in PUBLISHED[size]} == PUBLISHED[size]
    assert ours["head_dim"] == 128 and ours["rope_theta"] == 10000.0  # transformers' defaults for these shapes
    assert HF_REPOS[name] == f"meta-llama/Llama-2-{size}{'-chat' if 'chat' in name else ''}-hf"


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_parameter_count_equals_transformers(size):
    assert PRESETS[size].num_parameters() == transformers_parameters(PUBLISHED[size]) == PUBLISHED_PARAMETERS[size]


def test_tiny_is_a_trained_llama_on_held_out_text():
    """Perplexity on held-out documentation text, far below an untrained model's (≈ vocabulary size)."""
    ckpt = resolve_checkpoint("tiny")
    assert isinstance(ckpt, SafetensorsCheckpoint) and ckpt.config.num_key_value_heads < ckpt.config.num_attention_heads
    model = load_model(ckpt)
    tok = LlamaTokenizer(TINY_DIR / "tokenizer.model")
    text = (TINY_DIR / "heldout.txt").read_text()[:20000]
    ids = torch.tensor([tok.encode(text)[:1024]])
    with torch.no_grad():
        logits, _ = model(ids)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    random_nll = math.log(ckpt.config.vocab_size)
    print(f"tiny held-out perplexity {math.exp(nll):.1f} (uniform: {ckpt.config.vocab_size})")
    assert math.exp(nll) < 100 and nll < random_nll / 2  # measured: 63.3


def test_random_weights_for_any_preset_without_download():
    ckpt = resolve_checkpoint("70b", random_weights=True)
    assert isinstance(ckpt, RandomCheckpoint) and ckpt.config == PRESETS["70b"]
    w = ckpt.load("model.layers.0.self_attn.k_proj.weight")
    assert w.shape == (8 * 128, 8192)
    assert torch.equal(w, resolve_checkpoint("70b", random_weights=True).load("model.layers.0.self_attn.k_proj.weight"))


def test_preset_from_local_hf_cache(tmp_path, monkeypatch):
    config = small_config()
    snapshot = tmp_path / "models--meta-llama--Llama-2-7b-hf" / "snapshots" / "abc123"
    write_safetensors_checkpoint(snapshot, config, state_dict(RandomCheckpoint(config, seed=2)))
    (tmp_path / "models--meta-llama--Llama-2-7b-hf" / "refs").mkdir()
    (tmp_path / "models--meta-llama--Llama-2-7b-hf" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    ckpt = resolve_checkpoint("7b")
    assert ckpt.source == str(snapshot) and ckpt.config == config
    with pytest.raises(ExportError, match=r"preset '13b' is meta-llama/Llama-2-13b-hf, which is not in the local "
                                          r"Hugging Face cache.*--random-weights"):
        resolve_checkpoint("13b")


def test_unknown_model():
    with pytest.raises(ExportError, match=r"unknown model '8b': not a preset \(tiny, 7b, 7b-chat, 13b"):
        resolve_checkpoint("8b")


def test_tiny_config_equals_transformers_reading_of_it():
    """Our reader of the built-in config.json against transformers' (an independent reader of the same file)."""
    import transformers

    theirs = transformers.LlamaConfig.from_pretrained(TINY_DIR)
    ours = preset_config("tiny")
    assert resolve_checkpoint("tiny").config == ours
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "attention_bias", "mlp_bias",
                "pretraining_tp", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(ours, key) == getattr(theirs, key), key
    rope = getattr(theirs, "rope_parameters", None) or {"rope_theta": theirs.rope_theta}
    assert ours.rope_theta == rope["rope_theta"]
    assert ours.num_parameters() == transformers_parameters(theirs.to_dict())


def test_random_weights_need_only_a_config_json(tmp_path):
    config = small_config()
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    ckpt = resolve_checkpoint(str(tmp_path), random_weights=True, seed=1)
    assert isinstance(ckpt, RandomCheckpoint) and ckpt.config == config
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ExportError, match=r"config.json: cannot read it as JSON"):
        resolve_checkpoint(str(tmp_path), random_weights=True)
