"""Standard `RotaryEmbedding` with per-step cos/sin → ONNX Runtime's `com.microsoft.RotaryEmbedding`
reading constant caches by `position_ids` (ort target only).

    freqs = Mul(Cast(Unsqueeze(position_ids)), inv_freq); RotaryEmbedding(x, Cast?(Cos(freqs)), Cast?(Sin(freqs)))
      →  com.microsoft.RotaryEmbedding(x, position_ids, cos_cache, sin_cache)

with `cos_cache[p] = cos(p · inv_freq)` for every position p < max_positions, computed in fp32 and stored
in x's type, so no step computes Cos/Sin. Only a constant `inv_freq` matches: a rope whose frequencies
depend on the sequence length (dynamic NTK) keeps the standard op.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern


class ContribRope(pattern.RewriteRuleClassBase):
    def __init__(self, cast: bool, max_positions: int):
        super().__init__(f"ContribRope{'Cast' if cast else ''}", remove_nodes=False)  # Cos/Sin are shared
        self._cast, self._max_positions = cast, max_positions
        self._caches: dict[tuple, tuple[ir.Value, ir.Value]] = {}

    def pattern(self, op, x, position_ids, axes, inv_freq):
        freqs = op.Mul(op.Cast(op.Unsqueeze(position_ids, axes), _allow_other_attributes=True), inv_freq)
        cos, sin = op.Cos(freqs), op.Sin(freqs)
        if self._cast:
            cos = op.Cast(cos, _allow_other_attributes=True)
            sin = op.Cast(sin, _allow_other_attributes=True)
        return op.RotaryEmbedding(x, cos, sin, _allow_other_attributes=True, _outputs=["rotated"])

    def check(self, op, x, position_ids, inv_freq, rotated, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        attributes = rotated.producer().attributes
        if attributes.get_int("interleaved", 0) != 0 or attributes.get_int("rotary_embedding_dim", 0) != 0:
            return result.fail("only full rotate-half rope is converted", rotated)
        if not position_ids.is_graph_input():
            return result.fail("position_ids is not the graph input", position_ids)
        if inv_freq.const_value is None:
            return result.fail("inv_freq is not constant", inv_freq)
        if x.shape is None or x.shape.rank() != 4 or not isinstance(x.shape[3], int):
            return result.fail("x is not [batch, heads, seq, head_dim]", x)
        if inv_freq.const_value.numpy().size * 2 != x.shape[3]:
            return result.fail("inv_freq does not cover half the head", inv_freq)
        return result

    def rewrite(self, op, x, position_ids, inv_freq, **_):
        key = (inv_freq.name, x.dtype)
        if key not in self._caches:  # one pair of caches shared by every layer
            freqs = np.arange(self._max_positions, dtype=np.float32)[:, None] * \
                inv_freq.const_value.numpy().astype(np.float32).reshape(1, -1)
            dtype = x.dtype.numpy()
            self._caches[key] = tuple(op.initializer(ir.tensor(fn(freqs).astype(dtype)), name=f"{inv_freq.name}.{name}")
                                      for fn, name in ((np.cos, "cos_cache"), (np.sin, "sin_cache")))
        cos, sin = self._caches[key]
        return op.RotaryEmbedding(x, position_ids, cos, sin, interleaved=0, _domain="com.microsoft")


def apply(model: ir.Model, max_positions: int) -> int:
    rules = pattern.RewriteRuleSet([ContribRope.rule(cast=True, max_positions=max_positions),
                                    ContribRope.rule(cast=False, max_positions=max_positions)])
    count = rules.apply_to_model(model)
    if count:
        model.opset_imports.setdefault("com.microsoft", 1)
    return count
