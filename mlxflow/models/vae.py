"""The Stable Diffusion VAE (diffusers' `AutoencoderKL`, e.g. stabilityai/sd-vae-ft-mse) in MLX.

The `dit` family trains on its latents: a (64, 64, 3) image in [-1, 1] becomes an
(8, 8, 4) latent. Weights come from an unmodified diffusers folder (config.json +
diffusion_pytorch_model.safetensors or .bin); convert/hf_vae.py maps their keys.

Parameter names are diffusers' own (encoder.down_blocks.0.resnets.0.norm1.weight, ...,
mid_block.attentions.0.to_out.0.weight), so the key map is the identity apart from old
attention names and conv layouts. Everything here is channels-last:

    AutoencoderKL.encode  (B, H, W, 3) -> mean, logvar  each (B, H/8, W/8, 4)   (unscaled)
    AutoencoderKL.decode  (B, h, w, 4) unscaled z -> (B, 8h, 8w, 3)
    mlxflow.encoders.LatentVAE wraps it: numpy in/out, batched, scaled latents
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..configs.encoders import VAEConfig
from ..layers import upsample_nearest_2x

# diffusers clamps the log-variance of its DiagonalGaussianDistribution to this range.
LOGVAR_RANGE = (-30.0, 20.0)
EPS = 1e-6  # every GroupNorm of the SD VAE (resnets, attention, conv_norm_out)


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


def parameter_shapes(model: nn.Module) -> dict[str, tuple]:
    from mlx.utils import tree_flatten

    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
