"""Check a freshly written artifact in ONNX Runtime against the reference model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from runtime.artifact import Artifact
from runtime.backends import NUMPY_DTYPES, open_backend

from .checkpoint import Checkpoint
from .loading import load_model


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


def verify_artifact(directory: Path, manifest: dict, ckpt: Checkpoint, dtype: str, prompt_len: int = 8,
                    forced: bool = False) -> dict:
    """One prefill and one decode step on a short random prompt, through the runtime's backend for the
    graph's flavour; max |logit difference| and top-1 agreement against the float32 reference."""
    if dtype not in NUMPY_DTYPES:
        return {"skipped": f"ONNX Runtime's CPU provider has no {dtype} kernels for this graph"}
    reason = too_large(ckpt, dtype, forced)
    if reason:
        return {"skipped": reason}
    c = ckpt.config
    backend = open_backend(Artifact(directory, manifest))
    reference = load_model(ckpt, "float32")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, c.vocab_size, (1, prompt_len), generator=gen)
    mask = torch.ones(1, prompt_len, dtype=torch.long)
    pos = torch.arange(prompt_len)[None]
    logits, past = backend.forward(ids.numpy(), mask.numpy(), pos.numpy(), backend.empty_cache(1), 0)
    with torch.no_grad():
        ref_logits, cache = reference(ids, mask, pos)
    diffs = [float(np.abs(logits - ref_logits.numpy()).max())]
    agree = [bool((logits.argmax(-1) == ref_logits.numpy().argmax(-1)).all())]
    step = ref_logits[:, -1:].argmax(-1)
    mask = torch.ones(1, prompt_len + 1, dtype=torch.long)
    pos = torch.tensor([[prompt_len]])
    logits, _ = backend.forward(step.numpy(), mask.numpy(), pos.numpy(), past, 1)
    with torch.no_grad():
        ref_logits, _ = reference(step, mask, pos, past_key_values=cache, logits_to_keep=1)
    diffs.append(float(np.abs(logits - ref_logits.numpy()).max()))
    agree.append(bool((logits.argmax(-1) == ref_logits.numpy().argmax(-1)).all()))
    return {"against": "reference model, float32", "prompt_tokens": prompt_len,
            "max_abs_logit_diff": max(diffs), "prefill_max_abs_diff": diffs[0], "decode_max_abs_diff": diffs[1],
            "top1_identical": all(agree)}
