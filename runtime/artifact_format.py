"""The artifact's manifest.json as types: the one contract between the exporter, which writes it (llama-export) and
amends it (llama-build), and everything that reads an artifact (the runtime, the backends, llama-bench, llama-parity).

`Manifest.from_dict` checks every field it reads and names the first one missing or of the wrong type;
`manifest_bytes` writes a manifest sealed with its own sha256 and `parse_manifest` checks that seal, the format
version and the fields. Torch-free, like the rest of the runtime. Checking the files a manifest lists against their
digests is `runtime.artifact`'s job.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
SEAL = "manifest_sha256"
DTYPES = ("float32", "float16", "bfloat16")  # the graph's float type (logits are float32 in every one)
FLAVOURS = ("portable", "static")
TARGETS = ("onnx", "ort", "trt")


class ArtifactError(ValueError):
    """An artifact directory or manifest that cannot be used; the message names the file, what is wrong and the fix."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


_KIND_NAMES = {dict: "a JSON object", list: "a list", str: "a string", int: "a whole number", float: "a number",
               bool: "true or false"}


class _Reader:
    """Takes typed fields out of one JSON object of the manifest; every refusal names the dotted field."""

    def __init__(self, data: object, where: str, path: str):
        if not isinstance(data, dict):
            what = f"'{path}' is not a JSON object" if path else "expected a JSON object"
            raise ArtifactError(f"{where}: {what}; re-export the artifact")
        self.data, self.where, self.path = data, where, path

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., *, choices: tuple = ()) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is ...:
                raise ArtifactError(f"{self.where}: '{self._name(key)}' is missing; re-export the artifact with this "
                                    f"llama-export")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        wrong = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
        if wrong or (choices and value not in choices):
            expected = " or ".join(repr(c) for c in choices) if choices else " or ".join(_KIND_NAMES[k] for k in kinds)
            raise ArtifactError(f"{self.where}: '{self._name(key)}' is {value!r}, expected {expected}; re-export the "
                                f"artifact with this llama-export")
        return value

    def section(self, key: str, optional: bool = False) -> "_Reader | None":
        if optional and self.data.get(key) is None:
            return None
        return _Reader(self.get(key, dict), self.where, self._name(key))


def _dict(obj) -> dict:
    """A dataclass as the manifest's JSON object: fields that are None are left out."""
    return {f.name: getattr(obj, f.name) for f in fields(obj) if getattr(obj, f.name) is not None}


@dataclass(frozen=True)
class FileRecord:
    """A file of the artifact directory with its size and sha256 (the runtime checks both)."""
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ModelRecord:
    """What was exported: the Hugging Face config (config.json's fields) and where it came from."""
    config: dict
    num_parameters: int
    name: str | None = None  # --model as given (a preset or a Hugging Face name)
    source: str | None = None  # the checkpoint's directory or description
    random_weights: bool = False
    num_layers_kept: int | None = None  # --num-layers

    @property
    def head_dim(self) -> int:
        return self.config.get("head_dim") or self.config["hidden_size"] // self.config["num_attention_heads"]

    def as_dict(self) -> dict:
        described = (("name", self.name), ("source", self.source), ("num_layers_kept", self.num_layers_kept))
        out = {k: v for k, v in described if v is not None}
        if self.name is not None or self.random_weights:
            out["random_weights"] = self.random_weights
        return {**out, "config": self.config, "num_parameters": self.num_parameters}


@dataclass(frozen=True)
class GraphRecord:
    """The ONNX graph: its files, the cache flavour, the target its passes were run for, and its I/O contract."""
    file: str
    data: str
    opset: int
    flavour: str  # "portable": the cache grows by Concat; "static": fixed slots written at write_indices
    target: str  # "onnx", "ort" or "trt"
    optimized: bool
    weights: str  # "float16", "int8 weight-only", "int8 SmoothQuant W8A8 (alpha 0.5)", ...
    io: dict  # {"inputs": [{"name", "dtype", "shape"}], "outputs": [...], ...}
    max_sequence_length: int | None = None  # the static cache's slots
    op_counts: dict | None = None

    def as_dict(self) -> dict:
        return _dict(self)


@dataclass(frozen=True)
class ExportRecord:
    """How the export went: where it traced, what it streamed and the passes it ran, each with what it changed."""
    traced_on: str
    weights_streamed: int
    weights_bytes: int
    trace_seconds: float
    passes: list  # [{"pass": name, "changed": count, "detail": text}]
    total_seconds: float | None = None

    def as_dict(self) -> dict:
        return _dict(self)


@dataclass(frozen=True)
class BuildLimits:
    """The largest batch, prompt and sequence (prompt + generated) a TensorRT engine is built for."""
    max_batch: int
    max_input_len: int
    max_seq_len: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EngineRecord:
    """A TensorRT plan llama-build wrote, and the TensorRT, GPU and settings it was built with."""
    file: str
    bytes: int
    sha256: str
    tensorrt_version: str
    gpu: dict  # {"name", "compute_capability"}
    limits: BuildLimits
    profiles: list
    build_seconds: float
    attention: dict = field(default_factory=lambda: {"fused": True})
    hardware_compatible: bool = False
    weight_streaming: bool = False
    builder_optimization_level: int | None = None
    shape_tensors: list = field(default_factory=list)
    timing_cache: str | None = None
    built_at: str | None = None
    polygraphy_version: str | None = None

    def as_dict(self) -> dict:
        return {**_dict(self), "limits": self.limits.as_dict()}


@dataclass(frozen=True)
class TensorRTRecord:
    """A trt-target artifact's TensorRT section: the profiles a default build uses, and the engine once built."""
    limits: BuildLimits
    profiles: list
    build_command: str
    engine: EngineRecord | None = None

    def as_dict(self) -> dict:
        out = {"limits": self.limits.as_dict(), "profiles": self.profiles, "build_command": self.build_command}
        return {**out, "engine": self.engine.as_dict()} if self.engine else out


@dataclass(frozen=True)
class Manifest:
    model: ModelRecord
    dtype: str  # the graph's float type: float32, float16 or bfloat16
    graph: GraphRecord
    tools: dict  # {package: version}
    export: ExportRecord
    verification: dict  # the export's parity check, or {"skipped": why}
    files: dict  # {file name: FileRecord}
    tensorrt: TensorRTRecord | None = None
    format_version: int = FORMAT_VERSION
    manifest_sha256: str | None = None  # the seal, as read (manifest_bytes writes it)

    def replace(self, **changes) -> "Manifest":
        return replace(self, **changes)

    def as_dict(self) -> dict:
        out = {"format_version": self.format_version, "model": self.model.as_dict(), "dtype": self.dtype,
               "graph": self.graph.as_dict(), "tools": self.tools, "export": self.export.as_dict()}
        if self.tensorrt is not None:
            out["tensorrt"] = self.tensorrt.as_dict()
        out["verification"] = self.verification
        out["files"] = {name: asdict(record) for name, record in self.files.items()}
        return out

    @classmethod
    def from_dict(cls, data: object, where: str) -> "Manifest":
        """The manifest `data` (parsed JSON); ArtifactError naming `where` and the first field missing or wrong."""
        top = _Reader(data, where, "")
        version = top.get("format_version", int, None)
        if version != FORMAT_VERSION:
            raise ArtifactError(f"{where}: format_version {version!r} is not supported (this runtime reads "
                                f"{FORMAT_VERSION}); re-export with this llama-export")
        m, g, e = top.section("model"), top.section("graph"), top.section("export")
        model = ModelRecord(m.get("config", dict), m.get("num_parameters", int), m.get("name", str, None),
                            m.get("source", str, None), m.get("random_weights", bool, False),
                            m.get("num_layers_kept", int, None))
        flavour = g.get("flavour", str, "portable", choices=FLAVOURS)
        graph = GraphRecord(g.get("file", str), g.get("data", str, g.get("file", str)), g.get("opset", int),
                            flavour, g.get("target", str, "onnx", choices=TARGETS), g.get("optimized", bool, False),
                            g.get("weights", str, top.get("dtype", str)), g.get("io", dict),
                            g.get("max_sequence_length", int, ... if flavour == "static" else None),
                            g.get("op_counts", dict, None))
        export = ExportRecord(e.get("traced_on", str), e.get("weights_streamed", int), e.get("weights_bytes", int),
                              e.get("trace_seconds", (int, float)), e.get("passes", list),
                              e.get("total_seconds", (int, float), None))
        files_reader = top.section("files")
        files = {}
        for name in files_reader.data:
            entry = files_reader.section(name)
            files[name] = FileRecord(entry.get("bytes", int), entry.get("sha256", str))
        t = top.section("tensorrt", optional=True)
        tensorrt = None
        if t is not None:
            engine = None
            n = t.section("engine", optional=True)
            if n is not None:
                engine = EngineRecord(
                    n.get("file", str), n.get("bytes", int), n.get("sha256", str), n.get("tensorrt_version", str),
                    n.get("gpu", dict), _limits(n.section("limits")), n.get("profiles", list),
                    n.get("build_seconds", (int, float)), n.get("attention", dict, {"fused": True}),
                    n.get("hardware_compatible", bool, False), n.get("weight_streaming", bool, False),
                    n.get("builder_optimization_level", int, None), n.get("shape_tensors", list, []),
                    n.get("timing_cache", str, None), n.get("built_at", str, None),
                    n.get("polygraphy_version", str, None))
            tensorrt = TensorRTRecord(_limits(t.section("limits")), t.get("profiles", list),
                                      t.get("build_command", str), engine)
        return cls(model, top.get("dtype", str, choices=DTYPES), graph,
                   top.get("tools", dict, {}), export, top.get("verification", dict, {}), files, tensorrt, version,
                   top.get(SEAL, str, None))


def _limits(r: _Reader) -> BuildLimits:
    return BuildLimits(r.get("max_batch", int), r.get("max_input_len", int), r.get("max_seq_len", int))


def manifest_bytes(manifest: Manifest | dict) -> bytes:
    """manifest.json as written: its first field, `manifest_sha256`, is the sha256 of these very bytes with that
    field's 64 hex digits as zeros, so any changed byte (a digit, a letter's case, a space) is seen. Every writer of
    manifest.json writes it through this function (a dict is written as given: the tests forge manifests)."""
    body = manifest.as_dict() if isinstance(manifest, Manifest) else {k: v for k, v in manifest.items() if k != SEAL}
    text = (json.dumps({SEAL: "0" * 64, **body}, indent=2) + "\n").encode()
    return text.replace(b"0" * 64, hashlib.sha256(text).hexdigest().encode(), 1)


def parse_manifest(raw: bytes, path: Path) -> Manifest:
    """manifest.json's bytes as a Manifest: valid JSON, its seal matching (artifacts written before the seal
    existed have none to check), a supported format version, every field present and typed."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: not valid JSON ({err}); re-export the artifact") from None
    if isinstance(data, dict) and data.get(SEAL) is not None:
        seal = data[SEAL]
        if not (isinstance(seal, str) and len(seal) == 64 and seal.encode() in raw
                and hashlib.sha256(raw.replace(seal.encode(), b"0" * 64, 1)).hexdigest() == seal):
            raise ArtifactError(f"{path}: its bytes do not match its manifest_sha256; the manifest was modified or "
                                f"damaged — re-export the artifact")
    return Manifest.from_dict(data, str(path))


def read_manifest(directory: Path) -> Manifest:
    """DIR/manifest.json, parsed and checked (not the files it lists: `runtime.artifact.Artifact.open` does that)."""
    path = Path(directory) / "manifest.json"
    return parse_manifest(path.read_bytes(), path)
