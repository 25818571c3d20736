"""The TensorRT-compatibility check: for every rule of TensorRT 11's ONNX parser it checks, a hand-made graph
that breaks it; valid graphs pass; the exporter's trt graphs pass and its old fp16 graph (an Attention with
softmax_precision) fails with the parser's own message."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from llama_export.graphs.trt_check import RULES, check

F, F16, B = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BOOL


def model(nodes, inputs, outputs, inits=(), opset=23):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def attention_model(*, past=False, present=False, empty_present=False, mask=True, q_len="q", k_len="k", opset=23,
                    rank=4, kv_rank=None, heads=True, mask_rank=4, mask_type=B, dtype=F, nonpad=False, **attrs):
    kv_rank = kv_rank or rank
    shape = {4: lambda n, s: [1, n, s, 16], 3: lambda n, s: [1, s, n * 16], 5: lambda n, s: [1, 1, n, s, 16]}
    inputs = [vi("q", dtype, shape[rank](8, q_len)), vi("k", dtype, shape[kv_rank](2, k_len)),
              vi("v", dtype, shape[kv_rank](2, k_len))]
    node_inputs = ["q", "k", "v", "mask" if mask else ""]
    if mask:
        inputs.append(vi("mask", mask_type, [1] * (mask_rank - 2) + [q_len, k_len]))
    if past:
        inputs += [vi(n, dtype, [1, 2, "p", 16]) for n in ("pk", "pv")]
        node_inputs += ["pk", "pv"]
    if nonpad:
        inputs.append(vi("lens", TensorProto.INT64, [1]))
        node_inputs += ["", "", "lens"]
    outputs = ["y"] + (["present_k", "present_v"] if present else []) + (["", ""] if empty_present else [])
    if heads:
        attrs = {"q_num_heads": 8, "kv_num_heads": 2, **attrs}
    node = helper.make_node("Attention", node_inputs, outputs, name="attn", **attrs)
    return model([node], inputs, [vi(o, dtype, None) for o in outputs if o], opset=opset)


def dq_model(*, zero_point=None, zero_size=None, per_channel=False, on_activation=False, scale_input=False,
             scale=0.5, scale_dtype=np.float32, scale_len=3):
    w = numpy_helper.from_array(np.ones((4, 3), np.int8), "w")
    values = np.full((scale_len,) if per_channel else (), scale, scale_dtype)
    scale_tensor = numpy_helper.from_array(values, "scale")
    inits, inputs = [scale_tensor], [vi("x", F, [2, 4])]
    if on_activation:
        inputs.append(vi("w", TensorProto.INT8, [4, 3]))
    else:
        inits.append(w)
    if scale_input:
        inits.remove(scale_tensor)
        inputs.append(vi("scale", F, []))
    dq_inputs = ["w", "scale"]
    if zero_point is not None:
        size = zero_size if zero_size is not None else (scale_len if per_channel else None)
        inits.append(numpy_helper.from_array(np.full((size,) if size else (), zero_point, np.int8), "zp"))
        dq_inputs.append("zp")
    nodes = [helper.make_node("DequantizeLinear", dq_inputs, ["wf"], name="dq", axis=1),
             helper.make_node("MatMul", ["x", "wf"], ["y"])]
    return model(nodes, inputs, [vi("y", F, [2, 3])], inits)


def scatter_model(*, cache_rank=4, axis=-2, mode="linear", static=True, cache_is_input=True, output_is_output=True):
    cache_shape = {4: ["b", 2, 8 if static else "s", 16], 3: ["b", 8, 32]}[cache_rank]
    update_shape = {4: ["b", 2, 1, 16], 3: ["b", 1, 32]}[cache_rank]
    inputs = [vi("update", F, update_shape), vi("idx", TensorProto.INT64, ["b"])]
    nodes = []
    cache = "cache"
    if cache_is_input:
        inputs.append(vi("cache", F, cache_shape))
    else:
        inputs.append(vi("raw", F, cache_shape))
        nodes.append(helper.make_node("Identity", ["raw"], ["cache"]))
    nodes.append(helper.make_node("TensorScatter", [cache, "update", "idx"], ["present"], name="ts", axis=axis,
                                  mode=mode))
    out = "present"
    if not output_is_output:
        nodes.append(helper.make_node("Identity", ["present"], ["out"]))
        out = "out"
    return model(nodes, inputs, [vi(out, F, cache_shape)], opset=24)


def squeeze_model(*, static=True, axes=False):
    inits = [numpy_helper.from_array(np.array([1], np.int64), "axes")] if axes else []
    node = helper.make_node("Squeeze", ["x", "axes"] if axes else ["x"], ["y"], name="sq")
    return model([node], [vi("x", F, [1, 4] if static else ["n", 4])], [vi("y", F, None)], inits)


def rotary_model(*, num_heads=2, hidden=32):
    attrs = {"num_heads": num_heads} if num_heads else {}
    node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin", "pos"], ["y"], name="rope", **attrs)
    inputs = [vi("x", F, [1, "s", hidden]), vi("cos", F, [16, 8]), vi("sin", F, [16, 8]),
              vi("pos", TensorProto.INT64, [1, "s"])]
    return model([node], inputs, [vi("y", F, None)])


def split_model(*, split=True, num_outputs=None, split_len=2):
    inits = [numpy_helper.from_array(np.array([2] * split_len, np.int64), "split")] if split else []
    attrs = {"num_outputs": num_outputs} if num_outputs else {}
    node = helper.make_node("Split", ["x", "split"] if split else ["x"], ["a", "b"], name="split", axis=1, **attrs)
    return model([node], [vi("x", F, [1, 4])], [vi("a", F, None), vi("b", F, None)], inits, opset=18)


def mixed_add_model():
    return model([helper.make_node("Add", ["a", "b"], ["y"], name="add")], [vi("a", F, [2]), vi("b", F16, [2])],
                 [vi("y", F, [2])])


def rules(m) -> list[str]:
    return sorted(v.rule for v in check(m))


def contrib_model():
    node = helper.make_node("GroupQueryAttention", ["q"], ["y"], domain="com.microsoft", name="gqa")
    m = model([node], [vi("q", F, [1])], [vi("y", F, [1])])
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return m


BREAKING = [
    (attention_model(opset=25), "opset"),
    (attention_model(opset=8), "opset"),
    (contrib_model(), "domain"),
    (attention_model(present=True), "attention-outputs"),
    (attention_model(empty_present=True), "attention-outputs"),  # empty-named outputs count
    (attention_model(softmax_precision=1), "attention-softmax-precision"),
    (attention_model(softcap=30.0), "attention-softcap"),
    (attention_model(past=True), "attention-past"),
    (attention_model(nonpad=True), "attention-past"),
    (attention_model(kv_rank=3), "attention-rank"),
    (attention_model(rank=3, heads=False), "attention-heads"),
    (attention_model(rank=3, heads=False, q_num_heads=8, kv_num_heads=3), "attention-heads"),
    (attention_model(mask_rank=5), "attention-mask-rank"),
    (attention_model(mask_type=F16), "attention-mask-type"),
    (attention_model(mask=False), "attention-mask"),
    (scatter_model(cache_rank=3, axis=1), "tensorscatter-rank"),
    (scatter_model(axis=1), "tensorscatter-axis"),
    (scatter_model(axis=-3), "tensorscatter-axis"),
    (scatter_model(mode="circular"), "tensorscatter-mode"),
    (scatter_model(static=False), "tensorscatter-io"),
    (scatter_model(cache_is_input=False), "tensorscatter-io"),
    (scatter_model(output_is_output=False), "tensorscatter-io"),
    (dq_model(scale_input=True), "qdq-scale"),
    (dq_model(scale=0.0), "qdq-scale-positive"),
    (dq_model(scale=1e-8, scale_dtype=np.float16, per_channel=True), "qdq-scale-positive"),  # rounds to 0
    (dq_model(per_channel=True, scale_len=4), "qdq-scale-length"),
    (dq_model(zero_point=3), "qdq-zero-point"),
    (dq_model(zero_point=0, zero_size=2, per_channel=True), "qdq-zero-point-size"),
    (dq_model(per_channel=True, on_activation=True), "qdq-per-channel"),
    (squeeze_model(static=False), "squeeze-dynamic"),
    (rotary_model(num_heads=0), "rotary-num-heads"),
    (rotary_model(num_heads=3), "rotary-num-heads"),
    (split_model(num_outputs=2), "split-both"),
    (split_model(split_len=3), "split-both"),
    (split_model(split=False, num_outputs=3), "split-both"),
    (mixed_add_model(), "strong-typing"),
]


@pytest.mark.parametrize("m, rule", BREAKING, ids=[f"{r}-{i}" for i, (_, r) in enumerate(BREAKING)])
def test_each_rule_rejects_its_graph(m, rule):
    assert rule in rules(m)


def test_every_rule_has_a_graph_that_breaks_it():
    assert {rule for _, rule in BREAKING} == set(RULES)


def test_valid_graphs_pass():
    assert check(attention_model()) == []
    assert check(attention_model(mask=False, q_len="s", k_len="s")) == []  # same length: no mask needed
    assert check(attention_model(rank=3)) == []  # 3-D with both head counts
    assert check(attention_model(mask_type=F)) == []  # a float mask of the query's type
    assert check(attention_model(softcap=0.0)) == []  # the attribute is allowed at 0
    assert check(dq_model()) == [] and check(dq_model(zero_point=0, per_channel=True)) == []
    assert check(dq_model(scale=float(np.finfo(np.float16).tiny), scale_dtype=np.float16, per_channel=True)) == []
    assert check(scatter_model()) == [] and check(scatter_model(axis=2)) == []  # 2 normalises to -2
    assert check(squeeze_model()) == [] and check(squeeze_model(static=False, axes=True)) == []
    assert check(rotary_model()) == [] and check(split_model()) == []
    assert check(split_model(split=False, num_outputs=2)) == []


def test_messages_are_the_parsers_and_name_the_source():
    problem = check(attention_model(softmax_precision=1))[0]
    assert str(problem) == ("attn: attention-softmax-precision: Setting softmax precision is not supported in "
                            "TensorRT Attention. [onnxOpCheckers.cpp DEFINE_OP_CHECKER(Attention)]")
    assert "Scale coefficients must all be positive" in str(check(dq_model(scale=0.0))[0])


def test_scale_values_are_read_from_the_external_data(tmp_path):
    """The exporter's graphs keep their scales in the data file: the check reads them there."""
    m = dq_model(scale=0.0, per_channel=True, scale_len=3)
    onnx.save(m, str(tmp_path / "m.onnx"), save_as_external_data=True,
              location="m.onnx.data", size_threshold=0)
    graph_only = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert "qdq-scale-positive" not in rules(graph_only)  # values unknown without the data
    assert "qdq-scale-positive" in {v.rule for v in check(graph_only, base_dir=tmp_path)}


@pytest.fixture(scope="module")
def tiny_trt(tmp_path_factory):
    """tiny exported for trt in the two forms no other test file exports: bf16 and the static cache."""
    from llama_export.exporter.write_artifact import build_artifact
    from llama_export.graphs.options import ExportOptions
    from llama_export.exporter.presets import resolve_checkpoint

    ckpt, root = resolve_checkpoint("tiny"), tmp_path_factory.mktemp("tiny-trt")
    out = {}
    for name, dtype, max_seq in (("bf16", "bfloat16", None), ("static", "float16", 64)):
        out[name] = root / name
        options = ExportOptions(dtype, "trt", kv_cache="static" if max_seq else "portable", max_seq_len=max_seq)
        build_artifact(ckpt, out[name], options, log=lambda m: None)
    return out


@pytest.mark.parametrize("name", ["bf16", "static"])
def test_the_exported_trt_graphs_pass(tiny_trt, name):
    """(fp32, fp16, --int8 and --int8 --smoothquant trt graphs are exported, and so checked, by test_pipeline,
    test_pass_weight_quant and test_pass_smooth_quant; the export fails on any violation.)"""
    directory = tiny_trt[name]
    m = onnx.load(str(directory / "model.onnx"), load_external_data=False)
    assert check(m, base_dir=directory) == []
    attention = [n for n in m.graph.node if n.op_type == "Attention"]
    assert len(attention) == 4 and not any(a.name == "softmax_precision" for n in attention for a in n.attribute)
    if name == "static":
        assert sum(n.op_type == "TensorScatter" for n in m.graph.node) == 8


def test_the_old_fp16_graph_fails_with_the_parsers_message(tmp_path):
    """The onnx target keeps softmax_precision (legal there): exactly the graph every fp16 trt export used to
    be; the check refuses each of its Attention nodes as the parser does."""
    from llama_export.exporter.write_artifact import build_artifact
    from llama_export.graphs.options import ExportOptions
    from llama_export.exporter.presets import resolve_checkpoint

    out = tmp_path / "onnx"
    build_artifact(resolve_checkpoint("tiny"), out, ExportOptions("float16"), log=lambda m: None)
    problems = check(onnx.load(str(out / "model.onnx"), load_external_data=False), base_dir=out)
    assert len(problems) == 4 and {p.rule for p in problems} == {"attention-softmax-precision"}
    assert all("Setting softmax precision is not supported in TensorRT Attention." in str(p) for p in problems)
