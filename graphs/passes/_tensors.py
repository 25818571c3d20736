"""Weights that passes create or read, kept out of memory: row-block writing and unmapping."""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np
import onnx_ir as ir


class RowBlockTensor(ir.LazyTensor):
    """A lazily computed tensor that `ir.save` writes a block of rows (along its first axis) at a time."""

    def __init__(self, blocks: Callable[[], Iterator[np.ndarray]], dtype: ir.DataType, shape: ir.Shape):
        super().__init__(lambda: ir.tensor(np.concatenate(list(blocks()), axis=0)), dtype=dtype, shape=shape)
        self.blocks = blocks

    def tofile(self, file) -> None:
        for block in self.blocks():
            file.write(np.ascontiguousarray(block).tobytes())


class ColumnConcat(RowBlockTensor):
    """The column-wise concatenation of 2-D `parts` (a packed weight), written a block of rows at a time; the
    parts stay reachable, so that a later pass can read the concatenation another way (by columns)."""

    def __init__(self, parts: list[ir.TensorProtocol], block_bytes: int = 32 << 20):
        rows, cols = parts[0].shape[0], sum(t.shape[1] for t in parts)
        step = max(1, int(block_bytes // (cols * parts[0].dtype.itemsize)))

        def blocks() -> Iterator[np.ndarray]:
            for start in range(0, rows, step):
                yield np.concatenate([t.numpy()[start:start + step] for t in parts], axis=1)
                for t in parts:  # unmap the sources: mapped pages would otherwise stay resident
                    release(t)
        super().__init__(blocks, parts[0].dtype, ir.Shape([rows, cols]))
        self.parts = parts


def column_parts(t: ir.TensorProtocol) -> list[ir.TensorProtocol]:
    """A 2-D tensor as the column blocks it is the concatenation of (itself, unless it is a `ColumnConcat`)."""
    return list(t.parts) if isinstance(t, ColumnConcat) else [t]


def release(t: ir.TensorProtocol) -> None:
    """Unmap an external tensor once read (a no-op while someone still holds a view of it)."""
    if isinstance(t, ir.ExternalTensor):
        try:
            t.release()
        except BufferError:
            pass


def constant_matrix(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor behind a 2-D constant initializer (a MatMul weight), else None."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value if value.shape is not None and value.shape.rank() == 2 else None


def add_initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


class NodeBuilder:
    """Appends nodes before `anchor`, naming their outputs `<prefix>/<op>_<n>`; `const` adds initializers."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, prefix: str):
        self.graph, self.anchor, self.prefix, self.count = graph, anchor, prefix, 0

    def __call__(self, op: str, inputs: list, dtype: ir.DataType, shape: list, **attributes) -> ir.Value:
        self.count += 1
        name = f"{self.prefix}/{op}_{self.count}"
        node = ir.node(op, inputs, attributes=attributes, name=name)
        out = node.outputs[0]
        out.name, out.type, out.shape = name, ir.TensorType(dtype), ir.Shape(shape)
        self.graph.insert_before(self.anchor, node)
        return out

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        return add_initializer(self.graph, f"{self.prefix}/{name}", ir.tensor(array))


WeightOf = Callable[[Optional[ir.Value]], Optional[ir.TensorProtocol]]


def constant_matmuls(graph: ir.Graph, weight: WeightOf = constant_matrix) -> dict[ir.Value, list[ir.Node]]:
    """Activation → the standard MatMuls that read it with a constant weight (`weight(value)` not None)."""
    groups: dict[ir.Value, list[ir.Node]] = {}
    for node in graph:
        if node.op_type == "MatMul" and node.domain == "" and weight(node.inputs[1]) is not None:
            groups.setdefault(node.inputs[0], []).append(node)
    return groups
