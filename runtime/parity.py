"""Parity figures: an artifact's outputs against a reference's, and the thresholds each precision must meet.

One definition of every figure, for `llama-parity`, `llama-export`'s verify step and the tests. It is torch-free
(numpy only), so the runtime and the tests may use it as well as the exporter. Figures, all over real (unpadded)
positions:

- logits: max and mean |Δ|, max relative difference (max |Δ| ÷ max |reference|: an element-wise |Δ|/|ref| is
  dominated by logits near zero, the reason polygraphy's default tolerance fails healthy fp16 results), KL
  divergence KL(reference ‖ artifact) of the next-token distributions (mean and max over positions), top-1
  agreement (the same argmax) and top-5 agreement (mean overlap of the two top-5 sets);
- tensors (each layer's present key and value, each decoder layer's output): relative L2 error ‖Δ‖ / ‖reference‖,
  with max and mean |Δ| beside it.

polygraphy's comparator (`SimpleCompareFunc`) was the first choice for the tensors and was measured out: its
relative error is element-wise (|Δ| / |reference|, the quantity whose default tolerance fails healthy fp16
results, NVIDIA/TensorRT#2709), and each call also computes medians and formats statistics for its log, 36 ms a
tensor on tiny, a quarter of a whole `llama-parity` run. polygraphy builds and runs the TensorRT engines of the
per-layer bisection instead (`exporter/parity_run.py`).

The thresholds are data (`THRESHOLDS`), one row per precision; docs/parity.md gives each its reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .artifact_format import Manifest

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "smoothquant")


@dataclass(frozen=True)
class Thresholds:
    """What an artifact of one precision must meet against the float32 reference (None: not gated)."""
    logit_max_abs: float | None  # max |Δ logit| at any real position of any step
    kl_mean: float  # mean KL(reference ‖ artifact) over all positions of all steps
    kl_max: float  # KL at the worst position of any step
    top1: float  # minimum fraction of all positions with the same argmax
    top5: float  # minimum mean overlap of the top-5 sets over all positions
    kv_rel: float  # relative L2 error of each layer's present key / value, per step
    hidden_rel: float  # relative L2 error of each decoder layer's output (--per-layer)
    ppl_rel: float  # |perplexity(artifact) / perplexity(reference) − 1| on the text

    def as_dict(self) -> dict:
        return asdict(self)


THRESHOLDS: dict[str, Thresholds] = {  # each row's reasons and the figures measured: docs/parity.md
    "fp32": Thresholds(logit_max_abs=2e-3, kl_mean=1e-6, kl_max=1e-5, top1=0.99, top5=0.99, kv_rel=1e-4,
                       hidden_rel=1e-4, ppl_rel=1e-4),
    "fp16": Thresholds(logit_max_abs=None, kl_mean=1e-3, kl_max=1e-2, top1=0.97, top5=0.95, kv_rel=5e-3,
                       hidden_rel=1e-2, ppl_rel=5e-3),
    "bf16": Thresholds(logit_max_abs=None, kl_mean=8e-3, kl_max=8e-2, top1=0.9, top5=0.9, kv_rel=4e-2,
                       hidden_rel=8e-2, ppl_rel=2e-2),
    "int8": Thresholds(logit_max_abs=None, kl_mean=5e-3, kl_max=5e-2, top1=0.9, top5=0.9, kv_rel=5e-2,
                       hidden_rel=5e-2, ppl_rel=1e-2),
    "int4": Thresholds(logit_max_abs=None, kl_mean=0.1, kl_max=0.5, top1=0.8, top5=0.8, kv_rel=0.25,
                       hidden_rel=0.25, ppl_rel=0.05),
    "smoothquant": Thresholds(logit_max_abs=None, kl_mean=0.03, kl_max=0.5, top1=0.8, top5=0.8, kv_rel=0.15,
                              hidden_rel=0.15, ppl_rel=0.03),
}


def precision_of(manifest: Manifest) -> str:
    """The THRESHOLDS row for an artifact, from its manifest's weights label and dtype."""
    weights = manifest.graph.weights
    if "SmoothQuant" in weights:
        return "smoothquant"
    if weights.startswith("int8"):
        return "int8"
    if weights.startswith("int4"):
        return "int4"
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[manifest.dtype]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _top(x: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(-x, k - 1, axis=-1)[..., :k]


def compare_logits(ours: np.ndarray, reference: np.ndarray, real: np.ndarray | None = None) -> dict:
    """Logit figures over the real positions (`real`: a boolean [batch, positions] mask; None: all)."""
    if ours.shape != reference.shape:
        raise ValueError(f"logits are {ours.shape}, the reference's {reference.shape}")
    real = np.ones(ours.shape[:-1], bool) if real is None else real.astype(bool)
    a, r = ours[real].astype(np.float64), reference[real].astype(np.float64)
    diff = np.abs(a - r)
    log_r, log_a = _log_softmax(r), _log_softmax(a)
    kl = (np.exp(log_r) * (log_r - log_a)).sum(-1)
    top_a, top_r = _top(a, 5), _top(r, 5)
    overlap = (top_a[:, :, None] == top_r[:, None, :]).any(-1).sum(-1) / 5.0
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "max_rel": float(diff.max() / max(np.abs(r).max(), 1e-30)),
            "kl_mean": float(max(kl.mean(), 0.0)), "kl_max": float(max(kl.max(), 0.0)),
            "top1": float((a.argmax(-1) == r.argmax(-1)).mean()), "top5": float(overlap.mean()),
            "positions": int(real.sum())}


def compare_tensors(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per named tensor: relative L2 error ‖Δ‖ / ‖reference‖, max and mean |Δ| (in float64)."""
    out = {}
    for name, ref in reference.items():
        a, r = np.asarray(ours[name], np.float64), np.asarray(ref, np.float64)
        if a.shape != r.shape:
            raise ValueError(f"{name} is {a.shape}, the reference's {r.shape}")
        diff = np.abs(a - r)
        out[name] = {"rel_l2": float(np.linalg.norm(diff) / max(np.linalg.norm(r), 1e-30)),
                     "max_abs": float(diff.max(initial=0.0)), "mean_abs": float(diff.mean()) if diff.size else 0.0}
    return out


def greedy_run(ours_top1: list[np.ndarray], reference_top1: list[np.ndarray]) -> list[int]:
    """Per row: how many of the steps' greedy tokens (each step's [batch] argmax) agree before the first that
    does not (all of them when none differs)."""
    rows = len(reference_top1[0])
    out = []
    for row in range(rows):
        n = 0
        for a, r in zip(ours_top1, reference_top1):
            if a[row] != r[row]:
                break
            n += 1
        out.append(n)
    return out


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp(mean NLL) of the next tokens: logits [1, n, vocab] for ids [1, n]."""
    log_p = _log_softmax(logits[0, :-1])
    nll = -log_p[np.arange(len(log_p)), ids[0, 1:]]
    return float(np.exp(nll.mean()))


def overall(steps: list[dict]) -> dict:
    """The logit figures of all steps together (means weighted by positions, worst of the maxima)."""
    figures = [step["logits"] for step in steps]
    total = sum(f["positions"] for f in figures)
    mean = {key: sum(f[key] * f["positions"] for f in figures) / total for key in ("mean_abs", "kl_mean", "top1", "top5")}
    worst = {key: max(f[key] for f in figures) for key in ("max_abs", "max_rel", "kl_max")}
    return {**worst, **mean, "positions": total}


def judge(steps: list[dict], t: Thresholds) -> list[str]:
    """Why the steps fail the thresholds (empty: they pass). Per step: the worst position's |Δ logit| and KL, and
    each layer's KV cache; over all positions: mean KL and the top-1 / top-5 agreement (a step of a small batch has
    too few positions for a fraction: one near-tie would be a third of a batch of three)."""
    why = []
    for step in steps:
        name, m = step["name"], step["logits"]
        if t.logit_max_abs is not None and not m["max_abs"] <= t.logit_max_abs:
            why.append(f"{name}: max |Δ logit| {m['max_abs']:.3g} > {t.logit_max_abs:g}")
        if not m["kl_max"] <= t.kl_max:
            why.append(f"{name}: max KL {m['kl_max']:.3g} > {t.kl_max:g}")
        bad = first_over(step.get("kv", []), t.kv_rel)
        if bad is not None:
            layer, rel = bad
            why.append(f"{name}: KV cache of layer {layer} differs (relative error {rel:.3g} > {t.kv_rel:g})")
    total = overall(steps)
    if not total["kl_mean"] <= t.kl_mean:
        why.append(f"all steps: mean KL {total['kl_mean']:.3g} > {t.kl_mean:g}")
    for key, label in (("top1", "top-1 agreement"), ("top5", "top-5 agreement")):
        if not total[key] >= getattr(t, key):
            why.append(f"all steps: {label} {total[key]:.3f} < {getattr(t, key):g}")
    return why


def layer_errors(per_tensor: dict[str, dict], names: dict[str, int]) -> dict[int, float]:
    """The worst relative L2 error per layer, from `compare_tensors`' result and a tensor name → layer map."""
    out: dict[int, float] = {}
    for name, figures in per_tensor.items():
        layer = names[name]
        out[layer] = max(out.get(layer, 0.0), figures["rel_l2"])
    return out


def first_over(errors: dict[int, float] | list[float], threshold: float) -> tuple[int, float] | None:
    """The first layer (lowest index) whose error is over the threshold (NaN counts as over), and its error."""
    if isinstance(errors, list):
        errors = dict(enumerate(errors))
    for layer in sorted(errors):
        value = errors[layer]
        if not value <= threshold:
            return layer, value
    return None
