"""Write an artifact directory atomically: graph, weights, config, tokenizer, manifest.

Everything is built in a hidden sibling directory and renamed into place at the end, so an
interrupted export leaves no directory that looks complete (a manifest is written last, and only
inside the temporary directory); `staging` holds the output's lock and cleans what killed exports left.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import onnx

from llama_export.graphs import pipeline
from llama_export.graphs.options import ExportOptions, OptionsError
# the contract the runtime reads
from llama_export.runtime.artifact_format import (ExportRecord, FileRecord, GraphRecord, Manifest, ModelRecord,
                                                  manifest_bytes, parse_manifest, sha256)

from .checkpoint import Checkpoint, expected_tensors
from .config import LlamaConfig
from .trt_build import trt_section
from .errors import ExportError
from .onnx_export import DATA_FILE, OPSET, io_contract, trace, write_weights
from .staging import discard, phase, prepare_output, publish
from .trt_profiles import limits

MANIFEST = "manifest.json"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("llama-export", "torch", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_artifact(
    ckpt: Checkpoint, out_dir: Path, options: ExportOptions, *, force: bool = False, tokenizer: Path | None = None,
    verify: Callable[[Path, Manifest], dict] | None = None, describe: dict | None = None,
    log: Callable[[str], None] = print, progress: Callable[[int], Callable[[str], None]] | None = None,
    smoothquant: pipeline.SmoothQuant | None = None,
) -> Manifest:
    """Export `ckpt` into `out_dir` as `options` say; returns the manifest. `verify(tmp_dir, manifest)` runs before
    publishing. W8A8 (`options.quantization`) calibrates on `smoothquant`'s sequences."""
    try:
        max_seq = options.slots(ckpt.config.max_position_embeddings)
    except OptionsError as err:
        raise ExportError(str(err)) from None
    dtype, target = options.dtype, options.target
    tmp = prepare_output(out_dir, force, log)
    try:
        started = time.perf_counter()
        config: LlamaConfig = ckpt.config
        graph = tmp / "model.onnx"
        phase("tracing", log)
        log(f"tracing {config.num_hidden_layers} layers on the meta device")
        proto = trace(config, graph)
        traced = time.perf_counter()
        phase("writing weights", log)
        step = progress(len(expected_tensors(config))) if progress else (lambda name: None)
        names, data_bytes, folded = write_weights(proto, graph, ckpt, dtype, step)
        log(f"wrote {data_bytes / 1e9:.2f} GB of weights to {DATA_FILE}")
        passes = [{"pass": "weight transposes folded into the stored weights", "changed": folded,
                   "detail": f"{folded} Transpose nodes removed"}]
        counts = None
        phase("graph passes", log)
        try:
            if dtype != "float32":
                converted = pipeline.convert_precision(graph, dtype, target)
                log(f"  {converted.name}: {converted.detail}")
                passes.append(converted.as_dict())
            if options.optimize:
                weights = "" if options.quantization == "none" else f"; weights: {options.weights_label}"
                log(f"optimizing for target {target}{weights}")
                staged = tmp / ".optimized" / "model.onnx"
                reports, counts = pipeline.run(graph, staged, options, config.max_position_embeddings,
                                               smoothquant=smoothquant, log=log)
                os.replace(staged, graph)
                os.replace(staged.parent / DATA_FILE, tmp / DATA_FILE)
                staged.parent.rmdir()
                passes += [r.as_dict() for r in reports]
                data_bytes = (tmp / DATA_FILE).stat().st_size
            checked = pipeline.check_target(graph, target)
            if checked:
                log(f"  {checked.name}: {checked.detail}")
                passes.append(checked.as_dict())
        except pipeline.PassError as err:
            raise ExportError(str(err)) from None
        # full_check runs strict shape inference, which knows only standard operators (not ORT's contrib ops)
        opsets = {o.domain: o.version for o in onnx.load(str(graph), load_external_data=False).opset_import}
        onnx.checker.check_model(str(graph), full_check=set(opsets) <= {"", "ai.onnx"})
        (tmp / "config.json").write_text(json.dumps(config.replace(torch_dtype=dtype).to_hf_dict(), indent=2) + "\n")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        manifest = Manifest(
            model=ModelRecord(config.to_hf_dict(), config.num_parameters(), **(describe or {})),
            dtype=dtype,
            graph=GraphRecord(file="model.onnx", data=DATA_FILE, opset=opsets.get("", OPSET),
                              flavour=options.kv_cache, target=target, optimized=options.optimize,
                              weights=options.weights_label,
                              io=io_contract(config, dtype, max_seq), max_sequence_length=max_seq, op_counts=counts),
            tools=_versions(),
            export=ExportRecord(traced_on="meta", weights_streamed=names, weights_bytes=data_bytes,
                                trace_seconds=round(traced - started, 2), passes=passes),
            verification={}, files={})
        if target == "trt":  # the profiles a default llama-build uses
            manifest = manifest.replace(tensorrt=trt_section(out_dir, manifest.graph,
                                                             limits(manifest.graph, manifest.model.config)))
        phase("verifying", log)
        manifest = manifest.replace(verification=verify(tmp, manifest) if verify else {"skipped": "--no-verify"})
        files = {p.name: FileRecord(p.stat().st_size, sha256(p)) for p in sorted(tmp.iterdir())}
        manifest = manifest.replace(files=files, export=dataclasses.replace(
            manifest.export, total_seconds=round(time.perf_counter() - started, 2)))
        sealed = manifest_bytes(manifest)
        (tmp / MANIFEST).write_bytes(sealed)
        manifest = parse_manifest(sealed, out_dir / MANIFEST)  # as on disk, with its seal
        phase("publishing", log)
        publish(tmp, out_dir)
        return manifest
    except BaseException:
        discard(tmp)
        raise
