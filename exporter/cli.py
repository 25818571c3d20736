"""`llama-export`: the pipeline's command line.

Today it resolves MODEL, checks every tensor of the checkpoint against its config (names, shapes,
dtypes, read one at a time) and describes the model; ONNX writing is added by the export stage.
"""

from __future__ import annotations

import sys
import time

import click

from .checkpoint import FLOAT_DTYPES
from .cli_options import model_options
from .errors import ExportError
from .presets import resolve_checkpoint


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_options
@click.option("--check/--no-check", default=True, show_default=True,
              help="Read every tensor once and check its dtype (names and shapes are always checked).")
def main(model_name, checkpoint, random_weights, seed, check):
    """Check a Llama 2 checkpoint (preset or directory) and describe it.

    \b
    Examples:
      llama-export --model tiny
      llama-export --model 13b                       # from the local Hugging Face cache
      llama-export --checkpoint ./llama-2-7b         # Meta params.json + consolidated.*.pth
      llama-export --model 70b --random-weights --no-check
    """
    try:
        t0 = time.perf_counter()
        ckpt = resolve_checkpoint(model_name, checkpoint, random_weights, seed)
        c = ckpt.config
        click.echo(f"source: {ckpt.source}")
        click.echo(f"layers {c.num_hidden_layers}, hidden {c.hidden_size}, heads {c.num_attention_heads} "
                   f"(key/value {c.num_key_value_heads}), head_dim {c.head_dim}, vocab {c.vocab_size}, "
                   f"rope {c.rope_type}, {c.num_parameters() / 1e9:.3f} B parameters")
        if check:
            names = ckpt.names()
            with click.progressbar(names, label="reading tensors", file=sys.stderr) as bar:
                for name in bar:
                    tensor = ckpt.load(name)
                    if tensor.dtype not in FLOAT_DTYPES:  # load() already refuses these; belt and braces
                        raise ExportError(f"{ckpt.where(name)}: tensor {name!r} has dtype {tensor.dtype}")
                    del tensor
        click.echo(f"checkpoint OK ({time.perf_counter() - t0:.1f} s)")
    except ExportError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
