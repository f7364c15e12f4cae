"""Codecs: the slot between images and the space a network works in.

A pixel family trains on images directly (the identity codec); a latent family trains
on autoencoder latents, so data is encoded once before training and samples are
decoded after the ODE solve. Both trainers and the sampler only ever ask a codec:

    network_shape(model_config) -> (H, W, C)   what the network sees, channels-last
    encode(images, model_config)  images (N, H, W, 3) in [-1, 1] -> network space
    decode(x, model_config)       network space -> images (N, H, W, 3) in [-1, 1]
"""

from __future__ import annotations

from .errors import MlxflowError


class Codec:
    name: str = ""
    needs_cache: bool = False  # training data must be encoded once beforehand (a latent cache)

    def network_shape(self, model_config) -> tuple[int, int, int]:
        raise NotImplementedError

    def encode(self, images, model_config):
        raise NotImplementedError

    def decode(self, x, model_config):
        raise NotImplementedError


class PixelCodec(Codec):
    """Identity: the network works on pixels in [-1, 1]."""

    name = "pixels"

    def network_shape(self, model_config) -> tuple[int, int, int]:
        return (model_config.image_size, model_config.image_size, model_config.in_channels)

    def encode(self, images, model_config):
        return images

    def decode(self, x, model_config):
        return x


class LatentCodec(Codec):
    """A frozen KL autoencoder (the SD VAE): images (N, S, S, 3) <-> scaled latents (N, S/f, S/f, C).

    The model config names the autoencoder (`vae`: "sd-vae" or "sd-vae:DIR") and its
    downsampling (`latent_downsample`); the weights load once per spec. Data is encoded
    once into a latent cache (mlxflow.data.latent_cache), so training never runs the VAE;
    sampling decodes after the ODE solve.
    """

    name = "sd-vae"
    needs_cache = True

    def network_shape(self, model_config) -> tuple[int, int, int]:
        f = model_config.latent_downsample
        return (model_config.image_size // f, model_config.image_size // f, model_config.in_channels)

    def autoencoder(self, model_config):
        from .encoders import load_latent_vae

        return load_latent_vae(model_config.vae)

    def encode(self, images, model_config):
        import numpy as np

        return self.autoencoder(model_config).encode(np.asarray(images, np.float32))

    def decode(self, x, model_config):
        import numpy as np

        return self.autoencoder(model_config).decode(np.asarray(x, np.float32))


_CODECS: dict[str, Codec] = {"pixels": PixelCodec(), "sd-vae": LatentCodec()}


def register_codec(codec: Codec) -> Codec:
    _CODECS[codec.name] = codec
    return codec


def get_codec(name: str) -> Codec:
    if name not in _CODECS:
        raise MlxflowError(f"unknown codec '{name}' (known: {', '.join(sorted(_CODECS))})")
    return _CODECS[name]
