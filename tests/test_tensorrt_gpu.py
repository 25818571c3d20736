"""TensorRT engines built and run: they need TensorRT 11 and a CUDA GPU, and skip (saying which is missing)
where either is absent. What is computed before TensorRT is tested on the CPU in test_tensorrt.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter.artifact import build_artifact
from exporter.checkpoint import RandomCheckpoint
from exporter.engine import build_engine, tensorrt_status
from exporter.loading import load_model
from exporter.presets import TINY_DIR, resolve_checkpoint
from exporter.trt_profiles import limits
from runtime import parity
from runtime.artifact import Artifact
from runtime.backends import open_backend
from runtime.generate import generate
from runtime.tokenizer import LlamaTokenizer
from test_onnx_export import padded_batch
from test_runtime import CONFIGS, PROMPTS, hf_greedy

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
            manifest = build_artifact(ckpt, out, dtype, tokenizer=TINY_DIR / "tokenizer.model", log=print,
                                      target="trt", optimize=True, int8=int8, max_seq=max_seq)
            lim = limits(manifest["graph"], manifest["model"]["config"], max_batch=4, max_input_len=64,
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


@pytest.mark.parametrize("int8", [False, True], ids=["fp16", "int8"])
def test_tiny_engine_prefill_and_16_decode_steps_against_pytorch(engines, int8):
    artifact, ckpt = engines("tiny", "float16", int8)
    backend = open_backend(artifact, "trt")
    model = load_model(ckpt)
    worst, agree, total = 0.0, 0, 0
    for ours, ref, real in engine_steps(backend, model, ckpt.config):
        figures = parity.compare_logits(ours, ref, real)
        agree, total = agree + round(figures["top1"] * figures["positions"]), total + figures["positions"]
        worst = max(worst, figures["max_abs"])
        if not int8:
            assert figures["top1"] == 1.0
    print(f"tiny TensorRT {'int8 weight-only' if int8 else 'fp16'} engine, prefill + 16 decode steps: max |logit "
          f"diff| vs PyTorch fp32 {worst:.4g}, top-1 agreement {agree}/{total}")
    assert agree / total >= (0.9 if int8 else 1.0)


@pytest.mark.parametrize("case, max_seq", [("mha", None), ("gqa", None), ("mha", 96), ("gqa", 96)])
def test_engine_greedy_tokens_equal_transformers(engines, case, max_seq):
    artifact, ckpt = engines(case, "float32", max_seq=max_seq)
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
