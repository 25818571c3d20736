"""`llama-export`: a Llama 2 checkpoint → an ONNX artifact directory, checked against PyTorch."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from llama_export.graphs.options import ExportOptions, OptionsError
from llama_export.runtime.artifact_format import Manifest

from . import fused_attention
from .checkpoint import truncate_layers
from .cli_options import dtype_option, model_options
from .trt_build import EXIT_NO_TENSORRT, build_command, build_engine, describe, tensorrt_status
from .errors import ExportError
from .presets import PRESET_NAMES, check_vocabulary, find_tokenizer, resolve_checkpoint
from .staging import Interrupted, catch_signals, write_failure


def _progress(total: int):
    bar = click.progressbar(length=total, label="writing weights", file=sys.stderr)
    bar.__enter__()

    def step(name: str) -> None:
        bar.update(1)
        if bar.pos >= total:
            bar.__exit__(None, None, None)
    return step


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_options
@dtype_option(None)
@click.option("--target", type=click.Choice(["auto", "onnx", "ort", "trt"]), default="auto", show_default=True,
              help="Which graph passes run. onnx: standard ONNX opset 23 (RMSNormalization, RotaryEmbedding, GQA "
                   "Attention with the cache Concat outside, packed qkv and gate/up). trt: the same, checked "
                   "against TensorRT 11's ONNX-parser rules, then the engine is built (see --build). ort: the "
                   "same plus ONNX Runtime's contrib fusions (GroupQueryAttention, SkipSimplifiedLayerNormalization, "
                   "RotaryEmbedding; with --kv-cache static on one shared past/present buffer); "
                   "int8 as MatMulNBits. auto: trt when TensorRT 11 "
                   "imports and a CUDA GPU is visible, else ort (the choice and its reason are printed).")
@click.option("--build/--no-build", default=True, show_default=True,
              help="With target trt: build the TensorRT engine right after the export (llama-build's defaults). "
                   "Where TensorRT or a GPU is missing, the trt-ready artifact is written and the command exits "
                   "with status 3 and the llama-build command to run on a GPU machine; --no-build stops at the "
                   "artifact (status 0).")
@click.option("--optimize/--no-optimize", default=True, show_default=True,
              help="--no-optimize writes the traced graph as it is (no fusions).")
@click.option("--kv-cache", type=click.Choice(["portable", "static"]), default="portable", show_default=True,
              help="portable: past/present that grow by Concat (any runtime). static: fixed buffers of --max-seq-len "
                   "slots written by opset-24 TensorScatter, each present output aliasing its past input (TensorRT's "
                   "KV-cache update; ONNX Runtime updates it in place; with --target ort GroupQueryAttention writes "
                   "it), attention masked by length.")
@click.option("--max-seq-len", type=click.IntRange(min=1), default=None,
              help="Slots of the static cache (prompt + generated tokens) [default: the model's "
                   "max_position_embeddings].")
@click.option("--int8", is_flag=True,
              help="Weight-only int8: per-output-channel symmetric int8 weights (DequantizeLinear → MatMul; "
                   "MatMulNBits for --target ort).")
@click.option("--int4", is_flag=True,
              help="Weight-only int4 for --target ort: ONNX Runtime's MatMulNBits bits=4, a symmetric scale per block "
                   "of 32 weights (TensorRT takes --int8).")
@click.option("--smoothquant", is_flag=True,
              help="With --int8: SmoothQuant W8A8, int8 activations too (Q/DQ pairs with constant scales). "
                   "Activation outliers move into the weights by per-channel factors folded into the RMSNorm "
                   "scales and the up projection; scales come from running --calibration text through the graph "
                   "in ONNX Runtime.")
@click.option("--smoothquant-alpha", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="Migration strength α: s = peak|x|^α / peak|W|^(1-α).")
@click.option("--calibration", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="UTF-8 text for --smoothquant calibration [default: the bundled 200 KB sample of English "
                   "technical prose]. Use text like what the model will serve.")
@click.option("--calibration-tokens", type=click.IntRange(min=1), default=2048, show_default=True,
              help="How many tokens of --calibration text to run (sequences of up to 512).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Artifact directory to write [default: out/MODEL-DTYPE].")
@click.option("--num-layers", type=int, default=None, help="Keep only the first N layers (structure/memory work).")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path), default=None,
              help="tokenizer.model to ship in the artifact [default: the checkpoint's].")
@click.option("--force", is_flag=True, help="Replace an existing output directory (only once the new one is complete).")
@click.option("--verify/--no-verify", default=None,
              help="Run the artifact in ONNX Runtime against the float32 reference model and print the max logit "
                   "difference. Default: only when both fit in 4 GiB (the export itself stays near 1 GB); "
                   "--verify checks whenever they fit in 80% of the available memory.")
def main(model_name, checkpoint, random_weights, seed, dtype, target, build, optimize, kv_cache, max_seq_len, int8,
         int4, smoothquant, smoothquant_alpha, calibration, calibration_tokens, output, num_layers, tokenizer_path,
         force, verify):
    """Export a Llama 2 model to an ONNX artifact directory.

    MODEL is a preset (tiny, 7b, 13b, 70b and their -chat versions) or a checkpoint directory. The
    directory holds model.onnx, its weights in model.onnx.data, config.json, tokenizer.model and
    manifest.json (I/O contract, file sizes and sha256, tool versions, verification). The dtype
    defaults to the checkpoint's own. With target trt it ends in a TensorRT engine (model.plan) where
    TensorRT and a GPU are present, else in the command that builds it there.

    \b
    Examples:
      llama-export --model tiny --fp32 -o out/tiny
      llama-export --model 13b --fp16                     # from the local Hugging Face cache
      llama-export --model 13b --fp16 --target trt --no-build   # trt-ready; llama-build it on a GPU
      llama-export --checkpoint ./llama-2-7b --fp16       # Meta params.json + consolidated.*.pth
      llama-export --model 70b --random-weights --num-layers 2 --fp16   # ~1 GB peak, not verified
      llama-export --model tiny --int8 --smoothquant --target trt  # W8A8 for TensorRT
      llama-export --model tiny --int4 --target ort --kv-cache static   # MatMulNBits 4-bit
      llama-export --model tiny --kv-cache static --max-seq-len 1024  # in-place cache updates
    """
    restore_signals = catch_signals()  # SIGINT/SIGTERM unwind (removing the unfinished directory) to one line
    try:
        started = time.perf_counter()
        # the model and the flags first: a mistake in them is reported before anything heavy is imported
        ckpt = truncate_layers(resolve_checkpoint(model_name, checkpoint, random_weights, seed), num_layers)
        status = tensorrt_status() if target == "auto" or (target == "trt" and build) else None
        if target == "auto":
            target = "trt" if status.usable else "ort"
            click.echo(f"target auto → {target}: {status.reason}"
                       + ("" if status.usable else " (pass --target trt for a TensorRT-ready artifact anyway)"),
                       err=True)
        options = ExportOptions.from_flags(
            dtype=dtype or ckpt.config.torch_dtype, target=target, optimize=optimize, int8=int8, int4=int4,
            smoothquant=smoothquant, kv_cache=kv_cache, max_seq_len=max_seq_len, smoothquant_alpha=smoothquant_alpha)
        options.slots(ckpt.config.max_position_embeddings)  # --max-seq-len against the model's positions
        dtype = options.dtype
        name = Path(model_name).name if model_name not in PRESET_NAMES else model_name
        output = output or Path("out") / options.output_name(name)
        tokenizer = find_tokenizer(model_name, checkpoint, tokenizer_path)
        if tokenizer is None:
            click.echo("note: no tokenizer.model found; the artifact will have none (pass --tokenizer PATH)", err=True)
        c = ckpt.config
        if tokenizer is not None:
            check_vocabulary(tokenizer, c)
        # the heavy imports (torch, onnx, the graph passes), once the input is known good
        from llama_export.graphs import pipeline

        from . import calibration_text
        from .write_artifact import build_artifact
        from .verify import verify_artifact

        smooth = None
        if options.quantization == "w8a8":
            text = calibration or calibration_text.DEFAULT_TEXT
            length = min(512, c.max_position_embeddings)
            smooth = pipeline.SmoothQuant(calibration_text.sequences(tokenizer, text, calibration_tokens, length),
                                          log=lambda msg: click.echo(msg, err=True))
            click.echo(f"SmoothQuant calibrates on {calibration_tokens} tokens of {text}", err=True)
        click.echo(f"{ckpt.source}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, heads "
                   f"{c.num_attention_heads}/{c.num_key_value_heads}, {c.num_parameters() / 1e9:.3f} B parameters",
                   err=True)

        def check(directory: Path, manifest: Manifest) -> dict:
            click.echo("verifying in ONNX Runtime against the reference model", err=True)
            return verify_artifact(directory, manifest, ckpt, dtype, forced=bool(verify))

        manifest = build_artifact(
            ckpt, output, options, force=force, tokenizer=tokenizer, verify=None if verify is False else check,
            describe={"name": model_name, "source": ckpt.source, "random_weights": random_weights,
                      "num_layers_kept": c.num_hidden_layers},
            log=lambda msg: click.echo(msg, err=True), progress=_progress, smoothquant=smooth)
        result = manifest.verification
        if "skipped" in result:
            click.echo(f"verification skipped: {result['skipped']}")
        else:
            click.echo(f"parity: max |logit diff| {result['max_abs_logit_diff']:.3g} vs PyTorch fp32 "
                       f"(prefill {result['prefill_max_abs_diff']:.3g}, decode {result['decode_max_abs_diff']:.3g}), "
                       f"top-1 {'identical' if result['top1_identical'] else 'DIFFERENT'}")
            summary = result["parity"]
            click.echo(f"parity ({summary['precision']} thresholds, prefill + {summary['decode_steps']} decode steps): "
                       + ("pass" if summary["passed"] else "FAIL: " + "; ".join(summary["failures"]))
                       + f"; llama-parity {output} for the full report")
        click.echo(f"wrote {output} in {time.perf_counter() - started:.1f} s")
        if target == "trt":
            click.echo(fused_attention.describe(dtype, c.head_dim), err=True)
        if target == "trt" and build:
            if not status.usable:
                click.echo(f"TensorRT engine not built: {status.reason}. {output} is ready for TensorRT; on a machine "
                           f"with TensorRT 11 and an NVIDIA GPU, finish with:\n  {build_command(output)}", err=True)
                sys.exit(EXIT_NO_TENSORRT)
            manifest = build_engine(output, manifest, manifest.tensorrt.limits,  # the defaults the export recorded
                                    timing_cache=output / "timing.cache",
                                    log=lambda msg: click.echo(msg, err=True))
            click.echo(describe(output, manifest))
    except (ExportError, OptionsError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except Interrupted as err:
        click.echo(f"error: interrupted by {err}; the unfinished artifact was removed (nothing written to -o)", err=True)
        sys.exit(128 + err.signum)
    except OSError as err:
        click.echo(f"error: {write_failure(err, output) or f'{err.strerror or err} ({err.filename})'}", err=True)
        sys.exit(2)
    finally:
        restore_signals()


if __name__ == "__main__":
    main()
