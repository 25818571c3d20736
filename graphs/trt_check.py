"""Does an ONNX graph stay inside what TensorRT 11's ONNX parser imports?

The rules come from TensorRT 11's documented parser support, as far as a graph meant for the `trt`
target can break them:
- default-domain opset 9..24, and no operator from another domain (ONNX Runtime's contrib ops);
- `Attention` with a single output and no `past_key` / `past_value` / `nonpad_kv_seqlen` inputs (the
  KV-cache `Concat` stays outside), and an explicit mask whenever query and key lengths may differ;
- `DequantizeLinear` / `QuantizeLinear` symmetric (zero point absent or all zeros) with constant
  scales, and per-channel (a scale with more than one element) only on constant inputs.
INT64 tensors are allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

MIN_OPSET, MAX_OPSET = 9, 24
ATTENTION_PAST_INPUTS = {4: "past_key", 5: "past_value", 6: "nonpad_kv_seqlen"}


@dataclass(frozen=True)
class Violation:
    node: str  # node name (or "model")
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.node}: {self.rule}: {self.detail}"


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto | None]:
    """Names whose value is known when the engine is built: initializers and Constant outputs."""
    out: dict[str, onnx.TensorProto | None] = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            out[node.output[0]] = value
    return out


def _all_zero(tensor: onnx.TensorProto | None) -> bool:
    if tensor is None:
        return False
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return False  # unknowable without reading the weights; zero points are never stored externally by us
    return not np.any(numpy_helper.to_array(tensor))


def _dims(value_info: dict[str, onnx.ValueInfoProto], name: str) -> list | None:
    info = value_info.get(name)
    if info is None or not info.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_param or d.dim_value or None for d in info.type.tensor_type.shape.dim]


def check(model: onnx.ModelProto) -> list[Violation]:
    """Every rule the graph breaks (empty: TensorRT 11's parser can import it)."""
    problems: list[Violation] = []
    opsets = {o.domain: o.version for o in model.opset_import}
    version = opsets.get("", opsets.get("ai.onnx"))
    if version is None or not MIN_OPSET <= version <= MAX_OPSET:
        problems.append(Violation("model", "opset", f"default-domain opset {version} is outside {MIN_OPSET}..{MAX_OPSET}"))
    graph = model.graph
    constants = _constants(graph)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except Exception:  # noqa: BLE001 - shapes only sharpen the attention check
        inferred = graph
    value_info = {v.name: v for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    for i, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}#{i}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(Violation(name, "domain", f"{node.domain}::{node.op_type} is not a standard ONNX operator"))
            continue
        if node.op_type == "Attention":
            problems += _check_attention(name, node, value_info)
        elif node.op_type in ("DequantizeLinear", "QuantizeLinear"):
            problems += _check_qdq(name, node, constants)
    return problems


def _check_attention(name: str, node: onnx.NodeProto, value_info) -> list[Violation]:
    out = []
    if len([o for o in node.output if o]) != 1:
        out.append(Violation(name, "attention-outputs", "Attention must have exactly one output (no present key/value)"))
    for index, what in ATTENTION_PAST_INPUTS.items():
        if len(node.input) > index and node.input[index]:
            out.append(Violation(name, "attention-past", f"Attention input {what} is not imported; keep the KV-cache "
                                                         f"Concat outside the node"))
    has_mask = len(node.input) > 3 and bool(node.input[3])
    q, k = _dims(value_info, node.input[0]), _dims(value_info, node.input[1])
    same_length = q is not None and k is not None and q[-2] is not None and q[-2] == k[-2]
    if not has_mask and not same_length:
        out.append(Violation(name, "attention-mask", "query and key lengths may differ but no explicit attn_mask "
                                                     "is given; pass a 4-D mask"))
    return out


def _check_qdq(name: str, node: onnx.NodeProto, constants) -> list[Violation]:
    out = []
    scale = node.input[1] if len(node.input) > 1 else ""
    if scale not in constants:
        out.append(Violation(name, "qdq-scale", f"{node.op_type} scale {scale!r} must be a constant"))
    if len(node.input) > 2 and node.input[2] and not _all_zero(constants.get(node.input[2])):
        out.append(Violation(name, "qdq-zero-point", f"{node.op_type} zero point must be 0 (symmetric quantization)"))
    scale_tensor = constants.get(scale)
    per_channel = scale_tensor is not None and int(np.prod(scale_tensor.dims or [1])) > 1
    if per_channel and node.op_type == "DequantizeLinear" and node.input[0] not in constants:
        out.append(Violation(name, "qdq-per-channel", "per-channel DequantizeLinear is only imported on constant "
                                                      "inputs (weights), not on activations"))
    return out
