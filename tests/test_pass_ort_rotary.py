"""Contrib RotaryEmbedding (ort target): ORT before and after, fp32 and fp16; a length-dependent rope stays."""

import numpy as np
import onnx_ir as ir
import pytest

from llama_export.graphs import pipeline
from llama_export.graphs.passes import ort_rotary, rotary
from graph_helpers import GQA, assert_same_outputs, save, traced


def fused_rope(path):
    model = ir.load(str(path))
    pipeline._cleanup(model)
    rotary.apply(model)
    return model


@pytest.mark.parametrize("dtype, np_dtype, tolerance", [("float32", np.float32, 1e-5), ("float16", np.float16, 2e-3)])
def test_contrib_rotary_keeps_outputs(tmp_path, dtype, np_dtype, tolerance):
    model = fused_rope(traced(tmp_path / "traced", dtype=dtype))
    before = save(model, tmp_path / "before" / "model.onnx")
    assert ort_rotary.apply(model, GQA.max_position_embeddings) == 2 * GQA.num_hidden_layers
    pipeline._cleanup(model)
    ropes = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    assert len(ropes) == 2 * GQA.num_hidden_layers and {n.domain for n in ropes} == {"com.microsoft"}
    assert {n.inputs[1].name for n in ropes} == {"position_ids"}
    counts = pipeline.op_counts(model)
    assert "Cos" not in counts and "Sin" not in counts  # read from one pair of constant caches
    cache = ropes[0].inputs[2].const_value
    assert cache.shape == (GQA.max_position_embeddings, GQA.head_dim // 2) and cache.dtype.numpy() == np_dtype
    worst = assert_same_outputs(before, save(model, tmp_path / "after" / "model.onnx"), tolerance, np_dtype)
    print(f"contrib RotaryEmbedding ({dtype}): max relative output difference {worst:.2e}")


def test_length_dependent_rope_keeps_the_standard_op(tmp_path):
    config = GQA.replace(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    model = fused_rope(traced(tmp_path / "traced", config=config))
    assert ort_rotary.apply(model, config.max_position_embeddings) == 0
