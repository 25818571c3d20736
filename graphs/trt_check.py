"""Does an ONNX graph stay inside what TensorRT 11's ONNX parser imports?

Each rule below is one the parser itself enforces, read from its source (onnx/onnx-tensorrt at the
TensorRT 11 commits dd0a3a9 / fa5aa9f: `onnxOpCheckers.cpp`, `onnxOpImporters.cpp`, `AttentionHelpers.cpp`,
`importerUtils.cpp`) or, where the parser hands the layer to TensorRT unchecked, one TensorRT's operator
documentation states for that layer. `RULES` names the file and function of each; the message of a
parser rule is the parser's own. The few rules stricter than the parser say why in `RULES` (`ours: ...`).
docs/tensorrt.md has the table, and the rules looked for and not found.

The check reads the graph file only; with `base_dir` it also reads the constant Q/DQ scales and zero
points from the external data file (a few kB), which the value rules need.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

MIN_OPSET, MAX_OPSET = 9, 24

PARSER = "onnx/onnx-tensorrt"
RULES: dict[str, tuple[str, str, str]] = {  # rule → (source file, function, what it requires)
    "opset": ("ours", "-", f"default-domain opset {MIN_OPSET}..{MAX_OPSET}: the opsets whose Attention (23) and "
                           f"TensorScatter (24) importers were read; no parser check refusing another opset was found"),
    "domain": ("ModelImporter.cpp", "parseNode",
               "only standard ONNX operators (ours, stricter): the parser looks importers up by op_type alone, so a "
               "com.microsoft op falls back to a plugin that does not exist (GroupQueryAttention) or imports as "
               "the standard op of the same name with other semantics (RotaryEmbedding)"),
    "attention-outputs": ("onnxOpImporters.cpp", "DEFINE_BUILTIN_OP_IMPORTER(Attention)",
                          "exactly one output, counting empty-named ones (node.output().size() == 1)"),
    "attention-softmax-precision": ("onnxOpCheckers.cpp", "DEFINE_OP_CHECKER(Attention)",
                                    "no softmax_precision attribute at all (only its presence is tested)"),
    "attention-softcap": ("onnxOpCheckers.cpp", "DEFINE_OP_CHECKER(Attention)", "softcap == 0"),
    "attention-past": ("onnxOpImporters.cpp", "DEFINE_BUILTIN_OP_IMPORTER(Attention)",
                       "no past_key / past_value inputs; (ours) no nonpad_kv_seqlen, which the importer "
                       "silently ignores"),
    "attention-rank": ("onnxOpImporters.cpp", "DEFINE_BUILTIN_OP_IMPORTER(Attention)",
                       "Q, K and V of the same rank"),
    "attention-heads": ("AttentionHelpers.cpp", "reshapeQKVTensor",
                        "3-D Q/K/V need q_num_heads / kv_num_heads, and a static hidden size divisible by them"),
    "attention-mask-rank": ("AttentionHelpers.cpp", "convertToMaskTensor", "attn_mask of rank <= 4"),
    "attention-mask-type": ("TensorRT operator docs, Attention", "IAttention::setMask",
                            "a bool mask, or a float mask of the query's type"),
    "attention-mask": ("ours", "-", "an explicit mask wherever query and key lengths may differ: without one "
                                     "the cached positions would attend to the future (causality is ours, not "
                                     "TensorRT's)"),
    "tensorscatter-rank": ("onnxOpImporters.cpp", "DEFINE_BUILTIN_OP_IMPORTER(TensorScatter)",
                           "4-D past_cache and update"),
    "tensorscatter-axis": ("onnxOpImporters.cpp", "DEFINE_BUILTIN_OP_IMPORTER(TensorScatter)",
                           "axis == -2 after axis -= rank for a positive axis"),
    "tensorscatter-mode": ("onnxOpImporters.cpp", "DEFINE_BUILTIN_OP_IMPORTER(TensorScatter)", "mode linear"),
    "tensorscatter-io": ("TensorRT operator docs, KVCacheUpdate", "INetworkDefinition::addKVCacheUpdate",
                         "the cache a network input with a static sequence dimension, the result a network "
                         "output (the two share one address)"),
    "qdq-scale": ("ours", "-", "a constant scale: only a constant's values can be checked here, and our "
                               "Q/DQ pairs all have one"),
    "qdq-scale-positive": ("onnxOpImporters.cpp", "QuantDequantLinearHelper", "every constant scale > 0"),
    "qdq-scale-length": ("onnxOpImporters.cpp", "QuantDequantLinearHelper",
                         "a 1-D scale of more than one value has the length of the quantized axis; otherwise "
                         "the scale's rank is the input's (blocked)"),
    "qdq-zero-point": ("onnxOpImporters.cpp", "QuantDequantLinearHelper (shiftIsAllZeros)",
                       "zero point all zeros"),
    "qdq-zero-point-size": ("onnxOpImporters.cpp", "QuantDequantLinearHelper",
                            "zero point of the scale's volume"),
    "qdq-per-channel": ("ours", "-", "per-channel DequantizeLinear only on constant inputs (weights): our "
                                     "activations are quantized per tensor, a per-channel one is a bug"),
    "squeeze-dynamic": ("onnxOpImporters.cpp", "DEFINE_BUILTIN_OP_IMPORTER(Squeeze)",
                        "without axes, a fully static input shape"),
    "rotary-num-heads": ("onnxOpImporters.cpp", "DEFINE_BUILTIN_OP_IMPORTER(RotaryEmbedding)",
                         "3-D input needs num_heads, dividing the hidden size"),
    "split-both": ("onnxOpImporters.cpp", "DEFINE_BUILTIN_OP_IMPORTER(Split)",
                   "not both a split input and num_outputs (opset >= 18); split / num_outputs match the outputs"),
    "strong-typing": ("importerUtils.cpp", "elementwiseHelper",
                      "under strong typing, the inputs of an elementwise node share one dtype (no cast is "
                      "inserted; IElementWiseLayer requires it)"),
}
ATTENTION_PAST_INPUTS = {4: "past_key", 5: "past_value", 6: "nonpad_kv_seqlen"}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Equal", "Greater", "Less",
               "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor"}  # Pow casts mixed types itself


@dataclass(frozen=True)
class Violation:
    node: str  # node name (or "model")
    rule: str
    detail: str

    def __str__(self) -> str:
        source, function, _ = RULES[self.rule]
        return f"{self.node}: {self.rule}: {self.detail} [{source} {function}]"


class _Graph:
    """What the rules look up: constants (initializers and Constant outputs), inferred types and shapes,
    the graph's inputs and outputs."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path | None):
        graph = model.graph
        self.base_dir = base_dir
        self.constants: dict[str, onnx.TensorProto | None] = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                self.constants[node.output[0]] = next((a.t for a in node.attribute if a.name == "value"), None)
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
        except Exception:  # noqa: BLE001 - shapes only sharpen the checks
            inferred = graph
        self.info = {v.name: v for v in [*inferred.value_info, *inferred.input, *inferred.output]}
        for t in graph.initializer:
            self.info.setdefault(t.name, onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        self.inputs = {v.name: v for v in graph.input}
        self.outputs = {v.name for v in graph.output}

    def dims(self, name: str) -> list | None:
        """Each dimension's size (int), symbol (str) or None; None when the rank is unknown."""
        info = self.info.get(name)
        if info is None or not info.type.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in info.type.tensor_type.shape.dim]

    def dtype(self, name: str) -> int | None:
        info = self.info.get(name)
        elem = info.type.tensor_type.elem_type if info is not None else 0
        return elem or None

    def value(self, name: str) -> np.ndarray | None:
        """A constant's values (read from the external data file when `base_dir` is given), else None."""
        tensor = self.constants.get(name)
        if tensor is None:
            return None
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            if self.base_dir is None:
                return None
            tensor = onnx.TensorProto.FromString(tensor.SerializeToString())
            external_data_helper.load_external_data_for_tensor(tensor, str(self.base_dir))
            tensor.data_location = onnx.TensorProto.DEFAULT
        return numpy_helper.to_array(tensor)


def check(model: onnx.ModelProto, base_dir: Path | None = None) -> list[Violation]:
    """Every rule the graph breaks (empty: TensorRT 11's parser can import it). `base_dir`: where the
    external data lives, to check Q/DQ scale values."""
    problems: list[Violation] = []
    opsets = {o.domain: o.version for o in model.opset_import}
    version = opsets.get("", opsets.get("ai.onnx"))
    if version is None or not MIN_OPSET <= version <= MAX_OPSET:
        problems.append(Violation("model", "opset", f"default-domain opset {version} is outside {MIN_OPSET}..{MAX_OPSET}"))
    g = _Graph(model, base_dir)
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}#{i}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(Violation(name, "domain", f"{node.domain}::{node.op_type} is not a standard ONNX operator"))
            continue
        checker = CHECKERS.get(node.op_type)
        if checker is not None:
            problems += [Violation(name, rule, detail) for rule, detail in checker(node, g, version or 0)]
        if node.op_type in ELEMENTWISE:
            problems += [Violation(name, rule, detail) for rule, detail in _check_elementwise(node, g)]
    return problems


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _check_attention(node, g: _Graph, opset: int):
    attrs = _attrs(node)
    if len(node.output) != 1:  # the importer counts the raw outputs: an empty-named present_key still counts
        yield "attention-outputs", f"TensorRT only supports Attention nodes with one output (this one has " \
                                   f"{len(node.output)}: {list(node.output)})"
    if "softmax_precision" in attrs:
        yield "attention-softmax-precision", "Setting softmax precision is not supported in TensorRT Attention."
    if attrs.get("softcap", 0.0) != 0.0:
        yield "attention-softcap", "Setting softcap is not supported in TensorRT Attention."
    for index, what in ATTENTION_PAST_INPUTS.items():
        if len(node.input) > index and node.input[index]:
            yield "attention-past", f"Setting {what} for the Attention node is not supported in TensorRT; keep " \
                                    f"the KV-cache Concat / TensorScatter outside the node"
    q, k, v = (g.dims(node.input[i]) for i in range(3))
    ranks = [len(x) if x is not None else None for x in (q, k, v)]
    if None not in ranks and len(set(ranks)) > 1:
        yield "attention-rank", f"Q, K, and V inputs must have the same number of dimensions (got {ranks})"
    if ranks[0] == 3:
        for which, x, key in (("q", q, "q_num_heads"), ("kv", k, "kv_num_heads")):
            heads = attrs.get(key, 0)
            if not heads:
                yield "attention-heads", f"{key} is not specified, which is required for 3D Q/K/V tensors"
            elif isinstance(x[2], int) and x[2] % heads:
                yield "attention-heads", f"hidden_size must be divisible by num_heads ({which}: {x[2]} % {heads})"
    mask = node.input[3] if len(node.input) > 3 and node.input[3] else None
    if mask is not None:
        m = g.dims(mask)
        if m is not None and len(m) > 4:
            yield "attention-mask-rank", f"Attention masks should have rank leq 4. Got mask with rank {len(m)}."
        mtype, qtype = g.dtype(mask), g.dtype(node.input[0])
        if mtype is not None and qtype is not None and mtype != onnx.TensorProto.BOOL and mtype != qtype:
            yield "attention-mask-type", f"a float mask must have the query's type: mask " \
                                         f"{onnx.TensorProto.DataType.Name(mtype)}, query " \
                                         f"{onnx.TensorProto.DataType.Name(qtype)}"
    elif not (q is not None and k is not None and q[-2] is not None and q[-2] == k[-2]):
        yield "attention-mask", "query and key lengths may differ but no explicit attn_mask is given; pass a 4-D mask"


def _check_tensor_scatter(node, g: _Graph, opset: int):
    attrs = _attrs(node)
    cache, update = g.dims(node.input[0]), g.dims(node.input[1])
    for what, dims in (("past_cache", cache), ("update", update)):
        if dims is not None and len(dims) != 4:
            yield "tensorscatter-rank", f"The {what} tensor is required to be 4D, got {len(dims)}D."
    axis = int(attrs.get("axis", -2))
    if axis > 0:  # the importer's normalisation: only a positive axis is shifted
        axis -= len(cache) if cache is not None else 4
    if axis != -2:
        yield "tensorscatter-axis", f"Sequence dimension must be -2, got {axis}"
    mode = attrs.get("mode", b"linear")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "linear":
        yield "tensorscatter-mode", f"Only linear mode is supported for now, got {mode}"
    if node.input[0] not in g.inputs:
        yield "tensorscatter-io", f"the cache {node.input[0]!r} must be a graph input (TensorRT updates it in place)"
    elif cache is not None and len(cache) >= 2 and not isinstance(cache[-2], int):
        yield "tensorscatter-io", f"the cache {node.input[0]!r} needs a static sequence dimension, has " \
                                  f"{cache[-2]!r}"
    if node.output[0] not in g.outputs:
        yield "tensorscatter-io", f"the result {node.output[0]!r} must be a graph output (it aliases the cache)"


def _check_qdq(node, g: _Graph, opset: int):
    scale = node.input[1] if len(node.input) > 1 else ""
    if scale not in g.constants:
        yield "qdq-scale", f"{node.op_type} scale {scale!r} must be a constant"
        return
    values = g.value(scale)
    if values is not None and not (values.astype(np.float32) > 0).all():
        yield "qdq-scale-positive", f"Scale coefficients must all be positive ({scale}: " \
                                    f"{int((values.astype(np.float32) <= 0).sum())} of {values.size} are not)"
    scale_dims = list(g.constants[scale].dims)
    scale_size = int(np.prod(scale_dims)) if scale_dims else 1
    data = g.dims(node.input[0])
    axis = int(_attrs(node).get("axis", 1))
    if scale_size != 1 and data is not None:
        axis = axis + len(data) if axis < 0 else axis
        if len(scale_dims) == 1:
            if 0 <= axis < len(data) and isinstance(data[axis], int) and data[axis] != scale_size:
                yield "qdq-scale-length", f"The number of scales is not equal to the number of output channels. " \
                                          f"Number of output channels = {data[axis]}, number of scales = {scale_size}."
        elif len(scale_dims) != len(data):
            yield "qdq-scale-length", f"Invalid rank for the scale tensor. Rank = {len(scale_dims)}."
    zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if zero is not None:
        tensor = g.constants.get(zero)  # a computed zero point the parser takes as a tensor, unchecked
        values = g.value(zero)
        if values is not None and values.any():
            yield "qdq-zero-point", f"Non-zero zero point is not supported ({node.op_type} {zero!r}); quantize " \
                                    f"symmetrically"
        if tensor is not None and int(np.prod(list(tensor.dims) or [1])) != scale_size:
            yield "qdq-zero-point-size", f"The scale and zero point must have the same volume. Size of zero point = " \
                                         f"{int(np.prod(list(tensor.dims) or [1]))}, size of the scale = {scale_size}."
    if scale_size > 1 and node.op_type == "DequantizeLinear" and node.input[0] not in g.constants:
        yield "qdq-per-channel", "per-channel DequantizeLinear is only imported on constant inputs (weights), not " \
                                 "on activations"


def _check_squeeze(node, g: _Graph, opset: int):
    has_axes = (len(node.input) > 1 and bool(node.input[1])) if opset >= 13 else "axes" in _attrs(node)
    if has_axes:
        return
    dims = g.dims(node.input[0])
    if dims is None or not all(isinstance(d, int) for d in dims):
        yield "squeeze-dynamic", f"Cannot infer squeeze dimensions from a dynamic shape ({dims}); give Squeeze " \
                                 f"its axes input"


def _check_rotary(node, g: _Graph, opset: int):
    dims = g.dims(node.input[0])
    if dims is None or len(dims) != 3:
        return
    heads = _attrs(node).get("num_heads")
    if not heads:
        yield "rotary-num-heads", "num_heads attribute is required for 3D input tensors."
    elif isinstance(dims[2], int) and dims[2] % heads:
        yield "rotary-num-heads", f"hiddenSize must be divisible by num_heads ({dims[2]} % {heads})."


def _check_split(node, g: _Graph, opset: int):
    attrs = _attrs(node)
    has_split = len(node.input) > 1 and bool(node.input[1]) if opset >= 13 else "split" in attrs
    if has_split and opset >= 18 and "num_outputs" in attrs:
        yield "split-both", "Either 'split' should be provided as an input or 'num_outputs' should be provided as " \
                            "an attribute. But not both."
    elif has_split and opset >= 13:
        split = g.value(node.input[1])
        if split is not None and split.size != len(node.output):
            yield "split-both", f"The number of the split attribute misaligns with the number of outputs " \
                                f"({split.size} vs {len(node.output)})."
    elif not has_split and "num_outputs" in attrs and attrs["num_outputs"] != len(node.output):
        yield "split-both", f"The number of node outputs is not the same as the value of 'num_outputs' " \
                            f"({attrs['num_outputs']} vs {len(node.output)})."


def _check_elementwise(node, g: _Graph):
    types = {g.dtype(x) for x in node.input if x}
    if None not in types and len(types) > 1:
        names = sorted(onnx.TensorProto.DataType.Name(t) for t in types)
        yield "strong-typing", f"{node.op_type} mixes {' and '.join(names)}: a strongly typed network needs one " \
                               f"dtype (cast first)"


CHECKERS = {"Attention": _check_attention, "TensorScatter": _check_tensor_scatter,
            "DequantizeLinear": _check_qdq, "QuantizeLinear": _check_qdq, "Squeeze": _check_squeeze,
            "RotaryEmbedding": _check_rotary, "Split": _check_split}
