"""Parity figures: an artifact's outputs against a reference's, and the thresholds each precision must meet.

One definition of every figure, for `llama-parity`, `llama-export`'s verify step and the tests. It is torch-free
(numpy, and polygraphy's comparator for the named tensors: the KV cache and the per-layer hidden states), so the
runtime and the tests may use it as well as the exporter. Figures, all over real (unpadded) positions:

- logits: max and mean |Δ|, max relative difference (max |Δ| ÷ max |reference|: an element-wise |Δ|/|ref| is
  dominated by logits near zero, the reason polygraphy's default tolerance fails healthy fp16 results), KL
  divergence KL(reference ‖ artifact) of the next-token distributions (mean and max over positions), top-1
  agreement (the same argmax) and top-5 agreement (mean overlap of the two top-5 sets);
- tensors (each layer's present key and value, each decoder layer's output): relative L2 error ‖Δ‖ / ‖reference‖,
  with polygraphy's max and mean |Δ| beside it.

The thresholds are data (`THRESHOLDS`), one row per precision; docs/parity.md gives each its reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "smoothquant")


@dataclass(frozen=True)
class Thresholds:
    """What an artifact of one precision must meet against the float32 reference (None: not gated)."""
    logit_max_abs: float | None  # max |Δ logit| at any real position of any step
    kl_mean: float  # mean KL(reference ‖ artifact) over the positions of a step
    kl_max: float  # worst position of a step
    top1: float  # minimum fraction of positions with the same argmax, per step
    top5: float  # minimum mean overlap of the top-5 sets, per step
    kv_rel: float  # relative L2 error of each layer's present key / value, per step
    hidden_rel: float  # relative L2 error of each decoder layer's output (--per-layer)
    ppl_rel: float  # |perplexity(artifact) / perplexity(reference) − 1| on the text

    def as_dict(self) -> dict:
        return asdict(self)


THRESHOLDS: dict[str, Thresholds] = {
    # fp32: the same arithmetic in another order (fused kernels, packed matmuls): rounding only
    "fp32": Thresholds(logit_max_abs=1e-3, kl_mean=1e-6, kl_max=1e-5, top1=1.0, top5=0.99, kv_rel=1e-4,
                       hidden_rel=1e-4, ppl_rel=1e-4),
    # fp16: 11-bit mantissas in weights and activations (≈ 5e-4 relative per rounding), statistics in fp32
    "fp16": Thresholds(logit_max_abs=None, kl_mean=1e-3, kl_max=2e-2, top1=0.97, top5=0.9, kv_rel=5e-3,
                       hidden_rel=1e-2, ppl_rel=5e-3),
    # bf16: 8-bit mantissas, eight times the fp16 rounding
    "bf16": Thresholds(logit_max_abs=None, kl_mean=8e-3, kl_max=0.1, top1=0.93, top5=0.85, kv_rel=3e-2,
                       hidden_rel=6e-2, ppl_rel=2e-2),
    # int8 weight-only: per-output-channel symmetric weights, activations in float
    "int8": Thresholds(logit_max_abs=None, kl_mean=5e-3, kl_max=0.1, top1=0.93, top5=0.85, kv_rel=3e-2,
                       hidden_rel=5e-2, ppl_rel=1e-2),
    # int4 weight-only: 16 levels per block of 32 weights: the largest weight error of the set
    "int4": Thresholds(logit_max_abs=None, kl_mean=0.1, kl_max=1.5, top1=0.75, top5=0.65, kv_rel=0.25,
                       hidden_rel=0.3, ppl_rel=0.15),
    # SmoothQuant W8A8: int8 weights and int8 activations with one static scale per tensor
    "smoothquant": Thresholds(logit_max_abs=None, kl_mean=0.05, kl_max=1.0, top1=0.8, top5=0.7, kv_rel=0.15,
                              hidden_rel=0.2, ppl_rel=0.08),
}


def precision_of(manifest: dict) -> str:
    """The THRESHOLDS row for an artifact, from its manifest's weights label and dtype."""
    weights = str(manifest.get("graph", {}).get("weights", ""))
    if "SmoothQuant" in weights:
        return "smoothquant"
    if weights.startswith("int8"):
        return "int8"
    if weights.startswith("int4"):
        return "int4"
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[manifest["dtype"]]


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
    """Per named tensor: relative L2 error, and polygraphy's max and mean |Δ| (cast up to float32)."""
    from polygraphy.comparator import IterationResult, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    compare = SimpleCompareFunc(check_error_stat="max", atol=np.inf, rtol=np.inf)
    ours = {name: np.ascontiguousarray(v, np.float32) for name, v in ours.items()}
    reference = {name: np.ascontiguousarray(v, np.float32) for name, v in reference.items()}
    found = compare(IterationResult(ours, runner_name="artifact"), IterationResult(reference, runner_name="reference"))
    out = {}
    for name, ref in reference.items():
        a, r = ours[name].astype(np.float64), ref.astype(np.float64)
        out[name] = {"rel_l2": float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30)),
                     "max_abs": float(found[name].max_absdiff), "mean_abs": float(found[name].mean_absdiff)}
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


def judge_step(step: dict, t: Thresholds) -> list[str]:
    """Why a step's figures fail the thresholds (empty: it passes)."""
    name, m, why = step["name"], step["logits"], []
    if t.logit_max_abs is not None and m["max_abs"] > t.logit_max_abs:
        why.append(f"{name}: max |Δ logit| {m['max_abs']:.3g} > {t.logit_max_abs:g}")
    for key, label in (("kl_mean", "mean KL"), ("kl_max", "max KL")):
        if m[key] > getattr(t, key):
            why.append(f"{name}: {label} {m[key]:.3g} > {getattr(t, key):g}")
    for key, label in (("top1", "top-1 agreement"), ("top5", "top-5 agreement")):
        if m[key] < getattr(t, key):
            why.append(f"{name}: {label} {m[key]:.3f} < {getattr(t, key):g}")
    bad = first_over(step.get("kv", {}), t.kv_rel)
    if bad is not None:
        layer, rel = bad
        why.append(f"{name}: KV cache of layer {layer} differs (relative error {rel:.3g} > {t.kv_rel:g})")
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
