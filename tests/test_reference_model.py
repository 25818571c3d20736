"""The reference model against transformers' LlamaForCausalLM, fp32, max abs diff ≤ 1e-5."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from llama_export.exporter.checkpoint import RandomCheckpoint
from llama_export.exporter.loading import load_model
from conftest import small_config, state_dict, transformers_model

TOL = 1e-5

CONFIGS = {
    "mha": {},
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2),
    "mqa-head_dim": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32),
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    # max_position_embeddings below the test length, so the NTK base really changes step by step
    "dynamic": dict(max_position_embeddings=16, rope_scaling={"type": "dynamic", "factor": 2.0}),
    "llama3": dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                               "beta_fast": 32, "beta_slow": 1}),
    "tied": dict(tie_word_embeddings=True),
    "tp2": dict(pretraining_tp=2, num_key_value_heads=2),
    "bias": dict(attention_bias=True, mlp_bias=True),
}


def left_padded_batch(vocab: int, length: int, pads=(0, 5, 9), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(pads), length), generator=gen)
    mask = torch.ones(len(pads), length, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def biased(ckpt: RandomCheckpoint) -> dict[str, torch.Tensor]:
    """Random weights, with non-zero biases where the config has them."""
    weights = state_dict(ckpt)
    for name in weights:
        if name.endswith(".bias"):
            weights[name] = 0.1 * torch.randn(weights[name].shape, generator=torch.Generator().manual_seed(len(name)))
    return weights


class Weights(RandomCheckpoint):
    def __init__(self, config, weights):
        super().__init__(config)
        self._w = weights

    def load_as(self, name, dtype):
        return self._w[name].to(dtype)


@pytest.mark.parametrize("case", list(CONFIGS))
def test_prefill_and_decode_match_transformers(case):
    config = small_config(**CONFIGS[case])
    weights = biased(RandomCheckpoint(config, seed=hash(case) % 1000))
    ours, theirs = load_model(Weights(config, weights)), transformers_model(config, weights)

    ids, mask, pos = left_padded_batch(config.vocab_size, 17)
    real = mask.bool()
    with torch.no_grad():
        logits, cache = ours(ids, mask, pos)
        hf_cache = DynamicCache()
        out = theirs(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=hf_cache, use_cache=True)
        assert (logits - out.logits)[real].abs().max().item() <= TOL
        gen = torch.Generator().manual_seed(1)
        for _ in range(6):  # decode steps with the cache
            step = torch.randint(3, config.vocab_size, (3, 1), generator=gen)
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            pos = pos[:, -1:] + 1
            logits, cache = ours(step, mask, pos, past_key_values=cache, logits_to_keep=1)
            out = theirs(input_ids=step, attention_mask=mask, position_ids=pos, past_key_values=out.past_key_values,
                         use_cache=True, logits_to_keep=1)
            assert logits.shape == (3, 1, config.vocab_size)
            assert (logits - out.logits).abs().max().item() <= TOL
    # the present cache is GQA-shaped [batch, kv_heads, total, head_dim] and equals transformers' cache
    key, value = cache[0]
    assert key.shape == (3, config.num_key_value_heads, 17 + 6, config.head_dim)
    hf_key = out.past_key_values.layers[0].keys
    assert (key - hf_key)[:, :, 9:].abs().max().item() <= TOL  # positions every row holds for real


def test_logits_to_keep_int_and_tensor():
    config = small_config(num_attention_heads=8, num_key_value_heads=2)
    ckpt = RandomCheckpoint(config, seed=3)
    ours, theirs = load_model(ckpt), transformers_model(config, state_dict(ckpt))
    ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = theirs(input_ids=ids).logits
        for keep in (0, 1, 4, 11):
            mine, _ = ours(ids, logits_to_keep=keep)
            ref = theirs(input_ids=ids, logits_to_keep=keep).logits
            assert mine.shape == ref.shape == (2, 11 if keep == 0 else keep, config.vocab_size)
            assert (mine - ref).abs().max().item() <= TOL
        index = torch.tensor([0, 3, 10])
        mine, _ = ours(ids, logits_to_keep=index)
        ref = theirs(input_ids=ids, logits_to_keep=index).logits
        assert (mine - ref).abs().max().item() <= TOL
        assert (mine - full[:, index]).abs().max().item() <= TOL


def test_pretraining_tp_is_computed_sliced():
    """tp=2 sums partial products: equal to tp=1 up to rounding, but not the same floating-point program."""
    config = small_config(pretraining_tp=2)
    ckpt = RandomCheckpoint(config, seed=5)
    sliced, plain = load_model(ckpt), load_model(RandomCheckpoint(config.replace(pretraining_tp=1), seed=5))
    ids = torch.randint(0, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = sliced(ids)[0], plain(ids)[0]
    assert (a - b).abs().max().item() <= TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_fp32_and_finite(dtype):
    config = small_config(num_attention_heads=8, num_key_value_heads=2)
    ckpt = RandomCheckpoint(config, seed=7)
    ref, half = load_model(ckpt, "float32"), load_model(ckpt, dtype)
    ids, mask, pos = left_padded_batch(config.vocab_size, 12)
    with torch.no_grad():
        a, _ = ref(ids, mask, pos)
        b, _ = half(ids, mask, pos)
    assert b.dtype == torch.float32  # logits always come out in fp32
    real = mask.bool()
    assert torch.isfinite(b).all()
    assert (a - b)[real].abs().max().item() < 0.05


def test_rmsnorm_survives_hidden_states_beyond_fp16_square_range():
    """Hidden states of magnitude > 256 square past fp16's 65504; statistics in fp32 keep them finite."""
    from llama_export.exporter.model import RMSNorm

    norm = RMSNorm(64, 1e-5).half()
    x = torch.full((1, 2, 64), 1000.0, dtype=torch.float16)
    y = norm(x)
    assert torch.isfinite(y).all() and torch.allclose(y.float(), torch.ones_like(y, dtype=torch.float32), atol=1e-3)
