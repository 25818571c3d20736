"""Check a freshly written artifact in ONNX Runtime against the reference model: `llama-parity`'s figures, small."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llama_export.runtime.artifact import Artifact
from llama_export.runtime.artifact_format import Manifest
from llama_export.runtime.backends import NUMPY_DTYPES

from .checkpoint import Checkpoint


def available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


AUTO_BUDGET = 4 << 30  # what an export may use for its automatic check: the export itself stays near 1 GB


def verification_memory(ckpt: Checkpoint, dtype: str) -> int:
    """Bytes the check holds at once: the float32 reference model plus the artifact's weights in ORT."""
    params = ckpt.config.num_parameters()
    return params * 4 + params * (4 if dtype == "float32" else 2)


def too_large(ckpt: Checkpoint, dtype: str, forced: bool = False) -> str | None:
    """Why the model is not verified here, or None.

    The export runs in bounded memory whatever the model size; the check cannot (it holds the model
    twice), so it runs automatically only within AUTO_BUDGET, and with --verify within 80% of the
    available memory."""
    need = verification_memory(ckpt, dtype)
    have = available_memory()
    if need > 0.8 * have:
        return (f"the reference model and the artifact need {need / 1e9:.1f} GB together, "
                f"{have / 1e9:.1f} GB is available")
    if not forced and need > AUTO_BUDGET:
        return (f"the reference model and the artifact need {need / 1e9:.1f} GB together, over the "
                f"{AUTO_BUDGET / 2**30:.0f} GiB an export checks automatically; pass --verify to check it anyway "
                f"({have / 1e9:.1f} GB available)")
    return None


def verify_artifact(directory: Path, manifest: Manifest, ckpt: Checkpoint, dtype: str, prompt_len: int = 8,
                    forced: bool = False, steps: int = 2) -> dict:
    """`llama-parity`'s per-step check, small: a prefill and `steps` teacher-forced decode steps through the
    runtime's backend for the graph's flavour, against the float32 reference, judged by the thresholds of the
    artifact's precision (`runtime.parity`). Prompts: real text when the directory has a tokenizer, else
    `prompt_len` seeded random tokens. Returns the manifest's `verification` section: the max |logit difference|
    of the prefill and of the decode steps, whether every top-1 agreed, and the parity summary."""
    if dtype not in NUMPY_DTYPES:
        return {"skipped": f"ONNX Runtime's CPU provider has no {dtype} kernels for this graph"}
    reason = too_large(ckpt, dtype, forced)
    if reason:
        return {"skipped": reason}
    from llama_export.runtime import parity
    from llama_export.runtime.tokenizer import LlamaTokenizer

    from .parity_run import Request, default_prompts, run

    artifact = Artifact(directory, manifest)
    vocab, window = ckpt.config.vocab_size, artifact.max_length
    prompts = []
    if (directory / "tokenizer.model").is_file():
        prompts = default_prompts(artifact, LlamaTokenizer(directory / "tokenizer.model"))
    if not prompts or max(max(p) for p in prompts) >= vocab:  # no tokenizer, or one larger than the model's vocab
        prompts = [np.random.default_rng(0).integers(3, vocab, prompt_len).tolist()]
    steps = max(min(steps, window - 2), 0)
    prompts = [p[:window - steps] for p in prompts]  # a small static cache holds the prompts and the steps
    report = run(Request(artifact, ckpt, prompts, steps=steps))
    figures = [step["logits"] for step in report["steps"]]
    return {"against": "reference model, float32", "prompt_tokens": report["prompt_tokens"],
            "max_abs_logit_diff": max(f["max_abs"] for f in figures), "prefill_max_abs_diff": figures[0]["max_abs"],
            "decode_max_abs_diff": max((f["max_abs"] for f in figures[1:]), default=0.0),
            "top1_identical": all(f["top1"] == 1.0 for f in figures),
            "parity": {"precision": report["precision"], "passed": report["passed"], "failures": report["failures"],
                       "decode_steps": len(figures) - 1, "overall": report["overall"],
                       "kv_rel_max": max((max(step["kv"]) for step in report["steps"] if step.get("kv")), default=None),
                       "thresholds": parity.THRESHOLDS[report["precision"]].as_dict()}}
