"""Build a TensorRT engine for an artifact directory through polygraphy, and record it in the manifest.

The network is strongly typed (TensorRT 11 has no other kind): an fp16 graph gives an fp16 engine, and
the int8 graphs' Q/DQ nodes give int8 kernels. The engine file and the manifest are each written to a
temporary file and renamed into place, so an interrupted build leaves the previous state.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from llama_export.runtime.artifact_format import (BuildLimits, EngineRecord, FileRecord, GraphRecord, Manifest,
                                                  TensorRTRecord, manifest_bytes, parse_manifest, sha256)

from . import fused_attention
from .errors import ExportError
from .trt_profiles import SHAPE_TENSORS, profiles, to_polygraphy

ENGINE_FILE = "model.plan"
EXIT_NO_TENSORRT = 3  # the status of a command that needs TensorRT and a GPU where either is missing
MIN_TENSORRT = 11  # strongly typed networks; the parser imports Attention, RMSNormalization, TensorScatter


@dataclass(frozen=True)
class TensorRTStatus:
    usable: bool
    reason: str  # why (not): shown to the user
    version: str | None = None


def tensorrt_status() -> TensorRTStatus:
    """Can this machine build and run engines: TensorRT 11+ imports and torch sees a CUDA GPU."""
    try:
        import tensorrt as trt
    except ImportError as err:
        return TensorRTStatus(False, f"the tensorrt package does not import ({err})")
    version = getattr(trt, "__version__", "0")
    if int(version.split(".")[0]) < MIN_TENSORRT:
        return TensorRTStatus(False, f"tensorrt {version} is installed; these graphs need TensorRT {MIN_TENSORRT} or "
                                     f"newer", version)
    import torch

    if not torch.cuda.is_available():
        return TensorRTStatus(False, f"tensorrt {version} imports but no CUDA GPU is visible to torch", version)
    return TensorRTStatus(True, f"tensorrt {version} and {torch.cuda.get_device_name(0)}", version)


def build_command(directory: Path) -> str:
    return f"llama-build {directory}"


def trt_section(directory: Path, graph: GraphRecord, lim: BuildLimits) -> TensorRTRecord:
    """The manifest's `tensorrt` section of a trt-ready artifact: the profiles a default build uses."""
    return TensorRTRecord(lim, profiles(graph, lim), build_command(directory))


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record_engine(directory: Path, manifest: Manifest, engine: bytes, info: dict) -> Manifest:
    """Write `engine` as DIR/model.plan and the manifest that lists it (file size, sha256, `info`), each
    atomically; returns the new manifest."""
    path = directory / ENGINE_FILE
    _atomic_write(path, engine)
    digest = sha256(path)
    record = EngineRecord(file=ENGINE_FILE, bytes=len(engine), sha256=digest, **info)
    section = manifest.tensorrt or TensorRTRecord(record.limits, record.profiles, build_command(directory))
    manifest = manifest.replace(files={**manifest.files, ENGINE_FILE: FileRecord(len(engine), digest)},
                                tensorrt=dataclasses.replace(section, engine=record))
    sealed = manifest_bytes(manifest)
    _atomic_write(directory / "manifest.json", sealed)
    return parse_manifest(sealed, directory / "manifest.json")


def describe(directory: Path, manifest: Manifest) -> str:
    """One line on the engine a manifest records."""
    record = manifest.tensorrt.engine
    return (f"wrote {directory / record.file} ({record.bytes / 1e6:.1f} MB, TensorRT {record.tensorrt_version}, "
            f"{record.gpu['name']}) in {record.build_seconds} s")


def _gpu() -> dict:
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def build_engine(directory: Path, manifest: Manifest, lim: BuildLimits, *, timing_cache: Path,
                 opt_level: int | None = None, hardware_compatible: bool = False, weight_streaming: bool = False,
                 log: Callable[[str], None] = print) -> Manifest:
    """Build the engine of the artifact at `directory` (TensorRT and a GPU must be usable); returns the
    manifest that records it."""
    status = tensorrt_status()
    if not status.usable:
        raise ExportError(f"cannot build here: {status.reason}. Run `{build_command(directory)}` on a machine with "
                          f"TensorRT {MIN_TENSORRT} (pip install tensorrt) and an NVIDIA GPU")
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, engine_bytes_from_network, network_from_onnx_path

    graph = manifest.graph
    plan = profiles(graph, lim)
    started = time.perf_counter()
    log(f"parsing {directory / graph.file} into a strongly typed TensorRT {status.version} network")
    network = network_from_onnx_path(str(directory / graph.file), strongly_typed=True)
    gpu = _gpu()
    capability = tuple(int(x) for x in gpu["compute_capability"].split("."))
    unfused = fused_attention.uncovered(manifest.dtype, manifest.model.head_dim, capability)
    if unfused:
        marked = fused_attention.make_decomposable(network[1], trt)
        if not marked:
            raise ExportError(f"{unfused}, and no IAttention layer was found to mark decomposable in the parsed "
                              f"network; export the model with --fp16 or --bf16")
        log(f"{unfused}: {marked} attention layers marked decomposable")
    inputs = [network[1].get_input(i) for i in range(network[1].num_inputs)]
    shape_tensors = {t.name for t in inputs if t.is_shape_tensor and t.name in SHAPE_TENSORS}
    config = CreateConfig(
        profiles=to_polygraphy(plan, shape_tensors),
        load_timing_cache=str(timing_cache) if timing_cache.is_file() else None,
        builder_optimization_level=opt_level,
        hardware_compatibility_level=trt.HardwareCompatibilityLevel.AMPERE_PLUS if hardware_compatible else None,
        weight_streaming=weight_streaming or None,
    )
    log(f"building ({', '.join(p['name'] for p in plan)} profile{'s' if len(plan) > 1 else ''}; "
        f"max batch {lim.max_batch}, max input {lim.max_input_len}, max sequence {lim.max_seq_len}); "
        f"this takes minutes")
    engine = engine_bytes_from_network(network, config=config, save_timing_cache=str(timing_cache))
    seconds = time.perf_counter() - started
    info = {
        "tensorrt_version": status.version, "gpu": gpu, "hardware_compatible": hardware_compatible,
        "attention": {"fused": unfused is None, **({"why_not": unfused} if unfused else {})},
        "weight_streaming": weight_streaming, "builder_optimization_level": opt_level,
        "limits": lim, "profiles": plan, "shape_tensors": sorted(shape_tensors),
        "timing_cache": str(timing_cache), "build_seconds": round(seconds, 1),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "polygraphy_version": metadata.version("polygraphy"),
    }
    return record_engine(directory, manifest, bytes(engine), info)
