"""The T5 encoder in MLX: frozen text states for the `dit` family (T5-small, 128 tokens).

Numerically the same function as Hugging Face's `T5EncoderModel(...).last_hidden_state`:
shared token embedding; one bidirectional bucketed relative-position bias (a learned
(buckets, heads) table, looked up once and added to every layer's scores); attention
scores NOT scaled by 1/sqrt(d); T5's RMS norm (no mean subtraction, no bias); pre-norm
residual blocks; relu FF (wi, wo) or gated-gelu FF (wi_0, wi_1 with tanh GELU, wo); a final
norm. The torch twin is mlxflow/torch_ref/t5.py; the HF key map, config and folder reading
are in convert/hf_t5.py.

`T5TextEncoder` wraps it as a `TextEncoder`: captions -> (N, max_length, d_model) float32
with padding rows exactly 0 (the DiT derives its key-padding mask from all-zero rows).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..configs.encoders import T5Config
from ..layers import RMSNorm
from .text import MASK_VALUE

__all__ = ["T5Config", "T5Encoder", "relative_position_bucket"]


def relative_position_bucket(relative_position: mx.array, num_buckets: int = 32, max_distance: int = 128) -> mx.array:
    """Bidirectional T5 bucket of each relative position (key - query), int32 in [0, num_buckets).

    Half the buckets per direction; within a direction, distances below half of that are
    exact and the rest are log-spaced up to max_distance (everything beyond shares the
    last bucket). Float32 log, truncated to int, exactly as HF computes it.
    """
    half = num_buckets // 2
    offset = (relative_position > 0).astype(mx.int32) * half
    distance = mx.abs(relative_position).astype(mx.int32)
    max_exact = half // 2
    # maximum(.., 1) keeps log finite for the distances the `where` below takes as exact anyway.
    scaled = mx.log(mx.maximum(distance, 1).astype(mx.float32) / max_exact) / math.log(max_distance / max_exact)
    large = mx.minimum(max_exact + (scaled * (half - max_exact)).astype(mx.int32), half - 1)
    return offset + mx.where(distance < max_exact, distance, large)


class T5Attention(nn.Module):
    """Multi-head self-attention without score scaling; x (B, L, d_model), bias (B|1, H, L, L) additive."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.heads, self.head_dim = config.num_heads, config.d_kv
        self.q = nn.Linear(config.d_model, config.inner_dim, bias=False)
        self.k = nn.Linear(config.d_model, config.inner_dim, bias=False)
        self.v = nn.Linear(config.d_model, config.inner_dim, bias=False)
        self.o = nn.Linear(config.inner_dim, config.d_model, bias=False)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        B, L, _ = x.shape
        q = self.q(x).reshape(B, L, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k(x).reshape(B, L, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v(x).reshape(B, L, self.heads, self.head_dim).transpose(0, 2, 1, 3)
        # scale 1: T5 was trained with the 1/sqrt(d) folded into the q initialisation.
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=bias.astype(q.dtype))
        return self.o(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class T5FeedForward(nn.Module):
    """relu: wo(relu(wi x)); gated-gelu: wo(gelu_tanh(wi_0 x) * wi_1 x). (B, L, d_model) -> same."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.gated = config.gated
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        if self.gated:
            # HF's "gelu_new" is the tanh approximation, which is nn.gelu_approx.
            return self.wo(nn.gelu_approx(self.wi_0(x)) * self.wi_1(x))
        return self.wo(nn.relu(self.wi(x)))


class T5Block(nn.Module):
    """Pre-norm residual block: x += attn(norm(x)); x += ffn(norm(x))."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.attn = T5Attention(config)
        self.ffn_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.ffn = T5FeedForward(config)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        x = x + self.attn(self.attn_norm(x), bias)
        return x + self.ffn(self.ffn_norm(x))


class T5Encoder(nn.Module):
    """(ids (B, L) int, mask (B, L) 1=token 0=pad) -> hidden states (B, L, d_model).

    Padding keys get MASK_VALUE added to their scores: zero attention weight, yet finite,
    so a fully padded row stays finite too. Padding query rows are computed like any other
    (HF does the same); callers that need them zero mask them (T5TextEncoder does).
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        # HF keeps this table in block 0 and hands the bias it computes to the later blocks;
        # here the encoder looks it up once and gives it to every block: the same function.
        self.relative_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.layers = [T5Block(config) for _ in range(config.num_layers)]
        self.final_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon)

    def position_bias(self, length: int) -> mx.array:
        """(1, heads, L, L) learned bias of each (query, key) pair from its bucketed offset."""
        pos = mx.arange(length)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.config.relative_attention_num_buckets,
                                           self.config.relative_attention_max_distance)
        return self.relative_bias(buckets).transpose(2, 0, 1)[None]

    def __call__(self, ids: mx.array, mask: mx.array | None = None) -> mx.array:
        x = self.embed(ids)
        bias = self.position_bias(ids.shape[1])
        if mask is not None:
            bias = bias + ((1.0 - mask.astype(mx.float32)) * MASK_VALUE)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        return self.final_norm(x)
