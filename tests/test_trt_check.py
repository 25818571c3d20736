"""The TensorRT-compatibility check: hand-made graphs that break each rule, and the exporter's own graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs.trt_check import check


def attention_model(*, past=False, present=False, mask=True, q_len="q", k_len="k", opset=23):
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 8, q_len, 16]),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 2, k_len, 16]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 2, k_len, 16])]
    node_inputs = ["q", "k", "v", "mask" if mask else ""]
    if mask:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, [1, 1, q_len, k_len]))
    if past:
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, "p", 16]) for n in ("pk", "pv")]
        node_inputs += ["pk", "pv"]
    outputs = ["y"] + (["present_k", "present_v"] if present else [])
    node = helper.make_node("Attention", node_inputs, outputs, name="attn", q_num_heads=8, kv_num_heads=2)
    graph = helper.make_graph([node], "g", inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def dq_model(*, zero_point=None, per_channel=False, on_activation=False, scale_input=False):
    w = numpy_helper.from_array(np.ones((4, 3), np.int8), "w")
    scale = numpy_helper.from_array(np.full((3,) if per_channel else (), 0.5, np.float32), "scale")
    inits, inputs = [scale], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])]
    if on_activation:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.INT8, [4, 3]))
    else:
        inits.append(w)
    if scale_input:
        inits.remove(scale)
        inputs.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, []))
    dq_inputs = ["w", "scale"]
    if zero_point is not None:
        inits.append(numpy_helper.from_array(np.full((3,) if per_channel else (), zero_point, np.int8), "zp"))
        dq_inputs.append("zp")
    nodes = [helper.make_node("DequantizeLinear", dq_inputs, ["wf"], name="dq", axis=1),
             helper.make_node("MatMul", ["x", "wf"], ["y"])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def rules(model) -> list[str]:
    return sorted(v.rule for v in check(model))


def test_valid_graphs_pass():
    assert check(attention_model()) == []
    assert check(attention_model(mask=False, q_len="s", k_len="s")) == []  # same length: no mask needed
    assert check(dq_model()) == [] and check(dq_model(zero_point=0, per_channel=True)) == []


@pytest.mark.parametrize("model, rule", [
    (attention_model(past=True), "attention-past"),
    (attention_model(present=True), "attention-outputs"),
    (attention_model(mask=False), "attention-mask"),
    (attention_model(opset=25), "opset"),
    (attention_model(opset=8), "opset"),
    (dq_model(zero_point=3), "qdq-zero-point"),
    (dq_model(per_channel=True, on_activation=True), "qdq-per-channel"),
    (dq_model(scale_input=True), "qdq-scale"),
])
def test_each_rule_rejects_its_graph(model, rule):
    assert rule in rules(model)


def test_contrib_ops_are_rejected():
    node = helper.make_node("GroupQueryAttention", ["q"], ["y"], domain="com.microsoft", name="gqa")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    problems = check(model)
    assert [p.rule for p in problems] == ["domain"] and "com.microsoft::GroupQueryAttention" in str(problems[0])


def test_the_exported_portable_graph_passes(tmp_path):
    from exporter.artifact import build_artifact
    from exporter.presets import resolve_checkpoint

    out = tmp_path / "tiny"
    build_artifact(resolve_checkpoint("tiny"), out, "float16", log=lambda m: None)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "Attention" for n in model.graph.node) == 4
    assert check(model) == []
