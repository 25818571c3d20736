"""Rotate-half RoPE → opset-23 `RotaryEmbedding`.

The traced form, per query or key tensor `x` `[batch, heads, seq, head_dim]`:

    emb = Concat(freqs, freqs); cos = Unsqueeze(Cast?(Cos(emb)), 1); sin = Unsqueeze(Cast?(Sin(emb)), 1)
    x1, x2 = Split(x, 2, axis=-1)
    out = x * cos + Concat(-x2, x1) * sin

becomes `RotaryEmbedding(x, Cast?(Cos(freqs)), Cast?(Sin(freqs)))` with 3-D caches `[batch, seq,
head_dim/2]` (no position_ids: the caches are already per position). onnxscript's own rule expects
HF's slicing form and no Cast, so it does not match the Split/Cast this model traces to in fp16.
A rope with an attention scaling factor (yarn) has a Mul after Cos and is left alone.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern


class RotateHalfRope(pattern.RewriteRuleClassBase):
    def __init__(self, cast: bool):
        super().__init__(f"RotateHalfRope{'Cast' if cast else ''}", remove_nodes=False)
        self._cast = cast

    def _cache(self, op, trig, axes, to):
        return op.Unsqueeze(op.Cast(trig, to=to) if self._cast else trig, axes)

    def pattern(self, op, x, freqs, cos_axes, sin_axes, to_cos, to_sin):
        emb = op.Concat(freqs, freqs, axis=-1)
        cos = self._cache(op, op.Cos(emb), cos_axes, to_cos)
        sin = self._cache(op, op.Sin(emb), sin_axes, to_sin)
        x1, x2 = op.Split(x, _outputs=["x1", "x2"], _allow_other_attributes=True, _allow_other_inputs=True)
        rotated = op.Concat(op.Neg(x2), x1, axis=-1)
        return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))

    def check(self, op, x, freqs, cos_axes, sin_axes, x1, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        for axes in (cos_axes, sin_axes):
            if not _ir_utils.is_singleton_value(axes, 1):
                return result.fail("cos/sin are not unsqueezed on axis 1", axes)
        if x.shape is None or x.shape.rank() != 4 or not isinstance(x.shape[3], int):
            return result.fail("x is not 4-D with a static head size", x)
        split_node = x1.producer()
        axis = split_node.attributes.get("axis")
        if axis is None or axis.value not in (3, -1):
            return result.fail("x is not split on its last axis", x)
        if len(split_node.inputs) > 1 and split_node.inputs[1] is not None:
            sizes = _ir_utils.get_numpy_value(split_node.inputs[1])
            if sizes is None or len(set(sizes.tolist())) != 1:
                return result.fail("x is not split into equal halves", x)
        if freqs.shape is None or freqs.shape.rank() != 3 or freqs.shape[2] != x.shape[3] // 2:
            return result.fail("freqs is not [batch, seq, head_dim/2]", freqs)
        return result

    def rewrite(self, op, x, freqs, to_cos=None, to_sin=None, **_):
        cos, sin = op.Cos(freqs), op.Sin(freqs)
        if self._cast:
            cos, sin = op.Cast(cos, to=to_cos.value), op.Cast(sin, to=to_sin.value)
        return op.RotaryEmbedding(x, cos, sin, interleaved=0)


RULES = pattern.RewriteRuleSet([RotateHalfRope.rule(cast=True), RotateHalfRope.rule(cast=False)])


def apply(model: ir.Model) -> int:
    return RULES.apply_to_model(model)
