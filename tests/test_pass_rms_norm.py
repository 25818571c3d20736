"""RMSNormalization fusion: ORT before and after, on a traced GQA graph."""

import onnx_ir as ir

from llama_export.graphs import pipeline
from llama_export.graphs.passes import rms_norm
from graph_helpers import GQA, assert_same_outputs, save, traced


def test_rms_norm_fusion_keeps_outputs(tmp_path):
    model = ir.load(str(traced(tmp_path / "traced")))
    pipeline._cleanup(model)
    before = save(model, tmp_path / "before" / "model.onnx")
    assert "RMSNormalization" not in pipeline.op_counts(model)
    assert rms_norm.apply(model) == 2 * GQA.num_hidden_layers + 1
    counts = pipeline.op_counts(model)
    assert counts["RMSNormalization"] == 2 * GQA.num_hidden_layers + 1
    assert "ReduceMean" not in counts and "Pow" not in counts
    worst = assert_same_outputs(before, save(model, tmp_path / "after" / "model.onnx"))
    print(f"RMSNormalization: max relative output difference {worst:.2e}")
