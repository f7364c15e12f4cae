"""Codecs: the slot between images and the space a network works in.

A pixel family trains on images directly (the identity codec); a latent family trains
on autoencoder latents, so data is encoded once before training and samples are
decoded after the ODE solve. Both trainers and the sampler only ever ask a codec:

    network_shape(image_size, channels) -> (H, W, C)   what the network sees, channels-last
    encode(images)  images (N, H, W, 3) in [-1, 1] -> network space
    decode(x)       network space -> images (N, H, W, 3) in [-1, 1]
"""

from __future__ import annotations

from .errors import MlxflowError


class Codec:
    name: str = ""

    def network_shape(self, image_size: int, channels: int) -> tuple[int, int, int]:
        raise NotImplementedError

    def encode(self, images):
        raise NotImplementedError

    def decode(self, x):
        raise NotImplementedError


class PixelCodec(Codec):
    """Identity: the network works on pixels in [-1, 1]."""

    name = "pixels"

    def network_shape(self, image_size: int, channels: int) -> tuple[int, int, int]:
        return (image_size, image_size, channels)

    def encode(self, images):
        return images

    def decode(self, x):
        return x


_CODECS: dict[str, Codec] = {"pixels": PixelCodec()}


def register_codec(codec: Codec) -> Codec:
    _CODECS[codec.name] = codec
    return codec


def get_codec(name: str) -> Codec:
    if name not in _CODECS:
        raise MlxflowError(f"unknown codec '{name}' (known: {', '.join(sorted(_CODECS))})")
    return _CODECS[name]
