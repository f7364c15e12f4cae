"""Import Hugging Face BERT-family sentence encoders (e.g. all-MiniLM-L6-v2) into mlxflow's names.

A pure key map: the HF folder's `model.safetensors` keys -> the names used by
`mlxflow.models.text.BertEncoder` and its torch twin. Every HF weight must map (or be
knowingly ignored) and every model weight must be provided; shapes are checked by the
caller with `check_weights_fit`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from mlxflow.errors import MlxflowError

# The pooler (a CLS-token dense layer) is not used by mean-pooling sentence encoders;
# position_ids is a non-trainable buffer some exports carry.
IGNORED = ("pooler.", "embeddings.position_ids")

_RENAMES = [
    (r"^embeddings\.word_embeddings\.", "embeddings.word."),
    (r"^embeddings\.position_embeddings\.", "embeddings.position."),
    (r"^embeddings\.token_type_embeddings\.", "embeddings.token_type."),
    (r"^embeddings\.LayerNorm\.", "embeddings.norm."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.query\.", r"layers.\1.attn.q_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.key\.", r"layers.\1.attn.k_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.value\.", r"layers.\1.attn.v_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attn.out_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attn_norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.ffn_in."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.ffn_out."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.ffn_norm."),
]


def bert_key(hf_key: str) -> str | None:
    """HF BERT key -> mlxflow key; None for ignored keys; MlxflowError for unknown ones."""
    key = hf_key[len("bert."):] if hf_key.startswith("bert.") else hf_key
    if key.startswith(IGNORED):
        return None
    for pattern, repl in _RENAMES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    raise MlxflowError(f"unexpected weight '{hf_key}' in the text encoder checkpoint")


def read_hf_bert(folder) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, weights renamed to mlxflow keys) from a Hugging Face model folder."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise MlxflowError(f"{folder} is not a Hugging Face sentence-encoder folder (missing {name})")
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") not in ("bert", None):
        raise MlxflowError(f"{folder}: model_type '{config.get('model_type')}' is not a BERT encoder")
    weights = {}
    for k, v in load_file(str(folder / "model.safetensors")).items():
        new = bert_key(k)
        if new is not None:
            weights[new] = v.astype(np.float32)
    return config, weights


def pooling_mode(folder) -> str:
    """'mean' or 'cls' from sentence-transformers' 1_Pooling/config.json (mean if absent)."""
    cfg_file = Path(folder) / "1_Pooling" / "config.json"
    if not cfg_file.is_file():
        return "mean"
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_mean_tokens", True):
        return "mean"
    raise MlxflowError(f"{cfg_file}: only mean or CLS pooling is supported")


def normalizes(folder) -> bool:
    """Whether the sentence-transformers pipeline ends in an L2 Normalize module."""
    modules = Path(folder) / "modules.json"
    if not modules.is_file():
        return True
    return any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))
