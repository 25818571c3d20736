"""SmoothQuant W8A8: smoothing alone keeps the function, the quantized graph is TensorRT-importable, and on
the trained `tiny` its held-out perplexity stays within 3% of fp32."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir

from llama_export.exporter import calibration_text
from llama_export.exporter.presets import TINY_DIR, resolve_checkpoint
from llama_export.exporter.write_artifact import build_artifact
from llama_export.graphs import calibrate, pipeline, trt_check
from llama_export.graphs.options import ExportOptions
from llama_export.graphs.passes import packed_matmul, rms_norm, rotary, smooth_quant
from graph_helpers import GQA, assert_same_outputs, perplexity, save, traced
from graph_helpers import cli


def fused(path):
    model = ir.load(str(path))
    for step in (pipeline._cleanup, rms_norm.apply, rotary.apply, packed_matmul.apply, pipeline._cleanup):
        step(model)
    return model


def calibrator(tmp_path, config=GQA):
    rng = np.random.default_rng(1)
    sequences = [rng.integers(3, config.vocab_size, (1, 24)) for _ in range(3)]
    return lambda model, values: calibrate.channel_peaks(model, values, sequences, tmp_path)


def test_smoothing_alone_computes_the_same_function(tmp_path):
    model = fused(traced(tmp_path / "traced"))
    before = save(model, tmp_path / "before" / "model.onnx")
    originals = {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items()
                 if "layernorm" in name or "gateup" in name or "down_proj" in name}
    assert smooth_quant.apply(model, calibrator(tmp_path), quantize=False) == 4 * GQA.num_hidden_layers + 1
    after = save(model, tmp_path / "after" / "model.onnx")
    worst = assert_same_outputs(before, after, tolerance=1e-5)
    print(f"smoothing only (alpha 0.5): outputs agree to {worst:.3g} × their scale")
    smoothed = ir.load(str(after)).graph.initializers
    changed = {name for name, array in originals.items() if not np.allclose(smoothed[name].const_value.numpy(), array)}
    layer = "model.model.layers.0"
    # 1/s went into both norms' scales and into the up half of the packed gate/up weight (down_proj's smoothing)
    assert {f"{layer}.input_layernorm.weight", f"{layer}.post_attention_layernorm.weight",
            f"{layer}.mlp.gateup_proj.weight.T", f"{layer}.mlp.down_proj.weight.T"} <= changed
    inter = GQA.intermediate_size
    up_scaled = smoothed[f"{layer}.mlp.gateup_proj.weight.T"].const_value.numpy()
    gamma_ratio = (originals[f"{layer}.post_attention_layernorm.weight"]
                   / smoothed[f"{layer}.post_attention_layernorm.weight"].const_value.numpy())
    # the gate half carries only its own row factors (s of the post-attention norm): W' = diag(s) W
    np.testing.assert_allclose(up_scaled[:, :inter], originals[f"{layer}.mlp.gateup_proj.weight.T"][:, :inter]
                               * gamma_ratio[:, None], rtol=1e-5)


def test_smoothquant_graph_is_explicitly_quantized_and_trt_importable(tmp_path):
    model = fused(traced(tmp_path / "traced"))
    matmuls = pipeline.op_counts(model)["MatMul"]
    assert smooth_quant.apply(model, calibrator(tmp_path)) == matmuls
    counts = pipeline.op_counts(model)
    assert counts["QuantizeLinear"] == matmuls and counts["DequantizeLinear"] == 2 * matmuls
    path = save(model, tmp_path / "sq" / "model.onnx")
    proto = onnx.load(str(path), load_external_data=False)
    assert trt_check.check(proto) == []
    # every MatMul reads two dequantized int8 tensors: the activation (one scalar scale) and the weight
    # (one scale per output channel)
    graph = ir.load(str(path)).graph
    for node in graph:
        if node.op_type == "MatMul":
            act, weight = (v.producer() for v in node.inputs)
            assert act.op_type == weight.op_type == "DequantizeLinear"
            assert act.inputs[0].producer().op_type == "QuantizeLinear"
            assert act.inputs[1].const_value.numpy().shape == ()
            assert weight.inputs[0].const_value.dtype == ir.DataType.INT8
            assert weight.inputs[1].const_value.shape[0] == node.outputs[0].shape[-1]


def test_smoothquant_tiny_perplexity_within_three_percent(tmp_path, heldout_ids):
    ckpt = resolve_checkpoint("tiny")
    text = tmp_path / "calibration.txt"  # held-out text that does not overlap the evaluated first 20000 characters
    text.write_text((TINY_DIR / "heldout.txt").read_text()[100000:])
    sequences = calibration_text.sequences(TINY_DIR / "tokenizer.model", text, 2048, 512)
    build_artifact(ckpt, tmp_path / "fp32", ExportOptions(target="trt"), log=lambda m: None)
    manifest = build_artifact(ckpt, tmp_path / "w8a8", ExportOptions(target="trt", quantization="w8a8"),
                              log=lambda m: None, smoothquant=pipeline.SmoothQuant(sequences))
    base, base_top1 = perplexity(tmp_path / "fp32", heldout_ids)
    ppl, top1 = perplexity(tmp_path / "w8a8", heldout_ids)
    print(f"tiny held-out ({heldout_ids.shape[1]} tokens): fp32 ppl {base:.3f}, SmoothQuant W8A8 (alpha 0.5, 2048 "
          f"calibration tokens) ppl {ppl:.3f} ({(ppl / base - 1) * 100:+.2f}%), top-1 agreement with fp32 "
          f"{(top1 == base_top1).mean():.4f}")
    assert abs(ppl / base - 1) <= 0.03  # measured +0.08%
    assert (top1 == base_top1).mean() >= 0.88  # measured 0.915 of 1023 positions
    assert manifest.graph.weights == "int8 SmoothQuant W8A8 (alpha 0.5)"
    assert manifest.export.passes[-1]["detail"] == "passed"  # the TensorRT check


def test_cli_smoothquant(tmp_path):
    out = tmp_path / "w8a8"
    result = cli("--model", "tiny", "--int8", "--smoothquant", "--calibration-tokens", "600", "--target", "trt",
                 "--no-build", "-o", str(out), "--no-verify")
    assert result.returncode == 0, result.stderr
    assert "calibration sequence 2/2" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert any(p["pass"].startswith("SmoothQuant W8A8 (alpha 0.5, 602 calibration tokens)")
               for p in manifest["export"]["passes"])
    for args, message in ((["--smoothquant"], "--smoothquant is a form of int8: pass it together with --int8"),
                          (["--int8", "--smoothquant", "--calibration", str(tmp_path / "none.txt")],
                           "cannot read the calibration text"),
                          (["--int8", "--smoothquant", "--smoothquant-alpha", "1.5"], "1.5 is not in the range")):
        bad = cli("--model", "tiny", *args, "-o", str(tmp_path / "bad"))
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert not (tmp_path / "bad").exists()
