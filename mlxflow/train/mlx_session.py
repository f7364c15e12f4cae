"""MLX trainer: the compiled optimizer step, and the short loop around mlxflow.trainer.

One optimizer step = `grad_accum` micro-batches, each: draw noise x0, times t and the
condition-dropout mask, build x_t on the straight path, regress the velocity (an
x-predicting family is scored in velocity space through flow.to_velocity). The step
(gradients, clipping, AdamW, EMA) is one `mx.compile`d function over
[model.state, optimizer.state, ema.state]. Steps are evaluated asynchronously
(`mx.async_eval`) one ahead: while the device runs step s, the host builds step s + 1,
and the loss is read back only every `log_every` steps (trainer.run_training). A dataset
that fits is held as one uint8 array and each batch is gathered from it by index
(TrainConfig.device_data; on Apple silicon that is the GPU's memory).

Randomness: every step draws from a key derived from (seed, step), passed into the
compiled step as an argument. That makes `--resume` exact without saving RNG state.
The learning rate comes from the one schedule (schedule.lr_at), set on the optimizer
before each step, so MLX and torch follow the same numbers.

Data-parallel under mlx.launch (train.mlx_dist, docs/DISTRIBUTED.md): every rank runs
`train`; rank 0 locks the folder, resolves the run and writes; every rank takes rank 0's
state, steps on its rows of each global batch (noise drawn for the global batch, then
sliced), and the compiled step averages the gradients across ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import replace
from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..conditioning import drop, kind_of, network_input
from ..config import TrainConfig
from ..encoders import load_text_encoder
from ..errors import MlxflowError
from ..families import family_of
from ..flow import interpolate, sample_time, to_velocity, velocity_target
from ..checkpoint import load_weights_into
from .loop import (RunPlan, StepInfo, TrainResult, eval_times, keeps_data_on_device, prepare_run, rank_rows,
                   run_lock, run_training)
from .mlx_dist import RankError, Watchdog, agree, broadcast_arrays, broadcast_object, init_group

__all__ = ["train", "flow_matching_loss", "make_optimizer", "make_train_step", "step_key", "StepInfo"]


def flow_matching_loss(model, x1: mx.array, x0: mx.array, t: mx.array, text,
                       prediction: str = "velocity") -> mx.array:
    """Velocity-space MSE. x1 data, x0 noise (B,H,W,C); t (B,); text: the condition, already
    dropped out ((B,L,D) embeddings, (B,) labels, or None)."""
    x_t = interpolate(x0, x1, t)
    pred = to_velocity(prediction, model(x_t, t, text), x_t, t)
    return mx.mean(mx.square(pred.astype(mx.float32) - velocity_target(x0, x1)))


def step_key(seed: int, step: int) -> mx.array:
    """The PRNG key of optimizer step `step`: a pure function of (seed, step)."""
    return mx.random.key((seed * 1_000_003 + step) % (2**63))


def make_optimizer(cfg: TrainConfig, lr: float | None = None) -> optim.AdamW:
    """AdamW as torch.optim.AdamW computes it (bias correction on, eps 1e-8, decoupled decay).

    The learning rate is a plain value the trainer sets every step from schedule.lr_at.
    """
    return optim.AdamW(learning_rate=cfg.lr if lr is None else lr, betas=list(cfg.betas), eps=1e-8,
                       weight_decay=cfg.weight_decay, bias_correction=True)


def make_train_step(model, ema, optimizer, cfg: TrainConfig, family=None, ema2=None, group=None):
    """The compiled optimizer step: (images (A,B,H,W,C), cond (A,B,...), key) -> (loss, grad_norm).

    `family` (default: the one of model.config) says what the network predicts and what it
    is conditioned on (see mlxflow.conditioning); cond is the per-sample table's rows.
    `ema2`, when given, is a second EMA updated with cfg.ema_decay2.
    `group` (mx.distributed, size N > 1): images hold this rank's B = global/N rows; noise,
    times and dropout are drawn for the global batch and sliced (rank r takes rows
    r*B..(r+1)*B), so N ranks see exactly the numbers one process would; the gradients are
    averaged across ranks (mlx.nn.average_gradients) before clipping, and the loss too.
    """
    rank, world = (group.rank(), group.size()) if group is not None else (0, 1)
    fam = family or family_of(model.config)
    kind, mcfg = kind_of(fam, model.config), model.config
    state = [model.state, optimizer.state, ema.state] + ([ema2.state] if ema2 is not None else [])
    compute_dtype = mx.bfloat16 if cfg.bf16 else mx.float32
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")

    def loss_fn(params, x1, x0, t, cond):
        # Mixed precision: fp32 master weights, the forward/backward in compute_dtype.
        model.update(tree_map(lambda p: p.astype(compute_dtype), params))
        return flow_matching_loss(model, x1, x0, t, network_input(kind, cond), fam.prediction)

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
            n, rows = b * world, slice(rank * b, (rank + 1) * b)  # the global batch; this rank's rows
            x0 = cfg.noise_scale * mx.random.normal((n, *x1.shape[1:]), dtype=compute_dtype, key=k_noise)[rows]
            t = sample_time(cfg.time_sampler, lambda n: mx.random.uniform(shape=(n,), key=k_t),
                            lambda n: mx.random.normal((n,), key=k_t), n, cfg.t_mean, cfg.t_std, cfg.t_shift,
                            cfg.t_unshifted)[rows]
            keep = (mx.random.uniform(shape=(n,), key=k_drop) >= cfg.cond_dropout)[rows]
            cond = drop(kind, text[a], keep, mcfg)
            cond = cond.astype(compute_dtype) if kind == "text" else cond
            params = model.trainable_parameters()
            loss, g = value_and_grad(params, x1, x0, t.astype(compute_dtype), cond)
            model.update(params)
            total_loss = total_loss + loss
            grads = g if grads is None else tree_map(mx.add, grads, g)
        if accum > 1:
            grads = tree_map(lambda g: g / accum, grads)
        if world > 1:
            # The mean of the ranks' means = the global batch's mean (equal rows per rank).
            grads = nn.average_gradients(grads, group=group)
            total_loss = mx.distributed.all_sum(total_loss, group=group) / world
        # The norm is reported even without clipping (an infinite bound clips nothing).
        grads, grad_norm = optim.clip_grad_norm(grads, max_norm)
        optimizer.update(model, grads)
        for average, d in ((ema, cfg.ema_decay), (ema2, cfg.ema_decay2)):
            if average is not None:
                average.update(tree_map(lambda e, p: d * e + (1 - d) * p.astype(e.dtype), average.parameters(),
                                        model.parameters()))
        return total_loss / accum, grad_norm

    return train_step


def weights_numpy(module) -> dict[str, np.ndarray]:
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(module.parameters())}


class MLXSession:
    """The MLX side of a run (see mlxflow.trainer): model, EMA, AdamW and the compiled step."""

    rank, world = 0, 1

    def __init__(self, plan: RunPlan, group=None, watchdog=None):
        cfg, fam = plan.train_config, plan.family
        self.cfg, self.family = cfg, fam
        # Data-parallel (mlx_dist): this rank's contiguous rows of every global batch.
        self.group, self.watchdog = group, watchdog
        if group is not None:
            self.rank, self.world = group.rank(), group.size()
        self.rows = rank_rows(cfg.batch_size, self.rank, self.world, RankError)
        self.kind = kind_of(fam, plan.model_config)
        mx.random.seed(cfg.seed)  # weight init
        self.model = fam.build(plan.model_config, "mlx")
        self.ema = fam.build(plan.model_config, "mlx")
        self.ema.update(self.model.parameters())
        self.ema2 = None
        if cfg.ema_decay2 > 0:
            self.ema2 = fam.build(plan.model_config, "mlx")
            self.ema2.update(self.model.parameters())
        self.optimizer = make_optimizer(cfg)
        self.optimizer.init(self.model.trainable_parameters())
        ck = plan.checkpoint
        if ck is not None:
            load_weights_into(self.model, ck.weights, f"checkpoint {ck.path}")
            load_weights_into(self.ema, ck.ema if ck.ema is not None else ck.weights, f"checkpoint {ck.path} (EMA)")
            if self.ema2 is not None:
                load_weights_into(self.ema2, ck.ema2 if ck.ema2 is not None else ck.weights,
                                  f"checkpoint {ck.path} (second EMA)")
            self.optimizer.state = tree_unflatten([(k, mx.array(v)) for k, v in ck.optimizer.items()])
        mx.eval(self.model.parameters(), self.ema.parameters(), self.optimizer.state,
                self.ema2.parameters() if self.ema2 is not None else [])
        if group is not None:
            with self.waiting("taking rank 0's weights"):
                self.take_rank0_state()
        self.train_step = make_train_step(self.model, self.ema, self.optimizer, cfg, fam, self.ema2, group)
        self.in_flight = None  # the previous step's loss, still being computed
        self.resident = keeps_data_on_device(plan)
        if self.resident:
            self.images = mx.array(plan.dataset.images)  # uint8 (N, H, W, C)
            self.table = mx.array(plan.embeddings)
        # A latent cache carries token ids: the frozen text encoder turns them into states here.
        self.text_encoder = None
        if plan.condition_encoder:

            self.text_encoder = load_text_encoder(plan.condition_encoder)

    def waiting(self, what: str):
        """Around a wait for the other ranks: the watchdog's timeout and a one-line error when a
        peer is gone (nothing to guard in a single process)."""
        return self.watchdog.waiting(what) if self.watchdog is not None else contextlib.nullcontext()

    def take_rank0_state(self) -> None:
        """Every rank takes rank 0's weights, EMAs and optimizer state (exact; see mlx_dist)."""
        modules = [self.model, self.ema] + ([self.ema2] if self.ema2 is not None else [])
        trees = [tree_flatten(m.parameters()) for m in modules] + [tree_flatten(self.optimizer.state)]
        # Rank 0's keys, shapes and dtypes: a resumed optimizer state (rank 0 read it from the
        # checkpoint) need not match a fresh one's, and all ranks must all-reduce alike.
        spec = broadcast_object([[(k, v.shape, str(v.dtype).split(".")[-1]) for k, v in tree] for tree in trees],
                                self.group)
        mine = {(i, k): v for i, tree in enumerate(trees) for k, v in tree}
        arrays = [mine[(i, k)] if self.rank == 0 else mx.zeros(shape, getattr(mx, dtype))
                  for i, tree in enumerate(spec) for k, shape, dtype in tree]
        got = iter(broadcast_arrays(arrays, self.group))
        trees = [[(k, next(got)) for k, _, _ in tree] for tree in spec]
        for module, tree in zip(modules, trees):
            module.update(tree_unflatten(tree))
        self.optimizer.state = tree_unflatten(trees[-1])
        mx.eval([m.parameters() for m in modules], self.optimizer.state)

    def conditions(self, batch: dict, rows: slice = slice(None)) -> np.ndarray:
        if self.text_encoder is None:
            return batch["text"][rows]
        return self.text_encoder.encode_ids(batch["text"][rows], batch["mask"][rows])

    def batch_arrays(self, batch: dict) -> tuple[mx.array, mx.array]:
        """(images (B,H,W,C) float32 in [-1, 1], conditions) of this rank's rows: gathered from
        the resident set for an index batch, converted from a host batch otherwise."""
        rows = self.rows
        if "image" in batch:
            return mx.array(batch["image"][rows]), mx.array(self.conditions(batch, rows))
        index = mx.array(batch["index"][rows])
        # The host stream's arithmetic (float32 x / 127.5 - 1), so both give the same pixels.
        image = self.images[index].astype(mx.float32) / 127.5 - 1.0
        if "flip" in batch:
            image = mx.where(mx.array(batch["flip"][rows])[:, None, None, None], image[:, :, ::-1], image)
        return image, self.table[index]

    def step(self, step: int, micro: list[dict], lr: float) -> tuple[mx.array, mx.array]:
        """One optimizer step, scheduled on the device; returns (loss, grad_norm) unevaluated."""
        self.optimizer.learning_rate = mx.array(lr, mx.float32)
        pairs = [self.batch_arrays(b) for b in micro]
        images = mx.stack([p[0] for p in pairs])
        text = mx.stack([p[1] for p in pairs])
        loss, grad_norm = self.train_step(images, text, step_key(self.cfg.seed, step))
        state = (loss, grad_norm, self.model.state, self.optimizer.state, self.ema.state,
                 self.ema2.state if self.ema2 is not None else [])
        if self.group is not None:
            # Across ranks both calls may wait on a peer's all-reduce: under the watchdog.
            with self.waiting(f"running step {step + 1}"):
                if self.in_flight is not None:
                    mx.eval(self.in_flight)
                self.in_flight = None
                mx.async_eval(*state)
        else:
            mx.async_eval(*state)
        # One step in flight at most: wait for the previous one (done by now, while this one
        # was being built), so the host never queues more than a step ahead.
        if self.in_flight is not None:
            mx.eval(self.in_flight)
        if self.watchdog is not None:
            self.watchdog.step = step + 1
        self.in_flight = loss
        return loss, grad_norm

    def read(self, values: list[mx.array]) -> list[float]:
        out = mx.stack(values).astype(mx.float32)
        with self.waiting("reading back losses"):
            mx.eval(out)
        return np.array(out).tolist()

    def evaluate(self, batch: dict) -> dict:
        """Held-out metrics on a fixed batch with fixed noise and an even spread of t (so the
        curve moves only when the model does): eval loss, data and velocity statistics."""
        self.settle()
        cfg = self.cfg
        x1 = mx.array(batch["image"])
        b = x1.shape[0]
        x0 = cfg.noise_scale * mx.random.normal(x1.shape, key=mx.random.key(cfg.seed + 7919))
        t = mx.array(eval_times(b))
        cond = mx.array(self.conditions(batch))
        x_t = interpolate(x0, x1, t)
        pred = to_velocity(self.family.prediction, self.model(x_t, t, network_input(self.kind, cond)), x_t, t)
        target = velocity_target(x0, x1)
        loss = mx.mean(mx.square(pred - target))
        return {k: float(v) for k, v in dict(eval_loss=loss, data_mean=mx.mean(x1), data_std=mx.std(x1),
                                             v_pred_std=mx.std(pred), v_target_std=mx.std(target)).items()}

    def settle(self) -> None:
        """Wait (guarded) for the weights of the last step before reading them to the host."""
        if self.group is not None:
            with self.waiting("finishing the last step"):
                mx.eval(self.model.state, self.optimizer.state, self.ema.state,
                        self.ema2.state if self.ema2 is not None else [])

    def checkpoint_tensors(self, step: int) -> dict:
        self.settle()
        return {"weights": weights_numpy(self.model), "ema": weights_numpy(self.ema),
                "ema2": weights_numpy(self.ema2) if self.ema2 is not None else None,
                "optimizer": {k: np.array(v) for k, v in tree_flatten(self.optimizer.state)}}

    def ema_weights(self) -> dict[str, np.ndarray]:
        self.settle()
        return weights_numpy(self.ema)

    def barrier(self) -> None:
        if self.group is not None:
            with self.waiting("waiting for rank 0's checkpoint"):
                mx.eval(mx.distributed.all_sum(mx.array(1, mx.int32), group=self.group))

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when any rank saw Ctrl-C, so all stop at the same step."""
        if self.group is None:
            return bool(flag)
        total = mx.distributed.all_sum(mx.array(int(bool(flag)), mx.int32), group=self.group)
        with self.waiting("checking for Ctrl-C"):
            mx.eval(total)
        return total.item() > 0


def train(run_dir, dataset, model_config, train_config: TrainConfig, *, family: str, text_encoder: str | None = None,
          resume: str | None = None, embeddings: np.ndarray | None = None,
          on_step: Callable[[StepInfo], None] | None = None, on_checkpoint: Callable | None = None,
          on_sample: Callable[[int, dict, RunPlan], None] | None = None,
          on_message: Callable[[str], None] | None = None,
          on_eval: Callable[[int, dict, RunPlan], dict | None] | None = None) -> TrainResult:
    """Train (or resume) `family` with MLX on a dataset (folder or ImageTextDataset).

    `embeddings` (N,L,D) skips the text encoder (tests, custom conditioning).
    `on_sample(step, ema_weights, plan)` runs every `sample_every` steps and at the end.
    """
    group = init_group()
    callbacks = dict(on_step=on_step, on_checkpoint=on_checkpoint, on_sample=on_sample, on_message=on_message,
                     on_eval=on_eval)
    if group is None:
        with run_lock(run_dir):
            plan = prepare_run(run_dir, family, dataset, model_config, train_config, text_encoder=text_encoder,
                               resume=resume, embeddings=embeddings)
            return run_training(plan, MLXSession(plan), framework="mlx", **callbacks)
    return _train_distributed(group, run_dir, family, dataset, model_config, train_config, text_encoder, resume,
                              embeddings, callbacks)


def _train_distributed(group, run_dir, family, dataset, model_config, train_config, text_encoder, resume, embeddings,
                       callbacks) -> TrainResult:
    """One rank of a data-parallel run under mlx.launch (see mlx_dist): rank 0 locks the folder
    and resolves the run, the others follow its plan; every rank steps on its rows."""
    rank, world = group.rank(), group.size()
    dog = Watchdog(rank)
    with contextlib.ExitStack() as stack:
        stack.callback(dog.close)
        plan, error = None, None
        if rank == 0:
            try:
                stack.enter_context(run_lock(run_dir))
                plan = prepare_run(run_dir, family, dataset, model_config, train_config, text_encoder=text_encoder,
                                   resume=resume, embeddings=embeddings)
            except MlxflowError as e:
                error = e
        with dog.waiting("starting (rank 0 resolves the run)"):
            agree(error, group)
            resolved = broadcast_object(None if plan is None else dict(
                model_config=plan.model_config, train_config=plan.train_config, text_encoder=plan.text_encoder,
                start_step=plan.start_step, data_position=plan.data_position, last_good=plan.last_good), group)
        if rank > 0:
            try:
                plan = prepare_run(run_dir, family, dataset, resolved["model_config"], resolved["train_config"],
                                   text_encoder=resolved["text_encoder"], embeddings=embeddings, follow=True)
                plan = replace(plan, start_step=resolved["start_step"], data_position=resolved["data_position"],
                               last_good=resolved["last_good"])
            except MlxflowError as e:
                error = e
        with dog.waiting("starting (the other ranks load the data)"):
            agree(error, group)
        try:
            session = MLXSession(plan, group, dog)
            result = run_training(plan, session, framework="mlx", **callbacks)
        except RuntimeError as e:  # a collective outside the guarded waits (an async step)
            raise dog.lost(e) from None
        except MlxflowError as e:
            # The loop's own stops (finite guard) happen on every rank at the same step, with the
            # same numbers: rank 0 reports; a lost peer is this rank's own news.
            if not str(e).startswith(f"rank {rank}: lost"):
                e.every_rank = True
            raise
    result.extra.update(world_size=world, rank=rank, digest=weights_digest(session.model))
    return result


def weights_digest(model) -> str:
    """sha256 over the parameters in tree order: equal digests = bitwise-equal weights."""
    h = hashlib.sha256()
    for k, v in tree_flatten(model.parameters()):
        h.update(k.encode())
        h.update(np.array(v).tobytes())
    return h.hexdigest()[:16]
