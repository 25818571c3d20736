"""SkipSimplifiedLayerNormalization fusion (ort target): ORT before and after, fp32 and fp16."""

import numpy as np
import onnx_ir as ir
import pytest

from llama_export.graphs import pipeline
from llama_export.graphs.passes import rms_norm, skip_rms_norm
from graph_helpers import GQA, assert_same_outputs, save, traced


@pytest.mark.parametrize("dtype, np_dtype, tolerance", [("float32", np.float32, 1e-5), ("float16", np.float16, 2e-3)])
def test_skip_rms_norm_fusion_keeps_outputs(tmp_path, dtype, np_dtype, tolerance):
    model = ir.load(str(traced(tmp_path / "traced", dtype=dtype)))
    pipeline._cleanup(model)
    rms_norm.apply(model)
    before = save(model, tmp_path / "before" / "model.onnx")
    adds = pipeline.op_counts(model)["Add"]
    # every norm after a residual Add: two per layer; the first layer's input norm reads the embedding
    assert skip_rms_norm.apply(model) == 2 * GQA.num_hidden_layers
    pipeline._cleanup(model)
    counts = pipeline.op_counts(model)
    assert counts["SkipSimplifiedLayerNormalization"] == 2 * GQA.num_hidden_layers and counts["RMSNormalization"] == 1
    assert counts["Add"] == adds - 2 * GQA.num_hidden_layers  # each residual sum now comes out of the fused node
    worst = assert_same_outputs(before, save(model, tmp_path / "after" / "model.onnx"), tolerance, np_dtype)
    print(f"SkipSimplifiedLayerNormalization ({dtype}): max relative output difference {worst:.2e}")
