"""`llama-build`: a TensorRT engine for a trt-ready artifact directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from llama_export.runtime.artifact import Artifact, ArtifactError

from . import fused_attention
from .trt_build import EXIT_NO_TENSORRT, build_engine, describe, tensorrt_status
from .errors import ExportError
from .staging import Interrupted, catch_signals, phase
from .trt_profiles import limits, profiles

def _describe(plan: list[dict]) -> str:
    lines = []
    for spec in plan:
        dims = ", ".join(f"{d} {r[0]}..{r[2]} (opt {r[1]})" for d, r in spec["dimensions"].items())
        keep = spec["values"]["logits_to_keep"]
        lines.append(f"  {spec['name']}: {dims}; logits_to_keep {keep['min']}..{keep['max']}")
    return "\n".join(lines)


def open_trt_ready(directory: Path) -> Artifact:
    """The artifact, if its graph is one TensorRT imports (exported with --target trt)."""
    try:
        artifact = Artifact.open(directory, log=lambda message: click.echo(message, err=True))
    except ArtifactError as err:
        raise ExportError(str(err)) from None
    target = artifact.manifest.graph.target
    if target != "trt":
        raise ExportError(f"{directory} was exported with --target {target}; TensorRT engines are built from a "
                          f"graph checked against TensorRT's parser: re-export with llama-export ... --target trt")
    return artifact


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--max-batch", type=int, default=None,
              help="Most sequences per step the engine serves [default: 4].")
@click.option("--max-input-len", type=int, default=None,
              help="Longest prompt (prefill) in tokens [default: 1024, or less than --max-seq-len].")
@click.option("--max-seq-len", type=int, default=None,
              help="Prompt plus generated tokens [default: the model's max_position_embeddings; a static-cache "
                   "graph's slots are fixed at export].")
@click.option("--timing-cache", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="TensorRT's tactic timing cache, read if present and saved after the build, so rebuilds and "
                   "other models of the same shapes build faster [default: DIRECTORY/timing.cache].")
@click.option("--opt-level", type=click.IntRange(0, 5), default=None,
              help="Builder optimization level 0-5 (TensorRT's default 3; higher builds slower, may run faster).")
@click.option("--hardware-compatible", is_flag=True,
              help="An engine that runs on any Ampere or newer GPU (not only this one), a little slower.")
@click.option("--weight-streaming", is_flag=True,
              help="Let the runtime stream weights from host memory when they do not fit the GPU.")
@click.option("--dry-run", is_flag=True, help="Check the flags and print the profiles; build nothing (no TensorRT "
                                              "needed).")
def main(directory, max_batch, max_input_len, max_seq_len, timing_cache, opt_level, hardware_compatible,
         weight_streaming, dry_run):
    """Build the TensorRT engine (DIRECTORY/model.plan) of an artifact exported with --target trt.

    The network is strongly typed: an fp16 artifact gives an fp16 engine, an --int8 or --int8
    --smoothquant artifact an int8 one (its Q/DQ nodes). A portable graph gets two optimization
    profiles, picked per step by the runtime: `context` (prefill: sequence 1..max-input, no past; opt
    at the full batch and half the max input) and `generation` (decode: sequence 1, past
    1..max-seq-1; opt at the full batch and half the window). A static-cache graph gets one profile
    around its fixed cache (sequence 1..max-input, opt 1). The manifest records the TensorRT
    version, the GPU and its compute capability, the profiles, the engine's sha256 and the build
    time; the engine and the manifest are replaced atomically. Attention builds as one fused kernel per
    layer for float16/bfloat16 with head sizes 16..256 (multiples of 8); any other artifact (float32) gets
    decomposable attention (matmul, softmax, matmul: slower), and the command says so first.

    \b
    Examples:
      llama-build out/13b-float16-trt
      llama-build out/tiny-float32-trt --max-batch 8 --max-input-len 256 --max-seq-len 512
      llama-build out/7b-float16-int8-trt --timing-cache ~/.cache/trt.cache --dry-run
    """
    restore_signals = catch_signals()  # SIGINT/SIGTERM: one line (the engine and manifest are replaced atomically)
    try:
        phase("checking", lambda message: click.echo(message, err=True))
        artifact = open_trt_ready(directory)
        graph = artifact.manifest.graph
        lim = limits(graph, artifact.config, max_batch, max_input_len, max_seq_len)
        plan = profiles(graph, lim)
        phase("profiles", lambda message: click.echo(message, err=True))
        click.echo(f"{directory}: {graph.weights} {graph.flavour} "
                   f"graph; profiles:\n{_describe(plan)}", err=True)
        click.echo(fused_attention.describe(artifact.dtype, artifact.head_dim), err=True)
        if dry_run:
            fused = fused_attention.uncovered(artifact.dtype, artifact.head_dim) is None
            click.echo(json.dumps({"limits": lim.as_dict(), "profiles": plan, "attention_fused": fused}))
            return
        status = tensorrt_status()
        if not status.usable:
            click.echo(f"error: cannot build here: {status.reason}. Run this command on a machine with TensorRT 11 "
                       f"(pip install tensorrt) and an NVIDIA GPU", err=True)
            sys.exit(EXIT_NO_TENSORRT)
        cache = timing_cache or directory / "timing.cache"
        manifest = build_engine(directory, artifact.manifest, lim, timing_cache=cache, opt_level=opt_level,
                                hardware_compatible=hardware_compatible, weight_streaming=weight_streaming,
                                log=lambda m: click.echo(m, err=True))
        click.echo(describe(directory, manifest))
    except ExportError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except Interrupted as err:
        click.echo(f"error: interrupted by {err}; {directory} is as it was (no engine written)", err=True)
        sys.exit(128 + err.signum)
    finally:
        restore_signals()


if __name__ == "__main__":
    main()
