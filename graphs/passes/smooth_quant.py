"""SmoothQuant W8A8: int8 weights *and* int8 activations, with activation outliers moved into the weights.

For the MatMuls `y = x @ W` (W [K, N] constant) that read one activation x, with calibrated per-channel
peaks a[k] = max |x[..., k]| and weight row peaks w[k] = max over those MatMuls and n of |W[k, n]|:

    s[k] = a[k]^α / w[k]^(1-α),   x' = x / s,   W' = diag(s) · W   (so x' @ W' = x @ W)

1/s is folded into whatever produced x, so smoothing costs nothing at run time:
- an `RMSNormalization` (qkv, gate/up, lm_head): its scale γ becomes γ / s;
- `silu(gate) * up` (down_proj): the `up` columns of the (packed) gate/up weight are divided by s.
An activation with another producer (o_proj reads the attention output) is quantized unsmoothed (s = 1).

Each activation then passes QuantizeLinear → DequantizeLinear with one constant scale, max_k(a[k]/s[k]) / 127
(symmetric: int8 zero point 0), and each W' becomes per-output-channel int8 → DequantizeLinear(axis=1):
the explicit-quantization form TensorRT 11 builds int8 GEMMs from, and ONNX Runtime's QDQ fusions run.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

from . import weight_quant
from ._tensors import add_initializer, constant_matmuls, release

Calibrate = Callable[[ir.Model, list[ir.Value]], dict[str, np.ndarray]]


def _row_peaks(value: ir.Value) -> np.ndarray:
    t = value.const_value
    return weight_quant.read_weight(t, lambda w: np.abs(w.astype(np.float32)).max(axis=1))


def _up_columns(x: ir.Value) -> tuple[ir.Value, slice] | None:
    """For x = silu(gate) * up: the constant weight that makes `up` and its columns, else None."""
    node = x.producer()
    if node is None or node.op_type != "Mul":
        return None
    for up in node.inputs:
        producer = up.producer() if up is not None else None
        if producer is None:
            continue
        if producer.op_type == "MatMul" and weight_quant.float_weight(producer.inputs[1]) is not None:
            return producer.inputs[1], slice(0, producer.inputs[1].shape[1])
        if producer.op_type == "Split" and len(producer.inputs) > 1 and producer.inputs[1] is not None:
            source = producer.inputs[0].producer()
            sizes = producer.inputs[1].const_value
            if (source is None or source.op_type != "MatMul" or sizes is None
                    or weight_quant.float_weight(source.inputs[1]) is None):
                continue
            sizes = sizes.numpy().tolist()
            start = sum(sizes[:up.index()])
            return source.inputs[1], slice(start, start + sizes[up.index()])
    return None


def _folds_into(x: ir.Value, readers: list[ir.Node]) -> tuple[str, ir.Value, slice | None] | None:
    """Where 1/s can go: ("norm", γ, None) or ("up", weight, columns); None when x has other readers."""
    if len(x.uses()) != len(readers):
        return None
    node = x.producer()
    if node is not None and node.op_type == "RMSNormalization":
        gamma = node.inputs[1]
        if gamma is not None and gamma.const_value is not None and len(gamma.uses()) == 1:
            return "norm", gamma, None
        return None
    found = _up_columns(x)
    return ("up", *found) if found else None


def _activation_qdq(graph: ir.Graph, node: ir.Node, x: ir.Value, scale: float) -> None:
    dtype = x.dtype
    name = node.inputs[1].name
    scale = max(scale, weight_quant.SCALE_FLOOR.get(dtype, 0.0))  # an fp16 scale must not round to 0
    s = add_initializer(graph, f"{name}.input_scale", ir.tensor(np.array(scale, dtype.numpy())))
    zero = add_initializer(graph, f"{name}.input_zero_point", ir.tensor(np.array(0, np.int8)))
    q = ir.node("QuantizeLinear", [x, s, zero], name=f"{name}/QuantizeLinear_input")
    dq = ir.node("DequantizeLinear", [q.outputs[0], s, zero], name=f"{name}/DequantizeLinear_input")
    q.outputs[0].type, q.outputs[0].shape = ir.TensorType(ir.DataType.INT8), x.shape
    dq.outputs[0].type, dq.outputs[0].shape = ir.TensorType(dtype), x.shape
    graph.insert_before(node, [q, dq])
    node.replace_input_with(0, dq.outputs[0])


def apply(model: ir.Model, calibrate: Calibrate, alpha: float = 0.5, quantize: bool = True) -> int:
    """Smooth and quantize every constant-weight MatMul; returns how many. `quantize=False` only smooths
    (the float graph computes the same function: what the rule's test checks)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha {alpha} is outside [0, 1]")
    graph = model.graph
    groups = constant_matmuls(graph, weight_quant.float_weight)
    peaks = calibrate(model, list(groups))
    factors: dict[ir.Value, np.ndarray] = {}  # activation → s (its readers' weight rows are multiplied by s)
    cols: dict[str, tuple[slice, np.ndarray]] = {}  # weight name → (columns, 1/s) for folded down_proj smoothing
    input_scale: dict[ir.Value, float] = {}
    for x, readers in groups.items():
        a = peaks[x.name]
        fold = _folds_into(x, readers)
        if fold is None:
            s = np.ones_like(a)
        else:
            w = np.maximum.reduce([_row_peaks(n.inputs[1]) for n in readers])
            s = np.where((a > 0) & (w > 0), a ** alpha / np.maximum(w, 1e-8) ** (1 - alpha), 1.0)
            s = np.clip(s, 1e-5, 1e5).astype(np.float32)
            kind, target, columns = fold
            if kind == "norm":
                gamma = target.const_value
                new = (gamma.numpy().astype(np.float32) / s).astype(gamma.dtype.numpy())
                release(gamma)
                target.const_value = ir.tensor(new, name=target.name)
            else:
                cols[target.name] = (columns, (1.0 / s).astype(np.float32))
        factors[x] = s
        input_scale[x] = float((a / s).max()) / 127.0 or 1.0
    done = 0
    for x, readers in groups.items():
        for node in readers:
            w = node.inputs[1]
            t, s, col = w.const_value, factors[x], cols.get(w.name)

            def read(fn, t=t, s=s, col=col):
                def scaled(array: np.ndarray) -> np.ndarray:
                    out = array.astype(np.float32) * s[:, None]
                    if col is not None:
                        out[:, col[0]] *= col[1]
                    return fn(out)
                return weight_quant.read_weight(t, scaled)

            done += 1
            if not quantize:
                w.const_value = ir.LazyTensor(lambda read=read, t=t: ir.tensor(read(lambda a: a).astype(
                    t.dtype.numpy())), dtype=t.dtype, shape=t.shape)
                continue
            _activation_qdq(graph, node, x, input_scale[x])
            weight_quant.qdq(graph, node, w, read)
            if not w.uses():
                graph.initializers.pop(w.name)
    return done
