"""Click options shared by the commands that read a checkpoint."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from .presets import PRESET_NAMES


def model_options(func):
    func = click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                        help="Seed for --random-weights.")(func)
    func = click.option("--random-weights", is_flag=True,
                        help="Use seeded random weights of the model's shape (structure-only work; no download).")(func)
    func = click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
                        help="Checkpoint directory: Hugging Face (config.json + *.safetensors or "
                             "pytorch_model*.bin) or Meta (params.json + consolidated.*.pth).")(func)
    func = click.option("--model", "model_name", default="tiny", show_default=True, metavar="MODEL",
                        help=f"A preset ({', '.join(PRESET_NAMES)}) or a checkpoint directory. Presets other "
                             "than tiny are looked up in the local Hugging Face cache.")(func)
    return func


_DTYPE_FLAGS = (("--bf16", "bfloat16"), ("--fp16", "float16"), ("--fp32", "float32"))


def dtype_option(default: str | None):
    """--fp32/--fp16/--bf16 into `dtype`; with default None the caller picks (e.g. the checkpoint's dtype). Two
    different flags are refused (one shared click destination would keep the last one silently)."""
    def wrap(func):
        @functools.wraps(func)
        def command(*args, **kwargs):
            given = [flag for flag, name in _DTYPE_FLAGS if kwargs.pop(name)]
            if len(given) > 1:
                raise click.UsageError(f"{' and '.join(given)} conflict: pass one of --fp32, --fp16, --bf16")
            kwargs["dtype"] = dict(_DTYPE_FLAGS)[given[0]] if given else default
            return func(*args, **kwargs)
        for flag, name in _DTYPE_FLAGS:
            command = click.option(flag, name, is_flag=True,
                                   help=f"Weights and activations in {name} (logits are always float32)."
                                        + (" [default]" if name == default else ""))(command)
        return command
    return wrap
