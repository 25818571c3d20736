"""TensorRT optimization profiles for an artifact's graph, from the build limits (no TensorRT needed).

A profile gives every dynamic input dimension a range (min, opt, max) and the value range of the shape
tensor `logits_to_keep`. The dimensions are the I/O contract's symbols (`batch`, `sequence_length`,
`past_sequence_length`, `total_sequence_length`), so one table of ranges fixes every input's shape.

Portable graph (the cache grows by Concat): two profiles, picked per step by the runtime.
- `context` (prefill): sequence 1…max-input, past 0; opt at the full batch and half the max input.
- `generation` (decode): sequence 1, past 1…max-seq−1; opt at the full batch and half the window.
Static-cache graph: one `static` profile; the cache is fixed at the export's max_sequence_length, the
sequence 1…max-input with opt 1 (decode steps dominate).
"""

from __future__ import annotations

from llama_export.runtime.artifact_format import BuildLimits, GraphRecord

from .errors import ExportError

DEFAULT_MAX_BATCH = 4
DEFAULT_MAX_INPUT = 1024
SHAPE_TENSORS = ("logits_to_keep",)  # read on the host by TensorRT: it sets the logits' shape


def _whole(flag: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ExportError(f"{flag} {value!r} is not a whole number")
    return value


def limits(graph: GraphRecord, config: dict, max_batch=None, max_input_len=None, max_seq_len=None) -> BuildLimits:
    """The build limits for an artifact's `graph` manifest section, defaults filled in, checked."""
    max_batch, max_input_len, max_seq_len = (_whole(f, v) for f, v in (
        ("--max-batch", max_batch), ("--max-input-len", max_input_len), ("--max-seq-len", max_seq_len)))
    positions = int(config["max_position_embeddings"])
    batch = DEFAULT_MAX_BATCH if max_batch is None else max_batch
    if batch < 1:
        raise ExportError(f"--max-batch {batch}: an engine serves at least one sequence; use 1 or more")
    if graph.flavour == "static":
        slots = graph.max_sequence_length
        if max_seq_len is not None and max_seq_len != slots:
            raise ExportError(f"--max-seq-len {max_seq_len}: this static-cache graph has {slots} cache slots, fixed "
                              f"at export; leave --max-seq-len out, or re-export with --kv-cache static "
                              f"--max-seq-len {max_seq_len}")
        if slots < 2:
            raise ExportError(f"this static-cache graph has {slots} cache slot: too few for a prompt and a generated "
                              f"token; re-export with --kv-cache static --max-seq-len 2 or more")
        seq = slots
    else:
        seq = positions if max_seq_len is None else max_seq_len
        if not 2 <= seq <= positions:
            raise ExportError(f"--max-seq-len {seq} is out of range: prompt plus generated tokens, 2..{positions} "
                              f"(the model's max_position_embeddings)")
    max_input = min(DEFAULT_MAX_INPUT, seq - 1) if max_input_len is None else max_input_len
    if max_input < 1:
        raise ExportError(f"--max-input-len {max_input}: a prompt has at least one token; use 1 or more")
    if max_input >= seq:
        raise ExportError(f"--max-input-len {max_input} must be below --max-seq-len {seq}, which counts the prompt "
                          f"and the generated tokens; lower --max-input-len to {seq - 1} or raise --max-seq-len")
    return BuildLimits(batch, max_input, seq)


def _half(n: int) -> int:
    return max(1, (n + 1) // 2)


def dimension_ranges(flavour: str, lim: BuildLimits) -> list[tuple[str, dict[str, list[int]], list[int]]]:
    """(profile name, {dimension symbol: [min, opt, max]}, logits_to_keep [min, opt, max]) per profile."""
    b = [1, lim.max_batch, lim.max_batch]
    if flavour == "static":
        return [("static", {"batch": b, "sequence_length": [1, 1, lim.max_input_len]}, [0, 1, lim.max_input_len])]
    s = _half(lim.max_input_len)
    p = _half(lim.max_seq_len - 1)
    return [
        ("context", {"batch": b, "sequence_length": [1, s, lim.max_input_len], "past_sequence_length": [0, 0, 0],
                     "total_sequence_length": [1, s, lim.max_input_len]}, [0, 1, lim.max_input_len]),
        ("generation", {"batch": b, "sequence_length": [1, 1, 1], "past_sequence_length": [1, p, lim.max_seq_len - 1],
                        "total_sequence_length": [2, p + 1, lim.max_seq_len]}, [0, 1, 1]),
    ]


def profiles(graph: GraphRecord, lim: BuildLimits) -> list[dict]:
    """Each profile: its name, the dimension ranges, and every input's min/opt/max shape (for the shape
    tensor `logits_to_keep`: its min/opt/max value), from the graph's I/O contract."""
    out = []
    for name, dims, keep in dimension_ranges(graph.flavour, lim):
        shapes = {}
        for spec in graph.io["inputs"]:
            if spec["name"] in SHAPE_TENSORS:
                continue
            unknown = [d for d in spec["shape"] if isinstance(d, str) and d not in dims]
            if unknown:
                raise ExportError(f"input {spec['name']} has dimension {unknown[0]!r}, which the {name} profile "
                                  f"does not range; re-export the artifact with this llama-export")
            shapes[spec["name"]] = {point: [dims[d][i] if isinstance(d, str) else int(d) for d in spec["shape"]]
                                    for i, point in enumerate(("min", "opt", "max"))}
        out.append({"name": name, "dimensions": dims, "shapes": shapes,
                    "values": {"logits_to_keep": dict(zip(("min", "opt", "max"), keep))}})
    return out


def to_polygraphy(profile_list: list[dict], shape_tensors: set[str]) -> list:
    """polygraphy `Profile`s. `shape_tensors`: the network inputs TensorRT treats as shape tensors (their
    range is of values: a 0-D one has one value); `logits_to_keep` otherwise is a 0-D execution tensor."""
    from polygraphy.backend.trt import Profile

    result = []
    for spec in profile_list:
        profile = Profile()
        for name, points in spec["shapes"].items():
            profile.add(name, points["min"], points["opt"], points["max"])
        for name, points in spec["values"].items():
            if name in shape_tensors:
                profile.add(name, [points["min"]], [points["opt"]], [points["max"]])
            else:
                profile.add(name, [], [], [])
        result.append(profile)
    return result
