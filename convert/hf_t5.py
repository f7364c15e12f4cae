"""Import Hugging Face T5 encoders (e.g. google-t5/t5-small) into mlxflow's names.

The `dit` family conditions on frozen T5 encoder states. This module holds everything
about the Hugging Face side, framework-free (numpy only), so both twins share it:

- `T5Config`, read from an HF `config.json`;
- the key map HF <-> mlxflow (`t5_key`, `hf_t5_key`), with full coverage: every HF weight
  maps or is knowingly ignored (the decoder and lm_head of a full T5ForConditionalGeneration
  checkpoint), anything else is an error;
- `read_hf_t5(folder)`: config + weights renamed to mlxflow keys, from `model.safetensors`
  or `pytorch_model.bin`; `t5_param_shapes(config)` is what a model of that config expects;
- `locate_t5_folder(path)`: a folder the user named, the hub cache, or the hub;
- `make_tiny_t5(...)`: a complete HF-format folder with random weights and a word-level
  tokenizer, for tests and for CPU runs labelled "random encoders".

mlxflow names (MLX `mlxflow.models.t5.T5Encoder` and its torch twin):

    embed.weight                      <- shared.weight (vocab, d_model)
    relative_bias.weight              <- encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
    layers.{i}.attn_norm.weight       <- encoder.block.{i}.layer.0.layer_norm.weight
    layers.{i}.attn.{q,k,v,o}.weight  <- encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight
    layers.{i}.ffn_norm.weight        <- encoder.block.{i}.layer.1.layer_norm.weight
    layers.{i}.ffn.{wi,wo}.weight     <- encoder.block.{i}.layer.1.DenseReluDense.{wi,wo}.weight (relu)
    layers.{i}.ffn.{wi_0,wi_1,wo}...  <- ... DenseReluDense.{wi_0,wi_1,wo}.weight (gated-gelu)
    final_norm.weight                 <- encoder.final_layer_norm.weight

Linear weights keep torch's (out, in) layout, which is also MLX's, so no transposes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from convert.hf_hub import locate_hf_folder
from mlxflow.configs.encoders import FEED_FORWARD, MODEL_TYPES, T5Config  # noqa: F401 (re-exported)
from mlxflow.errors import MlxflowError

REPO_IDS = ["google-t5/t5-small", "t5-small"]
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
REQUIRED_FILES = [("config.json",), WEIGHT_FILES, ("tokenizer.json",)]


def read_t5_config(folder) -> tuple[T5Config, dict]:
    """(T5Config, the raw config.json dict) of an HF folder."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise MlxflowError(f"{folder} is not a T5 encoder folder (missing config.json)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MlxflowError(f"{path} is not readable JSON: {e}") from None
    return T5Config.from_hf(raw, str(path)), raw


# --- key map -------------------------------------------------------------------------------

# Decoder and LM head of a full T5ForConditionalGeneration checkpoint: not part of the encoder.
IGNORED = ("decoder.", "lm_head.")
# encoder.embed_tokens is tied to `shared`; some exports carry both, some only one.
TIED_EMBED = "encoder.embed_tokens.weight"

_TO_MLXFLOW = [
    (r"^shared\.weight$", "embed.weight"),
    (r"^encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$", "relative_bias.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight$", r"layers.\1.attn_norm.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight$", r"layers.\1.attn.\2.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight$", r"layers.\1.ffn_norm.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight$", r"layers.\1.ffn.\2.weight"),
    (r"^encoder\.final_layer_norm\.weight$", "final_norm.weight"),
]

_TO_HF = [
    (r"^embed\.weight$", "shared.weight"),
    (r"^relative_bias\.weight$", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    (r"^layers\.(\d+)\.attn_norm\.weight$", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"^layers\.(\d+)\.attn\.([qkvo])\.weight$", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (r"^layers\.(\d+)\.ffn_norm\.weight$", r"encoder.block.\1.layer.1.layer_norm.weight"),
    (r"^layers\.(\d+)\.ffn\.(wi|wi_0|wi_1|wo)\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.\2.weight"),
    (r"^final_norm\.weight$", "encoder.final_layer_norm.weight"),
]


def _rename(key: str, table) -> str | None:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


def t5_key(hf_key: str) -> str | None:
    """HF T5 key -> mlxflow key; None for knowingly ignored keys; MlxflowError for unknown ones.

    The tied `encoder.embed_tokens.weight` maps to `embed.weight` like `shared.weight`;
    `hf_to_mlxflow` decides which of the two copies to keep.
    """
    if hf_key.startswith(IGNORED):
        return None
    if hf_key == TIED_EMBED:
        return "embed.weight"
    new = _rename(hf_key, _TO_MLXFLOW)
    if new is None:
        raise MlxflowError(f"unexpected weight '{hf_key}' in the T5 encoder checkpoint")
    return new


def hf_t5_key(key: str) -> str:
    """mlxflow T5 key -> HF T5EncoderModel key (the inverse of `t5_key`)."""
    new = _rename(key, _TO_HF)
    if new is None:
        raise MlxflowError(f"'{key}' is not a T5 encoder weight")
    return new


def hf_to_mlxflow(hf_weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename an HF state dict to mlxflow keys, as float32; decoder/lm_head dropped."""
    out = {}
    for k, v in hf_weights.items():
        new = t5_key(k)
        if new is None or (k == TIED_EMBED and "shared.weight" in hf_weights):
            continue
        out[new] = np.asarray(v, dtype=np.float32)
    return out


def mlxflow_to_hf(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename mlxflow T5 weights to the keys T5EncoderModel.save_pretrained writes."""
    return {hf_t5_key(k): np.ascontiguousarray(v) for k, v in weights.items()}


def t5_param_shapes(config: T5Config) -> dict[str, tuple[int, ...]]:
    """Every weight a T5Encoder of `config` has (mlxflow keys) and its shape."""
    c = config
    shapes = {"embed.weight": (c.vocab_size, c.d_model),
              "relative_bias.weight": (c.relative_attention_num_buckets, c.num_heads),
              "final_norm.weight": (c.d_model,)}
    for i in range(c.num_layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm.weight"] = (c.d_model,)
        for n in "qkv":
            shapes[p + f"attn.{n}.weight"] = (c.inner_dim, c.d_model)
        shapes[p + "attn.o.weight"] = (c.d_model, c.inner_dim)
        shapes[p + "ffn_norm.weight"] = (c.d_model,)
        for n in (("wi_0", "wi_1") if c.gated else ("wi",)):
            shapes[p + f"ffn.{n}.weight"] = (c.d_ff, c.d_model)
        shapes[p + "ffn.wo.weight"] = (c.d_model, c.d_ff)
    return shapes


# --- reading a folder ------------------------------------------------------------------------


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise MlxflowError(f"{path} is not a readable safetensors file: {e}") from None
    except TypeError:
        # bf16 tensors have no numpy dtype: read them through torch and widen to fp32.
        try:
            from safetensors.torch import load_file as load_torch
        except ImportError:
            raise MlxflowError(f"{path} holds bfloat16 weights; reading them needs torch") from None
        return {k: v.float().numpy() for k, v in load_torch(str(path)).items()}


def _load_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise MlxflowError(f"reading {path} needs torch (or convert the folder to model.safetensors)") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-tensor objects refused by weights_only
        raise MlxflowError(f"{path} is not a readable PyTorch state dict: {e}") from None
    if not isinstance(state, dict):
        raise MlxflowError(f"{path} does not hold a state dict")
    return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "float")}


def read_hf_t5(folder) -> tuple[T5Config, dict[str, np.ndarray]]:
    """(config, float32 weights under mlxflow keys) from an HF T5 folder.

    Reads `model.safetensors` if present, else `pytorch_model.bin`. Shapes are not checked
    here: the loaders compare with the model they build (`check_weights_fit`).
    """
    folder = Path(folder)
    config, _ = read_t5_config(folder)
    if (folder / "model.safetensors").is_file():
        hf = _load_safetensors(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        hf = _load_bin(folder / "pytorch_model.bin")
    else:
        raise MlxflowError(f"{folder} has no T5 weights (needs {' or '.join(WEIGHT_FILES)})")
    return config, hf_to_mlxflow(hf)


def locate_t5_folder(path=None) -> Path:
    """The T5 folder: `path` if given (it must hold the files), else the HF cache or hub (t5-small)."""
    return locate_hf_folder("T5 encoder", list(REPO_IDS), required=list(REQUIRED_FILES), path=path)


def folder_settings(folder) -> dict:
    """mlxflow's own keys in a folder's config.json: random (bool) and max_length (int | None)."""
    _, raw = read_t5_config(folder)
    return {"random": bool(raw.get("mlxflow_random", False)), "max_length": raw.get("mlxflow_max_length")}


# --- tiny random folders ---------------------------------------------------------------------

TINY_WORDS = (
    "a an the and with of on in at face smiling grinning crying laughing winking happy sad angry "
    "red orange yellow green blue purple pink brown black white small big heart star sun moon "
    "cloud fire water tree flower leaf cat dog fish bird apple car house hand eyes mouth open"
).split()
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in T5's SentencePiece vocabulary


def build_word_tokenizer(words):
    """A `tokenizers.Tokenizer`: lowercase, split on whitespace/punctuation, word-level ids,
    `</s>` appended (the T5 tokenizer's post-processing); unknown words -> `<unk>`."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", vocab["</s>"])])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def make_tiny_t5(folder, *, seed: int = 0, d_model: int = 32, num_layers: int = 2, num_heads: int = 2,
                 d_kv: int = 16, d_ff: int = 64, feed_forward_proj: str = "relu", max_length: int = 16,
                 words=None) -> Path:
    """Write a complete HF-format T5 encoder folder with random weights; returns its path.

    Files: config.json (model_type t5, architectures [T5EncoderModel], "mlxflow_random": true,
    "mlxflow_max_length"), model.safetensors (HF key names), tokenizer.json (word-level over
    `words`, default TINY_WORDS) and tokenizer_config.json. Loads in mlxflow's loaders, in
    transformers.T5EncoderModel.from_pretrained and in tokenizers.Tokenizer.from_file.
    Weights are drawn with HF's T5 init scales; norm gains are perturbed around 1 so a
    swapped norm would show in a parity test.
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_word_tokenizer(TINY_WORDS if words is None else words)
    config = T5Config(vocab_size=tok.get_vocab_size(with_added_tokens=True), d_model=d_model, d_kv=d_kv,
                      d_ff=d_ff, num_layers=num_layers, num_heads=num_heads,
                      relative_attention_num_buckets=8, relative_attention_max_distance=max(2 * max_length, 16),
                      feed_forward_proj=feed_forward_proj)
    rng = np.random.default_rng(seed)
    weights = {}
    for key, shape in t5_param_shapes(config).items():
        if key.endswith("norm.weight"):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            # HF's T5 init: std 1 for embeddings, 1/sqrt(fan_in) for projections, with q
            # further scaled by 1/sqrt(d_kv) because T5 does not scale its attention scores.
            std = {"embed.weight": 1.0, "relative_bias.weight": d_model ** -0.5}.get(key, shape[-1] ** -0.5)
            if key.endswith("attn.q.weight"):
                std = (d_model * d_kv) ** -0.5
            w = std * rng.standard_normal(shape)
        weights[key] = w.astype(np.float32)
    save_file(mlxflow_to_hf(weights), str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf = {**config.to_hf(), "mlxflow_random": True, "mlxflow_max_length": max_length}
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>",
         "unk_token": "<unk>", "model_max_length": max_length}, indent=2) + "\n")
    return folder
