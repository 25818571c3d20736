"""Greedy / temperature generation with the reference model (gpt-fast style small functions).

This is the PyTorch baseline every other backend is compared with, not the serving runtime.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .model import KV, LlamaForCausalLM


def prefill(model: LlamaForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, tuple[KV, ...]]:
    logits, cache = model(ids, logits_to_keep=1)
    return logits[:, -1], cache


def decode_one_token(model: LlamaForCausalLM, token: torch.Tensor, cache: tuple[KV, ...]):
    logits, cache = model(token.view(-1, 1), past_key_values=cache, logits_to_keep=1)
    return logits[:, -1], cache


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: LlamaForCausalLM, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None,
             temperature: float = 0.0, seed: int = 0) -> Iterator[int]:
    """Yields new token ids one at a time for a single prompt; stops at EOS or the context window."""
    window = model.config.max_position_embeddings
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_ids) >= window:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context window is {window}")
    generator = torch.Generator().manual_seed(seed)
    device = model.lm_head.weight.device
    logits, cache = prefill(model, torch.tensor([prompt_ids], device=device))
    for step in range(min(max_new_tokens, window - len(prompt_ids))):
        token = sample(logits.float(), temperature, generator)
        yield int(token)
        if eos_id is not None and int(token) == eos_id or step + 1 == max_new_tokens:
            return
        logits, cache = decode_one_token(model, token, cache)
