"""PyTorch twin of the MLX T5 encoder in mlxflow/models/t5.py.

Same classes, attribute names and structure, so convert/hf_t5.py's key map serves both;
only framework idiom differs (forward vs __call__, nn.ModuleList vs lists). It is the
reference the MLX encoder is tested against and what CUDA training runs to embed captions.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configs.encoders import T5Config
from .layers import RMSNorm

__all__ = ["T5Config", "T5Encoder", "relative_position_bucket"]

# Additive score for padding keys: zero attention weight, yet finite (see models/text.py).
MASK_VALUE = -1e4


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """Bidirectional T5 bucket of each relative position (key - query), long in [0, num_buckets).

    Half the buckets per direction; within a direction, distances below half of that are
    exact and the rest are log-spaced up to max_distance (everything beyond shares the
    last bucket). Float32 log, truncated to int, exactly as HF computes it.
    """
    half = num_buckets // 2
    offset = (relative_position > 0).long() * half
    distance = relative_position.abs().long()
    max_exact = half // 2
    # clamp_min(1) keeps log finite for the distances the `where` below takes as exact anyway.
    scaled = torch.log(distance.clamp_min(1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (scaled * (half - max_exact)).long()).clamp_max(half - 1)
    return offset + torch.where(distance < max_exact, distance, large)


class T5Attention(nn.Module):
    """Multi-head self-attention without score scaling; x (B, L, d_model), bias (B|1, H, L, L) additive."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.heads, self.head_dim = config.num_heads, config.d_kv
        self.q = nn.Linear(config.d_model, config.inner_dim, bias=False)
        self.k = nn.Linear(config.d_model, config.inner_dim, bias=False)
        self.v = nn.Linear(config.d_model, config.inner_dim, bias=False)
        self.o = nn.Linear(config.inner_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        # scale 1: T5 was trained with the 1/sqrt(d) folded into the q initialisation.
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(o.transpose(1, 2).reshape(B, L, -1))


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            # HF's "gelu_new" is the tanh approximation.
            return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))
        return self.wo(F.relu(self.wi(x)))


class T5Block(nn.Module):
    """Pre-norm residual block: x += attn(norm(x)); x += ffn(norm(x))."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.attn = T5Attention(config)
        self.ffn_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.ffn = T5FeedForward(config)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), bias)
        return x + self.ffn(self.ffn_norm(x))


class T5Encoder(nn.Module):
    """(ids (B, L) long, mask (B, L) 1=token 0=pad) -> hidden states (B, L, d_model).

    Padding keys get MASK_VALUE added to their scores: zero attention weight, yet finite,
    so a fully padded row stays finite too. Padding query rows are computed like any other
    (HF does the same); callers that need them zero mask them.
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        # HF keeps this table in block 0 and hands the bias it computes to the later blocks;
        # here the encoder looks it up once and gives it to every block: the same function.
        self.relative_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.layers = nn.ModuleList(T5Block(config) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon)

    def position_bias(self, length: int) -> torch.Tensor:
        """(1, heads, L, L) learned bias of each (query, key) pair from its bucketed offset."""
        pos = torch.arange(length, device=self.relative_bias.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.config.relative_attention_num_buckets,
                                           self.config.relative_attention_max_distance)
        return self.relative_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(ids.long())
        bias = self.position_bias(ids.shape[1])
        if mask is not None:
            bias = bias + ((1.0 - mask.float()) * MASK_VALUE)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        return self.final_norm(x)
