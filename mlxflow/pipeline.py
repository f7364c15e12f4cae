"""The loaded generator: a checkpoint read once, its network built once, sampled many times.

    gen = Generator.from_checkpoint("runs/tiny")           # weights="ema", framework="mlx"
    images = gen(["red heart", "pizza"], n=4)               # uint8 (8, H, W, 3), prompt-major
    for frame in gen.generate(["red heart"], steps=20):     # one Frame per solver step
        preview(gen.decode(frame.x))

Everything that samples a checkpoint (the CLI's `sample`, `serve`, prompt fidelity, FID,
the solver study) goes through a Generator, so the family's sampling defaults are
resolved in exactly one place (`SamplingSettings.resolve`) and the same checkpoint, prompts
and seed give the same images whichever face asked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import numpy as np

from .checkpoint import Checkpoint
from .conditioning import kind_of
from .data.dataset import ImageTextDataset
from .data.latent_cache import LatentCache
from .encoders import load_text_encoder
from .errors import MlxflowError
from .families import Family, get_family, load_checkpoint, load_model
from .sample import conditions_for, sample_steps, sample_steps_torch, to_uint8
from .solvers import SOLVERS
from .torch_ref import check_device, default_device, use_cpu_threads

WEIGHTS = ("ema", "ema2", "raw")
FRAMEWORKS = ("mlx", "torch")
MAX_SEED = 2**63 - 1  # MLX's PRNG key takes an unsigned 64-bit seed; Python ints beyond are refused


@dataclass(frozen=True)
class SamplingSettings:
    """How to integrate: `steps` of `solver`, CFG scale `cfg` (1 = off), applied only for t in
    `cfg_interval` (None: everywhere), on a time grid shifted by `shift` (> 1 spends more
    steps near noise; flow.shift_time)."""

    steps: int
    solver: str
    cfg: float
    cfg_interval: tuple[float, float] | None = None
    shift: float = 1.0

    @classmethod
    def family_default(cls, family: Family) -> "SamplingSettings":
        d = family.sample_defaults
        interval = tuple(d["cfg_interval"]) if d.get("cfg_interval") else None
        return cls(steps=int(d["steps"]), solver=d["solver"], cfg=float(d["cfg"]), cfg_interval=interval,
                   shift=float(d.get("shift", 1.0)))

    def resolve(self, *, steps=None, solver=None, cfg=None, cfg_interval=None, shift=None) -> "SamplingSettings":
        """These defaults with the caller's choices (None keeps the default), validated.

        The default shift belongs to the default solver: another solver gets 1 unless a
        shift is given. Errors: MlxflowError naming the value and its valid range."""
        solver = self.solver if solver is None else solver
        if solver not in SOLVERS:
            raise MlxflowError(f"unknown solver '{solver}' (known: {', '.join(sorted(SOLVERS))})")
        if shift is None:
            shift = self.shift if solver == self.solver else 1.0
        out = replace(self, steps=self.steps if steps is None else steps, solver=solver,
                      cfg=self.cfg if cfg is None else float(cfg), shift=float(shift),
                      cfg_interval=self.cfg_interval if cfg_interval is None else tuple(cfg_interval))
        out.check()
        return out

    def check(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)) or self.steps < 1:
            raise MlxflowError(f"steps must be a whole number >= 1, got {self.steps}")
        if not np.isfinite(self.shift) or self.shift <= 0:
            raise MlxflowError(f"shift must be a number > 0, got {self.shift:g}")
        if not np.isfinite(self.cfg) or self.cfg < 0:
            raise MlxflowError(f"CFG scale must be a number >= 0 (1 = off), got {self.cfg:g}")
        if self.cfg_interval is not None:
            lo, hi = self.cfg_interval
            if not 0.0 <= lo <= hi <= 1.0:
                raise MlxflowError(f"the CFG interval must satisfy 0 <= LO <= HI <= 1, got {lo:g} {hi:g}")


@dataclass
class Frame:
    """One solver step of a generation: `x` (N, H, W, C) in the network's space (an mx.array
    for MLX, numpy for torch) at time `t` after `step` of `total` steps."""

    step: int
    total: int
    t: float
    x: object


def check_count(n, what: str = "n") -> int:
    """A count of images a user typed: a whole number >= 1 (MlxflowError otherwise)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise MlxflowError(f"{what} must be a whole number >= 1, got {n}")
    return int(n)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise MlxflowError(f"seed must be a whole number from 0 to {MAX_SEED}, got {seed}")
    return int(seed)


class Generator:
    """A checkpoint loaded for sampling: family, configs, network (MLX or the torch twin),
    conditioning kind, text encoder spec and the family's sampling defaults.

    Build it with `Generator.from_checkpoint`; it reads the checkpoint folder once.
    """

    def __init__(self, checkpoint: Checkpoint, network, *, framework: str = "mlx", device: str | None = None,
                 weights: str = "ema"):
        self.checkpoint = checkpoint
        self.network = network
        self.framework = framework
        self.device = device
        self.weights = weights
        self.family = get_family(checkpoint.family)
        self.model_config = checkpoint.model_config
        self.kind = kind_of(self.family, self.model_config)  # "text" | "class" | "none"
        self.text_encoder = checkpoint.text_encoder
        self.defaults = SamplingSettings.family_default(self.family)
        # A run that never dropped its condition has no unconditional model to guide against:
        # its default is no guidance, and guidance asked for is refused (generate).
        self.guidable = self.kind == "none" or checkpoint.train_config.cond_dropout > 0
        if not self.guidable:
            self.defaults = replace(self.defaults, cfg=1.0)

    @classmethod
    def from_checkpoint(cls, path, *, weights: str = "ema", framework: str = "mlx",
                        device: str | None = None) -> "Generator":
        """Read a checkpoint folder (or a run folder's newest intact checkpoint) and build its network.

        weights: "ema" (the default; the raw weights when the run kept no EMA), "ema2" or
        "raw". framework "torch" samples with the torch twin on `device` (cpu | cuda | mps;
        default: the best available). Errors: MlxflowError for a bad folder, unknown
        weights/framework, or a device this machine does not have.
        """
        if weights not in WEIGHTS:
            raise MlxflowError(f"unknown weights '{weights}' (known: {', '.join(WEIGHTS)})")
        if framework not in FRAMEWORKS:
            raise MlxflowError(f"unknown framework '{framework}' (known: {', '.join(FRAMEWORKS)})")
        ckpt = load_checkpoint(path)
        if framework == "torch":
            from convert.torch_mlx import load_torch_model  # torch is optional

            device = check_device(device or default_device())
            use_cpu_threads(device)
            network, _ = load_torch_model(ckpt, device=device, use_ema=weights)
        else:
            if device not in (None, "cpu", "gpu", "metal"):
                raise MlxflowError(f"--device {device} is for the torch twin; MLX picks its own device "
                                   "(use --framework torch --device ...)")
            network, _ = load_model(ckpt, use_ema=weights)
        return cls(ckpt, network, framework=framework, device=device, weights=weights)

    # --- what the faces show -------------------------------------------------------------

    @property
    def step(self) -> int:
        return self.checkpoint.step

    @property
    def noise_scale(self) -> float:
        return float(self.checkpoint.train_config.noise_scale)

    @property
    def network_shape(self) -> tuple[int, int, int]:
        return self.family.network_shape(self.model_config)

    def info(self, examples: int = 8) -> dict:
        """What a front end shows beside the checkpoint: {"path", "family", "preset", "step",
        "framework", "text_encoder", "conditioning", "classes", "image_size", "examples" (up to
        `examples` training captions spread over the set; read only when asked, empty when the
        training data is not on this machine)}."""
        ck = self.checkpoint
        names = training_captions(ck.state.get("dataset"), examples if self.kind == "text" else None) \
            if examples or self.kind == "class" else []
        classes = list(ck.state.get("classes") or []) or (list(dict.fromkeys(names)) if self.kind == "class" else [])
        return {"path": str(ck.path), "family": ck.family, "preset": ck.train_config.preset, "step": ck.step,
                "framework": ck.meta.get("framework", "mlx"), "text_encoder": ck.text_encoder,
                "conditioning": self.kind, "classes": classes,
                "image_size": int(getattr(self.model_config, "image_size", 0)),
                "examples": list(dict.fromkeys(names))[:examples] if self.kind == "text" else []}

    def random_encoders(self) -> list[str]:
        """The frozen encoders of this checkpoint that are tiny RANDOM ones (`--random-encoders`)."""
        found = []
        for spec in (getattr(self.model_config, "vae", None), self.text_encoder):
            folder = spec.partition(":")[2] if isinstance(spec, str) else ""
            try:
                if folder and json.loads((Path(folder) / "config.json").read_text()).get("mlxflow_random"):
                    found.append(spec)
            except (OSError, ValueError):
                pass
        return found

    def unseen_prompts(self, prompts) -> list[tuple[str, str]]:
        """(prompt, nearest training caption in the text encoder's space) for each text prompt
        that is not one of the run's training captions; empty when the training set is not on
        this machine (a latent cache is not searched). The prompts are still sampled: this is
        what a front end tells the user about them."""
        data = self.checkpoint.state.get("dataset")
        if self.kind != "text" or not data or not (Path(data) / "images.npy").is_file():
            return []
        try:
            dataset = ImageTextDataset.load(data)
            captions = list(dataset.captions)
            unseen = [p for p in dict.fromkeys(prompts) if p not in set(captions)]
            if not unseen:
                return []
            table = dataset.text_embeddings(load_text_encoder(self.text_encoder))
        except MlxflowError:
            return []
        nearest = (pooled_text(self.conditions(unseen)) @ pooled_text(table).T).argmax(axis=1)
        return [(p, captions[i]) for p, i in zip(unseen, nearest)]

    # --- sampling ------------------------------------------------------------------------

    def conditions(self, prompts=(), embeddings: np.ndarray | None = None) -> np.ndarray:
        """One condition row per prompt (text embedded with the checkpoint's encoder, class
        names or indices, or one placeholder row for an unconditional model)."""
        return conditions_for(self.checkpoint, list(prompts), embeddings=embeddings)

    def generate(self, prompts=(), *, n: int = 1, steps: int | None = None, solver: str | None = None,
                 cfg: float | None = None, cfg_interval=None, shift: float | None = None, seed: int = 0,
                 embeddings: np.ndarray | None = None, conditions: np.ndarray | None = None,
                 noise=None) -> Iterator[Frame]:
        """Yield a Frame after every solver step for `n` samples of every prompt (prompt-major).

        None means the family's default (SamplingSettings.resolve). `embeddings` replaces
        the encoder for text prompts; `conditions` (N, ...) gives the per-sample rows
        directly (then prompts and n are ignored); `noise` (N, H, W, C) replaces the noise
        drawn from `seed`. Errors: MlxflowError for values out of range, and for CFG != 1 on
        a run trained with cond_dropout 0 (whose default CFG is 1).
        """
        settings = self.defaults.resolve(steps=steps, solver=solver, cfg=cfg, cfg_interval=cfg_interval, shift=shift)
        if settings.cfg != 1 and not self.guidable:
            raise MlxflowError(f"CFG {settings.cfg:g} needs an unconditional model, and this run trained with "
                               "--cond-dropout 0 (no condition ever dropped): use CFG 1")
        seed = check_seed(seed)
        if conditions is None:
            conditions = np.repeat(self.conditions(prompts, embeddings), check_count(n), axis=0)
        kw = dict(steps=settings.steps, solver=settings.solver, cfg_scale=settings.cfg, seed=seed,
                  interval=settings.cfg_interval, shift=settings.shift, noise_scale=self.noise_scale, noise=noise)
        if self.framework == "torch":
            frames = sample_steps_torch(self.network, np.asarray(conditions), device=self.device, **kw)
        else:
            frames = sample_steps(self.network, mx.array(conditions), **kw)
        for i, t, x in frames:
            yield Frame(step=i + 1, total=settings.steps, t=t, x=x)

    def decode(self, x) -> np.ndarray:
        """Network-space samples (N, H, W, C) -> uint8 images (N, H', W', 3) through the family's codec."""
        if isinstance(x, mx.array):
            x = np.asarray(x.astype(mx.float32))
        return to_uint8(self.family.get_codec().decode(x, self.model_config))

    def __call__(self, prompts=(), *, n: int = 1, **kwargs) -> np.ndarray:
        """uint8 images (len(prompts) * n, H, W, 3): the last frame of `generate`, decoded."""
        frame = None
        for frame in self.generate(prompts, n=n, **kwargs):
            pass
        return self.decode(frame.x)


def pooled_text(emb: np.ndarray) -> np.ndarray:
    """(N, L, D) text states -> (N, D) unit vectors: the mean of the non-padding (non-zero) rows."""
    mean = emb.sum(axis=1) / np.maximum((np.abs(emb).sum(-1) > 0).sum(axis=1, keepdims=True), 1)
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def training_captions(data, k: int | None) -> list[str]:
    """Up to `k` captions spread over a training set (all of them for k=None); empty when the
    set is not on this machine or unreadable (examples are a nicety, never an error)."""
    if not data:
        return []
    try:
        if (Path(data) / "cache.json").is_file():  # a latent cache: captions live in its shards
            cache = LatentCache.load(data)
            count, caption = len(cache), lambda i: cache.caption(int(i))
        elif (Path(data) / "captions.json").is_file():
            names = [c["text"] if isinstance(c, dict) else str(c)
                     for c in json.loads((Path(data) / "captions.json").read_text(encoding="utf-8"))]
            count, caption = len(names), lambda i: names[int(i)]
        else:
            return []
        picks = range(count) if k is None else np.linspace(0, count - 1, min(k, count)).astype(int) if count else []
        return [caption(i) for i in picks]
    except Exception:  # noqa: BLE001 - an unreadable set just has no examples
        return []
