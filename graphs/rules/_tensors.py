"""Weights that passes create or read, kept out of memory: row-block writing and unmapping."""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import onnx_ir as ir


class RowBlockTensor(ir.LazyTensor):
    """A lazily computed 2-D tensor that `ir.save` writes a block of rows at a time."""

    def __init__(self, blocks: Callable[[], Iterator[np.ndarray]], dtype: ir.DataType, shape: ir.Shape):
        super().__init__(lambda: ir.tensor(np.concatenate(list(blocks()), axis=0)), dtype=dtype, shape=shape)
        self.blocks = blocks

    def tofile(self, file) -> None:
        for block in self.blocks():
            file.write(np.ascontiguousarray(block).tobytes())


def release(t: ir.TensorProtocol) -> None:
    """Unmap an external tensor once read (a no-op while someone still holds a view of it)."""
    if isinstance(t, ir.ExternalTensor):
        try:
            t.release()
        except BufferError:
            pass
