"""Click options shared by the commands that read a checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from .presets import PRESET_NAMES


def model_options(func):
    func = click.option("--seed", type=int, default=0, show_default=True,
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


def dtype_option(default: str | None):
    """--fp32/--fp16/--bf16 into `dtype`; with default None the caller picks (e.g. the checkpoint's dtype)."""
    def wrap(func):
        for flag, name in (("--bf16", "bfloat16"), ("--fp16", "float16"), ("--fp32", "float32")):
            extra = {"default": True} if name == default else {}
            func = click.option(flag, "dtype", flag_value=name, **extra,
                                help=f"Weights and activations in {name} (logits are always float32)."
                                     + (" [default]" if name == default else ""))(func)
        return func
    return wrap
