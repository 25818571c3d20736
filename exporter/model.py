"""The reference Llama 2 in PyTorch, with Hugging Face state-dict names.

Everything the pipeline produces is measured against this file. It takes explicit past key/value
tensors and returns the present ones, shaped `[batch, num_key_value_heads, length, head_dim]`, so
that the same forward is what gets traced to ONNX. It creates no tensor on a fixed device inside
`forward`, so it can be traced with its weights on the meta device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import LlamaConfig
from .rope import dynamic_inv_freq, rope_parameters

KV = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # statistics in fp32 whatever the model dtype: fp16 squares overflow past 256
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def split_linear(x: torch.Tensor, layer: nn.Linear, tp: int, split_input: bool) -> torch.Tensor:
    """`layer(x)` computed the way a `pretraining_tp`-way sharded layer summed it during training."""
    if tp == 1:
        return layer(x)
    if not split_input:  # column parallel: each shard owns a slice of the outputs
        biases = layer.bias.chunk(tp) if layer.bias is not None else [None] * tp
        return torch.cat([F.linear(x, w, b) for w, b in zip(layer.weight.chunk(tp, 0), biases)], dim=-1)
    # row parallel: each shard sees a slice of the inputs, and their partial products are summed
    parts = zip(x.chunk(tp, dim=-1), layer.weight.chunk(tp, dim=1))
    out = sum(F.linear(xi, wi) for xi, wi in parts)
    return out + layer.bias if layer.bias is not None else out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=bias)

    def forward(self, x, cos, sin, mask, past: KV | None) -> tuple[torch.Tensor, KV]:
        b, q_len, _ = x.shape
        tp = self.config.pretraining_tp
        q = split_linear(x, self.q_proj, tp, False).view(b, q_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = split_linear(x, self.k_proj, tp, False).view(b, q_len, self.n_kv, self.head_dim).transpose(1, 2)
        v = split_linear(x, self.v_proj, tp, False).view(b, q_len, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(self.head_dim), enable_gqa=self.n_kv != self.n_heads
        )
        out = out.transpose(1, 2).reshape(b, q_len, self.n_heads * self.head_dim)
        return split_linear(out, self.o_proj, tp, True), (k, v)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.tp = config.pretraining_tp
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = split_linear(x, self.gate_proj, self.tp, False)
        up = split_linear(x, self.up_proj, self.tp, False)
        return split_linear(F.silu(gate) * up, self.down_proj, self.tp, True)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, past: KV | None) -> tuple[torch.Tensor, KV]:
        attn, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), present


class Rotary(nn.Module):
    """cos/sin for the given positions; the frequencies are computed from the config on the inputs'
    device (a few dozen floats), so the module holds no buffer that a meta-device trace would lose."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.rope_type == "dynamic":
            inv_freq, scaling = dynamic_inv_freq(self.config, position_ids), 1.0
        else:
            inv_freq, scaling = rope_parameters(self.config, position_ids.device)
        freqs = position_ids[:, :, None].float() * inv_freq[None, None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * scaling, emb.sin() * scaling
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]  # [batch, 1, seq, head_dim]


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Rotary(config)


def attention_mask_4d(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """`[batch, total]` padding mask (1 = token) → boolean `[batch, 1, q_len, total]` causal mask.

    Each position may always attend to itself, so that a left-padding row is never fully masked
    (a fully masked softmax is NaN, and a NaN value poisons every later layer through 0 * NaN).
    Real tokens are unaffected: they attend to themselves anyway.
    """
    total = attention_mask.shape[1]
    key_pos = torch.arange(total, device=attention_mask.device)
    query_pos = key_pos[total - q_len:]
    causal = key_pos[None, :] <= query_pos[:, None]
    allowed = causal[None] & attention_mask[:, None, :].bool()
    allowed = allowed | (key_pos[None, :] == query_pos[:, None])[None]
    return allowed[:, None]


def keep_last(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The last `n` positions of `x` (all of them when n == 0), traceable with a data-dependent n."""
    seq = x.shape[1]
    start = torch.where(n > 0, seq - n.clamp(max=seq), torch.zeros_like(n)).item()
    torch._check_is_size(start)
    torch._check(start < seq)
    return x.narrow(1, start, seq - start)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: list[KV] | tuple[KV, ...] | None = None,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> tuple[torch.Tensor, tuple[KV, ...]]:
        """Returns float32 logits `[batch, kept, vocab]` and the present (key, value) of each layer.

        `logits_to_keep`: an int N keeps the last N positions (0 keeps all); a 1-D tensor keeps those
        sequence indices. The vocabulary projection runs only on the kept positions.
        """
        b, q_len = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if attention_mask is None:
            attention_mask = input_ids.new_ones((b, past_len + q_len))
        if position_ids is None:
            position_ids = (torch.arange(q_len, device=input_ids.device) + past_len)[None].expand(b, q_len)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)
        mask = attention_mask_4d(attention_mask, q_len)
        presents = []
        for i, layer in enumerate(self.model.layers):
            x, present = layer(x, cos, sin, mask, past_key_values[i] if past_key_values else None)
            presents.append(present)
        x = self.model.norm(x)
        if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 1:
            x = x[:, logits_to_keep]
        elif isinstance(logits_to_keep, torch.Tensor):  # a scalar tensor, as in the exported graph
            x = keep_last(x, logits_to_keep)
        elif logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = split_linear(x, self.lm_head, self.config.pretraining_tp, False)
        return logits.float(), tuple(presents)
