"""ONNX export: ONNX Runtime CPU against the PyTorch reference, the I/O contract, the manifest, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from llama_export.exporter.checkpoint import RandomCheckpoint, truncate_layers
from llama_export.exporter.loading import load_model
from llama_export.exporter.onnx_export import io_contract
from llama_export.exporter.presets import resolve_checkpoint
from llama_export.exporter.write_artifact import build_artifact
from llama_export.graphs.options import ExportOptions
from llama_export.runtime import parity
from llama_export.runtime.artifact_format import sha256

from conftest import small_config, state_dict, write_safetensors_checkpoint
from graph_helpers import cli, run_steps, session

ONNX_TYPES = {"float32": 1, "float16": 10, "int64": 7}
CONFIGS = {
    "mha": small_config(),
    "gqa": small_config(num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096),
    "rope-scaled": small_config(num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache: dict[str, tuple] = {}

    def get(case: str):
        if case not in cache:
            config = CONFIGS[case]
            ckpt = RandomCheckpoint(config, seed=4)
            out = tmp_path_factory.mktemp(case) / "artifact"
            manifest = build_artifact(ckpt, out, ExportOptions(optimize=False), log=lambda m: None)
            cache[case] = (out, manifest, ckpt)
        return cache[case]
    return get


@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.parametrize("prefill_keep", [1, 0])
def test_fp32_matches_reference_prefill_and_decode(exported, case, prefill_keep):
    out, _, ckpt = exported(case)
    sess, model, config = session(out), load_model(ckpt), ckpt.config
    steps = 0
    for ours, ref, real, presents, cache in run_steps(sess, model, config, np.float32, prefill_keep):
        assert ours.dtype == np.float32 and ours.shape == ref.shape
        assert np.abs(ours - ref)[real].max() <= 1e-4
        for i, (k, v) in enumerate(cache):
            assert presents[2 * i].shape == tuple(k.shape)  # [batch, kv_heads, total, head_dim]: GQA stays GQA
            assert presents[2 * i].shape[1] == config.num_key_value_heads
            assert np.abs(presents[2 * i][0] - k[0].numpy()).max() <= 1e-4  # row 0 has no padding
            assert np.abs(presents[2 * i + 1][0] - v[0].numpy()).max() <= 1e-4
        steps += 1
    assert steps == 9


def test_graph_passes_full_check_and_carries_the_io_contract(exported):
    out, manifest, ckpt = exported("gqa")
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    contract = io_contract(ckpt.config, "float32")
    for values, specs in ((graph.input, contract["inputs"]), (graph.output, contract["outputs"])):
        assert [v.name for v in values] == [s["name"] for s in specs]
        for value, spec in zip(values, specs):
            tensor_type = value.type.tensor_type
            assert tensor_type.elem_type == ONNX_TYPES[spec["dtype"]], value.name
            dims = [d.dim_param or d.dim_value for d in tensor_type.shape.dim]
            assert dims == spec["shape"], value.name
    assert manifest.graph.io == json.loads(json.dumps(contract))
    # every weight is external, in model.onnx.data
    assert graph.initializer and all(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    assert {e.value for t in graph.initializer for e in t.external_data if e.key == "location"} == {"model.onnx.data"}
    # weights are stored pre-transposed: no Transpose reads an initializer
    names = {t.name for t in graph.initializer}
    assert not [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in names]
    assert (out / "model.onnx").stat().st_size < 2_000_000


def test_manifest(exported):
    out, manifest, ckpt = exported("mha")
    on_disk = json.loads((out / "manifest.json").read_text())
    assert {"manifest_sha256": manifest.manifest_sha256, **manifest.as_dict()} == on_disk  # as returned
    assert on_disk["format_version"] == 1 and on_disk["dtype"] == "float32" and on_disk["graph"]["opset"] >= 23
    assert set(on_disk["files"]) == {"model.onnx", "model.onnx.data", "config.json"}
    for name, info in on_disk["files"].items():
        assert info["sha256"] == sha256(out / name) and info["bytes"] == (out / name).stat().st_size
    assert on_disk["tools"]["torch"].startswith("2.13") and "onnx" in on_disk["tools"]
    assert on_disk["export"]["traced_on"] == "meta"
    # 7 matrices per layer and the lm_head
    assert on_disk["export"]["passes"] == [{"pass": "weight transposes folded into the stored weights",
                                            "changed": 15, "detail": "15 Transpose nodes removed"}]
    assert on_disk["model"]["config"]["num_hidden_layers"] == 2
    assert not list(out.parent.glob(".*partial*"))


@pytest.fixture(scope="module")
def tiny_fp16(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny16") / "artifact"
    build_artifact(resolve_checkpoint("tiny"), out, ExportOptions("float16", optimize=False), log=lambda m: None)
    return out


def test_fp16_tiny_top1_identical_every_step(tiny_fp16):
    ckpt = resolve_checkpoint("tiny")
    model = load_model(ckpt, "float32")
    worst = 0.0
    for ours, ref, real, _, _ in run_steps(session(tiny_fp16), model, ckpt.config, np.float16, 0):
        figures = parity.compare_logits(ours, ref, real)
        worst = max(worst, figures["max_abs"])
        assert ours.dtype == np.float32
        assert figures["top1"] == 1.0 and figures["kl_max"] <= parity.THRESHOLDS["fp16"].kl_max
    print(f"tiny fp16 on ORT CPU vs PyTorch fp32: max |logit diff| {worst:.4g}")
    assert worst < 0.1


class BlowUp(RandomCheckpoint):
    """Embeddings of magnitude ~1000: squares overflow fp16 (65504) unless RMSNorm reduces in fp32."""

    def load_as(self, name, dtype):
        tensor = super().load_as(name, torch.float32)
        return (tensor * 20000.0 if name == "model.embed_tokens.weight" else tensor).to(dtype)


def test_fp16_hidden_state_blow_up_stays_finite(tmp_path):
    config = small_config(num_attention_heads=8, num_key_value_heads=2)
    ckpt = BlowUp(config, seed=1)
    out = tmp_path / "blow"
    build_artifact(ckpt, out, ExportOptions("float16", optimize=False), log=lambda m: None)
    hidden = ckpt.load("model.embed_tokens.weight").abs().max().item()
    assert hidden > 256
    for ours, ref, real, _, _ in run_steps(session(out), load_model(ckpt), config, np.float16, 0, decode_steps=2):
        assert np.isfinite(ours).all() and np.isfinite(ref).all()
        scale = np.abs(ref[real]).max()
        assert np.abs(ours - ref)[real].max() <= 0.02 * scale, (np.abs(ours - ref)[real].max(), scale)
        assert (ours.argmax(-1) == ref.argmax(-1))[real].all()


def test_fp16_graph_reduces_rmsnorm_statistics_in_fp32(tiny_fp16):
    """Each RMSNorm's mean of squares is computed on float32 values in the fp16 graph, and each
    attention's softmax is asked for in float32."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(tiny_fp16 / "model.onnx"), load_external_data=False))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    reductions = [n for n in model.graph.node if n.op_type == "ReduceMean"]
    assert len(reductions) == 2 * 4 + 1  # two norms per layer and the final one
    assert all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in reductions)
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    assert len(attention) == 4
    for node in attention:
        precision = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}.get("softmax_precision")
        assert precision == onnx.TensorProto.FLOAT
    weights = [t for t in model.graph.initializer if t.name.endswith("q_proj.weight.T")]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)


def test_num_layers_keeps_the_first_layers(tmp_path):
    config = small_config(num_hidden_layers=3)
    ckpt = truncate_layers(RandomCheckpoint(config, seed=2), 1)
    out = tmp_path / "one"
    build_artifact(ckpt, out, ExportOptions(optimize=False), log=lambda m: None)
    names = [i.name for i in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.input]
    assert "past_key_values.0.key" in names and "past_key_values.1.key" not in names
    for ours, ref, real, _, _ in run_steps(session(out), load_model(ckpt), ckpt.config, np.float32, 0, 1):
        assert np.abs(ours - ref)[real].max() <= 1e-4


# ---- the command line ------------------------------------------------------------------------------


def test_cli_exports_and_verifies_tiny(tmp_path):
    out = tmp_path / "tiny"
    result = cli("--model", "tiny", "--fp32", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "parity: max |logit diff|" in result.stdout and "top-1 identical" in result.stdout
    assert "parity (fp32 thresholds, prefill + 2 decode steps): pass" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["max_abs_logit_diff"] <= 1e-4
    summary = manifest["verification"]["parity"]  # llama-parity's figures, recorded by the export
    assert summary["passed"] and summary["precision"] == "fp32" and summary["overall"]["top1"] == 1.0
    assert summary["overall"]["kl_max"] <= 1e-5 and summary["kv_rel_max"] <= 1e-4 and summary["overall"]["positions"] > 100
    assert {"model.onnx", "model.onnx.data", "config.json", "tokenizer.model", "manifest.json"} <= {
        p.name for p in out.iterdir()}
    for phase in ("tracing", "writing weights", "verifying"):
        assert phase in result.stderr
    # an existing directory is refused without --force, and left as it was
    again = cli("--model", "tiny", "--fp32", "-o", str(out), "--no-verify")
    assert again.returncode == 2 and "already exists; pass --force" in again.stderr
    assert json.loads((out / "manifest.json").read_text()) == manifest
    forced = cli("--model", "tiny", "--fp16", "-o", str(out), "--no-verify", "--force")
    assert forced.returncode == 0 and "verification skipped: --no-verify" in forced.stdout
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "float16"
    assert not list(tmp_path.glob(".*"))


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.mark.parametrize("args, message", [
    (["--model", "8b"], "unknown model '8b'"),
    (["--model", "tiny", "--num-layers", "0"], "--num-layers 0 is out of range: the model has 4 layers (use 1..4)"),
    (["--model", "tiny", "--num-layers", "5"], "--num-layers 5 is out of range"),
    (["--model", "tiny", "--int8", "--no-optimize"], "--int8 is a graph pass: it needs the optimization pipeline"),
])
def test_cli_bad_arguments(tmp_path, args, message):
    result = cli(*args, "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert leftovers(tmp_path) == []


def test_cli_unwritable_output(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    result = cli("--model", "tiny", "-o", str(tmp_path / "file" / "out"), "--no-verify")
    assert result.returncode == 2 and "cannot write the artifact under" in result.stderr
    assert "choose a writable -o DIR" in result.stderr


def test_cli_unconvertible_dtype_leaves_no_partial_artifact(tmp_path):
    """The failure comes mid-export (a late tensor is int8): nothing that looks like an artifact remains."""
    config = small_config()
    weights = state_dict(RandomCheckpoint(config))
    weights["model.layers.1.mlp.down_proj.weight"] = weights["model.layers.1.mlp.down_proj.weight"].to(torch.int8)
    ckpt_dir = write_safetensors_checkpoint(tmp_path / "ckpt", config, weights)
    exports = tmp_path / "exports"
    exports.mkdir()
    result = cli("--checkpoint", str(ckpt_dir), "-o", str(exports / "out"), "--no-verify")
    assert result.returncode == 2, result.stderr
    assert "'model.layers.1.mlp.down_proj.weight' has dtype torch.int8, which cannot be converted" in result.stderr
    assert leftovers(exports) == []


def test_verification_budget():
    """The automatic check stays within its budget (so the whole command stays bounded); --verify lifts it
    up to the available memory, and a model that cannot fit twice is never checked."""
    from llama_export.exporter.presets import PRESETS
    from llama_export.exporter.verify import AUTO_BUDGET, available_memory, too_large, verification_memory

    two_layers = truncate_layers(RandomCheckpoint(PRESETS["13b"]), 2)  # 0.96 B parameters
    need = verification_memory(two_layers, "float16")
    assert need > AUTO_BUDGET
    reason = too_large(two_layers, "float16")
    assert reason and "pass --verify to check it anyway" in reason and f"{need / 1e9:.1f} GB" in reason
    if need < 0.8 * available_memory():
        assert too_large(two_layers, "float16", forced=True) is None
    whole = RandomCheckpoint(PRESETS["70b"])
    assert "GB is available" in too_large(whole, "float16", forced=True)
    assert too_large(RandomCheckpoint(CONFIGS["gqa"]), "float32") is None
