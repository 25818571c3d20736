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
from .passes import (ort_gqa, ort_rotary, packed_matmul, pointwise_conv, precision, rms_norm, rotary, skip_rms_norm,
                    smooth_quant, static_cache, weight_quant)
from .passes._tensors import release

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


class GraphPass(ir.passes.InPlacePass):
    """One step of the pipeline in onnx-ir's pass interface: `rewrite(model)` returns how many places it changed,
    kept as `changed` (`unit` says what they are). `after` holds the keys of the passes it needs to have run
    before it, where the pipeline has them; `plan` refuses an order that breaks one."""

    def __init__(self, key: str, name: str, rewrite: Callable[[ir.Model], int], unit: str, after: tuple = ()):
        super().__init__()
        self.key, self.name, self.rewrite, self.unit, self.after = key, name, rewrite, unit, after
        self.changed = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.changed = self.rewrite(model)
        return ir.passes.PassResult(model, modified=self.changed > 0)


def check_order(steps: list[GraphPass]) -> None:
    """PassError if a pass comes before one it names in `after`."""
    first = {}
    for index, step in enumerate(steps):
        first.setdefault(step.key, index)
    for index, step in enumerate(steps):
        for key in step.after:
            if first.get(key, -1) > index:
                raise PassError(f"the pass {step.name!r} must run after {steps[first[key]].name!r}")


def plan(options: ExportOptions, max_positions: int, smoothquant: SmoothQuant | None = None) -> list[GraphPass]:
    """The passes for `options` on a model of `max_positions` positions (they size the static cache by default and
    the ort target's constant rope caches), in order. W8A8 calibrates on `smoothquant`'s sequences."""
    target, max_seq = options.target, options.slots(max_positions)
    if options.quantization == "w8a8" and smoothquant is None:
        raise PassError("SmoothQuant W8A8 calibrates the activations: give the calibration sequences")
    folded = ("cleanup",)  # the fusions match the traced graph once its constants are folded
    steps = [
        GraphPass("cleanup", "constant folding, shape simplification, dead-node removal", _cleanup, "nodes removed"),
        GraphPass("rms_norm", "RMSNormalization", rms_norm.apply, "fused", folded),
        GraphPass("rotary", "RotaryEmbedding", rotary.apply, "fused", folded),
        GraphPass("packed", "packed projections (qkv, gate/up)", packed_matmul.apply, "groups packed", folded),
    ]
    if target == "ort":
        steps.append(GraphPass("skip_rms_norm", "SkipSimplifiedLayerNormalization (com.microsoft)",
                               skip_rms_norm.apply, "fused", ("rms_norm",)))
        steps.append(GraphPass("ort_rotary", f"RotaryEmbedding (com.microsoft, {max_positions}-position caches)",
                               lambda m: ort_rotary.apply(m, max_positions), "converted", ("rotary",)))
    if options.quantization == "w8a8":
        sq, alpha = smoothquant, options.smoothquant_alpha

        def smooth(model: ir.Model) -> int:
            return smooth_quant.apply(model, lambda m, values: calibrate.channel_peaks(
                m, values, sq.sequences, sq.scratch, sq.threads, sq.log), alpha)
        tokens = sum(ids.shape[-1] for ids in sq.sequences)
        # the factors fold into the RMSNormalization scales and the packed gate/up weight
        steps.append(GraphPass("quantize", f"SmoothQuant W8A8 (alpha {alpha}, {tokens} calibration tokens)", smooth,
                               "MatMuls quantized", ("rms_norm", "packed")))
    elif options.quantization == "int4":
        steps.append(GraphPass("quantize", "int4 weight-only (MatMulNBits bits=4, blocks of 32)",
                               lambda m: weight_quant.apply(m, "matmulnbits", bits=4), "weights quantized",
                               ("packed",)))
    elif options.quantization == "int8":
        form = "matmulnbits" if target == "ort" else "qdq"
        steps.append(GraphPass("quantize", f"int8 weight-only ({weight_quant.OPS[form]})",
                               lambda m: weight_quant.apply(m, form), "weights quantized", ("packed",)))
    if max_seq is not None:
        steps.append(GraphPass("static_cache", f"static KV cache (TensorScatter, {max_seq} slots)",
                               lambda m: static_cache.apply(m, max_seq), "caches made static"))
    if target == "ort":
        sharing = (", past and present share one buffer; packed qkv rotated in the kernel, keys cached rotated by "
                   "slot, where head_dim is a multiple of 16") if max_seq is not None else ""
        # it reads the contrib rope and the packed qkv, and with a static cache its TensorScatter update
        steps.append(GraphPass("gqa", f"GroupQueryAttention (com.microsoft{sharing})", ort_gqa.apply, "layers fused",
                               ("ort_rotary", "packed", "static_cache")))
        # float32 MatMuls only: quantized weights stay as the quantization wrote them
        steps.append(GraphPass("pointwise_conv", "float32 weights as 1×1 Conv (ONNX Runtime's NCHWc kernel)",
                               pointwise_conv.apply, "MatMuls converted", ("quantize",)))
    steps.append(GraphPass("final_cleanup", "cleanup", _cleanup, "nodes removed"))
    check_order(steps)
    return steps


def run(src: Path, dst: Path, options: ExportOptions, max_positions: int, *, smoothquant: SmoothQuant | None = None,
        log: Callable[[str], None] = lambda msg: None) -> tuple[list[PassReport], dict[str, int]]:
    """Rewrite `src` (with its external data) into `dst` + `dst.data-file`; returns the reports and op counts."""
    model = ir.load(str(src))
    dst.parent.mkdir(parents=True, exist_ok=True)
    if smoothquant is not None and smoothquant.scratch is None:
        smoothquant = dataclasses.replace(smoothquant, scratch=dst.parent)
    reports = []
    for step in plan(options, max_positions, smoothquant):
        started = time.perf_counter()
        step(model)  # onnx-ir's PassBase.__call__: its preconditions, call, postconditions
        reports.append(PassReport(step.name, step.changed, f"{step.changed} {step.unit}"))
        log(f"  {step.name}: {step.changed} {step.unit} ({time.perf_counter() - started:.1f} s)")
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
    """Rewrite the float32 graph at `path` in place as `dtype` (`passes/precision.py`). Its weights must already
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
