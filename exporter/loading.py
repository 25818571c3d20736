"""Build the reference model from a checkpoint, one tensor at a time."""

from __future__ import annotations

import torch

from .checkpoint import Checkpoint, expected_tensors
from .model import LlamaForCausalLM

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    return name if isinstance(name, torch.dtype) else DTYPES[name]


def load_model(ckpt: Checkpoint, dtype: str | torch.dtype = "float32", device: str = "cpu") -> LlamaForCausalLM:
    """The reference model in `dtype` on `device`, filled from `ckpt` without a second full copy."""
    dtype = torch_dtype(dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(ckpt.config)
    for name in expected_tensors(ckpt.config):
        module_path, _, attr = name.rpartition(".")
        module = model.get_submodule(module_path)
        tensor = ckpt.load_as(name, dtype).to(device)
        setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False))
    if ckpt.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
