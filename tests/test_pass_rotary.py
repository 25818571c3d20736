"""RotaryEmbedding fusion: ORT before and after, on traced fp32 and fp16 GQA graphs."""

import numpy as np
import onnx_ir as ir
import pytest

from llama_export.graphs import pipeline
from llama_export.graphs.passes import rotary
from graph_helpers import GQA, assert_same_outputs, save, traced


@pytest.mark.parametrize("dtype, np_dtype, tolerance", [("float32", np.float32, 1e-5), ("float16", np.float16, 2e-3)])
def test_rotary_fusion_keeps_outputs(tmp_path, dtype, np_dtype, tolerance):
    model = ir.load(str(traced(tmp_path / "traced", dtype=dtype)))
    pipeline._cleanup(model)
    before = save(model, tmp_path / "before" / "model.onnx")
    assert rotary.apply(model) == 2 * GQA.num_hidden_layers  # queries and keys of every layer
    pipeline._cleanup(model)
    counts = pipeline.op_counts(model)
    assert counts["RotaryEmbedding"] == 2 * GQA.num_hidden_layers
    assert counts.get("Neg", 0) == 0 and counts["Cos"] == 1 and counts["Sin"] == 1  # one shared cache
    worst = assert_same_outputs(before, save(model, tmp_path / "after" / "model.onnx"), tolerance, np_dtype)
    print(f"RotaryEmbedding ({dtype}): max relative output difference {worst:.2e}")


def test_scaled_rope_is_left_alone(tmp_path):
    """yarn multiplies cos/sin by an attention factor: not the rotate-half form, so nothing is fused."""
    config = GQA.replace(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    model = ir.load(str(traced(tmp_path / "traced", config=config)))
    pipeline._cleanup(model)
    assert rotary.apply(model) == 0
