"""Static KV cache: the TensorScatter graph computes what the portable graph computes, step after step, its
presents alias its pasts (ONNX Runtime updates them in place through IOBinding), and TensorRT can import it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from llama_export.graphs import pipeline, trt_check
from llama_export.graphs.passes import static_cache
from llama_export.runtime.backends import ort_feed
from graph_helpers import GQA, SLOTS, assert_updates_in_place, cli, run, save, steps, traced

@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("static")
    model = ir.load(str(traced(tmp / "traced")))
    pipeline._cleanup(model)
    before = save(model, tmp / "portable" / "model.onnx")
    assert static_cache.apply(model, SLOTS) == 2 * GQA.num_hidden_layers
    pipeline._cleanup(model)
    return before, save(model, tmp / "static" / "model.onnx")


def test_static_graph_matches_portable_step_after_step(graphs):
    portable, static = graphs
    kvh, d, layers = GQA.num_key_value_heads, GQA.head_dim, GQA.num_hidden_layers
    past = [tuple(np.zeros((2, kvh, 0, d), np.float32) for _ in range(2)) for _ in range(layers)]
    buffers = [tuple(np.zeros((2, kvh, SLOTS, d), np.float32) for _ in range(2)) for _ in range(layers)]
    written, worst = 0, 0.0
    for ids, mask, keep in steps(np.random.default_rng(0)):
        pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)[:, -ids.shape[1]:]
        ref = run(portable, ort_feed(ids, mask, pos, past, keep))
        feed = ort_feed(ids, np.pad(mask, ((0, 0), (0, SLOTS - mask.shape[1]))), pos, buffers, keep)
        feed["write_indices"] = np.full(2, written, np.int64)
        out = run(static, feed)
        real = slice(None) if keep else (1, slice(2, None))  # row 1's padded prefill positions are undefined
        worst = max(worst, float(np.abs(out[0] - ref[0])[real].max()) / float(np.abs(ref[0]).max()))
        past, buffers = list(zip(ref[1::2], ref[2::2])), list(zip(out[1::2], out[2::2]))
        written = mask.shape[1]
        for (k, v), (sk, sv) in zip(past, buffers):  # the first `written` slots are the portable cache
            np.testing.assert_allclose(sk[:, :, :written], k, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(sv[:, :, :written], v, rtol=1e-6, atol=1e-6)
            assert not sk[:, :, written:].any()  # nothing written past the filled slots
    print(f"static vs portable over prefill + 3 decode steps: logits within {worst:.3g} × their scale")
    assert worst <= 1e-5


def test_static_graph_contract_and_trt_check(graphs):
    _, static = graphs
    proto = onnx.load(str(static), load_external_data=False)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 24
    assert trt_check.check(proto) == []
    onnx.checker.check_model(str(static), full_check=True)
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    inputs = {v.name: v for v in proto.graph.input}
    assert dims(inputs["write_indices"]) == ["batch"] and dims(inputs["attention_mask"]) == ["batch", SLOTS]
    for out in proto.graph.output[1:]:  # each present has its past's fixed shape: the output can alias the input
        past = inputs[out.name.replace("present", "past_key_values")]
        assert dims(out) == dims(past) == ["batch", GQA.num_key_value_heads, SLOTS, GQA.head_dim]
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("TensorScatter") == 2 * GQA.num_hidden_layers and "Concat" not in [
        n.op_type for n in proto.graph.node if any(o.startswith("present.") for o in n.output)]


def test_onnx_runtime_updates_the_bound_buffer_in_place(graphs):
    """Binding one CPU buffer as both past and present: ORT writes the new keys into it, no new output."""
    assert_updates_in_place(graphs[1], slots=SLOTS)


def test_cli_static_cache_errors(tmp_path):
    for args, message in ((["--max-seq-len", "64"],
                           "--max-seq-len sizes the static cache: pass it with --kv-cache static"),
                          (["--kv-cache", "static", "--max-seq-len", "99999"], "--max-seq-len 99999 is out of range"),
                          (["--kv-cache", "static", "--no-optimize"], "--kv-cache static is a graph pass")):
        result = cli("--model", "tiny", *args, "-o", str(tmp_path / "out"))
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert not (tmp_path / "out").exists()
