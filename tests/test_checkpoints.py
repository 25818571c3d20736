"""Checkpoint layouts load back to the same logits; bad checkpoints fail with messages that say what to fix."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from llama_export.exporter.checkpoint import BinCheckpoint, MetaCheckpoint, RandomCheckpoint, SafetensorsCheckpoint, open_checkpoint
from llama_export.exporter.config import LlamaConfig
from llama_export.exporter.errors import ExportError
from llama_export.exporter.loading import load_model
from conftest import hf_to_meta, small_config, state_dict, transformers_model, write_safetensors_checkpoint


def logits_of(ckpt) -> torch.Tensor:
    ids = torch.arange(3, 40).view(1, -1) % ckpt.config.vocab_size
    with torch.no_grad():
        return load_model(ckpt)(ids)[0]


@pytest.fixture
def gqa():
    config = small_config(num_attention_heads=8, num_key_value_heads=2, intermediate_size=192)
    return config, state_dict(RandomCheckpoint(config, seed=11))


@pytest.mark.parametrize("shards", [1, 3])
def test_safetensors_single_and_sharded(tmp_path, gqa, shards):
    config, weights = gqa
    ckpt = open_checkpoint(write_safetensors_checkpoint(tmp_path / "hf", config, weights, shards))
    assert isinstance(ckpt, SafetensorsCheckpoint)
    ids = torch.arange(3, 40).view(1, -1)
    with torch.no_grad():
        ref = transformers_model(config, weights)(input_ids=ids).logits
    assert (logits_of(ckpt) - ref).abs().max().item() <= 1e-5


def test_pytorch_bin_checkpoint(tmp_path, gqa):
    config, weights = gqa
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config.to_hf_dict()))
    torch.save(weights, d / "pytorch_model.bin")
    ckpt = open_checkpoint(d)
    assert isinstance(ckpt, BinCheckpoint)
    assert torch.equal(logits_of(ckpt), logits_of(RandomCheckpoint(config, seed=11)))


def test_meta_two_way_model_parallel_matches_hf_original(tmp_path):
    # params.json derives intermediate_size: 2/3 * 4 * 64 = 170 → multiple_of 32 → 192
    config = small_config(num_attention_heads=8, num_key_value_heads=2, intermediate_size=192, max_position_embeddings=4096)
    weights = state_dict(RandomCheckpoint(config, seed=21))
    d = tmp_path / "meta"
    d.mkdir()
    for i, shard in enumerate(hf_to_meta(weights, config, shards=2)):
        torch.save(shard, d / f"consolidated.{i:02d}.pth")
    (d / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2,
                                               "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1}))
    ckpt = open_checkpoint(d)
    assert isinstance(ckpt, MetaCheckpoint)
    assert ckpt.config.intermediate_size == 192 and ckpt.config.vocab_size == config.vocab_size
    for name in weights:  # the merged, re-permuted tensors are exactly the originals
        assert torch.equal(ckpt.load(name), weights[name]), name
    ids = torch.arange(3, 40).view(1, -1)
    with torch.no_grad():
        ref = transformers_model(config.replace(torch_dtype="float16"), weights)(input_ids=ids).logits
    assert (logits_of(ckpt) - ref).abs().max().item() <= 1e-5


def test_meta_params_give_published_llama2_sizes():
    seventy = LlamaConfig.from_meta_params({"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8,
                                            "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5,
                                            "vocab_size": -1}, vocab_size=32000)
    seven = LlamaConfig.from_meta_params({"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256,
                                          "norm_eps": 1e-5, "vocab_size": -1}, vocab_size=32000)
    assert seventy.intermediate_size == 28672 and seventy.num_key_value_heads == 8
    assert seven.intermediate_size == 11008 and seven.num_key_value_heads == 32


def test_loading_is_lazy(tmp_path, gqa):
    """Opening a checkpoint reads headers only; each tensor is read when asked for."""
    config, weights = gqa
    ckpt = open_checkpoint(write_safetensors_checkpoint(tmp_path / "hf", config, weights, 2))
    assert ckpt._handles and all(not isinstance(h, dict) for h in ckpt._handles.values())
    assert ckpt.shape("lm_head.weight") == (config.vocab_size, config.hidden_size)


def test_transformers5_rope_parameters_are_read():
    raw = small_config().to_hf_dict()
    raw.pop("rope_theta")
    raw.pop("rope_scaling")
    raw["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
    config = LlamaConfig.from_hf_dict(raw)
    assert config.rope_theta == 500000.0 and config.rope_type == "linear" and config.rope_scaling["factor"] == 2.0
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    assert LlamaConfig.from_hf_dict(raw).rope_scaling is None


# ---- bad input ---------------------------------------------------------------------------


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(ExportError, match="checkpoint directory not found"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="neither a Hugging Face checkpoint"):
        open_checkpoint(tmp_path / "empty")
    d = tmp_path / "cfg-only"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(small_config().to_hf_dict()))
    with pytest.raises(ExportError, match=r"no weights \(\*.safetensors"):
        open_checkpoint(d)


def test_missing_shard_named_by_index(tmp_path, gqa):
    config, weights = gqa
    d = write_safetensors_checkpoint(tmp_path / "hf", config, weights, 2)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ExportError, match="model-00002-of-00002.safetensors: shard named in the index is missing"):
        open_checkpoint(d)


def test_corrupt_files(tmp_path, gqa):
    config, weights = gqa
    d = write_safetensors_checkpoint(tmp_path / "hf", config, weights)
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ExportError, match=r"model.safetensors: not a readable safetensors file .*re-download"):
        open_checkpoint(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ExportError, match=r"config.json: not valid JSON"):
        open_checkpoint(d)
    b = tmp_path / "bin"
    b.mkdir()
    (b / "config.json").write_text(json.dumps(config.to_hf_dict()))
    (b / "pytorch_model.bin").write_bytes(b"PK\x03\x04truncated")
    with pytest.raises(ExportError, match=r"pytorch_model.bin: corrupt or truncated checkpoint"):
        open_checkpoint(b)


def test_shape_disagreeing_with_config_names_tensor_and_both_shapes(tmp_path, gqa):
    config, weights = gqa
    weights = dict(weights)
    weights["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    d = write_safetensors_checkpoint(tmp_path / "hf", config, weights)
    with pytest.raises(ExportError) as err:
        open_checkpoint(d)
    msg = str(err.value)
    assert "model.layers.1.self_attn.k_proj.weight" in msg and "[32, 64]" in msg and "[16, 64]" in msg
    assert "model.safetensors" in msg


def test_missing_tensor(tmp_path, gqa):
    config, weights = gqa
    weights = {k: v for k, v in weights.items() if k != "model.norm.weight"}
    with pytest.raises(ExportError, match="tensor 'model.norm.weight' is missing"):
        open_checkpoint(write_safetensors_checkpoint(tmp_path / "hf", config, weights))


def test_unknown_rope_type_and_bad_heads():
    with pytest.raises(ExportError, match=r"unknown rope type 'su' .*supported: default, linear, dynamic, llama3, yarn"):
        small_config(rope_scaling={"rope_type": "su", "factor": 2.0})
    with pytest.raises(ExportError, match="num_attention_heads=8 is not divisible by num_key_value_heads=3"):
        small_config(num_attention_heads=8, num_key_value_heads=3)
    with pytest.raises(ExportError, match=r"config.json: .*needs 'low_freq_factor'"):
        LlamaConfig.from_hf_dict({**small_config().to_hf_dict(), "rope_scaling": {"rope_type": "llama3", "factor": 8}})


def test_pickle_that_is_not_plain_weights_is_refused(tmp_path, gqa):
    config, _ = gqa
    d = tmp_path / "evil"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config.to_hf_dict()))

    class Payload:
        def __reduce__(self):
            return (print, ("this would run",))

    torch.save({"model.norm.weight": torch.ones(2), "x": Payload()}, d / "pytorch_model.bin")
    with pytest.raises(ExportError, match=r"pytorch_model.bin: not a plain weights file.*convert the checkpoint to safetensors"):
        open_checkpoint(d)
    with open(d / "pytorch_model.bin", "wb") as f:  # legacy non-zip pickle
        pickle.dump(Payload(), f)
    with pytest.raises(ExportError, match="pytorch_model.bin: not a plain weights file"):
        open_checkpoint(d)


def test_non_float_tensor_is_refused(tmp_path, gqa):
    config, weights = gqa
    weights = dict(weights)
    weights["model.norm.weight"] = torch.ones(64, dtype=torch.int8)
    ckpt = open_checkpoint(write_safetensors_checkpoint(tmp_path / "hf", config, weights))
    with pytest.raises(ExportError, match=r"'model.norm.weight' has dtype torch.int8, which cannot be converted"):
        load_model(ckpt)
