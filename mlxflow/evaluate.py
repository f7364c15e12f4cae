"""Evaluating a Generator: prompt fidelity, FID and few-step solver schedules.

Every function samples through a mlxflow.pipeline.Generator, so it uses the family's
sampling defaults for whatever the caller leaves as None, exactly like `mlxflow sample`.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np

from .conditioning import kind_of
from .data.classes import class_labels
from .data.dataset import ImageTextDataset
from .data.transforms import resize_images
from .encoders import load_text_encoder
from .errors import MlxflowError
from .families import Family
from .fid import fid, load_fid_network, reference_statistics
from .fidelity import nearest_neighbours
from .fidelity import prompt_fidelity as nearest_is_prompted
from .pipeline import Generator
from .sample import model_evals, to_uint8
from .train.loop import condition_table, load_training_data


def prompt_fidelity(gen: Generator, data_dir, *, k: int = 16, n: int = 2, prompts: list[str] | None = None,
                    seed: int = 0, steps: int | None = None, solver: str | None = None, cfg: float | None = None,
                    shift: float | None = None) -> dict:
    """Share of samples whose nearest training image (mlxflow.fidelity) is the prompted one.

    Text models: `k` training captions spread over the set, or the given training captions
    (`prompts`), each sampled `n` times from the dataset's cached embeddings. Class models:
    the same over classes (a hit when the nearest image has the prompted class).
    Returns {"fidelity", "prompts", "samples", "chance", "step", "settings"}.
    Errors: MlxflowError for an unconditional model (nothing to be faithful to), a dataset
    whose embeddings do not fit the checkpoint, or k / n < 1.
    """
    if gen.kind == "none":
        raise MlxflowError("prompt fidelity needs a conditioned model; this checkpoint is unconditional "
                           "(use mlxflow fid)")
    if k < 1 or n < 1:
        raise MlxflowError(f"--k and --n must be >= 1, got k={k}, n={n}")
    dataset = ImageTextDataset.load(data_dir)
    reference = resize_images(dataset.images, gen.model_config.image_size)
    if gen.kind == "class":
        labels = class_labels(dataset)
        classes = np.unique(labels)
        wanted = (np.array([gen.conditions([p])[0] for p in prompts]) if prompts
                  else classes[np.linspace(0, len(classes) - 1, min(k, len(classes))).astype(int)])
        rows = np.repeat(wanted, n).astype(np.int32)
        images = gen(conditions=rows, seed=seed, steps=steps, solver=solver, cfg=cfg, shift=shift)
        nearest = nearest_neighbours(images, reference)
        score = float(np.mean(labels[nearest] == rows))
        count, chance = len(wanted), 1.0 / len(classes)
    else:
        emb = dataset.text_embeddings(load_text_encoder(gen.text_encoder))
        if emb.shape[1:] != (gen.model_config.text_tokens, gen.model_config.text_dim):
            raise MlxflowError(f"{data_dir}: its text embeddings {emb.shape[1:]} do not fit the checkpoint's text "
                               f"input {(gen.model_config.text_tokens, gen.model_config.text_dim)} (another encoder?)")
        index = dataset.caption_index(prompts) if prompts else \
            np.linspace(0, len(dataset) - 1, min(k, len(dataset))).astype(int)
        images = gen(conditions=np.repeat(emb[index], n, axis=0), seed=seed, steps=steps, solver=solver, cfg=cfg,
                     shift=shift)
        score = nearest_is_prompted(images, np.repeat(index, n), reference)
        count, chance = len(index), 1.0 / len(dataset)
    settings = gen.defaults.resolve(steps=steps, solver=solver, cfg=cfg, shift=shift)
    return {"fidelity": float(score), "prompts": count, "samples": count * n, "chance": chance,
            "step": gen.step, "settings": settings}


def fid_references(fam: Family, model_config, dataset, n: int, text_encoder: str):
    """(conditions of the first n samples as the network takes them, images_fn for the FID
    reference statistics): a pixel dataset's own images at the model's size; a latent
    cache's VAE decodes (the images its latents stand for: the cache keeps no pixels)."""
    n = min(n, len(dataset))
    if fam.get_codec().needs_cache:
        cond = cache_conditions(dataset, np.arange(n), text_encoder)

        def images_fn(count):
            for lo in range(0, count, 64):
                part = dataset.gather(np.arange(lo, min(lo + 64, count)))["image"]
                yield to_uint8(fam.get_codec().decode(part, model_config))
        return cond, images_fn
    cond = condition_table(kind_of(fam, model_config), dataset, text_encoder)[:n]
    return cond, lambda count: resize_images(dataset.images[:count], model_config.image_size)


def cache_conditions(cache, index: np.ndarray, text_encoder: str) -> np.ndarray:
    """float32 (K, L, D) text states of a latent cache's samples `index`: their token ids
    through the frozen encoder, padding rows zero (what the trainers feed the network)."""
    rows = cache.gather(index)
    return load_text_encoder(text_encoder).encode_ids(rows["text"], rows["mask"])


def fid_of_generator(gen: Generator, dataset, data_dir, *, n: int, text_encoder: str | None = None,
                     steps: int | None = None, solver: str | None = None, cfg: float | None = None,
                     shift: float | None = None, seed: int = 0, batch: int = 50, net=None,
                     on_progress: Callable[[int, int], None] | None = None) -> float:
    """FID (standard Inception) of n samples drawn for the conditions of the first n training
    samples, against those samples' images (reference statistics cached in the data folder).
    Batch b uses seed + b * batch, so a result does not depend on anything but n and seed."""
    net = net or load_fid_network()
    cond, images_fn = fid_references(gen.family, gen.model_config, dataset, n, text_encoder or gen.text_encoder)
    n = len(cond)
    mu, sigma = reference_statistics(data_dir, images_fn, net, n,
                                     fingerprint=f"{gen.family.name}-{gen.model_config.image_size}")
    images = []
    for lo in range(0, n, batch):
        images.append(gen(conditions=cond[lo:lo + batch], seed=seed + lo, steps=steps, solver=solver, cfg=cfg,
                          shift=shift))
        if on_progress:
            on_progress(min(lo + batch, n), n)
    return fid(np.concatenate(images), mu, sigma, net)


def fid_score(gen: Generator, data_dir, *, n: int = 1000, steps: int | None = None, solver: str | None = None,
              cfg: float | None = None, seed: int = 0, shift: float | None = None, fid_weights=None,
              on_progress=None) -> dict:
    """FID of a generator against its training data (a dataset folder or a latent cache)."""
    if n < 2:
        raise MlxflowError(f"FID needs at least 2 samples, got --n {n}")
    settings = gen.defaults.resolve(steps=steps, solver=solver, cfg=cfg, shift=shift)
    net = load_fid_network(fid_weights)
    dataset = load_training_data(gen.family, data_dir)
    score = fid_of_generator(gen, dataset, data_dir, n=n, steps=settings.steps, solver=settings.solver,
                             cfg=settings.cfg, shift=settings.shift, seed=seed, net=net, on_progress=on_progress)
    return {"fid": score, "n": min(n, len(dataset)), "steps": settings.steps, "solver": settings.solver,
            "cfg": settings.cfg, "shift": settings.shift, "seed": seed, "step": gen.step, "network": net.id}


def solver_comparison(gen: Generator, prompts: list[str], schedules: list[tuple[str, int, float]], *, n: int = 4,
                      seed: int = 0, cfg: float | None = None, reference: tuple[str, int, float] = ("rk4", 50, 1.0),
                      data_dir=None, on_done: Callable[[dict], None] | None = None) -> list[dict]:
    """Sample the same noise with several (solver, steps, shift) schedules and score each
    against a fine reference solve (`reference`, default RK4 50 steps = 200 evaluations):
    RMSE of the decoded images in [0, 1] and, with `data_dir`, prompt fidelity. Works for
    text, class and unconditional checkpoints (prompts must then be empty)."""
    cond = np.repeat(gen.conditions(prompts), n, axis=0)
    cfg = gen.defaults.cfg if cfg is None else cfg
    noise = gen.noise_scale * mx.random.normal((len(cond), *gen.network_shape), key=mx.random.key(seed))
    ref_index = reference_images = None
    if data_dir is not None and gen.kind == "text":
        dataset = ImageTextDataset.load(data_dir)
        ref_index = np.repeat(dataset.caption_index(prompts), n)
        reference_images = resize_images(dataset.images, gen.model_config.image_size)

    def solve(solver, steps, shift):
        images = gen(conditions=cond, noise=noise, solver=solver, steps=steps, shift=shift, cfg=cfg)
        return images.astype(np.float32) / 255.0

    target = solve(*reference)
    rows = []
    for solver, steps, shift in schedules:
        images = solve(solver, steps, shift)
        row = {"solver": solver, "steps": steps, "shift": shift, "nfe": model_evals(steps, solver, cfg),
               "rmse": float(np.sqrt(np.mean((images - target) ** 2)))}
        if ref_index is not None:
            row["fidelity"] = float(nearest_is_prompted((images * 255).round().astype(np.uint8), ref_index,
                                                        reference_images))
        rows.append(row)
        if on_done:
            on_done(row)
    return rows
