"""float32 MatMuls as 1×1 Convs: ORT before and after (plain, and with ORT's NCHWc rewrite), the Conv weight's
block-wise transpose, and the weights the pass leaves alone."""

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch

from llama_export.graphs import pipeline
from llama_export.graphs.passes import packed_matmul, pointwise_conv, weight_quant
from llama_export.graphs.passes._tensors import ColumnConcat
from graph_helpers import GQA, assert_same_outputs, feeds, run, save, traced


def ort_ops(path) -> collections.Counter:
    """The (domain, op) counts of the graph ONNX Runtime's CPU session runs."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path.with_name("ort.onnx"))
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    return collections.Counter((n.domain, n.op_type) for n in graph.node)


def packed(tmp_path, dtype="float32") -> ir.Model:
    model = ir.load(str(traced(tmp_path / "traced", dtype=dtype)))
    pipeline._cleanup(model)
    packed_matmul.apply(model)
    return model


def test_matmuls_become_convs_and_keep_outputs(tmp_path):
    model = packed(tmp_path)
    before = save(model, tmp_path / "before" / "model.onnx")
    matmuls = pipeline.op_counts(model)["MatMul"]
    assert matmuls == 2 * GQA.num_hidden_layers + 1 + 2 * GQA.num_hidden_layers  # qkv, gate/up; o, down; lm_head
    assert pointwise_conv.apply(model) == matmuls
    counts = pipeline.op_counts(model)
    assert "MatMul" not in counts and counts["Conv"] == matmuls
    assert not any(name.endswith("weight.T") for name in model.graph.initializers)  # only the Conv weights remain
    after = save(model, tmp_path / "after" / "model.onnx")
    worst = assert_same_outputs(before, after)
    for feed in feeds():  # and as ONNX Runtime runs it: NCHWc Convs, the Transposes folded into its reorders
        for a, b in zip(run(before, feed, optimized=True), run(after, feed, optimized=True)):
            assert np.abs(a - b).max() <= 1e-5 * max(np.abs(a).max(), 1e-6)
    ours, theirs = ort_ops(after), ort_ops(before)
    assert ours["com.microsoft.nchwc", "Conv"] == matmuls and ("", "Conv") not in ours
    assert ours["", "Transpose"] == theirs["", "Transpose"]  # the attention's own; none of the pass's is left
    print(f"1×1 Conv: max relative output difference {worst:.2e}")


def test_conv_weight_is_the_transpose_written_in_blocks():
    rng = np.random.default_rng(0)
    parts = [ir.tensor(rng.standard_normal((48, n)).astype(np.float32)) for n in (40, 24)]
    whole = np.concatenate([p.numpy() for p in parts], axis=1)
    blocks = list(pointwise_conv._transposed_blocks(parts, block_bytes=48 * 4 * 16))  # 16 rows of the result each
    assert [b.shape for b in blocks] == [(16, 48, 1, 1)] * 2 + [(8, 48, 1, 1)] + [(16, 48, 1, 1), (8, 48, 1, 1)]
    np.testing.assert_array_equal(np.concatenate(blocks), whole.T.reshape(64, 48, 1, 1))
    weight = pointwise_conv.conv_weight(ColumnConcat(parts))
    assert weight.shape == (64, 48, 1, 1)
    np.testing.assert_array_equal(weight.numpy(), whole.T.reshape(64, 48, 1, 1))


def test_float16_and_quantized_weights_are_left_alone(tmp_path):
    assert pointwise_conv.apply(packed(tmp_path / "fp16", "float16")) == 0
    model = packed(tmp_path / "int8")
    quantized = weight_quant.apply(model, "matmulnbits")
    left = pipeline.op_counts(model).get("MatMul", 0)
    assert quantized > 0 and pointwise_conv.apply(model) == left


def test_matmuls_reading_one_activation_share_its_view(tmp_path):
    """Unpacked q/k/v and gate/up read one activation each: one Reshape/Transpose view of it serves them all."""
    model = ir.load(str(traced(tmp_path / "traced")))
    pipeline._cleanup(model)
    before = save(model, tmp_path / "before" / "model.onnx")
    activations = {n.inputs[0] for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None}
    transposes = pipeline.op_counts(model).get("Transpose", 0)
    converted = pointwise_conv.apply(model)
    assert converted == 7 * GQA.num_hidden_layers + 1 and len(activations) == 4 * GQA.num_hidden_layers + 1
    # each activation's input view, each Conv's output
    assert pipeline.op_counts(model)["Transpose"] == transposes + len(activations) + converted
    assert_same_outputs(before, save(model, tmp_path / "after" / "model.onnx"))


def test_output_shapes_are_computed_once_per_leading_dims_and_width(tmp_path):
    """Every layer's projections read `[batch, sequence_length, ·]` activations: one Shape serves them all, and one
    Concat per output width (the lm_head reads the kept positions, whose leading dims differ: a second Shape)."""
    model = packed(tmp_path)
    before = save(model, tmp_path / "before" / "model.onnx")
    counts = pipeline.op_counts(model)
    widths = {n.inputs[1].shape[-1] for n in model.graph
              if n.op_type == "MatMul" and n.inputs[1].const_value is not None}
    converted = pointwise_conv.apply(model)
    after = pipeline.op_counts(model)
    shapes = [n for n in model.graph if n.op_type == "Shape" and "/conv/" in n.name]
    concats = [n for n in model.graph if n.op_type == "Concat" and "/conv/" in n.name]
    assert converted > 2 * len(widths) and len(shapes) == 2 and len(concats) == len(widths)
    assert after["Shape"] - counts.get("Shape", 0) == 2 and after["Concat"] - counts.get("Concat", 0) == len(concats)
    assert_same_outputs(before, save(model, tmp_path / "after" / "model.onnx"))


def test_the_vocabulary_projection_is_split_into_chunks(tmp_path):
    """The logits' Conv in output-channel chunks of at most `head_chunk_bytes` each, joined on the channel axis:
    the same outputs as the MatMul (plain ONNX Runtime, and with its NCHWc rewrite, which keeps the join in NCHWc),
    and the torch backend reads the weight back whole. The layers' projections stay whole."""
    from llama_export.exporter.torch_backend import reference_weights

    model = packed(tmp_path)
    before = save(model, tmp_path / "before" / "model.onnx")
    matmuls = pipeline.op_counts(model)["MatMul"]
    head = GQA.vocab_size * GQA.hidden_size * 4
    assert pointwise_conv.apply(model, head_chunk_bytes=head // 3 + 1) == matmuls
    chunks = [name for name in model.graph.initializers if ".conv." in name]
    assert chunks == [f"model.lm_head.weight.T.conv.{i}" for i in range(3)]
    assert [model.graph.initializers[name].shape[0] for name in chunks] == [64, 64, GQA.vocab_size - 128]
    assert pipeline.op_counts(model)["Conv"] == matmuls + 2
    after = save(model, tmp_path / "after" / "model.onnx")
    assert_same_outputs(before, after)
    for feed in feeds():
        for a, b in zip(run(before, feed, optimized=True), run(after, feed, optimized=True)):
            assert np.abs(a - b).max() <= 1e-5 * max(np.abs(a).max(), 1e-6)
    unsplit = packed(tmp_path / "unsplit")
    pointwise_conv.apply(unsplit)
    ours, theirs = ort_ops(after), ort_ops(save(unsplit, tmp_path / "unsplit" / "convs" / "model.onnx"))
    assert ours["com.microsoft.nchwc", "Conv"] == matmuls + 2 and ("", "Conv") not in ours
    # one Concat more, in the NCHWc layout: the chunks' outputs are not reordered each
    assert ours["", "Concat"] == theirs["", "Concat"] + 1
    assert ours["com.microsoft.nchwc", "ReorderOutput"] == theirs["com.microsoft.nchwc", "ReorderOutput"]
    whole, split = reference_weights(before, GQA), reference_weights(after, GQA)
    assert whole.keys() == split.keys()
    assert all(torch.equal(whole[name], split[name]) for name in whole)
