"""Weight-only int8: every MatMul whose weight `W [K, N]` is a constant reads it quantized.

Per output channel n, symmetric: scale[n] = max_k |W[k, n]| / 127, q = round(W / scale) in [-127, 127].

- `qdq` form (standard ONNX, what TensorRT 11 imports): int8 constant → `DequantizeLinear(q, scale,
  axis=1)` (zero point absent, i.e. 0) → MatMul. The scale has the weight's float type.
- `matmulnbits` form (ONNX Runtime): `com.microsoft.MatMulNBits(bits=8)` with the same per-channel
  numbers written as blocks of `block_size` along K (every block of a column shares the column's
  scale; values stored offset by 128 as uint8, ORT's default zero point for 8 bits).

- int4 (`--int4`, ONNX Runtime only): `MatMulNBits(bits=4)` with a symmetric scale per block of
  `block_size` rows of a column, scale = max |W| / 7, q in [-7, 7] stored + 8 (ORT's default 4-bit zero
  point), two per byte, the first in the low nibble.

All quantized tensors are `ir.LazyTensor`s computed from one weight when the model is saved.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from ._tensors import add_initializer, constant_matrix, release

OPS = {"qdq": "DequantizeLinear", "matmulnbits": "MatMulNBits"}


FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _row_blocks(w: np.ndarray, block_bytes: int = 32 << 20):
    """Float32 copies of `w`'s rows, a block at a time: no float32 copy of a large weight exists whole."""
    rows = max(1, block_bytes // (4 * w.shape[1]))
    for start in range(0, w.shape[0], rows):
        yield start, w[start:start + rows].astype(np.float32)


# The smallest scale a type stores as a normal number. An fp16 scale of a column of tiny weights (peak below
# 127 × 6.1e-5) would round to a subnormal or to 0, and TensorRT's parser refuses a scale that is not > 0
# (onnx-tensorrt `QuantDequantLinearHelper`): such columns are quantized on this floor instead.
SCALE_FLOOR = {ir.DataType.FLOAT16: float(np.finfo(np.float16).tiny)}


def scales(w: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """float32 scale [N]: max_k |W[k, n]| / 127, at least `floor` (1 for an all-zero column)."""
    peak = np.zeros(w.shape[1], np.float32)
    for _, block in _row_blocks(w):
        np.maximum(peak, np.abs(block).max(axis=0), out=peak)
    return np.where(peak == 0, 1.0, np.maximum(peak / 127.0, floor)).astype(np.float32)


def quantize(w: np.ndarray, floor: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(int8 q [K, N], float32 scale [N]) with W ≈ q * scale."""
    scale = scales(w, floor)
    q = np.empty(w.shape, np.int8)
    for start, block in _row_blocks(w):
        q[start:start + len(block)] = np.clip(np.rint(block / scale), -127, 127)
    return q, scale


def read_weight(t: ir.TensorProtocol, fn):
    """`fn` of the weight's array, unmapping it afterwards."""
    try:
        return fn(t.numpy())
    finally:
        release(t)


def float_weight(value: ir.Value | None) -> ir.TensorProtocol | None:
    t = constant_matrix(value)
    return t if t is not None and t.dtype in FLOATS else None


def qdq(graph: ir.Graph, node: ir.Node, w: ir.Value, read: Callable[[Callable], Any] | None = None) -> None:
    """Make `node` read its weight `w` as int8 → DequantizeLinear(axis=1). `read(fn)` gives `fn` of the
    weight's array (default: `w`'s own tensor; SmoothQuant passes its rescaled weight)."""
    t = w.const_value
    read = read or (lambda fn: read_weight(t, fn))
    k, n = w.shape
    floor = SCALE_FLOOR.get(t.dtype, 0.0)
    q = add_initializer(graph, f"{w.name}.int8", ir.LazyTensor(
        lambda: ir.tensor(read(lambda a: quantize(a, floor))[0]), dtype=ir.DataType.INT8, shape=ir.Shape([k, n])))
    scale = add_initializer(graph, f"{w.name}.scale", ir.LazyTensor(  # one read pass, no quantizing
        lambda: ir.tensor(read(lambda a: scales(a, floor)).astype(t.dtype.numpy())), dtype=t.dtype,
        shape=ir.Shape([n])))
    dq = ir.node("DequantizeLinear", [q, scale], attributes={"axis": 1}, name=f"{w.name}/DequantizeLinear")
    dq.outputs[0].type, dq.outputs[0].shape = ir.TensorType(t.dtype), ir.Shape([k, n])
    graph.insert_before(node, dq)
    node.replace_input_with(1, dq.outputs[0])


def _nbits_weight(t: ir.TensorProtocol, block: int) -> np.ndarray:
    """uint8 [N, blocks, block]: the int8 values + 128, K padded with zeros to whole blocks."""
    q = read_weight(t, quantize)[0]
    k, n = q.shape
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), np.int16)
    padded[:k] = q
    return (padded.T.reshape(n, blocks, block) + 128).astype(np.uint8)


def _nbits_scales(t: ir.TensorProtocol, block: int) -> np.ndarray:
    """[N, blocks]: every block of a column carries the column's scale."""
    blocks = -(-t.shape[0] // block)
    return np.repeat(read_weight(t, scales)[:, None], blocks, axis=1).astype(t.dtype.numpy())


def int4_blocks(w: np.ndarray, block: int, column_bytes: int = 32 << 20,
                codes: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """(uint8 [N, blocks, block/2] packed codes, float32 scales [N, blocks]) of `w [K, N]`, computed a chunk
    of columns at a time (no float32 copy of a large weight exists whole); K is zero-padded to whole blocks.
    With `codes` False only the scales are computed (the codes are None)."""
    k, n = w.shape
    blocks = -(-k // block)
    packed = np.empty((n, blocks, block // 2), np.uint8) if codes else None
    block_scales = np.empty((n, blocks), np.float32)
    step = max(1, column_bytes // (4 * blocks * block))
    for start in range(0, n, step):
        cols = np.zeros((blocks * block, min(step, n - start)), np.float32)
        cols[:k] = w[:, start:start + step]
        grouped = cols.T.reshape(-1, blocks, block)  # [columns, blocks, block]
        peak = np.abs(grouped).max(axis=2)
        scale = np.where(peak == 0, 1.0, peak / 7.0).astype(np.float32)
        block_scales[start:start + len(scale)] = scale
        if codes:
            q = (np.clip(np.rint(grouped / scale[..., None]), -7, 7) + 8).astype(np.uint8)
            packed[start:start + len(scale)] = q[..., 0::2] | (q[..., 1::2] << 4)
    return packed, block_scales


def _matmulnbits(graph: ir.Graph, node: ir.Node, w: ir.Value, block: int, bits: int = 8) -> ir.Node:
    t = w.const_value
    k, n = w.shape
    blocks = -(-k // block)
    if bits == 4:
        # codes and scales each from their own read of the weight; the scales' read packs no codes
        b = add_initializer(graph, f"{w.name}.q4", ir.LazyTensor(
            lambda: ir.tensor(read_weight(t, lambda a: int4_blocks(a, block)[0])), dtype=ir.DataType.UINT8,
            shape=ir.Shape([n, blocks, block // 2])))
        block_scales = add_initializer(graph, f"{w.name}.scales", ir.LazyTensor(
            lambda: ir.tensor(read_weight(t, lambda a: int4_blocks(a, block, codes=False)[1]).astype(t.dtype.numpy())),
            dtype=t.dtype, shape=ir.Shape([n, blocks])))
    else:
        b = add_initializer(graph, f"{w.name}.q8", ir.LazyTensor(
            lambda: ir.tensor(_nbits_weight(t, block)), dtype=ir.DataType.UINT8, shape=ir.Shape([n, blocks, block])))
        block_scales = add_initializer(graph, f"{w.name}.scales", ir.LazyTensor(
            lambda: ir.tensor(_nbits_scales(t, block)), dtype=t.dtype, shape=ir.Shape([n, blocks])))
    fused = ir.node("MatMulNBits", [node.inputs[0], b, block_scales], domain="com.microsoft",
                    attributes={"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": 4},
                    name=f"{w.name}/MatMulNBits")
    out = fused.outputs[0]
    out.type, out.shape = node.outputs[0].type, node.outputs[0].shape
    graph.insert_before(node, fused)
    name = node.outputs[0].name
    ir.convenience.replace_all_uses_with(node.outputs[0], out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    out.name = name  # `logits` keeps its contract name
    return fused


def apply(model: ir.Model, form: str = "qdq", block_size: int = 32, bits: int = 8) -> int:
    """Quantize every constant-weight MatMul; returns how many (`bits` 4: the matmulnbits form only)."""
    if form not in OPS:
        raise ValueError(f"unknown int8 form {form!r}; use one of {sorted(OPS)}")
    if bits not in (8, 4) or (bits == 4 and form != "matmulnbits"):
        raise ValueError(f"bits={bits}: int8 has both forms, int4 only matmulnbits")
    graph = model.graph
    done = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain != "" or float_weight(node.inputs[1]) is None:
            continue
        w = node.inputs[1]
        if form == "qdq":
            qdq(graph, node, w)
        else:
            _matmulnbits(graph, node, w, block_size, bits)
            model.opset_imports.setdefault("com.microsoft", 1)
        if not w.uses():
            graph.initializers.pop(w.name)
        done += 1
    return done
