"""What the MLX and torch trainers share: run preparation, the step loop, and its guards.

A training run is: prepare (resume rules, text embeddings, shape checks, data at the
model's size) -> loop (draw micro-batches, one framework step, finite guard, step info,
periodic checkpoints and samples, Ctrl-C at a step boundary) -> final checkpoint.
Everything here is framework-free; a framework supplies a small `Session`:

    session.step(step, micro_batches, lr) -> (loss, grad_norm)   one optimizer step; the two
                                          scalars may stay on the device (framework arrays)
    session.read(values)                  -> list[float]: such scalars, in one transfer
    session.resident                      True: the session holds the whole set on its device
                                          and is fed index batches (data.dataset.index_batches)
    session.checkpoint_tensors(step)      -> {"weights", "ema", "optimizer"[, "ema2"]} (MLX names/layouts, numpy)
    session.ema_weights()                 -> EMA weights (MLX names/layouts, numpy) for sample grids
    session.rank, session.world, session.barrier(), session.any_rank(flag)

so both frameworks get the same checkpoints, the same error messages and the same
callbacks (`on_step(StepInfo)`, `on_checkpoint(path)`, `on_sample(step, ema_weights, plan)`, whose
returned metrics, if any, go to the run log as an eval record).

The loop never waits for the device between log steps: reading a loss back would stall a
GPU after every step, which is what bounds small models on big GPUs. Losses and gradient
norms are read every `log_every` steps (and before a checkpoint, an evaluation or a sample
grid; alone, also once a second on a slow device), then reported step by step in order;
the finite guard names the first bad step, and no checkpoint is written after it.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..checkpoint import Checkpoint, list_checkpoints, resolve_checkpoint, save_checkpoint
from ..conditioning import check_table, kind_of
from ..config import TrainConfig
from ..data.classes import class_labels
from ..data.dataset import ImageTextDataset, index_batches
from ..data.latent_cache import LatentCache
from ..data.transforms import resize_images
from ..encoders import load_text_encoder
from ..errors import MlxflowError
from ..families import Family, get_family, load_checkpoint
from ..runlock import RunLock
from ..runlog import RunLog
from ..schedule import lr_at


@dataclass
class StepInfo:
    """What a trainer reports after every optimizer step (both frameworks, same shape)."""

    step: int
    total: int
    loss: float
    lr: float
    grad_norm: float
    img_per_s: float


@dataclass
class RunPlan:
    """A prepared run: everything a framework needs to build its models and start stepping."""

    run_dir: Path
    family: Family
    model_config: object
    train_config: TrainConfig
    text_encoder: str
    dataset: object  # ImageTextDataset at the model's image size
    embeddings: np.ndarray | None  # per-sample conditions: (N, L, D) text or (N,) labels; None: the data's own
    start_step: int = 0
    data_position: int = 0  # micro-batches consumed before start_step
    checkpoint: Checkpoint | None = None  # what we resume from
    notes: list[str] = field(default_factory=list)  # things the user should be told
    last_good: Path | None = None  # the newest intact checkpoint in run_dir before this run
    # Spec of a frozen text encoder the sessions run on each batch's token ids (a latent
    # cache stores ids, not states); None: the batches already carry the conditions.
    condition_encoder: str | None = None


@dataclass
class TrainResult:
    checkpoint: Path | None
    losses: list[float]
    steps: int
    start_step: int
    model_config: object
    interrupted: bool = False
    extra: dict = field(default_factory=dict)

    def __getitem__(self, key):  # the summary dict callers and tests have always read
        if key in ("checkpoint", "losses", "steps", "start_step", "model_config", "interrupted"):
            return getattr(self, key)
        if key == "loss":
            return self.losses[-1] if self.losses else None
        return self.extra[key]



def checkpoint_to_resume(run_dir, resume: str, family: str, train_config: TrainConfig) -> tuple[Checkpoint, TrainConfig]:
    """The checkpoint `--resume latest|PATH` names, and the train config to continue with.

    The architecture and the data/schedule settings come from the checkpoint; only the
    step budget and the logging/checkpoint/sample cadence may change on resume. Both
    trainers (MLX and torch) resume through here.
    """
    run_dir = Path(run_dir)
    if resume == "latest":
        intact, broken = list_checkpoints(run_dir, with_broken=True)
        if not intact:
            damaged = f" (skipped damaged {broken[-1][0].name}: {broken[-1][1]})" if broken else ""
            raise MlxflowError(f"--resume latest: no checkpoint in {run_dir}{damaged}")
    ckpt = load_checkpoint(resolve_checkpoint(run_dir if resume == "latest" else Path(resume)), family=family,
                           with_optimizer=True)
    # lr: api.train_model passes the checkpoint's own unless the user asked for another.
    merged = replace(ckpt.train_config, steps=train_config.steps, log_every=train_config.log_every,
                     ckpt_every=train_config.ckpt_every, sample_every=train_config.sample_every, lr=train_config.lr)
    if ckpt.step >= merged.steps:
        raise MlxflowError(f"checkpoint {ckpt.path} is already at step {ckpt.step} >= --steps {merged.steps}")
    if ckpt.optimizer is None:
        raise MlxflowError(f"checkpoint {ckpt.path} has no optimizer state; cannot resume exactly")
    return ckpt, merged


def prepare_run(run_dir, family: str, dataset, model_config, train_config: TrainConfig, *,
                text_encoder: str | None = None, resume: str | None = None,
                embeddings: np.ndarray | None = None, follow: bool = False) -> RunPlan:
    """Apply the resume rules and check that data, embeddings and model fit together.

    resume: None (a fresh run: refused if the run folder already holds checkpoints),
    "latest" (the newest intact checkpoint; a run folder without one starts fresh and
    says so), or a checkpoint folder.
    follow: another process (rank 0 of a data-parallel run) owns the run folder and has
    already resolved model_config and train_config; only load and check the data (the
    caller sets the start step and data position it was sent).
    """

    run_dir = Path(run_dir)
    fam = get_family(family)
    text_encoder = text_encoder or fam.text_encoder
    notes: list[str] = []
    ckpt = None
    existing, broken = list_checkpoints(run_dir, with_broken=True) if not follow else ([], [])
    notes += [f"skipping damaged checkpoint {path.name}: {reason}" for path, reason in broken]
    if broken and not existing:
        # Starting over could write a step over a damaged folder someone may still want to rescue.
        raise MlxflowError(f"{run_dir} holds only damaged checkpoints ({broken[-1][0].name}: {broken[-1][1]}); "
                           "move them away or choose another --out")
    if resume == "latest" and not existing:
        notes.append(f"--resume latest: {run_dir} has no checkpoint yet, starting from step 0")
        resume = None
    elif resume is None and existing:
        raise MlxflowError(f"{run_dir} already holds checkpoints (newest: {existing[-1].name}); "
                           "pass --resume latest to continue it, or choose another --out")
    if resume is not None:
        ckpt, train_config = checkpoint_to_resume(run_dir, resume, family, train_config)
        model_config, text_encoder = ckpt.model_config, ckpt.text_encoder or text_encoder

    dataset = load_training_data(fam, dataset)
    if fam.get_codec().needs_cache:
        if follow:
            model_config.validate()
            text_encoder = dataset.meta["text_encoder"]
        else:
            model_config, text_encoder = fit_latent_cache(model_config, dataset, ckpt, notes)
        return _plan(run_dir, fam, model_config, train_config, text_encoder, dataset, None, ckpt, notes, existing,
                     condition_encoder=text_encoder)
    if ckpt is None and not follow:
        model_config = fit_conditioning(fam, model_config, dataset, notes)
    kind = kind_of(fam, model_config)
    if embeddings is None:
        embeddings = condition_table(kind, dataset, text_encoder)
    embeddings = np.asarray(embeddings, np.float32 if kind == "text" else np.int32)
    if ckpt is None and not follow:
        # A fresh model takes its condition's shape from the data actually used.
        if kind == "text" and embeddings.ndim == 3:
            model_config = replace(model_config, text_tokens=embeddings.shape[1], text_dim=embeddings.shape[2])
        elif kind == "class" and hasattr(dataset, "meta") and dataset.meta.get("classes"):
            model_config = replace(model_config, num_classes=len(dataset.meta["classes"]))
    check_table(kind, embeddings, model_config, len(dataset))
    model_config.validate()

    # A resized copy: the caller's dataset object is never changed under it.
    size = model_config.image_size
    if dataset.size != size:
        dataset = ImageTextDataset(dataset.path, resize_images(dataset.images, size), dataset.captions, dataset.meta)
    return _plan(run_dir, fam, model_config, train_config, text_encoder, dataset, embeddings, ckpt, notes, existing)


def _plan(run_dir, fam, model_config, cfg, text_encoder, dataset, embeddings, ckpt, notes, existing,
          condition_encoder=None) -> RunPlan:
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise MlxflowError(f"batch size and gradient accumulation must be >= 1, got {cfg.batch_size}, {cfg.grad_accum}")
    if cfg.max_samples and cfg.max_samples < len(dataset):
        if not hasattr(dataset, "subset"):
            raise MlxflowError(f"this dataset cannot be limited to {cfg.max_samples} samples")
        notes.append(f"training on the first {cfg.max_samples} of {len(dataset)} samples (max_samples)")
        dataset = dataset.subset(cfg.max_samples)
        embeddings = None if embeddings is None else embeddings[:cfg.max_samples]
    if len(dataset) < cfg.batch_size:
        raise MlxflowError(f"dataset has {len(dataset)} images, fewer than the batch size {cfg.batch_size}")
    start = ckpt.step if ckpt is not None else 0
    position = int(ckpt.state.get("batches_consumed", start * cfg.grad_accum)) if ckpt is not None else 0
    return RunPlan(run_dir, fam, model_config, cfg, text_encoder, dataset, embeddings, start, position, ckpt, notes,
                   existing[-1] if existing else None, condition_encoder)


def load_training_data(fam: Family, data):
    """A family's training data from a folder (or an already loaded dataset): a latent cache
    for latent families, a dataset folder for pixel ones."""
    if fam.get_codec().needs_cache:
        return load_latent_cache(data, fam)
    if hasattr(data, "batches"):
        return data

    return ImageTextDataset.load(data)


def load_latent_cache(dataset, fam: Family):
    """A latent-space family trains on a latent cache (`mlxflow data latents`), never on raw images."""
    if hasattr(dataset, "latent_shape"):
        return dataset

    path = Path(getattr(dataset, "path", dataset))
    if not (path / "cache.json").is_file():
        raise MlxflowError(f"the {fam.name} family trains on a latent cache and {path} is not one; "
                           f"build it with: mlxflow data latents {path}-latents --src {path}")
    return LatentCache.load(path)


def fit_latent_cache(model_config, cache, ckpt, notes: list[str]):
    """(model config, text encoder spec) that fit a latent cache: a fresh model takes the
    cache's latent grid, text length and encoders; a resumed one must match them."""
    meta = cache.meta
    h, w, c = cache.latent_shape
    want = dict(image_size=int(meta["image_size"]), latent_downsample=int(meta["image_size"]) // h, in_channels=c,
                text_tokens=int(cache.text_tokens), text_dim=int(meta["text_dim"]), vae=meta["vae"],
                text_encoder=meta["text_encoder"])
    if ckpt is None:
        model_config = replace(model_config, **want)
    else:
        have = {k: getattr(model_config, k) for k in want}
        diff = [f"{k} {have[k]} vs {want[k]}" for k in want if have[k] != want[k]]
        if diff:
            raise MlxflowError(f"checkpoint {ckpt.path.name} does not fit the cache {cache.path}: {'; '.join(diff)}")
    if meta.get("random"):
        notes.append(f"{cache.path} was encoded with RANDOM tiny encoders ({meta['vae']}, {meta['text_encoder']}): "
                     "a pipeline check, not a model of images")
    return model_config.validate(), meta["text_encoder"]


def data_conditioning(dataset) -> str:
    """What a dataset folder can condition on: "class" (class subfolders), "none" (images
    without captions) or "text" (captions)."""
    meta = getattr(dataset, "meta", {}) or {}
    if meta.get("classes"):
        return "class"
    return "none" if meta.get("kind") == "images" else "text"


def fit_conditioning(fam: Family, model_config, dataset, notes: list[str]):
    """A fresh model conditions on what the data has: a config with a `conditioning` field
    (JiT) follows the dataset; a family with a fixed kind refuses other data in one line."""
    want = data_conditioning(dataset)
    data_has = {"text": "captions", "class": "class labels", "none": "no captions"}[want]
    if hasattr(model_config, "conditioning"):
        if model_config.conditioning != want:
            model = "unconditional" if want == "none" else f"{want}-conditioned"
            notes.append(f"{dataset.path} has {data_has}: the model is {model}")
            model_config = replace(model_config, conditioning=want)
        return model_config
    if want != fam.conditioning:
        raise MlxflowError(f"the {fam.name} family is {fam.conditioning}-conditioned, but {dataset.path} has {data_has}")
    return model_config


def condition_table(kind: str, dataset, text_encoder: str) -> np.ndarray:
    """The per-sample conditions of a dataset: text embeddings (N,L,D), class labels (N,), or zeros (N,)."""
    if kind == "text":

        return dataset.text_embeddings(load_text_encoder(text_encoder))
    if kind == "class":

        return class_labels(dataset)
    return np.zeros(len(dataset), np.int32)


def rank_rows(batch_size: int, rank: int, world: int, error: type = MlxflowError) -> slice:
    """This rank's contiguous rows of every global batch of a data-parallel run (both
    frameworks); `error` (one line) when the global batch does not split evenly."""
    if batch_size % world:
        raise error(f"batch_size {batch_size} must be divisible by the number of processes ({world})")
    local = batch_size // world
    return slice(rank * local, (rank + 1) * local)


def run_lock(run_dir, rank: int = 0):
    """The run folder's lock, held by rank 0 for a whole run (preparation included): a second
    trainer pointed at the same folder stops with one line instead of mixing checkpoints."""

    return RunLock(run_dir) if rank == 0 else contextlib.nullcontext()


def eval_times(batch: int) -> np.ndarray:
    """float32 (B,) times spread evenly over (0, 1): the fixed t of held-out evaluation."""
    return ((np.arange(batch) + 0.5) / batch).astype(np.float32)


# The most a session copies to its device to hold a whole pixel dataset there when
# TrainConfig.device_data is left to decide (None).
DEVICE_DATA_LIMIT = 2 << 30


def keeps_data_on_device(plan: RunPlan) -> bool:
    """Should the session hold the training set (uint8 images and the condition table) on its
    device and gather each batch there? TrainConfig.device_data says; None: whenever the set
    is an in-memory image dataset with its conditions and fits DEVICE_DATA_LIMIT bytes.
    A latent cache streams its shards from disk (and its tokens go through the text encoder)."""
    flag = plan.train_config.device_data
    images = getattr(plan.dataset, "images", None)
    possible = plan.embeddings is not None and isinstance(images, np.ndarray)
    if flag is None:
        return possible and images.nbytes + plan.embeddings.nbytes <= DEVICE_DATA_LIMIT
    if flag and not possible:
        raise MlxflowError("device_data needs an image dataset held in memory; "
                           f"{getattr(plan.dataset, 'path', 'this data')} is streamed (a latent cache)")
    return bool(flag)


def check_finite(step: int, loss: float, grad_norm: float, last_good: Path | None) -> None:
    """Stop a run whose loss or gradient norm is not finite, naming the last good checkpoint."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    what = f"loss became {loss}" if not math.isfinite(loss) else f"gradient norm became {grad_norm}"
    where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written"
    raise MlxflowError(f"{what} at step {step}; training stopped ({where})")


class StopFlag:
    """Set by the first Ctrl-C; the loop stops at the next step boundary and saves."""

    def __init__(self):
        self.requested = False


@contextlib.contextmanager
def graceful_interrupt(on_message: Callable[[str], None] | None = None):
    """First SIGINT (Ctrl-C) or SIGTERM (what `timeout`, job schedulers and shutdown send): ask
    the loop to stop at the next step boundary, which writes a checkpoint. A second one: stop
    at once. Checkpoints are written atomically, so stopping at once loses nothing already
    written. Only the main thread can own signal handlers; elsewhere this is a no-op.
    """
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def restore():
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.default_int_handler)

    def handler(signum, frame):
        if flag.requested:
            restore()
            raise KeyboardInterrupt
        flag.requested = True
        if on_message:
            name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            on_message(f"{name}: stopping at the next step report and saving a checkpoint "
                       "(Ctrl-C again to stop at once)")

    for sig in signals:
        signal.signal(sig, handler)
    try:
        yield flag
    finally:
        restore()


def run_training(plan: RunPlan, session, *, framework: str,
                 on_step: Callable[[StepInfo], None] | None = None,
                 on_checkpoint: Callable[[Path], None] | None = None,
                 on_sample: Callable[[int, dict, RunPlan], None] | None = None,
                 on_message: Callable[[str], None] | None = None,
                 on_eval: Callable[[int, dict, RunPlan], dict | None] | None = None,
                 extra_state: dict | None = None) -> TrainResult:
    """The step loop both trainers run (see the module docstring).

    Rank 0 appends train records (every log_every steps) and eval records (every eval_every
    steps: session.evaluate's metrics plus what `on_eval(step, ema_weights, plan)` returns,
    e.g. FID) to RUN/log.jsonl, which `mlxflow plot RUN` draws."""
    cfg, step = plan.train_config, plan.start_step
    say = on_message or (lambda msg: print(msg, file=sys.stderr))
    if session.rank == 0:
        for note in plan.notes:
            say(note)
    if getattr(session, "resident", False):

        batches = index_batches(len(plan.dataset), cfg.batch_size, cfg.seed, start=plan.data_position, flip=cfg.flip)
    else:
        batches = plan.dataset.batches(cfg.batch_size, cfg.seed, start=plan.data_position, flip=cfg.flip,
                                       embeddings=plan.embeddings)
    position = plan.data_position
    last_good = plan.last_good
    losses: list[float] = []
    final = plan.checkpoint.path if plan.checkpoint is not None else None
    # Class names travel with every checkpoint so sampling can take `--class NAME`.
    classes = getattr(plan.dataset, "meta", {}).get("classes") if kind_of(plan.family, plan.model_config) == "class" \
        else None

    def save(at_step: int) -> Path:
        nonlocal last_good
        path = plan.run_dir / f"step-{at_step:07d}"
        if session.rank == 0:
            tensors = session.checkpoint_tensors(at_step)
            path = save_checkpoint(
                plan.run_dir, at_step, family=plan.family.name, model_config=plan.model_config, train_config=cfg,
                text_encoder=plan.text_encoder, weights=tensors["weights"], ema=tensors["ema"],
                ema2=tensors.get("ema2"), optimizer=tensors["optimizer"],
                state={"batches_consumed": position, "loss": losses[-1] if losses else None,
                       "dataset": str(Path(plan.dataset.path).resolve()) if getattr(plan.dataset, "path", "") else "", "world_size": session.world,
                       **({"classes": classes} if classes else {}),
                       **({"random_encoders": True} if getattr(plan.dataset, "meta", {}).get("random") else {}),
                       **(extra_state or {})},
                keep=cfg.keep_checkpoints, framework=framework, keep_every=cfg.keep_every)
            if on_checkpoint:
                on_checkpoint(path)
        session.barrier()  # nobody races ahead (or exits) while rank 0 is still writing
        last_good = path
        return path

    log = None
    if session.rank == 0:

        log = RunLog(plan.run_dir, resume_step=plan.start_step)
    eval_batch = None
    if cfg.eval_every and session.rank == 0 and hasattr(session, "evaluate"):
        # A fixed batch from another permutation of the data, with fixed noise and times
        # (eval_times): its loss curve moves only when the model does.
        eval_batch = next(plan.dataset.batches(cfg.batch_size, cfg.seed + 1, embeddings=plan.embeddings))

    window = max(cfg.log_every, 1)
    pending: list[tuple[int, float, object, object]] = []  # (step, lr, loss, grad_norm) not read back yet

    def due(every: int) -> bool:
        return bool(every) and step % every == 0 and step < cfg.steps

    interrupted = False
    with graceful_interrupt(say if session.rank == 0 else None) as stop:
        tic = time.perf_counter()
        while step < cfg.steps:
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            position += cfg.grad_accum
            lr = lr_at(step, cfg)
            loss, grad_norm = session.step(step, micro, lr)
            step += 1
            pending.append((step, lr, loss, grad_norm))
            # Every rank stops at the same steps (the stop check below is a collective). A single
            # process also reads back once a window has run for a second: on a device that slow
            # waiting costs nothing, and progress and Ctrl-C stay prompt.
            if not (step % window == 0 or step == cfg.steps or due(cfg.eval_every) or due(cfg.ckpt_every)
                    or due(cfg.sample_every) or (session.world == 1 and time.perf_counter() - tic >= 1.0)):
                continue
            # One read-back for the window; its wall time over its images is the trainer's
            # img/s (checkpoints, evaluation and grids land in the next window's time).
            values = session.read([p[2] for p in pending] + [p[3] for p in pending])
            now = time.perf_counter()
            img_per_s = cfg.batch_size * cfg.grad_accum * len(pending) / max(now - tic, 1e-9)
            tic = now
            for (at, at_lr, _, _), loss_v, norm_v in zip(pending, values, values[len(pending):]):
                check_finite(at, loss_v, norm_v, last_good)
                losses.append(loss_v)
                if on_step and session.rank == 0:
                    on_step(StepInfo(at, cfg.steps, loss_v, at_lr, norm_v, img_per_s))
                if log is not None and (at % window == 0 or at == cfg.steps):
                    log.write("train", at, loss=loss_v, lr=at_lr, grad_norm=norm_v, img_per_s=img_per_s)
            pending.clear()
            if eval_batch is not None and step % cfg.eval_every == 0:
                metrics = session.evaluate(eval_batch)
                if on_eval is not None:
                    metrics.update(on_eval(step, session.ema_weights(), plan) or {})
                log.write("eval", step, **metrics)
            if session.any_rank(stop.requested) and step < cfg.steps:
                interrupted = True
                break
            if due(cfg.ckpt_every):
                final = save(step)
            if on_sample and session.rank == 0 and due(cfg.sample_every):
                sampled = on_sample(step, session.ema_weights(), plan)
                if sampled and log is not None:
                    log.write("eval", step, **sampled)
        if step > plan.start_step and (final is None or final.name != f"step-{step:07d}"):
            final = save(step)
        elif final is None:
            final = save(step)  # a fresh run asked for zero steps still leaves its initial weights
    if on_sample and session.rank == 0 and not interrupted:
        sampled = on_sample(step, session.ema_weights(), plan)
        if sampled and log is not None:
            log.write("eval", step, **sampled)
    if log is not None:
        log.close()
    return TrainResult(final, losses, step, plan.start_step, plan.model_config, interrupted)
