"""float32 MatMuls with constant weights → 1×1 Conv over the rows (ort target only).

ONNX Runtime's CPU MatMul runs its SGEMM on a prepacked copy of the weight; its NCHWc pointwise Conv (x86, the
weight reordered into channel blocks when the session loads) reads a weight faster when there are few rows, as in
a decode step, and no faster with a prefill's hundreds of rows (measurements: docs/design-pointwise-conv.md). So
each MatMul whose weight is a constant float32 `[K, N]` matrix becomes

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

The vocabulary projection (the MatMul whose output is a graph output: the logits) is split by output channels into
Convs of at most `HEAD_CHUNK_BYTES` of weight each, joined by a Concat on the channel axis, which ONNX Runtime runs
in its NCHWc layout (then one reorder and one Transpose of the logits, where a single Conv's Transpose folds into
its reorder). While a session loads, ONNX Runtime holds transient copies of the Conv weight it is reordering into
NCHWc blocks, several times the weight's size, so the largest weight sets the load's peak memory, and the
vocabulary projection is the largest. Split, it loads with a lower peak and faster, computes the same logits bit
for bit and takes the same decode step. Each chunk stays above glibc's largest dynamic mmap threshold (32 MiB):
smaller ones come from the heap, and their freed transient copies stay there, raising the loaded RSS. The layers'
projections are not split: their Concat would copy a whole prefill's activations. The measurements behind each of
these sentences: docs/design-pointwise-conv.md.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx_ir as ir

from ._tensors import NodeBuilder, RowBlockTensor, add_initializer, column_parts, constant_matrix, release

INT64 = ir.DataType.INT64


HEAD_CHUNK_BYTES = 64 << 20  # the vocabulary projection's Convs: at most this much weight each
CHANNEL_MULTIPLE = 16  # a chunk's output channels: whole NCHWc blocks (8 with AVX2, 16 with AVX-512)


def _transposed_blocks(parts: list[ir.TensorProtocol], block_bytes: int = 32 << 20, start: int = 0,
                       stop: int | None = None) -> Iterator[np.ndarray]:
    """Row blocks of the transpose of columns [start, stop) of the column-wise concatenation of `parts`, shaped
    [rows, K, 1, 1]."""
    offset = 0
    for part in parts:
        k, n = part.shape
        lo, hi = max(start - offset, 0), min(n if stop is None else stop - offset, n)
        step = max(1, int(block_bytes // (k * part.dtype.itemsize)))
        for first in range(lo, hi, step):
            block = part.numpy()[:, first:min(first + step, hi)]
            yield np.ascontiguousarray(block.T).reshape(block.shape[1], k, 1, 1)
            release(part)  # unmap: mapped pages would otherwise stay resident
        offset += n


def conv_weight(weight: ir.TensorProtocol, start: int = 0, stop: int | None = None) -> RowBlockTensor:
    """`[K, N]` → the Conv weight `[N, K, 1, 1]` (of output channels [start, stop) only, when given), computed
    while it is saved."""
    k, n = weight.shape
    stop = n if stop is None else stop
    parts = column_parts(weight)
    return RowBlockTensor(lambda: _transposed_blocks(parts, start=start, stop=stop), weight.dtype,
                          ir.Shape([stop - start, k, 1, 1]))


def chunk_bounds(weight: ir.TensorProtocol, max_bytes: int) -> list[tuple[int, int]]:
    """A `[K, N]` weight's output channels in as few equal ranges (whole multiples of `CHANNEL_MULTIPLE`) as keep
    each range's weight within `max_bytes`; one range when the weight fits."""
    k, n = weight.shape
    count = -(-k * n * int(weight.dtype.itemsize) // max_bytes)
    step = -(-n // count // CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


def _leading_dims(x: ir.Value) -> tuple | ir.Value:
    """The key of `x`'s dims but the last: the dims themselves where each is a number or a named symbol (equal
    names are equal sizes), else `x` itself."""
    dims = [d if isinstance(d, int) else d.value for d in list(x.shape)[:-1]]
    return x if any(d is None for d in dims) else tuple(dims)


def apply(model: ir.Model, head_chunk_bytes: int = HEAD_CHUNK_BYTES) -> int:
    graph = model.graph
    # activation → its rows as a [1, K, 1, rows] image, and MatMul weight → its Conv weight: one of each, however
    # many MatMuls read them; leading dims → their shape, and (leading dims, output width) → the output's shape
    views: dict[ir.Value, ir.Value] = {}
    leadings: dict[tuple | ir.Value, ir.Value] = {}
    shapes: dict[tuple, ir.Value] = {}
    convs: dict[ir.Value, list[ir.Value]] = {}
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
            bounds = chunk_bounds(weight, head_chunk_bytes) if out.is_graph_output() else [(0, n)]
            convs[source] = [add_initializer(graph, f"{name}.conv", conv_weight(weight))] if len(bounds) == 1 else [
                add_initializer(graph, f"{name}.conv.{i}", conv_weight(weight, lo, hi))
                for i, (lo, hi) in enumerate(bounds)]
        chunks = [b("Conv", [views[x], w], ir.DataType.FLOAT, [1, w.shape[0], 1, "rows"]) for w in convs[source]]
        conv = chunks[0] if len(chunks) == 1 else b("Concat", chunks, ir.DataType.FLOAT, [1, n, 1, "rows"], axis=1)
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
