"""The Stable Diffusion VAE (diffusers' `AutoencoderKL`, e.g. stabilityai/sd-vae-ft-mse) in MLX.

The `dit` family trains on its latents: a (64, 64, 3) image in [-1, 1] becomes an
(8, 8, 4) latent. Weights come from an unmodified diffusers folder (config.json +
diffusion_pytorch_model.safetensors or .bin); convert/hf_vae.py maps their keys.

Parameter names are diffusers' own (encoder.down_blocks.0.resnets.0.norm1.weight, ...,
mid_block.attentions.0.to_out.0.weight), so the key map is the identity apart from old
attention names and conv layouts. Everything here is channels-last:

    AutoencoderKL.encode  (B, H, W, 3) -> mean, logvar  each (B, H/8, W/8, 4)   (unscaled)
    AutoencoderKL.decode  (B, h, w, 4) unscaled z -> (B, 8h, 8w, 3)
    LatentVAE             numpy in/out, batched, scaled latents: what the rest of mlxflow uses
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MlxflowError
from ..layers import upsample_nearest_2x

HUB_REPOS = ["stabilityai/sd-vae-ft-mse"]
REQUIRED_FILES = [("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")]
# diffusers clamps the log-variance of its DiagonalGaussianDistribution to this range.
LOGVAR_RANGE = (-30.0, 20.0)
EPS = 1e-6  # every GroupNorm of the SD VAE (resnets, attention, conv_norm_out)


@dataclass
class VAEConfig:
    """The fields of a diffusers AutoencoderKL config.json that shape the network.

    Defaults are stabilityai/sd-vae-ft-mse's. Unknown keys of config.json are ignored.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if not self.block_out_channels:
            raise MlxflowError("VAE config: block_out_channels is empty")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise MlxflowError(f"VAE config: block_out_channels {bad} not divisible by norm_num_groups "
                               f"{self.norm_num_groups}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        # Refuse what this network does not implement rather than load weights into the wrong graph.
        if d.get("act_fn", "silu") != "silu":
            raise MlxflowError(f"VAE config: act_fn '{d['act_fn']}' is not supported (silu only)")
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            other = [t for t in d.get(key, ()) if t != kind]
            if other:
                raise MlxflowError(f"VAE config: {key} {other[0]} is not supported ({kind} only)")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_file(cls, path) -> "VAEConfig":
        return cls.from_dict(read_config_json(path))


def read_config_json(path) -> dict:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise MlxflowError(f"VAE config not found: {path}") from None
    except (OSError, ValueError) as e:
        raise MlxflowError(f"cannot read VAE config {path}: {' '.join(str(e).split())}") from None
    if not isinstance(d, dict):
        raise MlxflowError(f"VAE config {path} is not a JSON object")
    return d


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # pytorch_compatible groups channels exactly as torch.nn.GroupNorm does.
    return nn.GroupNorm(groups, channels, eps=EPS, pytorch_compatible=True)


# --- blocks -------------------------------------------------------------------------------

class ResnetBlock2D(nn.Module):
    """(B, H, W, in) -> (B, H, W, out): two GroupNorm-SiLU-conv3x3 steps plus a shortcut
    (a 1x1 conv when the channel count changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class AttentionBlock(nn.Module):
    """(B, H, W, C) -> same: single-head self-attention over the H*W positions, GroupNorm
    first, residual added after the output projection. `to_out` is a one-element list so
    its weights are named `to_out.0.*` as in diffusers."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        h = self.group_norm(x).reshape(B, 1, H * W, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=C ** -0.5)
        return x + self.to_out[0](o).reshape(B, H, W, C)


class Downsample2D(nn.Module):
    """(B, H, W, C) -> (B, H/2, W/2, C): pad one row/column at the bottom/right, then a
    stride-2 3x3 conv without padding (diffusers' padding=0 downsampler)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample2D(nn.Module):
    """(B, H, W, C) -> (B, 2H, 2W, C): nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(upsample_nearest_2x(x))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
                        for i in range(layers)]
        self.downsamplers = [Downsample2D(out_channels)] if downsample else []

    def __call__(self, x: mx.array) -> mx.array:
        for block in self.resnets + self.downsamplers:
            x = block(x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
                        for i in range(layers)]
        self.upsamplers = [Upsample2D(out_channels)] if upsample else []

    def __call__(self, x: mx.array) -> mx.array:
        for block in self.resnets + self.upsamplers:
            x = block(x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet -> (self-attention) -> resnet at the lowest resolution, channels unchanged."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, groups), ResnetBlock2D(channels, channels, groups)]
        self.attentions = [AttentionBlock(channels, groups)] if attention else []

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """(B, H, W, in_channels) -> (B, H/f, W/f, 2 * latent_channels) Gaussian moments (before quant_conv)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = [DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups,
                                               downsample=i < len(ch) - 1) for i in range(len(ch))]
        self.mid_block = UNetMidBlock2D(ch[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = _norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """(B, h, w, latent_channels) -> (B, h*f, w*f, out_channels) (after post_quant_conv)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(ch[0], groups, cfg.mid_block_add_attention)
        # One resnet more per level than the encoder, as in diffusers.
        self.up_blocks = [UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups,
                                           upsample=i < len(ch) - 1) for i in range(len(ch))]
        self.conv_norm_out = _norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL, channels-last. See the module docstring for shapes."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1)
        if config.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(c, c, 1)

    def encode(self, images: mx.array) -> tuple[mx.array, mx.array]:
        """images (B, H, W, in_channels) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent_channels)."""
        moments = self.encoder(images)
        if "quant_conv" in self:
            moments = self.quant_conv(moments)
        mean, logvar = mx.split(moments, 2, axis=-1)
        return mean, mx.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: mx.array) -> mx.array:
        """z (B, h, w, latent_channels), unscaled -> images (B, h*f, w*f, out_channels), not clipped."""
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, images: mx.array) -> mx.array:
        """Reconstruction through the posterior mean: (B, H, W, C) -> (B, H, W, C)."""
        return self.decode(self.encode(images)[0])


# --- loading ------------------------------------------------------------------------------

def parameter_shapes(model: nn.Module) -> dict[str, tuple]:
    from mlx.utils import tree_flatten

    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def load_autoencoder(folder) -> tuple[AutoencoderKL, dict]:
    """(model with the folder's weights, config.json dict) from a diffusers AutoencoderKL folder."""
    from convert.hf_vae import read_hf_vae

    from ..checkpoint import check_weights_fit

    folder = Path(folder)
    raw_config, weights = read_hf_vae(folder)
    model = AutoencoderKL(VAEConfig.from_dict(raw_config))
    check_weights_fit(parameter_shapes(model), weights, f"VAE weights in {folder}")
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    mx.eval(model.parameters())
    return model, raw_config


def _slug(path: Path) -> str:
    import hashlib

    return hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:8]


class LatentVAE:
    """The SD VAE as mlxflow's latent codec: numpy float32 in and out, batched internally.

    path: a diffusers AutoencoderKL folder; None looks for stabilityai/sd-vae-ft-mse in the
    Hugging Face cache (then the hub, when reachable) via convert.hf_hub.locate_hf_folder.

    Latents are scaled: encode returns (z - shift) * scaling_factor, which has roughly unit
    variance, and decode undoes it before the network, as diffusers' pipelines do.
    """

    def __init__(self, path=None, batch_size: int = 16):
        from convert.hf_hub import locate_hf_folder

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


_CACHE: dict[str, LatentVAE] = {}


def load_latent_vae(spec: str = "sd-vae") -> LatentVAE:
    """`sd-vae` (the hub cache / hub) or `sd-vae:DIR` -> a LatentVAE, loaded once per spec."""
    name, _, arg = spec.partition(":")
    if name != "sd-vae":
        raise MlxflowError(f"unknown VAE '{spec}' (known: sd-vae, sd-vae:DIR)")
    if spec not in _CACHE:
        _CACHE[spec] = LatentVAE(arg or None)
    return _CACHE[spec]


# --- random folders for tests and labelled CPU runs ----------------------------------------

def make_tiny_vae(folder, *, seed: int = 0, block_out_channels=(16, 32, 32, 32), layers_per_block: int = 1,
                  latent_channels: int = 4, norm_num_groups: int = 8) -> Path:
    """Write a diffusers AutoencoderKL folder with random weights; returns the folder.

    4 levels keep the real VAE's 8x downsampling (64x64 -> 8x8). config.json carries
    `"mlxflow_random": true`, so LatentVAE.random tells runs on it apart. The folder also
    loads in diffusers' AutoencoderKL.from_pretrained.
    """
    from convert.hf_vae import write_diffusers_folder

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
