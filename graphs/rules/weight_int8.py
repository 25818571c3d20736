"""Weight-only int8: every MatMul whose weight `W [K, N]` is a constant reads it quantized.

Per output channel n, symmetric: scale[n] = max_k |W[k, n]| / 127, q = round(W / scale) in [-127, 127].

- `qdq` form (standard ONNX, what TensorRT 11 imports): int8 constant → `DequantizeLinear(q, scale,
  axis=1)` (zero point absent, i.e. 0) → MatMul. The scale has the weight's float type.
- `matmulnbits` form (ONNX Runtime): `com.microsoft.MatMulNBits(bits=8)` with the same per-channel
  numbers written as blocks of `block_size` along K (every block of a column shares the column's
  scale; values stored offset by 128 as uint8, ORT's default zero point for 8 bits).

Both quantized tensors are `ir.LazyTensor`s computed from one weight when the model is saved.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._tensors import release

OPS = {"qdq": "DequantizeLinear", "matmulnbits": "MatMulNBits"}


def quantize(w: np.ndarray, block_bytes: int = 32 << 20) -> tuple[np.ndarray, np.ndarray]:
    """(int8 q [K, N], float32 scale [N]) with W ≈ q * scale, computed a block of rows at a time so that
    no float32 copy of a large weight exists."""
    k, n = w.shape
    rows = max(1, block_bytes // (4 * n))
    peak = np.zeros(n, np.float32)
    for start in range(0, k, rows):
        np.maximum(peak, np.abs(w[start:start + rows].astype(np.float32)).max(axis=0), out=peak)
    scale = np.where(peak == 0, 1.0, peak / 127.0).astype(np.float32)
    q = np.empty((k, n), np.int8)
    for start in range(0, k, rows):
        q[start:start + rows] = np.clip(np.rint(w[start:start + rows].astype(np.float32) / scale), -127, 127)
    return q, scale


def _quantized(t: ir.TensorProtocol) -> tuple[np.ndarray, np.ndarray]:
    try:
        return quantize(t.numpy())
    finally:
        release(t)


def _weight(value: ir.Value | None) -> ir.TensorProtocol | None:
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    ok = value.shape is not None and value.shape.rank() == 2 and value.const_value.dtype in (
        ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    return value.const_value if ok else None


def _initializer(graph: ir.Graph, name: str, lazy: ir.LazyTensor) -> ir.Value:
    value = ir.Value(name=name, shape=lazy.shape, type=ir.TensorType(lazy.dtype), const_value=lazy)
    graph.register_initializer(value)
    return value


def _qdq(graph: ir.Graph, node: ir.Node, w: ir.Value) -> None:
    t = w.const_value
    k, n = w.shape
    q = _initializer(graph, f"{w.name}.int8", ir.LazyTensor(
        lambda: ir.tensor(_quantized(t)[0]), dtype=ir.DataType.INT8, shape=ir.Shape([k, n])))
    scale = _initializer(graph, f"{w.name}.scale", ir.LazyTensor(
        lambda: ir.tensor(_quantized(t)[1].astype(t.dtype.numpy())), dtype=t.dtype, shape=ir.Shape([n])))
    dq = ir.node("DequantizeLinear", [q, scale], attributes={"axis": 1}, name=f"{w.name}/DequantizeLinear")
    dq.outputs[0].type, dq.outputs[0].shape = ir.TensorType(t.dtype), ir.Shape([k, n])
    graph.insert_before(node, dq)
    node.replace_input_with(1, dq.outputs[0])


def _nbits_blocks(t: ir.TensorProtocol, block: int) -> tuple[np.ndarray, np.ndarray]:
    q, scale = _quantized(t)
    k, n = q.shape
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), np.int16)
    padded[:k] = q
    packed = (padded.T.reshape(n, blocks, block) + 128).astype(np.uint8)
    return packed, np.repeat(scale[:, None], blocks, axis=1).astype(t.dtype.numpy())


def _matmulnbits(graph: ir.Graph, node: ir.Node, w: ir.Value, block: int) -> ir.Node:
    t = w.const_value
    k, n = w.shape
    blocks = -(-k // block)
    b = _initializer(graph, f"{w.name}.q8", ir.LazyTensor(
        lambda: ir.tensor(_nbits_blocks(t, block)[0]), dtype=ir.DataType.UINT8, shape=ir.Shape([n, blocks, block])))
    scales = _initializer(graph, f"{w.name}.scales", ir.LazyTensor(
        lambda: ir.tensor(_nbits_blocks(t, block)[1]), dtype=t.dtype, shape=ir.Shape([n, blocks])))
    fused = ir.node("MatMulNBits", [node.inputs[0], b, scales], domain="com.microsoft",
                    attributes={"K": k, "N": n, "bits": 8, "block_size": block, "accuracy_level": 4},
                    name=f"{w.name}/MatMulNBits")
    out = fused.outputs[0]
    out.type, out.shape = node.outputs[0].type, node.outputs[0].shape
    graph.insert_before(node, fused)
    name = node.outputs[0].name
    ir.convenience.replace_all_uses_with(node.outputs[0], out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    out.name = name  # `logits` keeps its contract name
    return fused


def apply(model: ir.Model, form: str = "qdq", block_size: int = 32) -> int:
    """Quantize every constant-weight MatMul; returns how many."""
    if form not in OPS:
        raise ValueError(f"unknown int8 form {form!r}; use one of {sorted(OPS)}")
    graph = model.graph
    done = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain != "" or _weight(node.inputs[1]) is None:
            continue
        w = node.inputs[1]
        if form == "qdq":
            _qdq(graph, node, w)
        else:
            _matmulnbits(graph, node, w, block_size)
            model.opset_imports.setdefault("com.microsoft", 1)
        if not w.uses():
            graph.initializers.pop(w.name)
        done += 1
    return done
