"""RMSNorm (Pow → ReduceMean → Add ε → Sqrt → Reciprocal → Mul, optional fp32 Casts) → opset-23
`RMSNormalization` with `stash_type` = the precision of the statistics (fp32 in fp16/bf16 graphs).

onnxscript's own rule; this module only names it for the pipeline."""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.rules.fusion import _rms_normalization


def apply(model: ir.Model) -> int:
    return _rms_normalization.fuse_rms_normalization(model)
