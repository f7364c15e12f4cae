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
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from convert.hf_t5 import T5Config
from ..errors import MlxflowError
from ..layers import RMSNorm
from .text import MASK_VALUE, TextEncoder, _slug

__all__ = ["T5Config", "T5Encoder", "T5TextEncoder", "load_t5_mlx", "relative_position_bucket"]


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


def load_t5_mlx(path=None) -> T5Encoder:
    """T5Encoder with the weights of an HF T5 folder (`path`, or t5-small from the HF cache/hub)."""
    from convert.hf_t5 import locate_t5_folder, read_hf_t5
    from mlx.utils import tree_flatten

    from ..checkpoint import check_weights_fit

    folder = locate_t5_folder(path)
    config, weights = read_hf_t5(folder)
    model = T5Encoder(config)
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    check_weights_fit(expected, weights, f"T5 encoder {folder}")
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    model.eval()
    mx.eval(model.parameters())
    return model


def load_t5_tokenizer(folder: Path, max_length: int):
    """tokenizers.Tokenizer from tokenizer.json: truncated to max_length (EOS kept), padded to it with id 0."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # the Rust side raises plain Exceptions for malformed files
        raise MlxflowError(f"{folder / 'tokenizer.json'} is not a readable tokenizer: {e}") from None
    # T5's tokenizer.json appends </s> in its post-processor; tokenizers reserves room for
    # it when truncating, so a long caption keeps its EOS as HF's T5 tokenizer does.
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(length=max_length, pad_id=0, pad_token=tok.id_to_token(0) or "<pad>")
    return tok


class T5TextEncoder(TextEncoder):
    """Captions -> T5 encoder states (N, max_length, d_model) float32, padding rows exactly 0.

    path: an HF T5 folder (config.json, model.safetensors or pytorch_model.bin, tokenizer.json);
    None finds google-t5/t5-small in the HF cache or hub. max_length: tokens per caption;
    None takes the folder's "mlxflow_max_length" (tiny random folders) or 128.
    """

    batch_size = 64  # captions per forward pass; bounds memory when a whole dataset is encoded

    def __init__(self, path: str | Path | None = None, max_length: int | None = None):
        from convert.hf_t5 import folder_settings, locate_t5_folder

        folder = locate_t5_folder(path).resolve()
        settings = folder_settings(folder)
        self.model = load_t5_mlx(folder)
        self.config = self.model.config
        self.folder = folder
        self.random = settings["random"]
        self.max_length = int(max_length or settings["max_length"] or 128)
        if self.max_length < 1:
            raise MlxflowError(f"T5 max_length must be >= 1, got {self.max_length}")
        self.tokenizer = load_t5_tokenizer(folder, self.max_length)
        self.tokens = self.max_length
        self.dim = self.config.d_model
        if path is None:
            self.id, self.spec = "t5-small", "t5"
        else:
            self.id = f"t5-{'random-' if self.random else ''}{_slug(folder)}"
            self.spec = f"t5:{folder}"

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 (N, max_length), mask int32 (N, max_length)); EOS appended, pad id 0."""
        enc = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in enc], np.int32).reshape(len(enc), self.max_length)
        mask = np.array([e.attention_mask for e in enc], np.int32).reshape(len(enc), self.max_length)
        if ids.size and ids.max() >= self.config.vocab_size:
            raise MlxflowError(f"{self.folder}: tokenizer.json produced id {ids.max()} beyond the model's "
                               f"vocabulary of {self.config.vocab_size}")
        return ids, mask

    def encode_ids(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(ids (N, L), mask (N, L)) -> (N, L, d_model) float32, rows where mask == 0 set to 0."""
        ids, mask = np.asarray(ids), np.asarray(mask)
        out = np.zeros((*ids.shape, self.dim), np.float32)
        for s in range(0, len(ids), self.batch_size):
            m = mx.array(mask[s:s + self.batch_size].astype(np.int32))
            h = self.model(mx.array(ids[s:s + self.batch_size].astype(np.int32)), m)
            out[s:s + self.batch_size] = np.array((h * m[..., None]).astype(mx.float32))
        return out

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.tokens, self.dim), np.float32)
        return self.encode_ids(*self.tokenize(texts))
