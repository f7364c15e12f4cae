"""Sampling: noise -> ODE solver -> images.

`sample_steps` (MLX) and `sample_steps_torch` (the torch twin) are generators yielding
(i, t, x) after every solver step; mlxflow.pipeline.Generator wraps them for a checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import mlx.core as mx
import numpy as np
from PIL import Image

from .conditioning import check_table, kind_of, network_input, unconditional
from .encoders import load_text_encoder
from .errors import MlxflowError
from .families import family_of, get_family
from .flow import to_velocity
from .solvers import EVALS_PER_STEP, guided, integrate


def sample_steps(model, text: mx.array, *, steps: int = 20, solver: str = "heun", cfg_scale: float = 1.0,
                 seed: int = 0, interval: tuple[float, float] | None = None, shift: float = 1.0,
                 noise: mx.array | None = None, noise_scale: float = 1.0,
                 family=None) -> Iterator[tuple[int, float, mx.array]]:
    """Integrate from noise to the network's space for a batch of conditions.

    `text` holds one condition per sample, of the model's kind (mlxflow.conditioning):
    text embeddings (N,L,D), class labels (N,), or placeholders (N,) for an unconditional
    model. The network's output becomes a velocity through flow.to_velocity, as its family
    says (`family` defaults to the registered family of `model.config`). The unconditional
    branch of CFG is what condition dropout trains: the zero embedding or the null class.
    Yields (i, t, x) with x (N,H,W,C) evaluated, in the network's space (decode with the
    family's codec for images).
    """

    fam = family or family_of(model.config)
    kind = kind_of(fam, model.config)
    n = text.shape[0]
    if noise is None:
        noise = noise_scale * mx.random.normal((n, *fam.network_shape(model.config)), key=mx.random.key(seed))
    forward = mx.compile(lambda x, t, c: to_velocity(fam.prediction, model(x, t, network_input(kind, c)), x, t))

    def model_fn(x, t: float, c):
        return forward(x, mx.full((x.shape[0],), t, dtype=mx.float32), c)

    if kind == "none":
        cfg_scale = 1.0  # nothing to guide by
    velocity = guided(model_fn, text, unconditional(kind, text, model.config), cfg_scale, interval)
    for i, t, x in integrate(velocity, noise, steps, solver, shift):
        mx.eval(x)
        yield i, t, x


def sample_steps_torch(model, cond: np.ndarray, *, steps: int = 20, solver: str = "heun", cfg_scale: float = 1.0,
                       seed: int = 0, interval: tuple[float, float] | None = None, shift: float = 1.0,
                       noise: np.ndarray | None = None, noise_scale: float = 1.0, family=None,
                       device: str = "cpu") -> Iterator[tuple[int, float, np.ndarray]]:
    """sample_steps with the torch twin (CPU, CUDA or MPS): same conditions, same noise.

    Unless `noise` (N,H,W,C) is given, it is drawn with MLX's RNG from `seed`, exactly as
    sample_steps draws it, so both frameworks start from the same point and end at the same
    images up to float rounding. CFG runs as one batched call. Yields (i, t, x) with x
    (N,H,W,C) float32 numpy.
    """
    import torch


    fam = family or family_of(model.config)
    kind = kind_of(fam, model.config)
    n = len(cond)
    if noise is None:
        noise = noise_scale * mx.random.normal((n, *fam.network_shape(model.config)), key=mx.random.key(seed))
    x = torch.from_numpy(np.array(noise, np.float32).transpose(0, 3, 1, 2).copy()).to(device)
    c = torch.from_numpy(np.asarray(cond)).to(device)

    def model_fn(x, t: float, c):
        tt = torch.full((x.shape[0],), t, dtype=torch.float32, device=device)
        return to_velocity(fam.prediction, model(x, tt, network_input(kind, c)), x, tt)

    if kind == "none":
        cfg_scale = 1.0
    velocity = guided(model_fn, c, unconditional(kind, c, model.config), cfg_scale, interval)
    with torch.no_grad():
        for i, t, x in integrate(velocity, x, steps, solver, shift):
            yield i, t, x.float().permute(0, 2, 3, 1).cpu().numpy()


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
    if not prompts or any(not p.strip() for p in prompts):
        raise MlxflowError("give at least one non-empty prompt")
    return load_text_encoder(encoder_spec).encode(list(prompts))


def conditions_for(ckpt, prompts: list[str], *, embeddings: np.ndarray | None = None) -> np.ndarray:
    """One condition per prompt, of the checkpoint's kind (mlxflow.conditioning).

    text: prompts are free text, embedded with the checkpoint's encoder (or `embeddings`).
    class: each prompt is a class name the run trained on, or its index.
    none: prompts must be empty; one unconditional row.
    """

    cfg = ckpt.model_config
    kind = kind_of(get_family(ckpt.family), cfg)
    if kind == "text":
        table = embeddings if embeddings is not None else embed_prompts(prompts, ckpt.text_encoder)
        if np.asarray(table).shape[1:] != (cfg.text_tokens, cfg.text_dim):
            raise MlxflowError(f"prompt embeddings {np.asarray(table).shape[1:]} do not fit the checkpoint's "
                               f"text input {(cfg.text_tokens, cfg.text_dim)}")
        return np.asarray(table, np.float32)
    if kind == "class":
        names = list(ckpt.state.get("classes") or [])
        if not prompts:
            raise MlxflowError(f"name at least one class (--class NAME or index; known: {', '.join(names[:8]) or '0..'}"
                               f"{'...' if len(names) > 8 else ''})")
        labels = []
        for p in prompts:
            p = str(p).strip()
            if p in names:
                labels.append(names.index(p))
            elif p.lstrip("-").isdigit():
                labels.append(int(p))
            else:
                raise MlxflowError(f"unknown class '{p}' (known: {', '.join(names[:8])}{'...' if len(names) > 8 else ''})")
        table = np.asarray(labels, np.int32)
        check_table(kind, table, cfg, len(table))
        return table
    if prompts:
        raise MlxflowError("this checkpoint is unconditional: give no prompt (use --n for the number of images)")
    return np.zeros(1, np.int32)


def model_evals(steps: int, solver: str, cfg_scale: float) -> int:
    """Network evaluations a run costs (CFG doubles the batch, not the count)."""
    return steps * EVALS_PER_STEP[solver] - (1 if solver == "heun_euler_last" else 0)
