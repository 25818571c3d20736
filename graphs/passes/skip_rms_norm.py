"""Residual Add → RMSNormalization → ONNX Runtime's `com.microsoft.SkipSimplifiedLayerNormalization`
(ort target only: TensorRT's parser has no contrib ops).

    total = Add(a, b); y = RMSNormalization(total, γ)   →   y, _, _, total = SkipSimplifiedLayerNormalization(a, b, γ)

One kernel reads the residual stream once, adds, normalizes and hands the sum on to the next residual.
The statistics stay fp32 (the contrib kernel accumulates in fp32, as `stash_type` 1 asks).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern


class SkipRmsNorm(pattern.RewriteRuleClassBase):
    def pattern(self, op, a, b, gamma):
        total = op.Add(a, b, _outputs=["total"])
        normalized = op.RMSNormalization(total, gamma, _allow_other_attributes=True, _outputs=["normalized"])
        return normalized, total

    def check(self, op, a, b, gamma, normalized, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        attributes = normalized.producer().attributes
        if attributes.get_int("axis", -1) not in (-1, 2) or attributes.get_int("stash_type", 1) != 1:
            return result.fail("not a last-axis RMSNorm with fp32 statistics", normalized)
        for value in (a, b):
            if value.shape is None or value.shape.rank() != 3 or value.shape != normalized.shape:
                return result.fail("the residual operands are not both [batch, seq, hidden]", value)
        if gamma.const_value is None or gamma.shape is None or gamma.shape.rank() != 1:
            return result.fail("γ is not a constant vector", gamma)
        return result

    def rewrite(self, op, a, b, gamma, normalized, **_):
        epsilon = normalized.producer().attributes.get_float("epsilon", 1e-5)
        out, _, _, total = op.SkipSimplifiedLayerNormalization(a, b, gamma, epsilon=epsilon, _outputs=4,
                                                                _domain="com.microsoft")
        return out, total


RULES = pattern.RewriteRuleSet([SkipRmsNorm.rule()])


def apply(model: ir.Model) -> int:
    count = RULES.apply_to_model(model)
    if count:
        model.opset_imports.setdefault("com.microsoft", 1)
    return count
