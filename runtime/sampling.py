"""Next-token choice from logits: greedy, temperature, top-k, top-p, min-p, repetition penalty."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature={self.temperature} must be >= 0 and finite (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1)")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")


def apply_repetition_penalty(logits: np.ndarray, seen: list[list[int]], penalty: float) -> np.ndarray:
    """transformers' rule: a seen token's logit is divided by the penalty if positive, multiplied if negative."""
    if penalty == 1.0:
        return logits
    logits = logits.copy()
    for row, tokens in enumerate(seen):
        ids = np.unique(np.asarray(tokens, dtype=np.int64))
        values = logits[row, ids]
        logits[row, ids] = np.where(values > 0, values / penalty, values * penalty)
    return logits


def filtered_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution sampled from: softmax(logits / T) truncated by top-k, top-p and min-p, renormalised."""
    z = logits.astype(np.float64) / params.temperature
    z -= z.max(-1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, -1)
    keep = np.ones_like(sorted_p, dtype=bool)
    if params.top_k:
        keep[:, params.top_k:] = False
    if params.top_p < 1.0:
        before = np.cumsum(sorted_p, -1) - sorted_p  # mass of the better tokens
        keep &= before < params.top_p
    if params.min_p > 0:
        keep &= sorted_p >= params.min_p * sorted_p[:, :1]
    keep[:, 0] = True
    mask = np.zeros_like(keep)
    np.put_along_axis(mask, order, keep, -1)
    probs = np.where(mask, probs, 0.0)
    return probs / probs.sum(-1, keepdims=True)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           seen: list[list[int]] | None = None) -> np.ndarray:
    """One token id per row of `logits` `[batch, vocab]`."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = filtered_probs(logits, params)
    u = rng.random((probs.shape[0], 1))
    return np.minimum((np.cumsum(probs, -1) < u).sum(-1), probs.shape[1] - 1)
