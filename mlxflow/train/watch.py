"""What a user sees of a run while it trains: sample grids, a cheap fidelity estimate and FID.

The trainer calls these with the run's EMA weights (mlxflow.train.loop's on_sample and
on_eval); each builds a Generator on them, so grids use the family's sampling settings
exactly as `mlxflow sample` does, with the run's own sample_steps and sample_cfg.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..checkpoint import Checkpoint, load_weights_into
from ..data.transforms import resize_images
from ..evaluate import cache_conditions, fid_of_generator
from ..families import build_model
from ..fid import fid_available
from ..fidelity import prompt_fidelity
from ..pipeline import Generator
from ..sample import make_grid, save_png


def grid_conditions(plan, picks: np.ndarray) -> np.ndarray:
    """The conditions of training samples `picks` as the network takes them."""
    if plan.embeddings is not None:
        return plan.embeddings[picks]
    return cache_conditions(plan.dataset, picks, plan.condition_encoder)


class RunWatcher:
    """Callbacks for one run. `samples` writes OUT/samples/step-*.png (a row of `grid_prompts`
    training prompts spread over the set) and returns {"sample_fidelity"}:
    the share of grid_prompts (4 x grid_prompts on a set of 1,000 or more) spread training
    prompts, one sample each, whose nearest
    training image is their own (text-conditioned pixel data; the run log keeps it and
    `mlxflow plot` draws it). `fid` returns {"fid"} when the FID network is on this machine."""

    def __init__(self, family: str, out_dir, data_dir, n_samples: int, grid_prompts: int = 8,
                 on_sample: Callable[[int, Path], None] | None = None):
        self.family, self.out_dir, self.data_dir, self.on_sample = family, Path(out_dir), data_dir, on_sample
        # A full-size set gets 4 estimate prompts per grid row; a small one just its grid's.
        per_row = 4 if n_samples >= 1000 else 1
        self.picks = np.linspace(0, n_samples - 1, min(per_row * max(grid_prompts, 1), n_samples)).astype(int)
        self.grid_rows = self.picks[::per_row]
        self.references = None

    def generator(self, ema_weights: dict, plan) -> Generator:
        """The run's EMA as a Generator with the run's own conditions and settings (a resumed run's)."""
        model = build_model(self.family, plan.model_config)
        load_weights_into(model, ema_weights, "EMA weights")
        ckpt = Checkpoint(path=self.out_dir, family=self.family, model_config=plan.model_config,
                          train_config=plan.train_config, text_encoder=plan.condition_encoder or plan.text_encoder,
                          weights=ema_weights)
        return Generator(ckpt, model)

    @staticmethod
    def cfg(gen: Generator, train_config) -> float | None:
        """The run's sample_cfg; None (no guidance) for a run that drops no condition."""
        return train_config.sample_cfg if gen.guidable else None

    def samples(self, step: int, ema_weights: dict, plan) -> dict | None:
        gen, cfg = self.generator(ema_weights, plan), plan.train_config
        images = gen(conditions=grid_conditions(plan, self.picks), steps=cfg.sample_steps, cfg=self.cfg(gen, cfg), seed=0)
        path = save_png(make_grid(images[np.isin(self.picks, self.grid_rows)], scale=2),
                        self.out_dir / "samples" / f"step-{step:07d}.png")
        if self.on_sample:
            self.on_sample(step, path)
        if gen.kind != "text" or not hasattr(plan.dataset, "images"):
            return None
        if self.references is None:
            self.references = resize_images(plan.dataset.images, plan.model_config.image_size)
        return {"sample_fidelity": prompt_fidelity(images, self.picks, self.references)}

    def fid(self, step: int, ema_weights: dict, plan) -> dict | None:
        if not fid_available():
            return None
        gen, cfg = self.generator(ema_weights, plan), plan.train_config
        return {"fid": fid_of_generator(gen, plan.dataset, self.data_dir, n=cfg.eval_samples, steps=cfg.sample_steps,
                                        cfg=self.cfg(gen, cfg))}
