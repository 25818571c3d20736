"""Presets: published Llama 2 shapes, the trained built-in `tiny`, and offline Hugging Face cache lookup."""

from __future__ import annotations

import json
import math

import pytest
import torch

from exporter.checkpoint import RandomCheckpoint, SafetensorsCheckpoint
from exporter.errors import ExportError
from exporter.loading import load_model
from exporter.presets import HF_REPOS, PRESET_NAMES, PRESETS, TINY_DIR, preset_config, resolve_checkpoint
from runtime.tokenizer import LlamaTokenizer
from conftest import small_config, state_dict, write_safetensors_checkpoint

# (hidden, intermediate, layers, heads, kv heads) from the published config.json files
PUBLISHED = {"7b": (4096, 11008, 32, 32, 32), "13b": (5120, 13824, 40, 40, 40), "70b": (8192, 28672, 80, 64, 8)}


@pytest.mark.parametrize("name", [n for n in PRESET_NAMES if n != "tiny"])
def test_llama2_presets(name):
    c = PRESETS[name]
    size = name.split("-")[0]
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads) == PUBLISHED[size]
    assert (c.vocab_size, c.max_position_embeddings, c.rms_norm_eps, c.rope_theta) == (32000, 4096, 1e-5, 10000.0)
    assert (c.head_dim, c.tie_word_embeddings, c.bos_token_id, c.eos_token_id) == (128, False, 1, 2)
    assert HF_REPOS[name] == f"meta-llama/Llama-2-{size}{'-chat' if 'chat' in name else ''}-hf"
    billions = {"7b": 6.74, "13b": 13.0, "70b": 69.0}[size]
    assert abs(c.num_parameters() / 1e9 - billions) / billions < 0.01


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


def test_tiny_config_is_read_from_assets():
    assert preset_config("tiny") == resolve_checkpoint("tiny").config


def test_random_weights_need_only_a_config_json(tmp_path):
    config = small_config()
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    ckpt = resolve_checkpoint(str(tmp_path), random_weights=True, seed=1)
    assert isinstance(ckpt, RandomCheckpoint) and ckpt.config == config
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ExportError, match=r"config.json: cannot read it as JSON"):
        resolve_checkpoint(str(tmp_path), random_weights=True)
