"""PyTorch twin of the MLX BERT sentence encoder in mlxflow/models/text.py.

Same class and attribute names, so the HF weight map in convert/hf_text.py serves both.
It is what the Core ML text-encoder export traces, and the reference the MLX encoder is
tested against.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Attention


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

    def forward(self, ids: torch.Tensor, type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x, mask=mask))
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))


class BertEncoder(nn.Module):
    """(ids (B,T) int, attention_mask (B,T) {0,1}) -> pooled sentence embedding (B, dim).

    `token_states` gives the per-token last hidden states (B, T, dim) the pooling reads.
    """

    def __init__(self, config: dict, pooling: str = "mean", normalize: bool = True):
        super().__init__()
        dim, eps = config["hidden_size"], config.get("layer_norm_eps", 1e-12)
        self.pooling, self.normalize = pooling, normalize
        self.embeddings = BertEmbeddings(config["vocab_size"], dim, config["max_position_embeddings"],
                                         config.get("type_vocab_size", 2), eps)
        self.layers = nn.ModuleList(BertLayer(dim, config["num_attention_heads"], config["intermediate_size"], eps)
                                    for _ in range(config["num_hidden_layers"]))

    def token_states(self, ids: torch.Tensor, attention_mask: torch.Tensor,
                     type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B,T) ids and mask -> (B, T, dim) last hidden states, padding rows exactly 0."""
        type_ids = torch.zeros_like(ids) if type_ids is None else type_ids
        x = self.embeddings(ids, type_ids)
        keep = attention_mask.float()
        additive = ((1.0 - keep) * MASK_VALUE)[:, None, None, :].to(x.dtype)
        for layer in self.layers:
            x = layer(x, additive)
        return x * keep[..., None].to(x.dtype)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor, type_ids: torch.Tensor | None = None):
        x = self.token_states(ids, attention_mask, type_ids)
        keep = attention_mask.float()
        if self.pooling == "cls":
            pooled = x[:, 0]
        else:
            pooled = x.sum(dim=1) / keep.sum(dim=1, keepdim=True).clamp_min(1e-9)
        if self.normalize:
            pooled = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return pooled
