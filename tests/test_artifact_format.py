"""The typed manifest (runtime/artifact_format.py) against what the exporter really writes, and the export options
(graphs/options.py): every refusal names the field or flag."""

from __future__ import annotations

import json

import pytest

from llama_export.exporter.checkpoint import truncate_layers
from llama_export.exporter.presets import TINY_DIR, resolve_checkpoint
from llama_export.exporter.trt_build import record_engine
from llama_export.exporter.write_artifact import build_artifact
from llama_export.graphs.options import ExportOptions, OptionsError
from llama_export.runtime.artifact import Artifact
from llama_export.runtime.artifact_format import SEAL, ArtifactError, Manifest, manifest_bytes, read_manifest


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A 1-layer tiny for trt with a static cache (every optional section present), and its manifest.json."""
    out = tmp_path_factory.mktemp("format") / "a"
    build_artifact(truncate_layers(resolve_checkpoint("tiny"), 1), out,
                   ExportOptions(target="trt", kv_cache="static", max_seq_len=32),
                   tokenizer=TINY_DIR / "tokenizer.model",
                   describe={"name": "tiny", "source": "bundled", "random_weights": False, "num_layers_kept": 1},
                   log=lambda m: None)
    return out, json.loads((out / "manifest.json").read_text())


def test_the_typed_manifest_keeps_every_field_the_exporter_writes(written):
    out, raw = written
    manifest = read_manifest(out)
    assert manifest.as_dict() == {k: v for k, v in raw.items() if k != SEAL}
    assert manifest_bytes(manifest) == (out / "manifest.json").read_bytes()  # same bytes, same seal
    assert manifest.graph.flavour == "static" and manifest.graph.max_sequence_length == 32
    assert manifest.tensorrt.limits.max_seq_len == 32 and manifest.tensorrt.engine is None
    assert manifest.model.num_layers_kept == 1 and manifest.model.head_dim == 32


def test_an_engine_record_round_trips(written, tmp_path):
    out, _ = written
    manifest = read_manifest(out)
    info = {"tensorrt_version": "11.4.0.106", "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
            "limits": manifest.tensorrt.limits, "profiles": manifest.tensorrt.profiles, "build_seconds": 3.0,
            "weight_streaming": True}
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in out.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    after = record_engine(copy, manifest, b"plan", info)
    reread = Artifact.open(copy).manifest
    assert reread == after and reread.tensorrt.engine.weight_streaming is True
    assert reread.files["model.plan"].bytes == 4


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["graph"].pop("io"), "'graph.io' is missing"),
    (lambda m: m["graph"].update(flavour="paged"), "'graph.flavour' is 'paged', expected 'portable' or 'static'"),
    (lambda m: m["graph"].pop("max_sequence_length"), "'graph.max_sequence_length' is missing"),
    (lambda m: m["model"].update(num_parameters="7B"), "'model.num_parameters' is '7B', expected a whole number"),
    (lambda m: m["export"].update(weights_bytes=True), "'export.weights_bytes' is True, expected a whole number"),
    (lambda m: m["tensorrt"]["limits"].pop("max_batch"), "'tensorrt.limits.max_batch' is missing"),
    (lambda m: m["files"].update({"x": []}), "'files.x' is [], expected a JSON object"),
    (lambda m: m.update(dtype="float8"), "'dtype' is 'float8', expected 'float32' or 'float16' or 'bfloat16'"),
    (lambda m: m.update(format_version=2), "format_version 2 is not supported (this runtime reads 1)"),
], ids=["no-io", "flavour", "static-slots", "parameters", "bool-not-int", "limits", "file-entry", "dtype", "version"])
def test_a_wrong_field_is_named(written, edit, message):
    _, raw = written
    damaged = json.loads(json.dumps(raw))
    edit(damaged)
    with pytest.raises(ArtifactError, match="re-export") as err:
        Manifest.from_dict(damaged, "x/manifest.json")
    assert message in str(err.value) and str(err.value).startswith("x/manifest.json: ")


def test_export_options_name_the_output_and_the_weights():
    assert ExportOptions().output_name("tiny") == "tiny-float32"
    options = ExportOptions.from_flags(dtype="float16", target="trt", int8=True, smoothquant=True,
                                       kv_cache="static", max_seq_len=64, smoothquant_alpha=0.6)
    assert options.quantization == "w8a8" and options.output_name("7b") == "7b-float16-w8a8-static-trt"
    assert options.weights_label == "int8 SmoothQuant W8A8 (alpha 0.6)"
    assert ExportOptions(target="ort", quantization="int4").weights_label == "int4 weight-only (blocks of 32)"
    assert options.slots(4096) == 64 and ExportOptions(kv_cache="static").slots(4096) == 4096
    assert ExportOptions().slots(4096) is None


@pytest.mark.parametrize("make, message", [
    (lambda: ExportOptions.from_flags(smoothquant=True),
     "--smoothquant is a form of int8: pass it together with --int8"),
    (lambda: ExportOptions.from_flags(int8=True, int4=True, target="ort"), "--int4 is ONNX Runtime's MatMulNBits: use "
                                                                            "it alone (not with --int8)"),
    (lambda: ExportOptions(quantization="int4"), "--int4 is ONNX Runtime's MatMulNBits: use it with --target ort"),
    (lambda: ExportOptions(quantization="w8a8", optimize=False), "--int8 --smoothquant is a graph pass"),
    (lambda: ExportOptions(max_seq_len=64), "--max-seq-len sizes the static cache: pass it with --kv-cache static"),
    (lambda: ExportOptions(kv_cache="static", optimize=False), "--kv-cache static is a graph pass"),
    (lambda: ExportOptions("bfloat16", optimize=False), "--bf16 needs the optimization pipeline"),
    (lambda: ExportOptions(target="tensorrt"), "target 'tensorrt' is not one of onnx, ort, trt"),
    (lambda: ExportOptions(kv_cache="static", max_seq_len=9000).slots(4096),
     "--max-seq-len 9000 is out of range: the model has 4096 positions (use 1..4096)"),
])
def test_export_options_refuse_what_cannot_be_exported(make, message):
    with pytest.raises(OptionsError) as err:
        make()
    assert message in str(err.value)
