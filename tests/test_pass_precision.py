"""Precision pass: the float32 trace → fp16 / bf16 with fp32 rope angles, RMSNorm statistics and logits.
ORT runs the graph before (fp32) and after (fp16); bf16, which ORT's CPU kernels do not run, is checked by
ONNX's full type inference."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from llama_export.graphs import pipeline
from llama_export.graphs.passes import precision
from llama_export.runtime.backends import ort_feed
from graph_helpers import GQA, feeds, run, save, traced
from graph_helpers import cli

FLOAT, FLOAT16 = ir.DataType.FLOAT, ir.DataType.FLOAT16


def far_positions(np_dtype) -> dict:
    """A decode-shaped step at positions ~3000: fp16 positions × frequencies would be off by whole radians."""
    rng = np.random.default_rng(1)
    kvh, d = GQA.num_key_value_heads, GQA.head_dim
    past = 3000
    cache = [tuple((0.5 * rng.standard_normal((1, kvh, past, d))).astype(np_dtype) for _ in range(2))
             for _ in range(GQA.num_hidden_layers)]
    ids = rng.integers(3, GQA.vocab_size, (1, 4))
    return ort_feed(ids, np.ones((1, past + 4), np.int64), np.arange(past, past + 4)[None], cache, 0)


def converted(tmp_path, dtype: str) -> tuple:
    src = traced(tmp_path / "traced")
    model = ir.load(str(src))
    kept = precision.apply(model, dtype)
    return src, model, kept


def test_fp16_keeps_islands_in_fp32_and_matches_the_fp32_graph(tmp_path):
    src, model, kept = converted(tmp_path, "float16")
    layers = GQA.num_hidden_layers
    assert kept == 1 + (2 * layers + 1) + 1  # one rope angle computation (cos and sin), the norms, the logits
    ops = {}
    for node in model.graph:
        ops.setdefault(node.op_type, []).append(node)
    for op in ("Pow", "ReduceMean", "Sqrt", "Reciprocal", "Cos", "Sin"):
        assert ops[op] and all(n.outputs[0].dtype == FLOAT for n in ops[op]), op
    assert all(n.outputs[0].dtype == FLOAT16 for n in ops["MatMul"])
    assert all(n.attributes.get_int("softmax_precision") == 1 for n in ops["Attention"])
    outputs = {v.name: v.dtype for v in model.graph.outputs}
    assert outputs.pop("logits") == FLOAT and set(outputs.values()) == {FLOAT16}
    weights = [v for v in model.graph.initializers.values() if v.name.endswith(".weight.T")]
    assert weights and all(v.dtype == FLOAT16 for v in weights)
    after = save(model, tmp_path / "fp16" / "model.onnx")
    onnx.checker.check_model(str(after), full_check=True)  # every type agrees with every operator
    worst = 0.0
    for feed32 in [*feeds(), far_positions(np.float32)]:
        feed16 = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feed32.items()}
        ref, ours = run(src, feed32)[0], run(after, feed16)[0]
        assert ours.dtype == np.float32
        diff = float(np.abs(ours - ref).max()) / float(np.abs(ref).max())
        worst = max(worst, diff)
        assert diff <= 1e-2, diff
    print(f"fp16 pass vs the fp32 graph (incl. positions 3000..3003): logits within {worst:.3g} × their scale")
    # the keys written at positions 3000..3003 are rotated by those angles: with fp16 angles (no fp32 rope
    # island) they are off by ~5% of their scale, here by less than 0.1%
    feed32 = far_positions(np.float32)
    ref = run(src, feed32)[1][:, :, 3000:]
    ours = run(after, {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feed32.items()})[1]
    keys = float(np.abs(ours[:, :, 3000:].astype(np.float32) - ref).max()) / float(np.abs(ref).max())
    print(f"layer-0 keys rotated at positions 3000..3003: within {keys:.3g} × their scale")
    assert keys <= 5e-3


def test_trt_attention_gets_no_softmax_precision(tmp_path):
    """TensorRT's parser refuses an Attention carrying softmax_precision at all (onnxOpCheckers.cpp,
    DEFINE_OP_CHECKER(Attention)): for the trt target the pass leaves it off and changes nothing else."""
    _, with_it, kept = converted(tmp_path, "float16")
    without = ir.load(str(tmp_path / "traced" / "model.onnx"))
    assert precision.apply(without, "float16", softmax_precision=False) == kept
    assert not [n for n in without.graph if n.op_type == "Attention" and "softmax_precision" in n.attributes]
    assert [n.op_type for n in without.graph] == [n.op_type for n in with_it.graph]


def test_bf16_types_agree_with_every_operator(tmp_path):
    """As the export runs it: the pass on the trace, then the pipeline's cleanup (whose Split replaces the
    trace's SplitToSequence, which ONNX does not define for bfloat16)."""
    _, model, _ = converted(tmp_path, "bfloat16")
    pipeline._cleanup(model)
    after = save(model, tmp_path / "bf16" / "model.onnx")
    onnx.checker.check_model(str(after), full_check=True)
    proto = onnx.load(str(after), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in proto.graph.output}
    assert types.pop("logits") == onnx.TensorProto.FLOAT and set(types.values()) == {onnx.TensorProto.BFLOAT16}


def test_out_of_range_constants_saturate():
    tensor = ir.tensor(np.array([np.finfo(np.float32).min, 1.5, 1e6], np.float32))
    assert precision._converted(tensor, FLOAT16).numpy().tolist() == [-65504.0, 1.5, 65504.0]


def test_converting_in_place_needs_weights_already_in_the_target_type(tmp_path):
    with pytest.raises(pipeline.PassError, match="are float32; the precision pass rewrites only the graph file"):
        pipeline.convert_precision(traced(tmp_path / "traced"), "float16")
    with pytest.raises(ValueError, match="cannot convert to 'int8'"):
        precision.apply(ir.load(str(tmp_path / "traced" / "model.onnx")), "int8")


def test_bf16_without_the_pipeline_is_refused(tmp_path):
    result = cli("--model", "tiny", "--bf16", "--no-optimize", "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "--bf16 needs the optimization pipeline (drop --no-optimize)" in result.stderr
    assert not (tmp_path / "out").exists()
