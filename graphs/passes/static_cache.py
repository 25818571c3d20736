"""Static KV cache: fixed-size cache buffers updated in place by opset-24 `TensorScatter`.

The portable graph grows its cache: `present = Concat(past, new)`. This rewrite gives every cache input the
fixed shape `[batch, kv_heads, max_sequence_length, head_dim]` and writes the step's keys/values into it:

    present.i.key = TensorScatter(past_key_values.i.key, new_key, write_indices, axis=2)

so each present output has its past input's shape and can alias it (TensorRT's KV-cache-update layer;
ONNX Runtime updates in place when the same buffer is bound as both). A new input `write_indices`
(int64 `[batch]`) says where the step's first token goes; `attention_mask` becomes `[batch,
max_sequence_length]`, 1 on the slots that hold real tokens. Attention reads all slots through an
explicit 4-D mask: key slot j is visible to the query at slot q = write_indices + i when j ≤ q and the
slot is real (and always j = q, so that a padding query never sees an all-masked row).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._tensors import NodeBuilder

OPSET = 24  # TensorScatter
INT64, BOOL = ir.DataType.INT64, ir.DataType.BOOL


def _mask(graph: ir.Graph, anchor: ir.Node, input_ids: ir.Value, attention_mask: ir.Value, write: ir.Value,
          max_seq: int) -> ir.Value:
    """bool [batch, 1, sequence_length, max_sequence_length]."""
    b = NodeBuilder(graph, anchor, "static_mask")
    zero, one, length = (b.const(name, np.array(value, np.int64))
                         for name, value in (("zero", 0), ("one", 1), ("max_sequence_length", max_seq)))
    axis0, axis1, axis2 = (b.const(f"axis{i}", np.array([i], np.int64)) for i in range(3))
    slots = b("Range", [zero, length, one], INT64, [max_seq])
    seq = b("Squeeze", [b("Shape", [input_ids], INT64, [1], start=1, end=2), axis0], INT64, [])
    steps = b("Range", [zero, seq, one], INT64, ["sequence_length"])
    query = b("Add", [b("Unsqueeze", [write, axis1], INT64, ["batch", 1]), steps], INT64, ["batch", "sequence_length"])
    query = b("Unsqueeze", [query, axis2], INT64, ["batch", "sequence_length", 1])
    shape = ["batch", "sequence_length", max_seq]
    causal = b("LessOrEqual", [slots, query], BOOL, shape)
    real = b("Unsqueeze", [b("Cast", [attention_mask], BOOL, ["batch", max_seq], to=BOOL), axis1], BOOL,
             ["batch", 1, max_seq])
    allowed = b("Or", [b("And", [causal, real], BOOL, shape), b("Equal", [slots, query], BOOL, shape)], BOOL, shape)
    return b("Unsqueeze", [allowed, axis1], BOOL, ["batch", 1, "sequence_length", max_seq])


def apply(model: ir.Model, max_seq: int) -> int:
    """Rewrite the portable cache into static buffers of `max_seq` slots; returns how many caches."""
    if max_seq < 1:
        raise ValueError(f"max_sequence_length must be ≥ 1 (got {max_seq})")
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    if "write_indices" in inputs:
        return 0
    missing = {"input_ids", "attention_mask"} - set(inputs)
    if missing:
        raise ValueError(f"not a portable graph: no {sorted(missing)} input")
    concats = [n for n in graph if n.op_type == "Concat" and n.inputs[0] is not None and n.inputs[0].is_graph_input()
               and n.inputs[0].name.startswith("past_key_values.") and n.outputs[0].is_graph_output()]
    attentions = [n for n in graph if n.op_type == "Attention"]
    if not concats or not attentions:
        raise ValueError("not a portable graph: no Concat(past_key_values.*, new) → present.* cache update "
                         "or no Attention node to mask")
    write = ir.Value(name="write_indices", type=ir.TensorType(INT64), shape=ir.Shape(["batch"]))
    graph.inputs.insert(graph.inputs.index(inputs["position_ids"]) + 1 if "position_ids" in inputs else 1, write)
    for concat in concats:
        past, new = concat.inputs[0], concat.inputs[1]
        dims = list(past.shape)
        past.shape = ir.Shape([dims[0], dims[1], max_seq, dims[3]])
        scatter = ir.node("TensorScatter", [past, new, write], attributes={"axis": 2, "mode": "linear"},
                          name=f"{concat.outputs[0].name}/TensorScatter")
        out = scatter.outputs[0]
        out.type, out.shape = past.type, past.shape
        graph.insert_before(concat, scatter)
        name = concat.outputs[0].name
        ir.convenience.replace_all_uses_with(concat.outputs[0], out, replace_graph_outputs=True)
        graph.remove(concat, safe=True)
        out.name = name
    mask_in = inputs["attention_mask"]
    mask_in.shape = ir.Shape([mask_in.shape[0], max_seq])
    mask = _mask(graph, attentions[0], inputs["input_ids"], mask_in, write, max_seq)
    for node in attentions:
        if len(node.inputs) < 4:
            raise ValueError(f"{node.name}: Attention without a mask input")
        node.replace_input_with(3, mask)
    model.opset_imports[""] = max(model.opset_imports.get("", OPSET), OPSET)
    return len(concats)
