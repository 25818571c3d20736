"""Packed qkv and gate/up projections: ORT before and after, and the packed weight's layout."""

import numpy as np
import onnx_ir as ir

from llama_export.graphs import pipeline
from llama_export.graphs.passes import packed_matmul
from graph_helpers import GQA, assert_same_outputs, save, traced


def test_packed_projections_keep_outputs(tmp_path):
    model = ir.load(str(traced(tmp_path / "traced")))
    pipeline._cleanup(model)
    before = save(model, tmp_path / "before" / "model.onnx")
    matmuls = pipeline.op_counts(model)["MatMul"]
    q = model.graph.initializers["model.model.layers.0.self_attn.q_proj.weight.T"].const_value.numpy()
    k = model.graph.initializers["model.model.layers.0.self_attn.k_proj.weight.T"].const_value.numpy()
    v = model.graph.initializers["model.model.layers.0.self_attn.v_proj.weight.T"].const_value.numpy()
    assert packed_matmul.apply(model) == 2 * GQA.num_hidden_layers  # qkv and gate/up per layer
    assert pipeline.op_counts(model)["MatMul"] == matmuls - 3 * GQA.num_hidden_layers
    qkv = model.graph.initializers["model.model.layers.0.self_attn.qkv_proj.weight.T"].const_value
    assert qkv.shape == (GQA.hidden_size, (GQA.num_attention_heads + 2 * GQA.num_key_value_heads) * GQA.head_dim)
    np.testing.assert_array_equal(qkv.numpy(), np.concatenate([q, k, v], axis=1))
    assert "model.model.layers.0.mlp.gateup_proj.weight.T" in model.graph.initializers
    assert "model.model.layers.0.self_attn.q_proj.weight.T" not in model.graph.initializers
    worst = assert_same_outputs(before, save(model, tmp_path / "after" / "model.onnx"))
    print(f"packed projections: max relative output difference {worst:.2e}")
