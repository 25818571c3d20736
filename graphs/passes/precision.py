"""fp32 graph → fp16 or bf16, with the numerically sensitive parts kept in fp32.

Every float32 tensor becomes the target type — graph inputs (the caches), activations, weights, constants,
`Cast(to=FLOAT)` — except these, which stay fp32 with a Cast at each edge into and out of them:
- the rope angles: everything the Cos/Sin of the positions is computed from, Cos/Sin themselves and an
  elementwise scaling by a constant right after them (fp16 positions × frequencies lose whole radians);
- the RMSNorm statistics: Pow → ReduceMean → Add ε → Sqrt → Reciprocal → Mul x (fp16 squares overflow
  past 256), and a fused `RMSNormalization` gets `stash_type` 1; a standalone Softmax;
- the logits: the last projection's result is cast to a float32 `logits` output.
Standard `Attention` is asked for an fp32 softmax (`softmax_precision`), except for TensorRT, whose ONNX
parser refuses any Attention that carries the attribute (onnx-tensorrt `onnxOpCheckers.cpp`,
`DEFINE_OP_CHECKER(Attention)`); its fused attention kernels accumulate Q·Kᵀ and the softmax in fp32 on
their own (docs/tensorrt.md, "fp16 attention"). A weight that is already stored
in the target type is kept as it is (the export streams weights in their final type into the fp32 trace);
an fp32 weight is converted lazily, while the model is saved, with values beyond the type's range
saturated to its largest finite value (a mask's "lowest" bias stays finite).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

FLOAT = ir.DataType.FLOAT
TARGETS = {"float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}
ELEMENTWISE = {"Mul", "Div", "Add", "Sub"}
NOT_FLOAT = {"Shape", "Size", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "ArgMax", "ArgMin",
             "NonZero", "IsNaN", "IsInf", "Not", "And", "Or", "Xor"}


def _constant(value: ir.Value | None) -> bool:
    return value is not None and (value.const_value is not None or
                                  (value.producer() is not None and value.producer().op_type == "Constant"))


def _rope_nodes(graph: ir.Graph) -> set[ir.Node]:
    """Cos/Sin of the positions, all they are computed from, and constant scalings right after them."""
    pinned: set[ir.Node] = set()
    for node in graph:
        if node.op_type not in ("Cos", "Sin") or node.domain != "":
            continue
        stack = [node]
        while stack:
            current = stack.pop()
            if current in pinned:
                continue
            pinned.add(current)
            stack.extend(v.producer() for v in current.inputs if v is not None and v.producer() is not None)
        out = node.outputs[0]
        while len(out.uses()) == 1:  # cos · attention_scaling
            user = next(iter(out.uses())).node
            if user.op_type not in ELEMENTWISE or not all(v is out or _constant(v) for v in user.inputs):
                break
            pinned.add(user)
            out = user.outputs[0]
    return pinned


def _rms_statistics(graph: ir.Graph) -> set[ir.Node]:
    """Pow(x, 2) → ReduceMean → … → Mul(x, ·) of each decomposed RMSNorm."""
    pinned: set[ir.Node] = set()
    for node in graph:
        if node.op_type != "ReduceMean" or node.inputs[0] is None:
            continue
        power = node.inputs[0].producer()
        if power is None or power.op_type != "Pow":
            continue
        x, chain, out = power.inputs[0], [power, node], node.outputs[0]
        while len(out.uses()) == 1:
            user = next(iter(out.uses())).node
            chain.append(user)
            if user.op_type == "Mul" and x in user.inputs:
                pinned.update(chain)
                break
            if user.op_type not in ("Add", "Sqrt", "Reciprocal", "Div"):
                break
            out = user.outputs[0]
    return pinned


def _complete_float_types(graph: ir.Graph) -> None:
    """Give untyped float outputs (a trace leaves some) a type, so that every float edge is seen: an output
    is float when its node reads a float and is not one that makes integers or booleans of it."""
    floats = {FLOAT, *TARGETS.values()}
    for node in graph:
        for out in node.outputs:
            if out.type is not None:
                continue
            if node.op_type == "Cast":
                to = ir.DataType(node.attributes.get_int("to"))
                if to in floats:
                    out.type = ir.TensorType(to)
            elif node.op_type == "SplitToSequence":
                if node.inputs[0] is not None and node.inputs[0].dtype in floats:
                    out.type = ir.SequenceType(ir.TensorType(FLOAT))
            elif node.op_type == "CastLike":
                if node.inputs[1] is not None and node.inputs[1].dtype in floats:
                    out.type = ir.TensorType(node.inputs[1].dtype)
            elif node.op_type in ("Constant", "ConstantOfShape") and "value" in node.attributes:
                out.type = ir.TensorType(node.attributes["value"].value.dtype)
            elif node.op_type not in NOT_FLOAT and any(v is not None and v.dtype in floats for v in node.inputs):
                out.type = ir.TensorType(FLOAT)


def _converted(tensor: ir.TensorProtocol, dtype: ir.DataType) -> ir.TensorProtocol:
    """`tensor` (float32) in `dtype`, computed when read; values beyond the range saturate."""
    target = dtype.numpy()
    limit = float(ml_dtypes.finfo(target).max)

    def convert() -> ir.Tensor:
        return ir.tensor(np.clip(tensor.numpy(), -limit, limit).astype(target), name=tensor.name)
    return ir.LazyTensor(convert, dtype=dtype, shape=tensor.shape, name=tensor.name)


def apply(model: ir.Model, dtype_name: str, softmax_precision: bool = True) -> int:
    """Convert the float32 graph to `dtype_name` (float16 or bfloat16); returns how many fp32 islands
    (rope angles, RMSNorm statistics, softmax, logits) were kept. `softmax_precision=False` leaves
    `Attention` without the attribute (the trt target: TensorRT's parser rejects it)."""
    if dtype_name not in TARGETS:
        raise ValueError(f"cannot convert to {dtype_name!r}; use one of {', '.join(TARGETS)}")
    dtype = TARGETS[dtype_name]
    graph = model.graph
    _complete_float_types(graph)
    pinned = _rope_nodes(graph) | _rms_statistics(graph)
    pinned |= {n for n in graph if n.op_type == "Softmax" and n.domain == ""}

    def retype(value: ir.Value) -> None:
        sequence = isinstance(value.type, ir.SequenceType)
        value.type = ir.SequenceType(ir.TensorType(dtype)) if sequence else ir.TensorType(dtype)

    for value in graph.inputs:
        if value.dtype == FLOAT:
            retype(value)
    for value in graph.initializers.values():
        if value.dtype == FLOAT and not all(use.node in pinned for use in value.uses()):
            value.const_value = _converted(value.const_value, dtype)
            retype(value)
    for node in graph:
        if node in pinned:
            continue
        for out in node.outputs:
            if out.dtype == FLOAT:
                retype(out)
        attributes = node.attributes
        if node.op_type == "Cast" and attributes.get_int("to") == FLOAT:
            attributes["to"] = ir.AttrInt64("to", dtype)
        elif node.op_type in ("Constant", "ConstantOfShape") and "value" in attributes \
                and attributes["value"].value.dtype == FLOAT:
            attributes["value"] = ir.AttrTensor("value", _converted(attributes["value"].value, dtype))
        elif node.op_type == "Attention" and node.domain == "" and softmax_precision:
            attributes["softmax_precision"] = ir.AttrInt64("softmax_precision", FLOAT)
        elif node.op_type == "RMSNormalization" and node.domain == "":
            attributes["stash_type"] = ir.AttrInt64("stash_type", FLOAT)

    casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}

    def cast(value: ir.Value, to: ir.DataType) -> ir.Value:
        if (value, to) not in casts:
            node = ir.node("Cast", [value], attributes={"to": to}, name=f"{value.name}/to_{to.name.lower()}")
            out = node.outputs[0]
            out.name, out.type, out.shape = f"{value.name}/{to.name.lower()}", ir.TensorType(to), value.shape
            producer = value.producer()
            if producer is not None:
                graph.insert_after(producer, node)
            else:
                graph.insert_before(graph.node(0), node)
            casts[(value, to)] = out
        return casts[(value, to)]

    for node in list(graph):  # the casts this adds are not in the list
        want = FLOAT if node in pinned else dtype
        for i, value in enumerate(node.inputs):
            if value is not None and isinstance(value.type, ir.TensorType) and value.dtype in (FLOAT, dtype) \
                    and value.dtype != want:
                node.replace_input_with(i, cast(value, want))
    for i, out in enumerate(graph.outputs):  # logits stay float32
        if out.name == "logits" and out.dtype == dtype:
            name = out.name
            out.name = f"{name}/{dtype.name.lower()}"
            logits = cast(out, FLOAT)
            logits.name = name
            graph.outputs[i] = logits
    return len({n for n in pinned if n.op_type in ("Cos", "ReduceMean", "Softmax")}) + 1
