"""float32 MatMuls with constant weights → 1×1 Conv over the rows (ort target only).

ONNX Runtime's CPU MatMul runs its SGEMM on a prepacked copy of the weight; its NCHWc pointwise Conv (x86, the
weight reordered into channel blocks when the session loads) reads a weight faster when there are few rows, as in
a decode step. Measured here (2 threads, 2 AMD EPYC cores, 2048×5632 / 5632×2048 weights, huge pages): 21.3 vs
26.9 GB/s with one row, 17.6 vs 23.5 with four, the same at 128 rows, and 1.2× slower at 512 rows. So each
MatMul whose weight is a constant float32 `[K, N]` matrix becomes

    Reshape(x, [1, 1, rows, K]) → Transpose(0 3 1 2) → Conv(W as [N, K, 1, 1]) → Transpose(0 2 3 1)
    → Reshape(leading dims of x + [N])

the rows as the width of a one-pixel-high NHWC image. ONNX Runtime folds both Transposes into the NCHWc
reorders it puts around the Conv (`ReorderInput` / `ReorderOutput` with `channels_last`); on a CPU without NCHWc
kernels it runs the Conv as a GEMM. The output's shape is computed once for every activation of the same leading
dims (`[batch, sequence_length]`, as shape inference names them) and output width, not once per MatMul: a Llama
step then runs two Shape nodes (the layers' rows, the kept positions') and four Concat nodes (qkv, hidden, gate/up
and vocab widths) instead of one of each per projection. Only the ort target takes this pass: TensorRT and the
standard-ONNX target keep their MatMuls, and float16 / bfloat16 weights (no NCHWc kernel) and quantized ones are
left alone.

The Conv weight is the MatMul weight transposed, an `ir.LazyTensor` that the save writes a block of rows at a
time from column blocks of the source (of each source, for a packed qkv or gate/up weight), so no weight is held
whole.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx_ir as ir

from ._tensors import NodeBuilder, RowBlockTensor, add_initializer, column_parts, constant_matrix, release

INT64 = ir.DataType.INT64


def _transposed_blocks(parts: list[ir.TensorProtocol], block_bytes: int = 32 << 20) -> Iterator[np.ndarray]:
    """Row blocks of the transpose of the column-wise concatenation of `parts`, shaped [rows, K, 1, 1]."""
    for part in parts:
        k, n = part.shape
        step = max(1, int(block_bytes // (k * part.dtype.itemsize)))
        for start in range(0, n, step):
            block = part.numpy()[:, start:start + step]
            yield np.ascontiguousarray(block.T).reshape(block.shape[1], k, 1, 1)
            release(part)  # unmap: mapped pages would otherwise stay resident


def conv_weight(weight: ir.TensorProtocol) -> RowBlockTensor:
    """`[K, N]` → the Conv weight `[N, K, 1, 1]`, computed while it is saved."""
    k, n = weight.shape
    parts = column_parts(weight)
    return RowBlockTensor(lambda: _transposed_blocks(parts), weight.dtype, ir.Shape([n, k, 1, 1]))


def _leading_dims(x: ir.Value) -> tuple | ir.Value:
    """The key of `x`'s dims but the last: the dims themselves where each is a number or a named symbol (equal
    names are equal sizes), else `x` itself."""
    dims = [d if isinstance(d, int) else d.value for d in list(x.shape)[:-1]]
    return x if any(d is None for d in dims) else tuple(dims)


def apply(model: ir.Model) -> int:
    graph = model.graph
    # activation → its rows as a [1, K, 1, rows] image, and MatMul weight → its Conv weight: one of each, however
    # many MatMuls read them; leading dims → their shape, and (leading dims, output width) → the output's shape
    views: dict[ir.Value, ir.Value] = {}
    leadings: dict[tuple | ir.Value, ir.Value] = {}
    shapes: dict[tuple, ir.Value] = {}
    convs: dict[ir.Value, ir.Value] = {}
    converted = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain != "":
            continue
        x, source, out = node.inputs[0], node.inputs[1], node.outputs[0]
        weight = constant_matrix(source)
        if weight is None or weight.dtype != ir.DataType.FLOAT or x.shape is None or x.shape.rank() < 2:
            continue
        k, n = weight.shape
        name = source.name
        b = NodeBuilder(graph, node, f"{name}/conv")
        if x not in views:
            rows = b("Reshape", [x, b.const("nhwc", np.array([1, 1, -1, k], np.int64))], ir.DataType.FLOAT,
                     [1, 1, "rows", k])
            views[x] = b("Transpose", [rows], ir.DataType.FLOAT, [1, k, 1, "rows"], perm=[0, 3, 1, 2])
        lead = _leading_dims(x)
        if lead not in leadings:
            leadings[lead] = b("Shape", [x], INT64, [x.shape.rank() - 1], end=-1)
        if (lead, n) not in shapes:
            shapes[lead, n] = b("Concat", [leadings[lead], b.const("n", np.array([n], np.int64))], INT64,
                                [x.shape.rank()], axis=0)
        if source not in convs:
            convs[source] = add_initializer(graph, f"{name}.conv", conv_weight(weight))
        conv = b("Conv", [views[x], convs[source]], ir.DataType.FLOAT, [1, n, 1, "rows"])
        nhwc = b("Transpose", [conv], ir.DataType.FLOAT, [1, 1, "rows", n], perm=[0, 2, 3, 1])
        y = b("Reshape", [nhwc, shapes[lead, n]], ir.DataType.FLOAT, [])
        y.shape, y.type = out.shape, out.type
        was_output, out_name = out.is_graph_output(), out.name
        out.replace_all_uses_with(y, replace_graph_outputs=True)
        if was_output:  # the graph output keeps its name (logits)
            out.name, y.name = f"{out_name}.matmul", out_name
        graph.remove(node, safe=True)
        if not source.uses():
            graph.initializers.pop(name)
        converted += 1
    return converted
