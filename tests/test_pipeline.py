"""Fully fused trt and ort graphs against the PyTorch reference, and what the pipeline records."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from llama_export.exporter.checkpoint import RandomCheckpoint
from llama_export.exporter.loading import load_model
from llama_export.exporter.presets import resolve_checkpoint
from llama_export.exporter.write_artifact import build_artifact
from llama_export.graphs import pipeline, trt_check
from llama_export.graphs.options import ExportOptions
from graph_helpers import GQA
from graph_helpers import run_steps, session

LEFT_IN_LAYERS = ("Softmax", "Pow", "ReduceMean", "Sin", "Cos")


def checkpoint(name: str):
    return resolve_checkpoint("tiny") if name == "tiny" else RandomCheckpoint(GQA, seed=5)


@pytest.mark.parametrize("name", ["tiny", "gqa"])
@pytest.mark.parametrize("target", ["trt", "ort"])
def test_fused_graph_matches_reference(tmp_path, name, target):
    ckpt = checkpoint(name)
    manifest = build_artifact(ckpt, tmp_path / "a", ExportOptions(target=target), log=lambda m: None)
    counts = manifest.graph.op_counts
    layers = ckpt.config.num_hidden_layers
    norms = counts["RMSNormalization"] + counts.get("SkipSimplifiedLayerNormalization", 0)
    assert norms == 2 * layers + 1 and counts["RotaryEmbedding"] == 2 * layers
    if target == "ort":  # residual Adds fused into the norms; rope reads constant caches by position; one
        # GroupQueryAttention per layer reads [batch, seq, hidden] and updates the cache itself
        assert counts["SkipSimplifiedLayerNormalization"] == 2 * layers and "Cos" not in counts
        assert counts["GroupQueryAttention"] == layers and "Attention" not in counts
        # every float32 weight is a 1×1 Conv (qkv, o, gate/up, down per layer; lm_head), whose only Transposes
        # are its own (the attention's are gone), and whose output shapes are one Concat per output width (qkv,
        # hidden for o and down, gate/up, vocab), shared by the layers
        convs = counts["Conv"]
        assert convs == 4 * layers + 1 and "MatMul" not in counts
        assert counts["Transpose"] == 2 * convs and counts["Concat"] == 4
    else:
        assert counts["Attention"] == layers
    assert counts["Split"] == 2 * layers  # packed qkv and gate/up
    for op in LEFT_IN_LAYERS:  # one shared cos/sin cache for all layers, nothing per layer
        assert counts.get(op, 0) <= (1 if op in ("Sin", "Cos") else 0), op
    worst = 0.0
    for ours, ref, real, _, _ in run_steps(session(tmp_path / "a"), load_model(ckpt), ckpt.config, np.float32, 1):
        worst = max(worst, float(np.abs(ours - ref)[real].max()))
    print(f"{name} {target} fp32: max |logit diff| vs PyTorch over prefill + 8 decode steps {worst:.3g}")
    assert worst <= 1e-4
    problems = trt_check.check(onnx.load(str(tmp_path / "a" / "model.onnx"), load_external_data=False))
    if target == "trt":
        assert problems == [] and manifest.export.passes[-1] == {
            "pass": "TensorRT-compatibility check", "changed": 0, "detail": "passed"}


@pytest.mark.parametrize("target", ["trt", "ort"])
def test_fused_fp16_tiny_top1_identical(tmp_path, target):
    ckpt = checkpoint("tiny")
    build_artifact(ckpt, tmp_path / "a", ExportOptions("float16", target), log=lambda m: None)
    worst = 0.0
    steps = run_steps(session(tmp_path / "a"), load_model(ckpt), ckpt.config, np.float16, 1, decode_steps=16)
    for ours, ref, real, _, _ in steps:
        assert (ours.argmax(-1) == ref.argmax(-1))[real].all()
        worst = max(worst, float(np.abs(ours - ref)[real].max()))
    print(f"tiny {target} fp16 fused: top-1 identical on prefill + 16 steps, max |logit diff| {worst:.4g}")
    # measured 0.0036-0.0042 (trt, no softmax_precision) and 0.0043 (ort); fp16 steps by 0.0078 at |logits| 8..16
    assert worst < 0.02
    if target == "trt":  # TensorRT's parser refuses the attribute (onnxOpCheckers.cpp, DEFINE_OP_CHECKER(Attention))
        proto = onnx.load(str(tmp_path / "a" / "model.onnx"), load_external_data=False)
        assert not [a for n in proto.graph.node if n.op_type == "Attention" for a in n.attribute
                    if a.name == "softmax_precision"]


def test_manifest_records_every_pass(tmp_path):
    manifest = build_artifact(RandomCheckpoint(GQA), tmp_path / "a", ExportOptions(target="onnx"),
                              log=lambda m: None)
    passes = {p["pass"]: p for p in manifest.export.passes}
    assert passes["RMSNormalization"]["detail"] == f"{2 * GQA.num_hidden_layers + 1} fused"
    assert passes["RotaryEmbedding"]["detail"] == f"{2 * GQA.num_hidden_layers} fused"
    assert passes["packed projections (qkv, gate/up)"]["changed"] == 2 * GQA.num_hidden_layers
    assert manifest.graph.target == "onnx" and manifest.graph.optimized is True
    onnx.checker.check_model(str(tmp_path / "a" / "model.onnx"), full_check=True)


def test_every_plan_keeps_the_order_its_passes_need():
    """Each pass names the passes it needs before it; every target × quantization × cache plan keeps that order,
    and a plan that breaks it is refused."""
    calibration = pipeline.SmoothQuant([np.zeros((1, 4), np.int64)])
    for target in ("onnx", "ort", "trt"):
        for quantization in ("none", "int8", "int4", "w8a8"):
            if quantization == "int4" and target != "ort":
                continue
            for kv_cache in ("portable", "static"):
                options = ExportOptions(target=target, quantization=quantization, kv_cache=kv_cache)
                steps = pipeline.plan(options, 64, calibration)
                assert all(isinstance(s, ir.passes.InPlacePass) for s in steps)
                keys = [s.key for s in steps]
                assert keys[0] == "cleanup" and keys[-1] == "final_cleanup"
                assert ("static_cache" in keys) == (kv_cache == "static")
                assert ("quantize" in keys) == (quantization != "none") and ("gqa" in keys) == (target == "ort")
    steps = pipeline.plan(ExportOptions(target="ort", quantization="int8"), 64)
    swapped = [steps[0], steps[4], *steps[1:4], *steps[5:]]  # SkipSimplifiedLayerNormalization before RMSNorm
    with pytest.raises(pipeline.PassError, match="'SkipSimplifiedLayerNormalization .*' must run after "
                                                 "'RMSNormalization'"):
        pipeline.check_order(swapped)
