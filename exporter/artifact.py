"""Write an artifact directory atomically: graph, weights, config, tokenizer, manifest.

Everything is built in a hidden sibling directory and renamed into place at the end, so an
interrupted export leaves no directory that looks complete (a manifest is written last, and only
inside the temporary directory); `staging` holds the output's lock and cleans what killed exports left.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import onnx

from graphs import pipeline
from runtime.artifact import manifest_bytes, sha256  # the runtime checks the same digests

from .checkpoint import Checkpoint, expected_tensors
from .config import LlamaConfig
from .engine import trt_section
from .errors import ExportError
from .onnx_export import DATA_FILE, OPSET, io_contract, trace, write_weights
from .staging import discard, phase, prepare_output, publish
from .trt_profiles import limits

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("llama-export", "torch", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def _weights_label(dtype: str, int8: bool, smoothquant: pipeline.SmoothQuant | None, int4: bool = False) -> str:
    if smoothquant is not None:
        return f"int8 SmoothQuant W8A8 (alpha {smoothquant.alpha})"
    return "int8 weight-only" if int8 else "int4 weight-only (blocks of 32)" if int4 else dtype


def build_artifact(
    ckpt: Checkpoint, out_dir: Path, dtype: str, *, force: bool = False, tokenizer: Path | None = None,
    verify: Callable[[Path, dict], dict] | None = None, describe: dict | None = None,
    log: Callable[[str], None] = print, progress: Callable[[int], Callable[[str], None]] | None = None,
    target: str = "onnx", optimize: bool = False, int8: bool = False,
    smoothquant: pipeline.SmoothQuant | None = None, max_seq: int | None = None, int4: bool = False,
) -> dict:
    """Export `ckpt` into `out_dir`; returns the manifest. `verify(tmp_dir, manifest)` runs before publishing.

    With `optimize`, the traced graph goes through `graphs.pipeline` for `target` (and int8)."""
    if int8 and not optimize:
        raise ExportError("--int8 is a graph pass: it needs the optimization pipeline (drop --no-optimize)")
    if int4 and (int8 or not optimize or target != "ort"):
        raise ExportError("--int4 is ONNX Runtime's MatMulNBits: use it alone (not with --int8), with --target ort "
                          "and the optimization pipeline (TensorRT takes --int8)")
    if dtype == "bfloat16" and not optimize:
        raise ExportError("--bf16 needs the optimization pipeline (drop --no-optimize): the traced graph splits "
                          "the rotary halves with SplitToSequence, which ONNX does not define for bfloat16")
    if smoothquant is not None and not int8:
        raise ExportError("--smoothquant is a form of int8: pass it together with --int8")
    if max_seq is not None:
        if not optimize:
            raise ExportError("--kv-cache static is a graph pass: it needs the optimization pipeline "
                              "(drop --no-optimize)")
        limit = ckpt.config.max_position_embeddings
        if not 1 <= max_seq <= limit:
            raise ExportError(f"--max-seq-len {max_seq} is out of range: the model has {limit} positions "
                              f"(use 1..{limit})")
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
            if optimize:
                weights = " with int8 weights" if int8 else " with int4 weights" if int4 else ""
                log(f"optimizing for target {target}{weights}{' and activations (SmoothQuant)' if smoothquant else ''}")
                staged = tmp / ".optimized" / "model.onnx"
                reports, counts = pipeline.run(graph, staged, target, int8=int8, smoothquant=smoothquant,
                                               max_seq=max_seq, max_positions=config.max_position_embeddings,
                                               log=log, int4=int4)
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
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": {**(describe or {}), "config": config.to_hf_dict(), "num_parameters": config.num_parameters()},
            "dtype": dtype,
            "graph": {"file": "model.onnx", "data": DATA_FILE, "opset": opsets.get("", OPSET),
                      "flavour": "static" if max_seq else "portable",
                      **({"max_sequence_length": max_seq} if max_seq else {}),
                      "target": target, "optimized": optimize,
                      "weights": _weights_label(dtype, int8, smoothquant, int4),
                      "io": io_contract(config, dtype, max_seq),
                      **({"op_counts": counts} if counts else {})},
            "tools": _versions(),
            "export": {"traced_on": "meta", "weights_streamed": names, "weights_bytes": data_bytes,
                       "trace_seconds": round(traced - started, 2), "passes": passes},
        }
        if target == "trt":  # the profiles a default llama-build uses
            graph_info = manifest["graph"]
            manifest["tensorrt"] = trt_section(out_dir, graph_info, limits(graph_info, config.to_hf_dict()))
        phase("verifying", log)
        manifest["verification"] = verify(tmp, manifest) if verify else {"skipped": "--no-verify"}
        manifest["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(tmp.iterdir())}
        manifest["export"]["total_seconds"] = round(time.perf_counter() - started, 2)
        sealed = manifest_bytes(manifest)
        (tmp / MANIFEST).write_bytes(sealed)
        manifest = json.loads(sealed)  # as on disk, with its manifest_sha256
        phase("publishing", log)
        publish(tmp, out_dir)
        return manifest
    except BaseException:
        discard(tmp)
        raise
