"""TensorRT on the CPU: target choice, the trt-ready artifact, profiles from the build flags, the engine
record in the manifest, the runtime's engine checks. (Building and running engines: test_tensorrt_gpu.py.)"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from llama_export.exporter import fused_attention
from llama_export.exporter.errors import ExportError
from llama_export.exporter.onnx_export import io_contract
from llama_export.exporter.presets import resolve_checkpoint
from llama_export.exporter.trt_build import ENGINE_FILE, record_engine, tensorrt_status
from llama_export.exporter.trt_profiles import limits, profiles, to_polygraphy
from llama_export.graphs import trt_check
from llama_export.runtime.artifact import Artifact, ArtifactError
from llama_export.runtime.artifact_format import BuildLimits, EngineRecord, GraphRecord
from llama_export.runtime.backends import open_backend
from llama_export.runtime.backends.trt import (TrtBackend, TrtCache, changed_bindings, cuda_graph_refusal, engine_mismatch, expect,
                                  pick_profile)
from graph_helpers import cli

HERE = tensorrt_status()
no_tensorrt_here = pytest.mark.skipif(HERE.usable, reason="checks the fallback where TensorRT or a GPU is missing")
TINY = resolve_checkpoint("tiny").config


def build_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama_export.exporter.build_cli", *args], capture_output=True, text=True,
                          timeout=300)


def graph_section(max_seq: int | None = None) -> GraphRecord:
    return GraphRecord("model.onnx", "model.onnx.data", 23, "static" if max_seq else "portable", "trt", True,
                       "float16", io_contract(TINY, "float16", max_seq), max_seq)


@pytest.fixture(scope="module")
def trt_ready(tmp_path_factory):
    """`llama-export --target trt` of tiny where TensorRT is missing: the artifact, then status 3."""
    out = tmp_path_factory.mktemp("trt") / "tiny-trt"
    result = cli("--model", "tiny", "--fp16", "--target", "trt", "-o", str(out), "--no-verify")
    return out, result


@no_tensorrt_here
def test_target_trt_here_writes_the_artifact_and_the_command_that_finishes_it(trt_ready):
    out, result = trt_ready
    assert result.returncode == 3, result.stderr
    finish = f"ready for TensorRT; on a machine with TensorRT 11 and an NVIDIA GPU, finish with:\n  llama-build {out}"
    assert finish in result.stderr and HERE.reason in result.stderr
    artifact = Artifact.open(out)  # complete: every file present with its digest
    manifest = artifact.manifest
    assert manifest.graph.target == "trt" and ENGINE_FILE not in manifest.files
    assert manifest.export.passes[-1] == {"pass": "TensorRT-compatibility check", "changed": 0,
                                                "detail": "passed"}
    assert trt_check.check(onnx.load(str(out / "model.onnx"), load_external_data=False)) == []
    section = manifest.tensorrt
    lim = BuildLimits(4, 1023, TINY.max_position_embeddings)
    assert section.limits == lim and section.build_command == f"llama-build {out}" and section.engine is None
    assert section.profiles == profiles(manifest.graph, lim)


@no_tensorrt_here
def test_target_auto_chooses_ort_here_and_says_why(tmp_path):
    result = cli("--model", "tiny", "--fp32", "-o", str(tmp_path / "a"), "--no-verify")
    assert result.returncode == 0, result.stderr
    said = f"target auto → ort: {HERE.reason} (pass --target trt for a TensorRT-ready artifact anyway)"
    assert said in result.stderr
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["graph"]["target"] == "ort" and "tensorrt" not in manifest


def test_13b_one_layer_fp16_trt_graph_passes_the_check(tmp_path):
    out = tmp_path / "13b"
    result = cli("--model", "13b", "--random-weights", "--num-layers", "1", "--fp16", "--target", "trt", "--no-build",
                 "-o", str(out), "--no-verify")
    assert result.returncode == 0, result.stderr
    assert "llama-build" not in result.stderr  # --no-build: the artifact is what was asked for
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["export"]["passes"][-1]["detail"] == "passed"
    assert trt_check.check(onnx.load(str(out / "model.onnx"), load_external_data=False), out) == []
    assert manifest["tensorrt"]["limits"] == {"max_batch": 4, "max_input_len": 1024, "max_seq_len": 4096}
    generation = manifest["tensorrt"]["profiles"][1]["shapes"]["past_key_values.0.value"]
    assert generation == {"min": [1, 40, 1, 128], "opt": [4, 40, 2048, 128], "max": [4, 40, 4095, 128]}


def test_portable_profiles_from_the_flags():
    graph = graph_section()
    lim = limits(graph, TINY.to_hf_dict(), max_batch=8, max_input_len=256, max_seq_len=512)
    context, generation = profiles(graph, lim)
    kv, d = TINY.num_key_value_heads, TINY.head_dim
    assert context["name"] == "context" and generation["name"] == "generation"
    assert context["shapes"]["input_ids"] == {"min": [1, 1], "opt": [8, 128], "max": [8, 256]}
    assert context["shapes"]["attention_mask"] == {"min": [1, 1], "opt": [8, 128], "max": [8, 256]}
    assert context["shapes"]["past_key_values.0.key"] == {"min": [1, kv, 0, d], "opt": [8, kv, 0, d],
                                                          "max": [8, kv, 0, d]}
    assert generation["shapes"]["input_ids"] == {"min": [1, 1], "opt": [8, 1], "max": [8, 1]}
    assert generation["shapes"]["attention_mask"] == {"min": [1, 2], "opt": [8, 257], "max": [8, 512]}
    assert generation["shapes"]["past_key_values.3.value"] == {"min": [1, kv, 1, d], "opt": [8, kv, 256, d],
                                                               "max": [8, kv, 511, d]}
    assert context["values"]["logits_to_keep"] == {"min": 0, "opt": 1, "max": 256}
    assert generation["values"]["logits_to_keep"] == {"min": 0, "opt": 1, "max": 1}
    names = {spec["name"] for spec in graph.io["inputs"]} - {"logits_to_keep"}
    assert set(context["shapes"]) == set(generation["shapes"]) == names


def test_static_profile_keeps_the_cache_fixed():
    graph = graph_section(max_seq=96)
    lim = limits(graph, TINY.to_hf_dict(), max_batch=2, max_input_len=64)
    assert lim == BuildLimits(2, 64, 96)
    (static,) = profiles(graph, lim)
    kv, d = TINY.num_key_value_heads, TINY.head_dim
    assert static["shapes"]["past_key_values.0.key"] == {"min": [1, kv, 96, d], "opt": [2, kv, 96, d],
                                                         "max": [2, kv, 96, d]}
    assert static["shapes"]["attention_mask"] == {"min": [1, 96], "opt": [2, 96], "max": [2, 96]}
    assert static["shapes"]["write_indices"] == {"min": [1], "opt": [2], "max": [2]}
    assert static["shapes"]["input_ids"] == {"min": [1, 1], "opt": [2, 1], "max": [2, 64]}


@pytest.mark.parametrize("flags, message", [
    ({"max_batch": 0}, "--max-batch 0: an engine serves at least one sequence"),
    ({"max_batch": -3}, "--max-batch -3"),
    ({"max_batch": 2.5}, "--max-batch 2.5 is not a whole number"),
    ({"max_input_len": "64"}, "--max-input-len '64' is not a whole number"),
    ({"max_input_len": 600, "max_seq_len": 512}, "--max-input-len 600 must be below --max-seq-len 512, which counts "
                                                 "the prompt and the generated tokens; lower --max-input-len to 511"),
    ({"max_input_len": 512, "max_seq_len": 512}, "--max-input-len 512 must be below --max-seq-len 512"),
    ({"max_input_len": 0}, "--max-input-len 0: a prompt has at least one token"),
    ({"max_seq_len": 5000}, "--max-seq-len 5000 is out of range: prompt plus generated tokens, 2..1024"),
])
def test_bad_build_limits_are_named(flags, message):
    with pytest.raises(ExportError, match=message.replace(".", r"\.").replace("(", r"\(")):
        limits(graph_section(), TINY.to_hf_dict(), **flags)


def test_static_graph_slots_are_fixed():
    with pytest.raises(ExportError, match="this static-cache graph has 96 cache slots, fixed at export; leave "
                                          "--max-seq-len out, or re-export with --kv-cache static --max-seq-len 200"):
        limits(graph_section(96), TINY.to_hf_dict(), max_seq_len=200)
    with pytest.raises(ExportError, match="has 1 cache slot: too few"):
        limits(graph_section(1), TINY.to_hf_dict())


def test_polygraphy_profiles_carry_shapes_and_the_shape_tensor_values():
    plan = profiles(graph_section(), BuildLimits(2, 16, 64))
    host = to_polygraphy(plan, {"logits_to_keep"})
    assert len(host) == 2
    assert tuple(host[0]["input_ids"].max) == (2, 16) and tuple(host[1]["input_ids"].max) == (2, 1)
    assert tuple(host[0]["logits_to_keep"].max) == (16,) and tuple(host[1]["logits_to_keep"].min) == (0,)
    device = to_polygraphy(plan, set())  # an execution tensor: its 0-D shape, not values
    assert tuple(device[0]["logits_to_keep"].max) == ()


def test_build_cli_flags_and_fallback(trt_ready):
    out, _ = trt_ready
    dry = build_cli(str(out), "--max-batch", "2", "--max-input-len", "100", "--max-seq-len", "300", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["limits"] == {"max_batch": 2, "max_input_len": 100, "max_seq_len": 300}
    assert "generation: batch 1..2 (opt 2), sequence_length 1..1 (opt 1), past_sequence_length 1..299" in dry.stderr
    for args, message in ((["--max-batch", "0"], "error: --max-batch 0: an engine serves at least one sequence"),
                          (["--max-batch", "two"], "Invalid value for '--max-batch': 'two' is not a valid integer"),
                          (["--max-input-len", "2000", "--max-seq-len", "1000"],
                           "error: --max-input-len 2000 must be below --max-seq-len 1000")):
        bad = build_cli(str(out), *args)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    if not HERE.usable:
        missing = build_cli(str(out))
        assert missing.returncode == 3 and f"error: cannot build here: {HERE.reason}" in missing.stderr
        assert not (out / ENGINE_FILE).exists()


def test_build_cli_refuses_a_graph_not_made_for_tensorrt(tmp_path):
    result = cli("--model", "tiny", "--fp32", "--target", "ort", "-o", str(tmp_path / "ort"), "--no-verify")
    assert result.returncode == 0, result.stderr
    refused = build_cli(str(tmp_path / "ort"))
    assert refused.returncode == 2
    assert "was exported with --target ort; TensorRT engines are built from a graph checked against TensorRT's " \
           "parser: re-export with llama-export ... --target trt" in refused.stderr
    gone = build_cli(str(tmp_path / "nothing"))
    assert gone.returncode == 2 and "nothing does not exist: give an artifact directory" in gone.stderr


def test_engine_record_in_the_manifest(trt_ready, tmp_path):
    """The engine file and its record go into the manifest the runtime checks (size and sha256)."""
    out = tmp_path / "copy"
    shutil.copytree(trt_ready[0], out)
    before = Artifact.open(out).manifest
    info = {"tensorrt_version": "11.4.0.106", "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
            "hardware_compatible": False, "limits": before.tensorrt.limits, "profiles": before.tensorrt.profiles,
            "build_seconds": 12.5}
    blob = bytes(range(256)) * 64  # the engine bytes are opaque to everything but TensorRT
    record_engine(out, before, blob, info)
    after = Artifact.open(out).manifest
    engine = after.tensorrt.engine
    assert engine.file == ENGINE_FILE and engine.bytes == len(blob) == after.files[ENGINE_FILE].bytes
    assert engine.sha256 == after.files[ENGINE_FILE].sha256 == __import__("hashlib").sha256(blob).hexdigest()
    assert engine.gpu["compute_capability"] == "9.0" and engine.profiles == before.tensorrt.profiles
    assert after.tensorrt.limits == before.tensorrt.limits and after.graph == before.graph
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    (out / ENGINE_FILE).write_bytes(blob[:-1] + b"\x00")
    with pytest.raises(ArtifactError, match="model.plan: sha256 does not match the manifest"):
        Artifact.open(out)


def test_runtime_refuses_an_engine_from_elsewhere():
    record = EngineRecord("model.plan", 1, "0" * 64, "11.4.0.106", {"name": "NVIDIA H100 80GB HBM3",
                          "compute_capability": "9.0"}, BuildLimits(1, 1, 2), [], 1.0)
    assert engine_mismatch(record, "11.4.0.106", "NVIDIA H100 80GB HBM3", (9, 0)) is None
    assert engine_mismatch(record, "11.5.0.1", "NVIDIA H100 80GB HBM3", (9, 0)) == \
        "built with TensorRT 11.4.0.106, this is TensorRT 11.5.0.1"
    assert "built for NVIDIA H100 80GB HBM3 (compute capability 9.0), this is NVIDIA L4 (8.9)" in \
        engine_mismatch(record, "11.4.0.106", "NVIDIA L4", (8, 9))
    portable = dataclasses.replace(record, hardware_compatible=True)
    assert engine_mismatch(portable, "11.4.0.106", "NVIDIA L4", (8, 9)) is None
    assert "compute capability 7.5" in engine_mismatch(portable, "11.4.0.106", "Tesla T4", (7, 5))


def test_runtime_picks_the_profile_per_step():
    plan = profiles(graph_section(), BuildLimits(4, 100, 300))
    rebuild = "llama-build out/x"
    assert pick_profile(plan, 3, 100, 0, rebuild) == 0
    assert pick_profile(plan, 4, 1, 17, rebuild) == 1
    assert pick_profile(plan, 1, 1, 0, rebuild) == 0
    for step, message in (((5, 1, 9), "batch 5 exceeds the engine's 4; rebuild with: llama-build out/x --max-batch 5"),
                          ((1, 101, 0), "sequence length 101 exceeds the engine's 100; rebuild with: llama-build "
                                        "out/x --max-input-len 101"),
                          ((1, 1, 300), "total sequence length 301 exceeds the engine's 300; rebuild with: "
                                        "llama-build out/x --max-seq-len 301"),
                          ((2, 3, 10), "no profile of the engine runs 3 new tokens after 10 cached ones")):
        with pytest.raises(ValueError, match=message):
            pick_profile(plan, *step, rebuild)


def test_trt_backend_without_an_engine_says_how_to_build_it(trt_ready):
    out, _ = trt_ready
    with pytest.raises(ValueError, match=f"{out} has no TensorRT engine; build it with: llama-build {out}"):
        open_backend(Artifact.open(out), "trt")
    result = subprocess.run([sys.executable, "-m", "llama_export.runtime.cli", str(out), "--prompt", "x", "--backend", "trt"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "has no TensorRT engine; build it with: llama-build" in result.stderr


def test_fused_attention_coverage():
    """TensorRT's fused attention (developer guide, MHA fusion): fp16/bf16, head size 16..256 in multiples of 8,
    compute capability 7.5+ (bf16 8.0+); everything else builds decomposable."""
    assert fused_attention.uncovered("float16", TINY.head_dim) is None  # tiny: head size 32
    assert fused_attention.uncovered("bfloat16", 128, (9, 0)) is None  # Llama 2 on an H100/H200
    assert "no fused attention kernel for float32" in fused_attention.uncovered("float32", 128)
    assert "this model's is 12" in fused_attention.uncovered("float16", 12)
    assert "this model's is 260" in fused_attention.uncovered("float16", 260)
    assert "this model's is 36" in fused_attention.uncovered("float16", 36)  # not a multiple of 8
    assert "needs compute capability 8.0+, this GPU has 7.5" in fused_attention.uncovered("bfloat16", 128, (7, 5))
    assert fused_attention.describe("float32", 32).endswith("building it decomposable (matmul, softmax, matmul as "
                                                            "separate kernels: slower)")


def test_build_cli_says_up_front_whether_attention_is_fused(trt_ready):
    out, _ = trt_ready
    dry = build_cli(str(out), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "attention: one fused TensorRT kernel per layer (float16, head size 32)" in dry.stderr
    assert json.loads(dry.stdout)["attention_fused"] is True


def test_cuda_graph_refused_while_weights_stream():
    """An engine whose weight-streaming budget is below its streamable weights enqueues synchronously (weights are
    copied in during enqueueV3), which a CUDA graph cannot capture."""
    refusal = cuda_graph_refusal(True, budget=2 << 30, streamable=13 << 30)
    assert refusal.startswith("--cuda-graph cannot capture this engine: it streams weights (budget 2147483648 B of "
                              "13958643712 B streamable)")
    assert cuda_graph_refusal(True, budget=13 << 30, streamable=13 << 30) is None  # everything resident
    assert cuda_graph_refusal(False, budget=-1, streamable=0) is None  # no weight streaming


class RefusingContext:
    """What TensorRT's IExecutionContext does with a shape outside the profile or an unknown name: it returns False
    (it does not raise). TensorRT cannot run here; this stands in for its two setters only."""

    def set_input_shape(self, name, shape):
        return shape[0] <= 4

    def set_tensor_address(self, name, address):
        return name != "nonexistent"


def test_setter_results_are_checked_and_name_the_tensor():
    with pytest.raises(RuntimeError, match=r"TensorRT refused set_input_shape\('input_ids', \(8, 1\)\)"):
        expect(False, "set_input_shape", "input_ids", (8, 1))
    expect(True, "set_input_shape", "input_ids", (1, 1))
    backend = TrtBackend.__new__(TrtBackend)  # the backend's own binding methods, without an engine
    context = RefusingContext()
    backend._bound = {id(context): {}}
    backend._shape(context, "input_ids", (4, 1))
    with pytest.raises(RuntimeError, match=r"set_input_shape\('input_ids', \(5, 1\)\)"):
        backend._shape(context, "input_ids", (5, 1))
    with pytest.raises(RuntimeError, match=r"set_tensor_address\('nonexistent', shape \(2, 3\)\)"):
        backend._address(context, "nonexistent", 1234, (2, 3))
    assert backend._bound[id(context)] == {("shape", "input_ids"): (4, 1)}  # what TensorRT accepted, only


def test_a_captured_graph_replays_only_on_its_bindings():
    captured = {("shape", "input_ids"): (2, 1), ("address", "input_ids"): 100, ("keep", "logits_to_keep"): 1}
    assert changed_bindings(captured, dict(captured)) == []
    after_prefill = {**captured, ("shape", "input_ids"): (2, 7), ("address", "input_ids"): 200}
    assert changed_bindings(captured, after_prefill) == [("address", "input_ids"), ("shape", "input_ids")]
    assert changed_bindings(captured, {**captured, ("keep", "logits_to_keep"): 0}) == [("keep", "logits_to_keep")]


class RecordingContext:
    """Accepts every shape and address and remembers the last of each (as an IExecutionContext holds them)."""

    def __init__(self):
        self.shapes, self.addresses = {}, {}

    def set_input_shape(self, name, shape):
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True


def test_replay_after_a_prefill_sets_the_captured_bindings_back():
    """The backend's own binding code on CPU tensors: a decode step's bindings (what a CUDA graph is captured at),
    then a prefill on the same context, then `_restore`, which the replay calls when the bindings differ."""
    import torch

    backend = TrtBackend.__new__(TrtBackend)
    backend.torch, backend.device, backend.keep_on_host = torch, torch.device("cpu"), True
    backend._keep, backend.names = np.zeros((), np.int64), [("past_key_values.0.key", "present.0.key")]
    context = RecordingContext()
    backend._bound = {id(context): {}}
    past = TrtCache([[torch.zeros(2, 4, 64, 32)]], 5)
    decode = {"input_ids": np.zeros((2, 1), np.int64), "write_indices": np.array([5, 5])}
    tensors = backend._inputs(context, decode, 1)
    backend._bind_cache(context, past)
    logits = torch.empty(2, 1, 8)
    backend._address(context, "logits", logits.data_ptr(), (2, 1, 8))
    captured, shapes, addresses = dict(backend._bound[id(context)]), dict(context.shapes), dict(context.addresses)
    backend._inputs(context, {"input_ids": np.zeros((2, 7), np.int64), "write_indices": np.array([0, 0])}, 0)
    assert changed_bindings(captured, backend._bound[id(context)]) == [
        ("address", "input_ids"), ("address", "write_indices"), ("keep", "logits_to_keep"), ("shape", "input_ids")]
    backend._restore(context, tensors, past, logits, 1)
    assert changed_bindings(captured, backend._bound[id(context)]) == []
    assert context.shapes == shapes and context.addresses == addresses and int(backend._keep) == 1
