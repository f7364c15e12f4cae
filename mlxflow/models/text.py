"""BERT (sentence-transformers/all-MiniLM-L6-v2's architecture) in MLX: the network behind
the `minilm` and `minilm-tokens` text encoders.

Token ids (N, L) + attention mask -> pooled sentence embedding (N, D) or per-token states
(N, L, D). Loading a Hugging Face folder into it, tokenizing and the encoder specs are
mlxflow/encoders.py's job.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxflowError
from ..layers import Attention


# --- BERT in MLX --------------------------------------------------------------------------

# Additive score for padding keys. Finite and representable in fp16 (the Core ML export
# runs this graph in fp16), yet exp(-1e4) underflows to exactly 0 in fp16 and fp32, so
# padding gets zero attention weight and a fully padded row stays finite.
MASK_VALUE = -1e4

class BertEmbeddings(nn.Module):
    def __init__(self, vocab: int, dim: int, max_positions: int, type_vocab: int, eps: float):
        super().__init__()
        self.word = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(max_positions, dim)
        self.token_type = nn.Embedding(type_vocab, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def __call__(self, ids: mx.array, type_ids: mx.array) -> mx.array:
        positions = mx.arange(ids.shape[1])[None]
        return self.norm(self.word(ids) + self.position(positions) + self.token_type(type_ids))


class BertLayer(nn.Module):
    """Post-norm transformer layer: x = norm(x + attn(x)); x = norm(x + ffn(x)), exact (erf) GELU."""

    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.attn = Attention(dim, heads)
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn_in = nn.Linear(dim, hidden)
        self.ffn_out = nn.Linear(hidden, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = self.attn_norm(x + self.attn(x, mask=mask))
        return self.ffn_norm(x + self.ffn_out(nn.gelu(self.ffn_in(x))))


class BertEncoder(nn.Module):
    """(ids (B,T) int, attention_mask (B,T) {0,1}) -> pooled sentence embedding (B, dim).

    `token_states` gives the per-token last hidden states (B, T, dim) the pooling reads.
    """

    def __init__(self, config: dict, pooling: str = "mean", normalize: bool = True):
        super().__init__()
        dim, eps = config["hidden_size"], config.get("layer_norm_eps", 1e-12)
        if config.get("hidden_act", "gelu") != "gelu":
            raise MlxflowError(f"text encoder activation '{config['hidden_act']}' is not supported (gelu only)")
        self.pooling, self.normalize = pooling, normalize
        self.embeddings = BertEmbeddings(config["vocab_size"], dim, config["max_position_embeddings"],
                                         config.get("type_vocab_size", 2), eps)
        self.layers = [BertLayer(dim, config["num_attention_heads"], config["intermediate_size"], eps)
                       for _ in range(config["num_hidden_layers"])]

    def token_states(self, ids: mx.array, attention_mask: mx.array, type_ids: mx.array | None = None) -> mx.array:
        """(B,T) ids and mask -> (B, T, dim) last hidden states, padding rows exactly 0."""
        type_ids = mx.zeros_like(ids) if type_ids is None else type_ids
        x = self.embeddings(ids, type_ids)
        keep = attention_mask.astype(mx.float32)
        additive = ((1.0 - keep) * MASK_VALUE)[:, None, None, :].astype(x.dtype)
        for layer in self.layers:
            x = layer(x, additive)
        return x * keep[..., None].astype(x.dtype)

    def __call__(self, ids: mx.array, attention_mask: mx.array, type_ids: mx.array | None = None) -> mx.array:
        x = self.token_states(ids, attention_mask, type_ids)
        keep = attention_mask.astype(mx.float32)
        if self.pooling == "cls":
            pooled = x[:, 0]
        else:
            pooled = x.sum(axis=1) / mx.maximum(keep.sum(axis=1, keepdims=True), 1e-9)
        if self.normalize:
            pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled
