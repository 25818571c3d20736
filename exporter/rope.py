"""Rotary-embedding frequencies for each `rope_scaling` type Llama checkpoints use.

Each function returns `(inv_freq, attention_scaling)` with `inv_freq` in float32, the way
transformers' `ROPE_INIT_FUNCTIONS` define them. `dynamic` (NTK) depends on the sequence length, so
the model recomputes it from the positions of each call with `dynamic_inv_freq`.
"""

from __future__ import annotations

import math

import torch

from .config import LlamaConfig


def _exponents(dim: int, device: torch.device | None = None) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim


def default_inv_freq(base: float, dim: int, device: torch.device | None = None) -> torch.Tensor:
    return 1.0 / (base ** _exponents(dim, device))


def _linear(config: LlamaConfig, device) -> tuple[torch.Tensor, float]:
    return default_inv_freq(config.rope_theta, config.head_dim, device) / config.rope_scaling["factor"], 1.0


def _llama3(config: LlamaConfig, device) -> tuple[torch.Tensor, float]:
    s = config.rope_scaling
    inv_freq = default_inv_freq(config.rope_theta, config.head_dim, device)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(config: LlamaConfig, device) -> tuple[torch.Tensor, float]:
    s = config.rope_scaling
    base, dim, factor = config.rope_theta, config.head_dim, s["factor"]
    original = s.get("original_max_position_embeddings") or config.max_position_embeddings
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, attention_factor


def rope_parameters(config: LlamaConfig, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """inv_freq at the configured length, and the factor cos/sin are multiplied by.

    Built from `arange` on `device` (the inputs' device), so that a trace on the meta device
    records the computation and the exported graph folds it to a constant.
    """
    kind = config.rope_type
    if kind in ("default", "dynamic"):
        return default_inv_freq(config.rope_theta, config.head_dim, device), 1.0
    return {"linear": _linear, "llama3": _llama3, "yarn": _yarn}[kind](config, device)


def dynamic_inv_freq(config: LlamaConfig, position_ids: torch.Tensor) -> torch.Tensor:
    """NTK-aware frequencies for the longest position in this call (transformers' dynamic rope).

    transformers caches the largest length seen so far; for a generation whose positions only grow,
    as every prefill/decode loop's do, that equals this stateless form, which is also traceable.
    """
    dim, factor = config.head_dim, config.rope_scaling["factor"]
    max_positions = config.max_position_embeddings
    seq_len = torch.clamp(position_ids.max() + 1, min=max_positions)
    base = config.rope_theta * ((factor * seq_len / max_positions) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** _exponents(dim, position_ids.device))
