"""GroupQueryAttention (ort target): ORT before and after, on the portable cache (fp32, fp16) and on the static
cache, whose buffer is both past and present and is updated in place, and whose kernel rotates q and k itself, by
slot."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from llama_export.graphs import pipeline
from llama_export.graphs.passes import ort_gqa, ort_rotary, packed_matmul, rms_norm, rotary, skip_rms_norm, static_cache
from llama_export.runtime.backends import ort_feed
from conftest import small_config
from graph_helpers import GQA, assert_same_outputs, assert_updates_in_place, run, save, traced
from graph_helpers import SLOTS, steps

LAYERS = GQA.num_hidden_layers


GQA16 = small_config(hidden_size=128, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)


def ort_fused(path, slots: int | None = None, config=GQA) -> ir.Model:
    """The ort target's graph up to (not including) GroupQueryAttention."""
    model = ir.load(str(path))
    pipeline._cleanup(model)
    for fuse in (rms_norm.apply, rotary.apply, packed_matmul.apply, skip_rms_norm.apply,
                 lambda m: ort_rotary.apply(m, config.max_position_embeddings)):
        fuse(model)
    if slots:
        static_cache.apply(model, slots)
    return model


def fuse_gqa(model: ir.Model, config=GQA, rotary_in_kernel: bool = False) -> dict[str, int]:
    assert ort_gqa.apply(model) == LAYERS
    pipeline._cleanup(model)
    counts = pipeline.op_counts(model)
    assert counts["GroupQueryAttention"] == LAYERS and not {"Attention", "TensorScatter"} & set(counts)
    assert not [n for n in model.graph if n.op_type == "Concat" and n.outputs[0].is_graph_output()]  # no cache Concat
    assert "Transpose" not in counts  # the kernel reads [batch, seq, heads·head_dim] and rope rotates it so
    # static, head_dim 16·n: the kernel reads the packed qkv and rotates it (no qkv Split, no RotaryEmbedding)
    assert counts.get("RotaryEmbedding", 0) == (0 if rotary_in_kernel else 2 * LAYERS)
    assert counts["Split"] == (LAYERS if rotary_in_kernel else 2 * LAYERS)
    if "write_indices" in {v.name for v in model.graph.inputs}:  # static: the kernel masks causally, by slot
        assert not {"Range", "LessOrEqual", "Or", "Equal"} & set(counts), "the static mask's causal part is left"
    for node in model.graph:
        if node.op_type == "GroupQueryAttention":
            a = node.attributes
            assert (a.get_int("num_heads"), a.get_int("kv_num_heads")) == (config.num_attention_heads,
                                                                           config.num_key_value_heads)
            assert a.get_int("do_rotary") == int(rotary_in_kernel) and (node.inputs[1] is None) == rotary_in_kernel
            assert [o.name for o in node.outputs[1:]][0].startswith("present.")
    return counts


@pytest.mark.parametrize("dtype, np_dtype, tolerance", [("float32", np.float32, 1e-5), ("float16", np.float16, 2e-3)])
def test_portable_cache_keeps_outputs(tmp_path, dtype, np_dtype, tolerance):
    model = ort_fused(traced(tmp_path / "traced", dtype=dtype))
    before = save(model, tmp_path / "before" / "model.onnx")
    fuse_gqa(model)
    worst = assert_same_outputs(before, save(model, tmp_path / "after" / "model.onnx"), tolerance, np_dtype)
    print(f"GroupQueryAttention, portable cache ({dtype}): max relative output difference {worst:.2e}")


@pytest.fixture(scope="module", params=[(GQA, False), (GQA16, True)], ids=["head_dim8", "head_dim16"])
def static_graphs(tmp_path_factory, request):
    """(TensorScatter + Attention graph, GroupQueryAttention graph, whether its kernel rotates q and k): head_dim 8
    keeps the contrib RotaryEmbedding outside the kernel, head_dim 16 moves it inside."""
    config, rotary_in_kernel = request.param
    tmp = tmp_path_factory.mktemp("gqa-static")
    model = ort_fused(traced(tmp / "traced", config), SLOTS, config)
    before = save(model, tmp / "scatter" / "model.onnx")
    fuse_gqa(model, config, rotary_in_kernel)
    return before, save(model, tmp / "gqa" / "model.onnx"), config, rotary_in_kernel


def rope_shift(keys: np.ndarray, shift: int) -> np.ndarray:
    """Keys rotated (rotate-half rope) by `shift` more positions."""
    d = keys.shape[-1]
    angle = shift / GQA16.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    cos, sin = np.tile(np.cos(angle), 2), np.tile(np.sin(angle), 2)
    half = np.concatenate([-keys[..., d // 2:], keys[..., :d // 2]], axis=-1)
    return (keys * cos + half * sin).astype(keys.dtype)


def test_static_cache_matches_tensorscatter_step_after_step(static_graphs):
    scatter, fused, config, rotary_in_kernel = static_graphs
    kvh, d = config.num_key_value_heads, config.head_dim
    buffers = {g: [tuple(np.zeros((2, kvh, SLOTS, d), np.float32) for _ in range(2)) for _ in range(LAYERS)]
               for g in (scatter, fused)}
    written, worst = 0, 0.0
    for ids, mask, keep in steps(np.random.default_rng(0)):
        pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)[:, -ids.shape[1]:]
        out = {}
        for graph in (scatter, fused):
            feed = ort_feed(ids, np.pad(mask, ((0, 0), (0, SLOTS - mask.shape[1]))), pos, buffers[graph], keep)
            feed["write_indices"] = np.full(2, written, np.int64)
            out[graph] = run(graph, feed)
            buffers[graph] = list(zip(out[graph][1::2], out[graph][2::2]))
        real = slice(None) if keep else (1, slice(2, None))  # row 1's padded prefill positions are undefined
        ref, ours = out[scatter][0], out[fused][0]
        worst = max(worst, float(np.abs(ours - ref)[real].max()) / float(np.abs(ref).max()))
        written = mask.shape[1]
        # row 1's two padding slots hold what its padding queries computed, which the static mask and the kernel's
        # causal window + padding bias define differently (both are masked from every real query): not compared
        for (k, v), (gk, gv) in zip(buffers[scatter], buffers[fused]):
            for row, real_slots in ((0, slice(0, written)), (1, slice(2, written))):
                np.testing.assert_allclose(gv[row, :, real_slots], v[row, :, real_slots], rtol=1e-6, atol=1e-6)
            if not rotary_in_kernel:
                for row, real_slots in ((0, slice(0, written)), (1, slice(2, written))):
                    np.testing.assert_allclose(gk[row, :, real_slots], k[row, :, real_slots], rtol=1e-6, atol=1e-6)
                continue
            # keys rotated by slot: row 0's slots are its positions, row 1's its positions + 2 (its padding)
            np.testing.assert_allclose(gk[0, :, :written], k[0, :, :written], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(gk[1, :, 2:written], rope_shift(k[1, :, 2:written], 2), rtol=1e-5, atol=1e-5)
            assert np.abs(gk[1, :, 2:written] - k[1, :, 2:written]).max() > 1e-2  # the shift is visible
    print(f"GroupQueryAttention (head_dim {d}) vs TensorScatter + Attention over prefill + 3 steps: logits within "
          f"{worst:.3g}")
    assert worst <= 1e-5


def test_static_cache_buffer_is_updated_in_place(static_graphs):
    assert_updates_in_place(static_graphs[1], config=static_graphs[2], slots=SLOTS)


def test_graph_without_contrib_rope_is_left_alone(tmp_path):
    model = ir.load(str(traced(tmp_path / "traced")))
    pipeline._cleanup(model)
    rotary.apply(model)  # standard RotaryEmbedding: GroupQueryAttention would need the contrib rope on [b, s, h]
    assert ort_gqa.apply(model) == 0
    assert pipeline.op_counts(model)["Attention"] == LAYERS
