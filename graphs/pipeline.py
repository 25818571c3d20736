"""The pass pipeline per target: traced portable graph → the graph an engine runs fastest.

The model is loaded with onnx-ir, whose external tensors stay on disk (memory-mapped on demand), so a
13B/70B graph is rewritten without reading its weights; the passes that make new weights (packing,
int8) create `ir.LazyTensor`s that are computed one at a time while the result is saved.

Targets (all keep the portable I/O contract: past/present, logits_to_keep, float32 logits):
- onnx / trt: standard ONNX (opset 23): RMSNormalization, RotaryEmbedding, the traced GQA `Attention`
  (cache Concat outside, explicit 4-D mask), packed QKV and gate/up; int8 as DequantizeLinear → MatMul.
  trt additionally must pass `trt_check` (TensorRT 11's parser rules).
- ort: the same fusions, then ONNX Runtime's contrib ops: SkipSimplifiedLayerNormalization, RotaryEmbedding
  on constant caches, GroupQueryAttention (with the static cache: one buffer as past and present, updated
  in place); int8 as `MatMulNBits` (bits=8), and int4 (bits=4, a scale per block of 32), which only
  ONNX Runtime runs; the float32 weights' MatMuls as 1×1 Convs, which its CPU kernels read faster.
SmoothQuant W8A8 (every target) calibrates on token sequences in ONNX Runtime, then writes Q/DQ pairs on
the activations and int8 → DequantizeLinear on the smoothed weights. The static KV cache (every target)
changes the contract: fixed cache buffers written by opset-24 TensorScatter at `write_indices`.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript import optimizer

from . import calibrate, trt_check
from .options import ExportOptions
from .rules import (ort_gqa, ort_rotary, packed_matmul, pointwise_conv, precision, rms_norm, rotary, skip_rms_norm,
                    smooth_quant, static_cache, weight_int8)
from .rules._tensors import release

ALIGN = 4096  # page-aligned external data, so that runtimes can memory-map it


class PassError(Exception):
    """The pipeline cannot produce a valid graph for the target (the message says why and what to do)."""


@dataclass
class SmoothQuant:
    """W8A8 calibration: the token sequences (int64 [1, T] each) run through the graph in ONNX Runtime (the
    migration strength α is `ExportOptions.smoothquant_alpha`)."""
    sequences: Sequence[np.ndarray]
    scratch: Path | None = None  # where the calibration copy of the graph goes (default: next to dst)
    threads: int = 0
    log: Callable[[str], None] = field(default=lambda msg: None)


@dataclass
class PassReport:
    name: str
    changed: int
    detail: str

    def as_dict(self) -> dict:
        return {"pass": self.name, "changed": self.changed, "detail": self.detail}


def op_counts(model: ir.Model) -> dict[str, int]:
    return dict(collections.Counter(node.op_type for node in model.graph).most_common())


def _cleanup(model: ir.Model) -> int:
    before = len(model.graph)
    optimizer.optimize(model)
    return before - len(model.graph)


def passes(options: ExportOptions, max_positions: int, smoothquant: SmoothQuant | None = None
           ) -> list[tuple[str, Callable[[ir.Model], int], str]]:
    """(name, function returning how many places it changed, what the count means) in order, for `options` on a
    model of `max_positions` positions (they size the static cache by default and the ort target's constant rope
    caches). W8A8 calibrates on `smoothquant`'s sequences."""
    target, max_seq = options.target, options.slots(max_positions)
    if options.quantization == "w8a8" and smoothquant is None:
        raise PassError("SmoothQuant W8A8 calibrates the activations: give the calibration sequences")
    steps = [
        ("constant folding, shape simplification, dead-node removal", _cleanup, "nodes removed"),
        ("RMSNormalization", rms_norm.apply, "fused"),
        ("RotaryEmbedding", rotary.apply, "fused"),
        ("packed projections (qkv, gate/up)", packed_matmul.apply, "groups packed"),
    ]
    if target == "ort":
        steps.append(("SkipSimplifiedLayerNormalization (com.microsoft)", skip_rms_norm.apply, "fused"))
        steps.append((f"RotaryEmbedding (com.microsoft, {max_positions}-position caches)",
                      lambda m: ort_rotary.apply(m, max_positions), "converted"))
    if options.quantization == "w8a8":
        sq, alpha = smoothquant, options.smoothquant_alpha

        def smooth(model: ir.Model) -> int:
            return smooth_quant.apply(model, lambda m, values: calibrate.channel_peaks(
                m, values, sq.sequences, sq.scratch, sq.threads, sq.log), alpha)
        tokens = sum(ids.shape[-1] for ids in sq.sequences)
        steps.append((f"SmoothQuant W8A8 (alpha {alpha}, {tokens} calibration tokens)", smooth,
                      "MatMuls quantized"))
    elif options.quantization == "int4":
        steps.append(("int4 weight-only (MatMulNBits bits=4, blocks of 32)",
                      lambda m: weight_int8.apply(m, "matmulnbits", bits=4), "weights quantized"))
    elif options.quantization == "int8":
        form = "matmulnbits" if target == "ort" else "qdq"
        steps.append((f"int8 weight-only ({weight_int8.OPS[form]})",
                      lambda m: weight_int8.apply(m, form), "weights quantized"))
    if max_seq is not None:
        steps.append((f"static KV cache (TensorScatter, {max_seq} slots)",
                      lambda m: static_cache.apply(m, max_seq), "caches made static"))
    if target == "ort":
        sharing = (", past and present share one buffer; packed qkv rotated in the kernel, keys cached rotated by "
                   "slot, where head_dim is a multiple of 16") if max_seq is not None else ""
        steps.append((f"GroupQueryAttention (com.microsoft{sharing})", ort_gqa.apply, "layers fused"))
    if target == "ort":
        steps.append(("float32 weights as 1×1 Conv (ONNX Runtime's NCHWc kernel)", pointwise_conv.apply,
                      "MatMuls converted"))
    steps.append(("cleanup", _cleanup, "nodes removed"))
    return steps


def run(src: Path, dst: Path, options: ExportOptions, max_positions: int, *, smoothquant: SmoothQuant | None = None,
        log: Callable[[str], None] = lambda msg: None) -> tuple[list[PassReport], dict[str, int]]:
    """Rewrite `src` (with its external data) into `dst` + `dst.data-file`; returns the reports and op counts."""
    model = ir.load(str(src))
    dst.parent.mkdir(parents=True, exist_ok=True)
    if smoothquant is not None and smoothquant.scratch is None:
        smoothquant = dataclasses.replace(smoothquant, scratch=dst.parent)
    reports = []
    for name, fn, unit in passes(options, max_positions, smoothquant):
        started = time.perf_counter()
        changed = fn(model)
        reports.append(PassReport(name, changed, f"{changed} {unit}"))
        log(f"  {name}: {changed} {unit} ({time.perf_counter() - started:.1f} s)")
    counts = op_counts(model)
    data = f"{dst.name}.data"
    log(f"  writing the optimized graph and weights to {dst.name} / {data}")
    written: list[ir.TensorProtocol] = []

    def unmap_previous(tensor: ir.TensorProtocol, info) -> None:  # called before each tensor is written
        if written:
            release(written[-1])
        written[:] = [tensor]

    ir.save(model, str(dst), external_data=data, alignment=ALIGN, align_threshold=ALIGN, max_workers=1,
            callback=unmap_previous)
    return reports, counts


def convert_precision(path: Path, dtype: str, target: str = "onnx") -> PassReport:
    """Rewrite the float32 graph at `path` in place as `dtype` (`rules/precision.py`). Its weights must already
    be stored in `dtype` (the export writes them so): only the graph file is rewritten, the data file is not.
    For the trt target, `Attention` gets no `softmax_precision` (TensorRT's parser rejects the attribute)."""
    model = ir.load(str(path))
    external = [v.name for v in model.graph.initializers.values()
                if isinstance(v.const_value, ir.ExternalTensor) and v.dtype == ir.DataType.FLOAT]
    if external:
        raise PassError(f"{path}: weights {external[:3]} are float32; the precision pass rewrites only the graph "
                        f"file, so its weights must already be {dtype}")
    kept = precision.apply(model, dtype, softmax_precision=target != "trt")
    ir.save(model, str(path))
    softmax = "softmax" if target != "trt" else "softmax left to TensorRT's fused attention"
    return PassReport(f"precision {dtype}", kept, f"{kept} fp32 islands kept (rope angles, RMSNorm statistics, "
                                                 f"{softmax}, logits)")


def check_target(path: Path, target: str) -> PassReport | None:
    """The target's import rules (trt: TensorRT 11's ONNX parser), on the graph file; of the weights only the
    Q/DQ scales and zero points are read."""
    if target != "trt":
        return None
    problems = trt_check.check(onnx.load(str(path), load_external_data=False), base_dir=path.parent)
    if problems:
        listed = "\n  ".join(str(p) for p in problems[:20])
        raise PassError(f"the trt graph breaks {len(problems)} TensorRT 11 parser rule(s):\n  {listed}")
    return PassReport("TensorRT-compatibility check", 0, "passed")
