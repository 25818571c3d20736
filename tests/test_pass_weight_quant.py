"""Weight-only int8: the numbers, both graph forms in ORT, and held-out perplexity on the trained `tiny`."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from llama_export.exporter.presets import resolve_checkpoint
from llama_export.exporter.write_artifact import build_artifact
from llama_export.graphs import pipeline, trt_check
from llama_export.graphs.options import ExportOptions
from llama_export.graphs.passes import weight_quant

from graph_helpers import assert_same_outputs, feeds, perplexity, run, save, traced
from graph_helpers import cli


def test_quantize_is_symmetric_per_output_channel():
    w = np.random.default_rng(0).standard_normal((64, 24)).astype(np.float32) * np.linspace(0.01, 3, 24)
    q, scale = weight_quant.quantize(w)
    assert q.dtype == np.int8 and scale.shape == (24,) and np.abs(q).max() == 127
    np.testing.assert_allclose(scale, np.abs(w).max(0) / 127, rtol=1e-6)
    assert (np.abs(q * scale - w) <= scale / 2 + 1e-7).all()  # rounding error at most half a step per column


def test_fp16_scales_of_tiny_columns_stay_positive():
    """A column whose peak is below 127 × 6.1e-5 has a scale fp16 stores as a subnormal or 0, and TensorRT's
    parser refuses a scale that is not > 0: fp16 scales are floored at the smallest normal fp16."""
    w = np.array([[1e-7, 0.5], [-2e-7, 0.25]], np.float32)
    assert weight_quant.scales(w).astype(np.float16)[0] == 0  # what an fp16 graph used to store
    floor = weight_quant.SCALE_FLOOR[ir.DataType.FLOAT16]
    q, scale = weight_quant.quantize(w, floor)
    assert scale.astype(np.float16)[0] == np.finfo(np.float16).tiny and scale[1] == np.float32(0.5 / 127)
    assert (np.abs(q * scale - w) <= scale / 2 + 1e-9).all()  # still W ≈ q × scale


def test_qdq_and_matmulnbits_forms_agree(tmp_path):
    model = ir.load(str(traced(tmp_path / "traced")))
    pipeline._cleanup(model)
    matmuls = pipeline.op_counts(model)["MatMul"]
    before = save(model, tmp_path / "before" / "model.onnx")
    forms = {}
    for form in weight_quant.OPS:
        m = ir.load(str(before))
        assert weight_quant.apply(m, form) == matmuls  # every projection and the lm_head
        assert pipeline.op_counts(m)[weight_quant.OPS[form]] == matmuls
        forms[form] = save(m, tmp_path / form / "model.onnx")
    problems = trt_check.check(onnx.load(str(forms["qdq"]), load_external_data=False))
    assert problems == []
    # the same integers and scales; MatMulNBits (accuracy_level 4) also rounds the activations to int8 per
    # block, so the forms agree to about 1% of the output scale (measured 0.8%), not bit for bit
    assert_same_outputs(forms["qdq"], forms["matmulnbits"], tolerance=0.02)
    for feed in feeds():
        ref, ours = run(before, feed)[0], run(forms["qdq"], feed)[0]
        assert np.abs(ours - ref).max() <= 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("target", ["trt", "ort"])
def test_int8_tiny_perplexity_within_one_percent(tmp_path, heldout_ids, target):
    ckpt = resolve_checkpoint("tiny")
    build_artifact(ckpt, tmp_path / "fp32", ExportOptions(target=target), log=lambda m: None)
    build_artifact(ckpt, tmp_path / "int8", ExportOptions(target=target, quantization="int8"), log=lambda m: None)
    base, base_top1 = perplexity(tmp_path / "fp32", heldout_ids)
    ppl, top1 = perplexity(tmp_path / "int8", heldout_ids)
    size = lambda d: (d / "model.onnx.data").stat().st_size  # noqa: E731
    print(f"tiny held-out ({heldout_ids.shape[1]} tokens), target {target}: fp32 ppl {base:.3f}, int8 weight-only "
          f"ppl {ppl:.3f} ({(ppl / base - 1) * 100:+.2f}%), top-1 agreement with fp32 {(top1 == base_top1).mean():.4f}, "
          f"weights {size(tmp_path / 'fp32') / 1e6:.1f} MB -> {size(tmp_path / 'int8') / 1e6:.1f} MB")
    assert abs(ppl / base - 1) <= 0.01
    assert (top1 == base_top1).mean() >= 0.97  # measured 0.991 (trt), 0.988 (ort) of 1023 positions
    # the projections take a quarter of their fp32 bytes (plus scales); the embedding table stays fp32:
    # measured 20.2 → 8.3 MB (trt), 20.3 → 8.8 MB (ort)
    assert size(tmp_path / "int8") <= 0.45 * size(tmp_path / "fp32")


def dequantized_int4(w: np.ndarray, block: int = 32) -> np.ndarray:
    """The float weight MatMulNBits bits=4 computes with: codes unpacked (low nibble first) − 8, × scale."""
    packed, scales = weight_quant.int4_blocks(w, block)
    codes = np.empty(packed.shape[:2] + (block,), np.int16)
    codes[..., 0::2], codes[..., 1::2] = packed & 0x0F, packed >> 4
    full = ((codes - 8) * scales[..., None]).reshape(w.shape[1], -1).T
    return full[:w.shape[0]].astype(np.float32)


def test_int4_blocks_are_symmetric_per_block():
    w = np.random.default_rng(0).standard_normal((70, 24)).astype(np.float32) * np.linspace(0.01, 3, 24)
    packed, scales = weight_quant.int4_blocks(w, 32)
    assert packed.shape == (24, 3, 16) and packed.dtype == np.uint8 and scales.shape == (24, 3)
    np.testing.assert_allclose(scales[:, 0], np.abs(w[:32]).max(0) / 7, rtol=1e-6)
    np.testing.assert_allclose(scales[:, 2], np.abs(w[64:]).max(0) / 7, rtol=1e-6)  # the padded last block
    deq = dequantized_int4(w)
    step = np.repeat(scales.T, 32, axis=0)[:70]
    assert (np.abs(deq - w) <= step / 2 + 1e-6).all()  # rounding error at most half a step per block
    assert {int(v) for v in np.unique(packed & 0x0F)} <= set(range(1, 16))  # codes 1..15: q in [-7, 7]


def test_int4_matmulnbits_computes_with_its_dequantized_weights(tmp_path):
    model = ir.load(str(traced(tmp_path / "traced")))
    pipeline._cleanup(model)
    before = save(model, tmp_path / "before" / "model.onnx")
    reference = ir.load(str(before))
    for node in reference.graph:  # the same graph, each weight replaced by what int4 represents
        if node.op_type == "MatMul" and weight_quant.float_weight(node.inputs[1]) is not None:
            w = node.inputs[1]
            w.const_value = ir.tensor(dequantized_int4(w.const_value.numpy()), name=w.name)
    reference_path = save(reference, tmp_path / "dequantized" / "model.onnx")
    matmuls = pipeline.op_counts(model)["MatMul"]
    assert weight_quant.apply(model, "matmulnbits", bits=4) == matmuls
    nodes = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert len(nodes) == matmuls and {n.attributes.get_int("bits") for n in nodes} == {4}
    after = save(model, tmp_path / "int4" / "model.onnx")
    # accuracy_level 4 also rounds the activations to int8 per block, as for int8 (see above)
    worst = assert_same_outputs(reference_path, after, tolerance=0.02)
    print(f"int4 MatMulNBits vs the same graph on its dequantized weights: within {worst:.3g} × the output scale")
    with pytest.raises(ValueError, match="int4 only matmulnbits"):
        weight_quant.apply(ir.load(str(before)), "qdq", bits=4)


def test_int4_tiny_perplexity(tmp_path, heldout_ids):
    ckpt = resolve_checkpoint("tiny")
    build_artifact(ckpt, tmp_path / "fp32", ExportOptions(target="ort"), log=lambda m: None)
    build_artifact(ckpt, tmp_path / "int4", ExportOptions(target="ort", quantization="int4"), log=lambda m: None)
    base, base_top1 = perplexity(tmp_path / "fp32", heldout_ids)
    ppl, top1 = perplexity(tmp_path / "int4", heldout_ids)
    print(f"tiny held-out ({heldout_ids.shape[1]} tokens), target ort: fp32 ppl {base:.3f}, int4 weight-only ppl "
          f"{ppl:.3f} ({(ppl / base - 1) * 100:+.2f}%), top-1 agreement with fp32 {(top1 == base_top1).mean():.4f}")
    assert abs(ppl / base - 1) <= 0.1  # measured +3.1%
    assert (top1 == base_top1).mean() >= 0.85  # measured 0.880 of 1023 positions


def test_int4_is_for_onnx_runtime_only(tmp_path):
    result = cli("--model", "tiny", "--int4", "--target", "trt", "--no-build", "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "--int4 is ONNX Runtime's MatMulNBits" in result.stderr
    assert not (tmp_path / "out").exists()
