"""MLX trainer shared by all families.

One optimizer step = `grad_accum` micro-batches, each: draw noise x0, times t and the
condition-dropout mask, build x_t on the straight path, regress the velocity. The step
(gradients, clipping, AdamW, EMA) is one `mx.compile`d function over
[model.state, optimizer.state, ema.state]; there is one `mx.eval` per step.

Randomness: every step draws from a key derived from (seed, step), passed into the
compiled step as an argument. That makes `--resume` exact without saving RNG state and
lets the torch trainer reproduce the same schedule of draws.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .checkpoint import check_weights_fit, checkpoint_to_resume, list_checkpoints, save_checkpoint
from .config import TrainConfig
from .errors import MlxflowError
from .flow import interpolate, sample_time, velocity_target, x_to_velocity
from .models import build_model
from .schedule import lr_at


def flow_matching_loss(model, x1: mx.array, x0: mx.array, t: mx.array, text: mx.array) -> mx.array:
    """Velocity-space MSE. x1 data, x0 noise (B,H,W,C); t (B,); text (B,L,D), already dropped out."""
    x_t = interpolate(x0, x1, t)
    pred = model(x_t, t, text)
    if model.config.prediction == "x":
        pred = x_to_velocity(pred, x_t, t)
    return mx.mean(mx.square(pred.astype(mx.float32) - velocity_target(x0, x1)))


def step_key(seed: int, step: int) -> mx.array:
    """The PRNG key of optimizer step `step`: a pure function of (seed, step)."""
    return mx.random.key((seed * 1_000_003 + step) % (2**63))


def mlx_lr_schedule(cfg: TrainConfig):
    """`schedule.lr_at` written with mx ops, evaluated by the optimizer on its step counter."""
    floor = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(cfg.steps - cfg.warmup_steps, 1)

    def schedule(step):
        step = step.astype(mx.float32) if isinstance(step, mx.array) else mx.array(step, mx.float32)
        warm = cfg.lr * (step + 1) / max(cfg.warmup_steps, 1)
        progress = mx.clip((step - cfg.warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = floor + 0.5 * (cfg.lr - floor) * (1 + mx.cos(math.pi * progress))
        return mx.where(step < cfg.warmup_steps, warm, cosine) if cfg.warmup_steps > 0 else cosine

    return schedule


def make_optimizer(cfg: TrainConfig) -> optim.AdamW:
    # bias_correction=True matches torch.optim.AdamW exactly.
    return optim.AdamW(learning_rate=mlx_lr_schedule(cfg), betas=list(cfg.betas), eps=1e-8,
                       weight_decay=cfg.weight_decay, bias_correction=True)


def make_train_step(model, ema, optimizer, cfg: TrainConfig):
    """The compiled optimizer step: (images (A,B,H,W,C), text (A,B,L,D), key) -> (loss, grad_norm)."""
    state = [model.state, optimizer.state, ema.state]
    compute_dtype = mx.bfloat16 if cfg.bf16 else mx.float32

    def loss_fn(params, x1, x0, t, txt):
        # Mixed precision: fp32 master weights, the forward/backward in compute_dtype.
        model.update(tree_map(lambda p: p.astype(compute_dtype), params))
        return flow_matching_loss(model, x1, x0, t, txt)

    value_and_grad = mx.value_and_grad(loss_fn)

    @partial(mx.compile, inputs=state, outputs=state)
    def train_step(images, text, key):
        accum = images.shape[0]
        keys = mx.random.split(key, accum)
        total_loss, grads = 0.0, None
        for a in range(accum):
            k_noise, k_t, k_drop = mx.random.split(keys[a], 3)
            x1 = images[a].astype(compute_dtype)
            b = x1.shape[0]
            x0 = mx.random.normal(x1.shape, dtype=compute_dtype, key=k_noise)
            t = sample_time(cfg.time_sampler, lambda n: mx.random.uniform(shape=(n,), key=k_t),
                            lambda n: mx.random.normal((n,), key=k_t), b, cfg.t_mean, cfg.t_std, cfg.t_shift)
            keep = mx.random.uniform(shape=(b,), key=k_drop) >= cfg.cond_dropout
            txt = (text[a] * keep[:, None, None]).astype(compute_dtype)
            params = model.trainable_parameters()
            loss, g = value_and_grad(params, x1, x0, t.astype(compute_dtype), txt)
            model.update(params)
            total_loss = total_loss + loss
            grads = g if grads is None else tree_map(mx.add, grads, g)
        if accum > 1:
            grads = tree_map(lambda g: g / accum, grads)
        grads, grad_norm = optim.clip_grad_norm(grads, cfg.grad_clip) if cfg.grad_clip > 0 else (grads, mx.array(0.0))
        optimizer.update(model, grads)
        d = cfg.ema_decay
        ema.update(tree_map(lambda e, p: d * e + (1 - d) * p.astype(e.dtype), ema.parameters(), model.parameters()))
        return total_loss / accum, grad_norm

    return train_step


@dataclass
class StepInfo:
    step: int
    total: int
    loss: float
    lr: float
    grad_norm: float
    img_per_s: float


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """(N,H,W,3) uint8 -> (N,size,size,3), area-averaged down (or bicubic up) with Pillow."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    from PIL import Image

    resample = Image.BOX if images.shape[1] > size else Image.BICUBIC
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), resample)) for im in images])


def _weights_np(module) -> dict[str, np.ndarray]:
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(module.parameters())}


def load_weights_into(module, weights: dict[str, np.ndarray], where: str) -> None:
    expected = {k: v.shape for k, v in tree_flatten(module.parameters())}
    check_weights_fit(expected, weights, where)
    module.load_weights([(k, mx.array(v)) for k, v in weights.items()])


def train(run_dir, dataset, model_config, train_config: TrainConfig, *, text_encoder: str = "minilm",
          family: str = "emoji", resume: str | None = None, embeddings: np.ndarray | None = None,
          on_step: Callable[[StepInfo], None] | None = None,
          on_checkpoint: Callable[[Path], None] | None = None,
          on_sample: Callable[[int, object], None] | None = None) -> dict:
    """Train (or resume) a model on an ImageTextDataset; returns a summary dict.

    `embeddings` (N,L,D) skips the text encoder (tests, custom conditioning).
    `on_sample(step, ema_model)` is called every `sample_every` steps and at the end.
    """
    run_dir = Path(run_dir)
    start_step, ckpt = 0, None
    if resume is not None:
        ckpt, train_config = checkpoint_to_resume(run_dir, resume, family, train_config)
        model_config, text_encoder, start_step = ckpt.model_config, ckpt.text_encoder, ckpt.step

    cfg = train_config
    if embeddings is None:
        from .models.text import load_text_encoder

        embeddings = dataset.text_embeddings(load_text_encoder(text_encoder))
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if ckpt is None:
        model_config = replace(model_config, text_dim=embeddings.shape[2], text_tokens=embeddings.shape[1])
    elif (model_config.text_tokens, model_config.text_dim) != embeddings.shape[1:]:
        raise MlxflowError(f"text embeddings are {embeddings.shape[1:]} but the checkpoint expects "
                           f"{(model_config.text_tokens, model_config.text_dim)} (a different text encoder?)")
    dataset.images = resize_images(dataset.images, model_config.image_size)
    if len(dataset) < cfg.batch_size:
        raise MlxflowError(f"dataset has {len(dataset)} images, fewer than the batch size {cfg.batch_size}")

    mx.random.seed(cfg.seed)  # weight init
    model = build_model(family, model_config)
    ema = build_model(family, model_config)
    ema.update(model.parameters())
    optimizer = make_optimizer(cfg)
    optimizer.init(model.trainable_parameters())
    if ckpt is not None:
        load_weights_into(model, ckpt.weights, f"checkpoint {ckpt.path}")
        load_weights_into(ema, ckpt.ema if ckpt.ema is not None else ckpt.weights, f"checkpoint {ckpt.path} (EMA)")
        optimizer.state = tree_unflatten([(k, mx.array(v)) for k, v in ckpt.optimizer.items()])
    mx.eval(model.parameters(), ema.parameters(), optimizer.state)

    train_step = make_train_step(model, ema, optimizer, cfg)
    batches = dataset.batches(cfg.batch_size, cfg.seed, start=start_step * cfg.grad_accum, flip=cfg.flip,
                              embeddings=embeddings)

    def save(step: int, last_loss: float) -> Path:
        path = save_checkpoint(run_dir, step, family=family, model_config=model_config, train_config=cfg,
                               text_encoder=text_encoder, weights=_weights_np(model), ema=_weights_np(ema),
                               optimizer={k: np.array(v) for k, v in tree_flatten(optimizer.state)},
                               state={"batches_consumed": step * cfg.grad_accum, "loss": last_loss,
                                      "dataset": str(getattr(dataset, "path", ""))},
                               keep=cfg.keep_checkpoints)
        if on_checkpoint:
            on_checkpoint(path)
        return path

    existing = list_checkpoints(run_dir)
    last_good = existing[-1] if existing else None
    losses: list[float] = []
    step = start_step
    tic = time.perf_counter()
    while step < cfg.steps:
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        images = mx.array(np.stack([b["image"] for b in micro]))
        text = mx.array(np.stack([b["text"] for b in micro]))
        loss, grad_norm = train_step(images, text, step_key(cfg.seed, step))
        mx.eval(loss, grad_norm, model.state, optimizer.state, ema.state)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written"
            raise MlxflowError(f"loss became {loss_value} at step {step + 1}; training stopped ({where})")
        losses.append(loss_value)
        step += 1
        now = time.perf_counter()
        if on_step:
            on_step(StepInfo(step, cfg.steps, loss_value, lr_at(step - 1, cfg), grad_norm.item(),
                             cfg.batch_size * cfg.grad_accum / max(now - tic, 1e-9)))
        tic = now
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
            last_good = save(step, loss_value)
        if on_sample and cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
            on_sample(step, ema)
    final = save(step, losses[-1] if losses else float("nan")) if step > start_step or ckpt is None else ckpt.path
    if on_sample:
        on_sample(step, ema)
    return {"checkpoint": final, "losses": losses, "steps": step, "start_step": start_step,
            "model_config": model_config}
