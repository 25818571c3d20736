"""TensorRT engines built and run: they need TensorRT 11 and a CUDA GPU, and skip (saying which is missing)
where either is absent. What is computed before TensorRT is tested on the CPU in test_tensorrt.py.
`examples/gpu_check.sh` sets up a fresh GPU machine and runs this file: TensorRT's own parser against
graphs/trt_check.py, tiny fp16 / int8 / static engines against PyTorch, fp32 engines (decomposed attention)
against transformers' greedy tokens, the CUDA-graph path, and llama-bench on a 7B-shaped 2-layer model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from llama_export.exporter.checkpoint import RandomCheckpoint
from llama_export.exporter.loading import load_model
from llama_export.exporter.presets import TINY_DIR, resolve_checkpoint
from llama_export.exporter.trt_build import build_engine, tensorrt_status
from llama_export.exporter.trt_profiles import limits
from llama_export.exporter.write_artifact import build_artifact
from llama_export.graphs import trt_check
from llama_export.graphs.options import ExportOptions
from llama_export.runtime import parity
from llama_export.runtime.artifact import Artifact
from llama_export.runtime.backends import open_backend
from llama_export.runtime.generation import generate
from llama_export.runtime.tokenizer import LlamaTokenizer

from conftest import PROMPTS, RUNTIME_CONFIGS as CONFIGS, hf_greedy
from graph_helpers import padded_batch

HERE = tensorrt_status()
pytestmark = pytest.mark.skipif(not HERE.usable, reason=f"needs TensorRT 11 and a CUDA GPU: {HERE.reason}")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    made = {}

    def get(case: str, dtype: str, int8: bool = False, max_seq: int | None = None):
        key = (case, dtype, int8, max_seq)
        if key not in made:
            ckpt = resolve_checkpoint("tiny") if case == "tiny" else RandomCheckpoint(CONFIGS[case], seed=9)
            out = tmp_path_factory.mktemp(f"{case}-{dtype}") / "artifact"
            options = ExportOptions(dtype, "trt", quantization="int8" if int8 else "none",
                                    kv_cache="static" if max_seq else "portable", max_seq_len=max_seq)
            manifest = build_artifact(ckpt, out, options, tokenizer=TINY_DIR / "tokenizer.model", log=print)
            lim = limits(manifest.graph, manifest.model.config, max_batch=4, max_input_len=64,
                         max_seq_len=None if max_seq else 128)
            build_engine(out, manifest, lim, timing_cache=out.parent / "timing.cache", log=print)
            made[key] = (Artifact.open(out), ckpt)
        return made[key]
    return get


def engine_steps(backend, model, config, decode_steps: int = 16):
    """Prefill 17 tokens of a left-padded batch of 3 (all positions kept), then greedy decode steps fed the
    engine's own choice; yields (engine logits, fp32 PyTorch logits, real-position mask) per step."""
    ids, mask, pos = padded_batch(config.vocab_size)
    past, cache, keep = backend.empty_cache(3), None, 0
    for _ in range(decode_steps + 1):
        ours, past = backend.forward(ids.numpy(), mask.numpy(), pos.numpy(), past, keep)
        with torch.no_grad():
            ref, cache = model(ids, mask, pos, past_key_values=cache, logits_to_keep=keep)
        yield ours, ref.numpy(), mask[:, -ref.shape[1]:].bool().numpy()
        ids = torch.from_numpy(ours[:, -1].argmax(-1)).view(3, 1)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        pos, keep = pos[:, -1:] + 1, 1


def parse(path) -> list[str]:
    """TensorRT's own ONNX parser on a graph: its error messages (empty: parsed)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 11: strongly typed
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(path))
    errors = [parser.get_error(i).desc() for i in range(parser.num_errors)]
    return [] if ok else errors or ["parse failed without a message"]


@pytest.mark.parametrize("dtype, int8, smoothquant, max_seq", [
    ("float32", False, False, None), ("float16", False, False, None), ("bfloat16", False, False, None),
    ("float16", True, False, None), ("float16", True, True, None), ("float16", False, False, 64)],
    ids=["fp32", "fp16", "bf16", "int8", "smoothquant", "static"])
def test_tensorrt_parser_accepts_what_the_check_passes(tmp_path, dtype, int8, smoothquant, max_seq):
    from llama_export.exporter.calibration_text import DEFAULT_TEXT, sequences
    from llama_export.graphs.pipeline import SmoothQuant

    smooth = SmoothQuant(sequences(TINY_DIR / "tokenizer.model", DEFAULT_TEXT, 256, 64)) if smoothquant else None
    out = tmp_path / "a"
    options = ExportOptions.from_flags(dtype=dtype, target="trt", int8=int8, smoothquant=smoothquant,
                                       kv_cache="static" if max_seq else "portable", max_seq_len=max_seq)
    build_artifact(resolve_checkpoint("tiny"), out, options, log=print, smoothquant=smooth)
    assert trt_check.check(onnx.load(str(out / "model.onnx"), load_external_data=False), out) == []
    assert parse(out / "model.onnx") == []


def test_tensorrt_parser_refuses_the_old_fp16_graph_as_the_check_does(tmp_path):
    out = tmp_path / "onnx"
    build_artifact(resolve_checkpoint("tiny"), out, ExportOptions("float16"), log=print)
    assert {p.rule for p in trt_check.check(onnx.load(str(out / "model.onnx"), load_external_data=False))} == {
        "attention-softmax-precision"}
    errors = parse(out / "model.onnx")
    assert any("Setting softmax precision is not supported in TensorRT Attention." in e for e in errors), errors


@pytest.mark.parametrize("int8, max_seq", [(False, None), (True, None), (False, 128)], ids=["fp16", "int8", "static"])
def test_tiny_engine_prefill_and_16_decode_steps_against_pytorch(engines, int8, max_seq):
    artifact, ckpt = engines("tiny", "float16", int8, max_seq)
    assert artifact.manifest.tensorrt.engine.attention == {"fused": True}
    backend = open_backend(artifact, "trt")
    model = load_model(ckpt)
    agree, total = 0, 0
    for ours, ref, real in engine_steps(backend, model, ckpt.config):
        figures = parity.compare_logits(ours, ref, real)
        agree, total = agree + round(figures["top1"] * figures["positions"]), total + figures["positions"]
        if not int8:
            assert figures["top1"] == 1.0
    assert agree / total >= (0.9 if int8 else 1.0)


@pytest.mark.parametrize("case, max_seq", [("mha", None), ("gqa", None), ("mha", 96), ("gqa", 96)])
def test_engine_greedy_tokens_equal_transformers(engines, case, max_seq):
    artifact, ckpt = engines(case, "float32", max_seq=max_seq)
    # no fused fp32 attention kernel: llama-build marked the IAttention layers decomposable, and they build
    assert artifact.manifest.tensorrt.engine.attention["fused"] is False
    backend = open_backend(artifact, "trt")
    tokenizer = LlamaTokenizer(TINY_DIR / "tokenizer.model")
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    expected = hf_greedy(ckpt, prompts, 32)
    assert [r.tokens for r in generate(backend, tokenizer, prompts, backend.max_length, 32)] == expected
    for prompt, want in zip(prompts, expected):
        assert generate(backend, tokenizer, [prompt], backend.max_length, 32)[0].tokens == want


def test_cuda_graph_decode_gives_the_same_tokens(engines):
    artifact, _ = engines("tiny", "float16", max_seq=128)
    tokenizer = LlamaTokenizer(artifact.tokenizer_path)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    plain = generate(open_backend(artifact, "trt"), tokenizer, prompts, 128, 40)
    graphed_backend = open_backend(artifact, "trt", cuda_graph=True)
    graphed = generate(graphed_backend, tokenizer, prompts, 128, 40)
    assert [r.tokens for r in graphed] == [r.tokens for r in plain]
    again = generate(graphed_backend, tokenizer, prompts, 128, 40)  # a new cache: captured anew
    assert [r.tokens for r in again] == [r.tokens for r in plain]


def test_cuda_graph_replay_after_another_prefill_on_the_context(engines):
    """Cache A decodes through captured graphs; cache B's prefill then rebinds the one context; A's next replay
    sets A's bindings back first (runtime/backends/trt.py `_restore`), and gives the plain backend's logits."""
    artifact, _ = engines("tiny", "float16", max_seq=128)
    plain, graphed = open_backend(artifact, "trt"), open_backend(artifact, "trt", cuda_graph=True)
    ids, mask, pos = padded_batch(artifact.config["vocab_size"])

    def run(backend, interleave: bool):
        a = backend.empty_cache(3)
        logits, a = backend.forward(ids.numpy(), mask.numpy(), pos.numpy(), a, 1)
        step_ids, step_mask, step_pos = ids, mask, pos
        outs = []
        for step in range(4):
            step_ids = torch.from_numpy(logits[:, -1].argmax(-1)).view(3, 1)
            step_mask = torch.cat([step_mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            step_pos = step_pos[:, -1:] + 1
            if interleave and step == 2:  # another request's prefill on the same context
                backend.forward(ids[:, :9].numpy(), mask[:, :9].numpy(), pos[:, :9].numpy(), backend.empty_cache(3), 1)
            logits, a = backend.forward(step_ids.numpy(), step_mask.numpy(), step_pos.numpy(), a, 1)
            outs.append(logits)
        return outs

    want = run(plain, False)
    for got, ref in zip(run(graphed, True), want):
        np.testing.assert_allclose(got, ref, atol=1e-3)


def test_bench_7b_shaped_two_layers_reports_its_hbm_fraction(tmp_path):
    """llama-bench --backend trt on Llama-2-7B widths (2 random layers, fp16): decode reads ~1.3 GB per step."""
    out = tmp_path / "7b2"
    export = subprocess.run([sys.executable, "-m", "llama_export.exporter.cli", "--model", "7b", "--random-weights", "--num-layers",
                             "2", "--fp16", "--target", "trt", "--no-build", "--no-verify", "-o", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr
    build = subprocess.run([sys.executable, "-m", "llama_export.exporter.build_cli", str(out), "--max-batch", "1", "--max-input-len",
                            "128", "--max-seq-len", "512"], capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr
    assert "attention: one fused TensorRT kernel per layer (float16, head size 128)" in build.stderr
    bench = subprocess.run([sys.executable, "-m", "llama_export.runtime.bench", str(out), "--backend", "trt", "--prompt-len", "128",
                            "--gen-len", "128", "--runs", "2", "--json"], capture_output=True, text=True, timeout=600)
    assert bench.returncode == 0, bench.stderr
    report = json.loads(bench.stdout)
    print(f"7B-shaped 2 layers fp16 TensorRT: {json.dumps(report)}")
    assert report["bandwidth_of"] == "GPU memory (HBM)" and 0 < report["bandwidth_fraction"] <= 1.1
