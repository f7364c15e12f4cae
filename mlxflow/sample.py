"""Sampling: noise -> ODE solver -> images.

`sample_steps` is a generator yielding (i, t, x) after every solver step, so the CLI can
show progress and keep preview frames; `generate` wraps it for a checkpoint and prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import mlx.core as mx
import numpy as np
from PIL import Image

from .errors import MlxflowError
from .flow import to_velocity
from .models import load_model
from .solvers import EVALS_PER_STEP, guided, integrate


def sample_steps(model, text: mx.array, *, steps: int = 20, solver: str = "heun", cfg_scale: float = 1.0,
                 seed: int = 0, interval: tuple[float, float] | None = None, shift: float = 1.0,
                 noise: mx.array | None = None, family=None) -> Iterator[tuple[int, float, mx.array]]:
    """Integrate from noise to the network's space for a batch of text embeddings (N,L,D).

    The network's output becomes a velocity through flow.to_velocity, as its family says
    (`family` defaults to the registered family of `model.config`). The unconditional
    branch for CFG is the zero embedding (what condition dropout trains).
    Yields (i, t, x) with x (N,H,W,C) evaluated, in the network's space (decode with the
    family's codec for images).
    """
    from .families import family_of

    fam = family or family_of(model.config)
    n = text.shape[0]
    if noise is None:
        noise = mx.random.normal((n, *fam.network_shape(model.config)), key=mx.random.key(seed))
    forward = mx.compile(lambda x, t, c: to_velocity(fam.prediction, model(x, t, c), x, t))

    def model_fn(x, t: float, c):
        return forward(x, mx.full((x.shape[0],), t, dtype=mx.float32), c)

    velocity = guided(model_fn, text, mx.zeros_like(text), cfg_scale, interval)
    for i, t, x in integrate(velocity, noise, steps, solver, shift):
        mx.eval(x)
        yield i, t, x


def to_uint8(x) -> np.ndarray:
    """Model space [-1, 1] (N,H,W,3) -> uint8 images."""
    x = np.asarray(x.astype(mx.float32) if isinstance(x, mx.array) else x)
    return np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2, scale: int = 1) -> Image.Image:
    """(N,H,W,3) uint8 -> one PIL image, row-major, white padding."""
    n, h, w, _ = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    img = Image.fromarray(grid)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_png(img: Image.Image, path) -> Path:
    """Write atomically: a half-written PNG never replaces a good one."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise MlxflowError(f"output must be a .png file, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def embed_prompts(prompts: list[str], encoder_spec: str) -> np.ndarray:
    from .models.text import load_text_encoder

    if not prompts or any(not p.strip() for p in prompts):
        raise MlxflowError("give at least one non-empty prompt")
    return load_text_encoder(encoder_spec).encode(list(prompts))


def generate(ckpt_path, prompts: list[str], *, n: int = 1, steps: int = 20, solver: str = "heun",
             cfg_scale: float = 3.0, seed: int = 0, interval=None, embeddings: np.ndarray | None = None):
    """Yields (i, t, x) for n samples of every prompt (prompt-major order); see sample_steps.

    Returns (model, ckpt, generator) so the caller knows the total before iterating.
    """
    model, ckpt = load_model(ckpt_path)
    emb = embeddings if embeddings is not None else embed_prompts(prompts, ckpt.text_encoder)
    cfg = ckpt.model_config
    if emb.shape[1:] != (cfg.text_tokens, cfg.text_dim):
        raise MlxflowError(f"prompt embeddings {emb.shape[1:]} do not fit the checkpoint's text input "
                           f"{(cfg.text_tokens, cfg.text_dim)}")
    text = mx.array(np.repeat(np.asarray(emb, np.float32), n, axis=0))
    gen = sample_steps(model, text, steps=steps, solver=solver, cfg_scale=cfg_scale, seed=seed, interval=interval)
    return model, ckpt, gen


def model_evals(steps: int, solver: str, cfg_scale: float) -> int:
    """Network evaluations a run costs (CFG doubles the batch, not the count)."""
    return steps * EVALS_PER_STEP[solver]
