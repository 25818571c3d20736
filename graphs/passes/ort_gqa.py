"""Attention with its cache update → ONNX Runtime's `com.microsoft.GroupQueryAttention` (ort target only).

Each layer's projections arrive split and rotated per head (after `ort_rotary`):

    q, k = RotaryEmbedding(Transpose(Reshape(q2))), RotaryEmbedding(Transpose(Reshape(k2)));  v = Transpose(Reshape(v2))
    K, V = Concat(past_key, k), Concat(past_value, v)        (static cache: TensorScatter(past, new, write_indices))
    out = Reshape(Transpose(Attention(q, K, V, mask)))

and become one kernel that reads `[batch, seq, heads·head_dim]` directly and writes the cache itself:

    q, k = RotaryEmbedding(q2, num_heads=H), RotaryEmbedding(k2, num_heads=KV)    (the same cos/sin caches)
    out, K, V = GroupQueryAttention(q, k, v2, past_key, past_value, seqlens_k, total_sequence_length,
                                    attention_bias=Where(mask, 0, lowest))

The portable cache keeps its contract (past grows into present: `seqlens_k = total − 1` for every row), and its
rope stays outside the kernel: GroupQueryAttention rotates by cache slot (a first prompt from slot 0 on), and a
left-padded row's slot is its position plus its padding, so the present keys would not be the model's. The static
cache shares one buffer as past and present: the step writes at `write_indices`, `query_seqlens` says every row
brings the whole step, and `total_sequence_length` is the buffer's slot count, only an upper bound, so the bias
spans every slot; it says only which slots are real (`_slot_bias`: the kernel masks causally by slot itself, so
the static mask's causal part is dropped). ONNX Runtime updates the buffer in place when the same OrtValue is
bound as both. That cache is the runtime's own, so where its projections are packed (one qkv MatMul and a Split)
and head_dim is a multiple of 16 (as the kernel's rope requires), the kernel reads the packed
`[batch, seq, (H + 2·KV)·head_dim]` and rotates q and k itself (`do_rotary`), by slot: a row's slots and positions
differ by the same padding for every token, and rope's attention scores depend only on the difference of the
query's and key's positions, so the scores, and so the output, are the model's; the cached keys are rotated by
slot. This saves the Split and both RotaryEmbedding nodes of each layer.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx_ir as ir

from ._tensors import NodeBuilder

INT32, INT64 = ir.DataType.INT32, ir.DataType.INT64
MS = "com.microsoft"


class _Unmatched(Exception):
    pass


def _producer(value: ir.Value | None, op: str, domain: str = "") -> ir.Node:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op or node.domain != domain:
        raise _Unmatched(f"{value.name if value is not None else 'None'} is not made by {domain or 'ai.onnx'}.{op}")
    return node


def _heads(value: ir.Value) -> tuple[int, int]:
    """(heads, head_dim) of a `[batch, heads, seq, head_dim]` value."""
    shape = value.shape
    if shape is None or shape.rank() != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise _Unmatched(f"{value.name} is not [batch, heads, seq, head_dim] with known heads and head_dim")
    return shape[1], shape[3]


def _unheaded(value: ir.Value) -> ir.Value:
    """The `[batch, seq, heads·head_dim]` projection behind Transpose(Reshape(x), perm 0 2 1 3)."""
    transpose = _producer(value, "Transpose")
    if list(transpose.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        raise _Unmatched(f"{transpose.name} is not the heads transpose")
    projection = _producer(transpose.inputs[0], "Reshape").inputs[0]
    if projection.shape is None or projection.shape.rank() != 3:
        raise _Unmatched(f"{projection.name} is not [batch, seq, hidden]")
    return projection


def _cache_update(value: ir.Value) -> tuple[ir.Node, ir.Value, ir.Value]:
    """The Concat / TensorScatter that writes one cache: (node, past input, the step's keys or values)."""
    node = value.producer()
    concat = node is not None and node.op_type == "Concat" and len(node.inputs) == 2 \
        and node.attributes.get_int("axis", 0) in (2, -2)
    scatter = node is not None and node.op_type == "TensorScatter" and node.attributes.get_int("axis", -2) in (2, -2)
    if (concat or scatter) and node.domain == "":
        return node, node.inputs[0], node.inputs[1]
    raise _Unmatched(f"{value.name} is not a cache Concat or TensorScatter on the sequence axis")


def _graph_input(value: ir.Value | None) -> bool:
    return value is not None and value.is_graph_input()


def _lengths(b: NodeBuilder, inputs: dict[str, ir.Value], slots: int | None) -> dict[str, ir.Value]:
    """seqlens_k, total_sequence_length, query_seqlens (int32), and the step's `batch` and `step` dims (int64
    [1]): every row brings the whole step (left padding included), so `query_seqlens` is the step's length; it
    also lets a batch add several tokens to a cache."""
    zero, one = b.const("axis0", np.array([0], np.int64)), b.const("one", np.array(1, np.int64))
    batch = b("Shape", [inputs["input_ids"]], INT64, [1], start=0, end=1)
    step_dim = b("Shape", [inputs["input_ids"]], INT64, [1], start=1, end=2)
    step = b("Squeeze", [step_dim, zero], INT64, [])
    query = b("Cast", [b("Expand", [step, batch], INT64, ["batch"])], INT32, ["batch"], to=INT32)
    dims = {"query_seqlens": query, "batch": batch, "step": step_dim}
    if slots is None:  # every row holds past + step tokens
        total = b("Squeeze", [b("Shape", [inputs["attention_mask"]], INT64, [1], start=1, end=2), zero], INT64, [])
        last = b("Expand", [b("Sub", [total, one], INT64, []), batch], INT64, ["batch"])
        return dims | {"seqlens_k": b("Cast", [last], INT32, ["batch"], to=INT32),
                       "total_sequence_length": b("Cast", [total], INT32, [], to=INT32)}
    last = b("Sub", [b("Add", [inputs["write_indices"], step], INT64, ["batch"]), one], INT64, ["batch"])
    return dims | {"seqlens_k": b("Cast", [last], INT32, ["batch"], to=INT32),
                   "total_sequence_length": b.const("slots", np.array(slots, np.int32))}


def _bias(b: NodeBuilder, mask: ir.Value, dtype: ir.DataType) -> ir.Value:
    """The boolean attention mask as an additive bias (0 where visible, the dtype's lowest elsewhere)."""
    np_dtype = dtype.numpy()
    zero = b.const(f"bias_zero_{dtype.name}", np.array(0, np_dtype))
    lowest = b.const(f"bias_lowest_{dtype.name}", np.array(ml_dtypes.finfo(np_dtype).min, np_dtype))
    return b("Where", [mask, zero, lowest], dtype, list(mask.shape))


def _slot_bias(b: NodeBuilder, attention_mask: ir.Value, lengths: dict[str, ir.Value], slots: int,
               dtype: ir.DataType) -> ir.Value:
    """The static cache's bias, `[batch, 1, step, slots]`, from the `[batch, slots]` mask alone: 0 on real slots,
    the dtype's lowest on padding and empty ones. GroupQueryAttention masks causally by slot itself (the query at
    slot write_indices + i sees slots up to its own), so the bias needs to say only which slots are real; the
    static mask's causal part (a dozen small nodes every step) is left to the kernel. A padding query then sees
    only padding: its scores are all about the lowest, a uniform softmax, finite, and its output is never used."""
    real = b("Cast", [attention_mask], ir.DataType.BOOL, ["batch", slots], to=ir.DataType.BOOL)
    real = b("Unsqueeze", [real, b.const(f"axes12_{dtype.name}", np.array([1, 2], np.int64))], ir.DataType.BOOL,
             ["batch", 1, 1, slots])
    bias = _bias(b, real, dtype)
    shape = b("Concat", [lengths["batch"], b.const(f"one_dim_{dtype.name}", np.array([1], np.int64)), lengths["step"],
                         b.const(f"slots_dim_{dtype.name}", np.array([slots], np.int64))], INT64, [4], axis=0)
    return b("Expand", [bias, shape], dtype, ["batch", 1, "sequence_length", slots])


def _match(attention: ir.Node) -> dict:
    """Everything one layer's rewrite needs, or _Unmatched."""
    if attention.domain != "" or len(attention.inputs) != 4 or len(attention.outputs) != 1:
        raise _Unmatched(f"{attention.name}: not a 4-input, 1-output Attention")
    attributes = attention.attributes
    if attributes.get_int("is_causal", 0) or attributes.get_float("softcap", 0.0) or \
            attributes.get_int("qk_matmul_output_mode", 0):
        raise _Unmatched(f"{attention.name}: causal flag, softcap or qk output set")
    q, keys, values, mask = attention.inputs
    if mask is None or mask.dtype != ir.DataType.BOOL:
        raise _Unmatched(f"{attention.name}: the attention mask is not boolean")
    heads, head_dim = _heads(q)
    kv_heads, _ = _heads(keys)
    key_update, past_key, new_key = _cache_update(keys)
    value_update, past_value, new_value = _cache_update(values)
    if not (_graph_input(past_key) and _graph_input(past_value)
            and keys.is_graph_output() and values.is_graph_output()):
        raise _Unmatched(f"{attention.name}: the caches are not the graph's past inputs and present outputs")
    if key_update.op_type != value_update.op_type:
        raise _Unmatched(f"{attention.name}: keys and values are updated differently")
    ropes = [_producer(x, "RotaryEmbedding", MS) for x in (q, new_key)]
    if any(r.attributes.get_int("interleaved", 0) or r.attributes.get_int("rotary_embedding_dim", 0) for r in ropes):
        raise _Unmatched(f"{attention.name}: only full rotate-half rope is moved")
    users = [use.node for use in attention.outputs[0].uses()]
    after = users[0] if len(users) == 1 else None
    if after is None or after.op_type != "Transpose" or list(after.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        raise _Unmatched(f"{attention.name}: the output is not transposed back to [batch, seq, heads, head_dim]")
    reshape = next((use.node for use in after.outputs[0].uses() if use.node.op_type == "Reshape"), None)
    if reshape is None or len(after.outputs[0].uses()) != 1:
        raise _Unmatched(f"{attention.name}: the output is not merged back to [batch, seq, hidden]")
    scale = attributes.get_float("scale", 1.0 / math.sqrt(head_dim))
    projections = [_unheaded(ropes[0].inputs[0]), _unheaded(ropes[1].inputs[0]), _unheaded(new_value)]
    return dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, scale=scale, mask=mask, ropes=ropes,
                projections=projections, packed=_packed(projections),
                pasts=[past_key, past_value], updates=[key_update, value_update], output=reshape.outputs[0],
                shared=key_update.op_type == "TensorScatter")


def _packed(projections: list[ir.Value]) -> ir.Value | None:
    """The packed qkv projection that a last-axis Split divides into exactly q, k and v, if there is one."""
    split = projections[0].producer()
    if split is None or split.op_type != "Split" or split.domain != "" or list(split.outputs) != projections:
        return None
    return split.inputs[0] if split.attributes.get_int("axis", 0) in (-1, 2) else None


def apply(model: ir.Model) -> int:
    """Fuse each layer whose attention and cache update have the shape above; returns how many (a layer that
    does not match keeps its standard Attention, which is still correct)."""
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    attentions = [n for n in graph if n.op_type == "Attention" and n.domain == ""]
    matches = []
    for node in attentions:
        try:
            matches.append((node, _match(node)))
        except _Unmatched:
            continue
    if not matches:
        return 0
    shared = {m["shared"] for _, m in matches}
    if len(shared) != 1:
        raise ValueError("some caches are static and some portable; export one kind")
    slots = None
    if shared.pop():
        slots = matches[0][1]["pasts"][0].shape[2]
        if not isinstance(slots, int) or "write_indices" not in inputs:
            raise ValueError("a static cache without a fixed slot count or a write_indices input")
    b = NodeBuilder(graph, matches[0][0], "gqa")
    lengths = _lengths(b, inputs, slots)
    biases: dict[tuple, ir.Value] = {}
    for attention, m in matches:
        q2, k2, v2 = m["projections"]
        dtype = q2.dtype
        key = ("slots" if slots is not None else m["mask"].name, dtype)
        if key not in biases:
            biases[key] = _slot_bias(b, inputs["attention_mask"], lengths, slots, dtype) if slots is not None \
                else _bias(b, m["mask"], dtype)
        bias = biases[key]
        attributes = {"num_heads": m["heads"], "kv_num_heads": m["kv_heads"], "scale": m["scale"], "do_rotary": 0}
        if slots is not None and m["packed"] is not None and m["head_dim"] % 16 == 0:  # rotated in the kernel, by slot
            cos_cache, sin_cache = m["ropes"][0].inputs[2:4]
            feed = [m["packed"], None, None, *m["pasts"], lengths["seqlens_k"], lengths["total_sequence_length"],
                    cos_cache, sin_cache, None, bias]
            attributes.update(do_rotary=1, rotary_interleaved=0)
        else:
            rotated = []
            for rope, x, heads in zip(m["ropes"], (q2, k2), (m["heads"], m["kv_heads"])):
                node = ir.node("RotaryEmbedding", [x, *rope.inputs[1:]],
                               attributes={"interleaved": 0, "num_heads": heads}, domain=MS, name=f"{rope.name}/bsh")
                node.outputs[0].type, node.outputs[0].shape = x.type, x.shape
                graph.insert_before(attention, node)
                rotated.append(node.outputs[0])
            feed = [*rotated, v2, *m["pasts"], lengths["seqlens_k"], lengths["total_sequence_length"], None, None,
                    None, bias]
        feed += [None] * 5 + [lengths["query_seqlens"]]  # head_sink, k_scale, v_scale, q/k_norm_weight; query_seqlens
        fused = ir.node("GroupQueryAttention", feed, attributes=attributes, domain=MS, num_outputs=3,
                        name=f"{attention.name}/GroupQueryAttention")
        out, present_key, present_value = fused.outputs
        out.type, out.shape = m["output"].type, m["output"].shape
        graph.insert_before(attention, fused)
        ir.convenience.replace_all_uses_with(m["output"], out)
        for update, present in zip(m["updates"], (present_key, present_value)):
            old = update.outputs[0]
            present.type, present.shape = old.type, old.shape
            name = old.name
            ir.convenience.replace_all_uses_with(old, present, replace_graph_outputs=True)
            old.name, present.name = f"{name}/replaced", name
    model.opset_imports.setdefault(MS, 1)
    return len(matches)
