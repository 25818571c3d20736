"""llama-parity: tiny's artifacts pass at every precision; corrupted artifacts fail and name the layer; bad input
exits 2; the comparison figures against torch's own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from llama_export.exporter import calibration_text
from llama_export.exporter.checkpoint import RandomCheckpoint
from llama_export.exporter.parity_cli import main
from llama_export.exporter.parity_run import (bisect_first, default_prompts, graph_copy, graph_feed, ort_layer_outputs,
                                 residual_outputs)
from llama_export.exporter.presets import TINY_DIR, resolve_checkpoint
from llama_export.exporter.write_artifact import build_artifact
from llama_export.graphs import pipeline
from llama_export.graphs.options import ExportOptions
from llama_export.runtime import parity
from llama_export.runtime.artifact import Artifact
from llama_export.runtime.artifact_format import manifest_bytes, read_manifest, sha256
from llama_export.runtime.generation import left_pad
from llama_export.runtime.tokenizer import LlamaTokenizer
from conftest import small_config, state_dict, write_safetensors_checkpoint

KINDS = {"fp32": {}, "fp16": dict(dtype="float16"), "int8": dict(quantization="int8"),
         "int4": dict(quantization="int4"), "smoothquant": dict(quantization="w8a8"),
         "fp32-static": dict(kv_cache="static", max_seq_len=128)}
CASES = [(target, kind) for target in ("onnx", "ort") for kind in KINDS
         if not (kind == "int4" and target == "onnx") and not (kind == "fp32-static" and target == "onnx")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny exported as llama-export does (manifest naming the preset), once per (target, kind)."""
    ckpt, tokenizer, made = resolve_checkpoint("tiny"), TINY_DIR / "tokenizer.model", {}

    def get(target: str, kind: str) -> Path:
        if (target, kind) not in made:
            options = ExportOptions(target=target, **KINDS[kind])
            sq = pipeline.SmoothQuant(calibration_text.sequences(tokenizer, calibration_text.DEFAULT_TEXT, 2048, 512),
                                      log=lambda m: None) if kind == "smoothquant" else None
            out = tmp_path_factory.mktemp(f"tiny-{kind}-{target}") / "artifact"
            build_artifact(ckpt, out, options, tokenizer=tokenizer, log=lambda m: None, smoothquant=sq,
                           describe={"name": "tiny", "source": ckpt.source, "random_weights": False,
                                     "num_layers_kept": 4})
            made[target, kind] = out
        return made[target, kind]
    return get


@pytest.fixture(scope="module")
def short_text(tmp_path_factory) -> Path:
    """The start of tiny's held-out text (about 300 tokens): a quicker perplexity than the default 512 tokens."""
    path = tmp_path_factory.mktemp("text") / "heldout-start.txt"
    path.write_text((TINY_DIR / "heldout.txt").read_text(encoding="utf-8")[:1200], encoding="utf-8")
    return path


def parity_cli(*args) -> tuple[int, str, dict | None]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)  # 1 ≠ a crash
    assert "Traceback" not in result.output, result.output
    report = None
    if "--json" in args and result.exit_code in (0, 1):
        report = json.loads(result.stdout)
    return result.exit_code, result.output, report


@pytest.mark.parametrize("target, kind", CASES)
def test_tiny_passes_with_the_documented_thresholds(tiny, short_text, target, kind):
    code, output, report = parity_cli(tiny(target, kind), "--per-layer", "--steps", 2, "--text", short_text, "--json")
    assert code == 0, report["failures"] if report else output
    precision = kind.removesuffix("-static")
    assert report["passed"] and report["precision"] == precision and report["target"] == target
    limits = parity.THRESHOLDS[precision]
    assert len(report["steps"]) == 3 and report["steps"][0]["name"] == "prefill"
    for step in report["steps"]:
        assert step["logits"]["kl_max"] <= limits.kl_max and max(step["kv"]) <= limits.kv_rel
        assert len(step["kv"]) == 4
    assert report["layers"]["first_divergent"] is None and len(report["layers"]["errors"]) == 4
    assert max(report["layers"]["errors"]) <= limits.hidden_rel
    assert report["overall"]["top1"] >= limits.top1
    assert abs(report["perplexity"]["rel_change"]) <= limits.ppl_rel
    assert 10 < report["perplexity"]["reference"] < 200  # tiny was trained: far below its 4096-token vocabulary
    if precision == "fp32":
        assert report["overall"]["max_abs"] < 1e-4 and report["greedy_match"] == [3, 3, 3]
    else:  # lossy, yet measurably so
        assert max(report["layers"]["errors"]) > 1e-5


# ---- corrupted artifacts -----------------------------------------------------------------------------------


def corrupted(src: Path, dst: Path, edit) -> Path:
    """A copy of the artifact, `edit(model_proto, data_path)` applied, the manifest's sizes and sha256 refreshed."""
    shutil.copytree(src, dst)
    graph = dst / "model.onnx"
    model = onnx.load(str(graph), load_external_data=False)
    if edit(model, dst / "model.onnx.data"):
        onnx.save(model, str(graph))
    manifest = json.loads((dst / "manifest.json").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"bytes": (dst / name).stat().st_size, "sha256": sha256(dst / name)}
    (dst / "manifest.json").write_bytes(manifest_bytes(manifest))
    return dst


def scale_weight(name_part: str, factor: float, columns: slice = slice(None)):
    """Scale the float32 initializers whose name contains `name_part` (their `columns` of the last axis)."""
    def edit(model, data: Path) -> bool:
        hits = [t for t in model.graph.initializer if name_part in t.name]
        assert hits, name_part
        for tensor in hits:
            where = {e.key: e.value for e in tensor.external_data}
            array = np.memmap(data, np.float32, "r+", int(where.get("offset", 0)), tuple(tensor.dims))
            array[..., columns] *= factor
            array.flush()
        return False
    return edit


def swap_present(layer: int):
    """Layer `layer`'s present key and value outputs exchanged: the graph computes the same, names them crossed."""
    def edit(model, data: Path) -> bool:
        key, value = f"present.{layer}.key", f"present.{layer}.value"
        rename = {key: value, value: key}
        for node in model.graph.node:
            for names in (node.input, node.output):
                for i, name in enumerate(names):
                    names[i] = rename.get(name, name)
        return True
    return edit


@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_layer_2_mlp_scaled_names_layer_2(tiny, short_text, tmp_path, target):
    bad = corrupted(tiny(target, "fp32"), tmp_path / "bad", scale_weight("layers.2.mlp.down_proj", 1.5))
    code, output, report = parity_cli(bad, "--per-layer", "--steps", 2, "--text", short_text, "--json")
    assert code == 1 and not report["passed"]
    errors = report["layers"]["errors"]
    assert report["layers"]["first_divergent"] == 2
    assert max(errors[:2]) < 1e-5 < 1e-2 < errors[2]  # layers 0 and 1 untouched, layer 2 clearly off
    assert any("layer 2 is the first whose output differs" in why for why in report["failures"])
    # the KV cache of layers 0..2 is computed before the damage; layer 3's is not
    assert max(report["steps"][0]["kv"][:3]) < 1e-5 and report["steps"][0]["kv"][3] > 1e-3
    # bisection over the same errors names the same layer (TensorRT's way: one layer at a time) ...
    assert bisect_first(4, lambda i: errors[i] > parity.THRESHOLDS["fp32"].hidden_rel) == 2
    assert [bisect_first(4, lambda i: i >= k) for k in range(5)] == [0, 1, 2, 3, None]
    # ... on a graph copy with only that layer's output marked, which gives what the all-layers copy gives
    artifact = Artifact.open(bad)
    ids, mask, pos = left_pad(default_prompts(artifact, LlamaTokenizer(artifact.tokenizer_path)))
    every = ort_layer_outputs(artifact, ids, mask, pos, None)
    with graph_copy(artifact.graph_path, lambda m: residual_outputs(m, 4)[2:3]) as (path, names):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (one,) = session.run(names, graph_feed(session, artifact, ids, mask, pos))
    np.testing.assert_allclose(one, every[2], rtol=1e-5, atol=1e-5)
    assert not list(bad.parent.glob(".bad.parity-*"))  # the temporary copy is gone


def test_layer_0_q_proj_corrupted_names_layer_0(tiny, short_text, tmp_path):
    q = 8 * 32  # tiny's query heads × head_dim: the first columns of the packed, transposed qkv weight
    bad = corrupted(tiny("onnx", "fp32"), tmp_path / "bad", scale_weight("layers.0.self_attn.qkv_proj", -1.0,
                                                                         slice(0, q)))
    code, output, report = parity_cli(bad, "--per-layer", "--steps", 1, "--text", short_text, "--json")
    assert code == 1 and report["layers"]["first_divergent"] == 0
    assert report["layers"]["errors"][0] > 1e-2
    text_code, text, _ = parity_cli(bad, "--per-layer", "--steps", 1, "--text", short_text)  # the table says it too
    assert text_code == 1 and "first divergent layer: 0" in text and "FAIL" in text


def test_keys_and_values_swapped_in_one_layer_are_caught(tiny, short_text, tmp_path):
    bad = corrupted(tiny("onnx", "fp32"), tmp_path / "bad", swap_present(1))
    code, output, report = parity_cli(bad, "--steps", 2, "--text", short_text, "--json")
    assert code == 1
    prefill = report["steps"][0]
    assert prefill["logits"]["max_abs"] < 1e-4  # the prefill itself is right: only what it hands on is wrong
    assert [i for i, e in enumerate(prefill["kv"]) if e > 1e-3] == [1]
    assert "prefill: KV cache of layer 1 differs" in " ".join(report["failures"])
    assert report["steps"][1]["logits"]["max_abs"] > 1e-2  # the next step reads the crossed cache


# ---- bad input ---------------------------------------------------------------------------------------------


def test_bad_input_exits_2(tiny, tmp_path):
    good = tiny("onnx", "fp32")
    code, output, _ = parity_cli(tmp_path)
    assert code == 2 and "no manifest.json; not an artifact directory" in output
    config = small_config(hidden_size=128)
    other = write_safetensors_checkpoint(tmp_path / "other", config, state_dict(RandomCheckpoint(config)))
    code, output, _ = parity_cli(good, "--reference", other)
    assert code == 2 and "hidden_size = 128" in output and "hidden_size = 256" in output
    code, output, _ = parity_cli(good, "--steps", 1000)
    assert code == 2 and "--steps 1000" in output and "context window of 1024" in output and "--steps 976" in output
    code, output, _ = parity_cli(good, "--prompts", tmp_path / "missing.txt")
    assert code == 2 and "--prompts" in output and "missing.txt: cannot read it" in output
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    code, output, _ = parity_cli(good, "--prompts", tmp_path / "binary.txt")
    assert code == 2 and "UTF-8" in output


def test_prompts_file_and_plot(tiny, short_text, tmp_path):
    (tmp_path / "prompts.txt").write_text("Lists are mutable.\n\nA tuple is\n")
    code, output, report = parity_cli(tiny("ort", "int8"), "--prompts", tmp_path / "prompts.txt", "--steps", 2,
                                      "--per-layer", "--text", short_text, "--json", "--plot", tmp_path / "p.png")
    assert code == 0 and len(report["prompt_tokens"]) == 2
    png = (tmp_path / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 100_000


# ---- the figures -------------------------------------------------------------------------------------------


def test_logit_figures_equal_torch():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 5, 50, generator=gen) * 3
    ours = ref + torch.randn(2, 5, 50, generator=gen) * 0.3
    real = np.ones((2, 5), bool)
    real[1, :2] = False  # padding is not compared
    got = parity.compare_logits(ours.numpy(), ref.numpy(), real)
    r, a = ref[torch.from_numpy(real)], ours[torch.from_numpy(real)]
    kl = torch.nn.functional.kl_div(a.log_softmax(-1), r.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert got["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert got["kl_max"] == pytest.approx(kl.max().item(), rel=1e-5)
    assert got["top1"] == pytest.approx((a.argmax(-1) == r.argmax(-1)).float().mean().item())
    overlap = [len(set(x.tolist()) & set(y.tolist())) / 5 for x, y in zip(a.topk(5).indices, r.topk(5).indices)]
    assert got["top5"] == pytest.approx(np.mean(overlap))
    assert got["max_abs"] == pytest.approx((a - r).abs().max().item(), rel=1e-6) and got["positions"] == 8
    ids = torch.randint(0, 50, (1, 5), generator=gen)
    nll = torch.nn.functional.cross_entropy(ref[0, :-1], ids[0, 1:])
    assert parity.perplexity(ref[:1].numpy(), ids.numpy()) == pytest.approx(torch.exp(nll).item(), rel=1e-5)


def test_precision_of_every_manifest_kind(tiny):
    for target, kind in CASES:
        manifest = read_manifest(tiny(target, kind))
        assert parity.precision_of(manifest) == kind.removesuffix("-static")
    assert set(parity.THRESHOLDS) == set(parity.PRECISIONS)
