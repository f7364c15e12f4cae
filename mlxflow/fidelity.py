"""Prompt fidelity: does a sample look most like the training image it was prompted with?

Nearest neighbours are found in pixel space after area-downsampling to 16x16: emoji are
flat, centred icons, so colour layout at low resolution identifies them well, and the
downsampling forgives one-pixel shifts and sampling noise that full-resolution L2 punishes.
"""

from __future__ import annotations

import numpy as np


def _downsample(images: np.ndarray, size: int) -> np.ndarray:
    """(N,H,W,3) uint8 -> (N, size*size*3) float32 by block averaging (H, W multiples of size)."""
    n, h, w, c = images.shape
    if h % size or w % size:
        from PIL import Image

        images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BOX)) for im in images])
        return images.reshape(n, -1).astype(np.float32)
    x = images.astype(np.float32).reshape(n, size, h // size, size, w // size, c).mean(axis=(2, 4))
    return x.reshape(n, -1)


def nearest_neighbours(generated: np.ndarray, reference: np.ndarray, downsample: int = 16,
                       chunk: int = 256) -> np.ndarray:
    """Index into `reference` of each generated image's nearest neighbour (L2 after downsampling)."""
    g = _downsample(generated, downsample)
    r = _downsample(reference, downsample)
    r_sq = (r * r).sum(axis=1)
    out = np.empty(len(g), np.int64)
    for lo in range(0, len(g), chunk):
        block = g[lo: lo + chunk]
        d = r_sq[None] - 2.0 * block @ r.T  # |g|^2 is constant per row
        out[lo: lo + chunk] = d.argmin(axis=1)
    return out


def prompt_fidelity(generated: np.ndarray, prompt_indices: np.ndarray, reference: np.ndarray,
                    downsample: int = 16) -> float:
    """Share of generated images whose nearest reference image is (identical to) the prompted one."""
    prompt_indices = np.asarray(prompt_indices)
    if len(generated) != len(prompt_indices):
        raise ValueError(f"{len(generated)} images for {len(prompt_indices)} prompt indices")
    nn_idx = nearest_neighbours(generated, reference, downsample)
    # Duplicate training images (same picture, different label) count as a hit.
    hit = [np.array_equal(reference[a], reference[b]) for a, b in zip(nn_idx, prompt_indices)]
    return float(np.mean(hit)) if hit else 0.0
