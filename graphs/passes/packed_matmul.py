"""Packed projections: MatMuls that read the same activation with constant weights become one MatMul
on the weights concatenated along their output axis, followed by a Split.

In a Llama layer this packs q/k/v (one `qkv_proj` GEMM/GEMV instead of three) and gate/up (one
`gateup_proj`; SiLU(gate)·up then reads the two halves of the Split). The packed weight is an
`ir.LazyTensor` (`ColumnConcat`) that the save writes a block of rows at a time (a 70B gate/up pair is 940 MB
in fp16: it is never held whole, and the sources are unmapped after every block).
"""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir

from ._tensors import ColumnConcat, add_initializer, constant_matmuls


def _packed_name(names: list[str]) -> str:
    prefix = os.path.commonprefix(names)
    suffix = os.path.commonprefix([n[len(prefix):][::-1] for n in names])[::-1]
    middle = "".join(n[len(prefix):len(n) - len(suffix)] for n in names)
    return f"{prefix}{middle}{suffix}"


def apply(model: ir.Model) -> int:
    graph = model.graph
    groups = constant_matmuls(graph)
    packed = 0
    for group in groups.values():
        weights = [node.inputs[1] for node in group]
        first = weights[0].const_value
        if len(group) < 2 or any(w.const_value.dtype != first.dtype or w.shape[0] != weights[0].shape[0]
                                 for w in weights):
            continue
        sizes = [w.shape[1] for w in weights]
        lazy = ColumnConcat([w.const_value for w in weights])
        weight = add_initializer(graph, _packed_name([w.name for w in weights]), lazy)
        split_sizes = add_initializer(graph, f"{weight.name}.split", ir.tensor(np.array(sizes, dtype=np.int64)))
        matmul = ir.node("MatMul", [group[0].inputs[0], weight], name=f"{weight.name}/MatMul")
        split = ir.node("Split", [matmul.outputs[0], split_sizes], attributes={"axis": -1},
                        num_outputs=len(group), name=f"{weight.name}/Split")
        for old, new in zip(group, split.outputs):
            new.shape, new.type, new.name = old.outputs[0].shape, old.outputs[0].type, None
        graph.insert_before(group[0], [matmul, split])
        ir.convenience.replace_all_uses_with([n.outputs[0] for n in group], list(split.outputs))
        graph.remove(group, safe=True)
        for w in weights:
            if not w.uses():
                graph.initializers.pop(w.name)
        packed += 1
    return packed
