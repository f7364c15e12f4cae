"""Checkpoint folders that move between machines and frameworks.

A checkpoint is a folder:
    config.json            family, model config, train config, text encoder, versions
    model.safetensors      weights in the canonical (MLX) key names and layouts, fp32
    ema.safetensors        EMA weights (same keys), when training keeps an EMA
    optimizer.safetensors  optimizer state, flattened
    state.json             step, data position, RNG state, last loss

A run folder holds checkpoints as step-0000500/ ... ; "latest" is the highest step.
Folders are written under a temporary name and renamed into place, so an interrupted
save never leaves a half-written checkpoint and never replaces a good one.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from . import __version__
from .config import MODEL_CONFIGS, TrainConfig, from_dict, to_dict
from .errors import MlxflowError

CKPT_PREFIX = "step-"


@dataclass
class Checkpoint:
    path: Path
    family: str
    model_config: object
    train_config: TrainConfig
    text_encoder: str
    weights: dict[str, np.ndarray]
    ema: dict[str, np.ndarray] | None = None
    optimizer: dict[str, np.ndarray] | None = None
    state: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))

    def inference_weights(self) -> dict[str, np.ndarray]:
        """EMA weights when present (what sampling should use), else the raw weights."""
        return self.ema if self.ema is not None else self.weights


def _versions() -> dict:
    v = {"mlxflow": __version__, "python": platform.python_version()}
    for mod in ("mlx", "torch"):
        try:
            v[mod] = __import__(mod).__version__ if mod != "mlx" else __import__("mlx.core").core.__version__
        except Exception:
            pass
    return v


def save_checkpoint(run_dir, step: int, *, family: str, model_config, train_config: TrainConfig,
                    text_encoder: str, weights: dict, ema: dict | None = None, optimizer: dict | None = None,
                    state: dict | None = None, keep: int = 0, framework: str = "mlx") -> Path:
    """Write run_dir/step-XXXXXXX atomically; prune to the newest `keep` (0 keeps all)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"{CKPT_PREFIX}{step:07d}"
    tmp = run_dir / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    config = {
        "family": family,
        "model": to_dict(model_config),
        "train": to_dict(train_config),
        "text_encoder": text_encoder,
        "framework": framework,
        "versions": _versions(),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_file(_np32(weights), str(tmp / "model.safetensors"))
    if ema is not None:
        save_file(_np32(ema), str(tmp / "ema.safetensors"))
    if optimizer is not None:
        save_file({k: np.ascontiguousarray(v) for k, v in optimizer.items()}, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, **(state or {})}, indent=2))
    # Same-step re-save (e.g. a resumed run saving again): move the old one aside first,
    # so at every instant one complete checkpoint of this step exists.
    old = None
    if final.exists():
        old = run_dir / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep > 0:
        for stale in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _np32(tree: dict) -> dict:
    out = {}
    for k, v in tree.items():
        a = np.asarray(v)
        out[k] = np.ascontiguousarray(a.astype(np.float32) if a.dtype != np.float32 else a)
    return out


def list_checkpoints(run_dir) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX)
             and (p / "config.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder, or a run folder meaning its latest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise MlxflowError(f"checkpoint not found: {path}")
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise MlxflowError(f"{path} is neither a checkpoint folder (config.json + model.safetensors) "
                           f"nor a run folder containing {CKPT_PREFIX}* checkpoints")
    return ckpts[-1]


def _load_tensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise MlxflowError(f"cannot read {path}: {e}") from None


def load_checkpoint(path, family: str | None = None, with_optimizer: bool = False) -> Checkpoint:
    """Load a checkpoint (or a run's latest); `family` asserts what the caller expects."""
    path = resolve_checkpoint(path)
    try:
        config = json.loads((path / "config.json").read_text())
        ckpt_family = config["family"]
        model_cls = MODEL_CONFIGS[ckpt_family]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise MlxflowError(f"{path}/config.json is not an mlxflow checkpoint config ({e})") from None
    if family is not None and ckpt_family != family:
        raise MlxflowError(f"{path} is a '{ckpt_family}' checkpoint, not '{family}'")
    state_file = path / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    ema_file, opt_file = path / "ema.safetensors", path / "optimizer.safetensors"
    return Checkpoint(
        path=path,
        family=ckpt_family,
        model_config=from_dict(model_cls, config["model"]),
        train_config=from_dict(TrainConfig, config.get("train", {})),
        text_encoder=config.get("text_encoder", "minilm"),
        weights=_load_tensors(path / "model.safetensors"),
        ema=_load_tensors(ema_file) if ema_file.exists() else None,
        optimizer=_load_tensors(opt_file) if with_optimizer and opt_file.exists() else None,
        state=state,
        meta=config,
    )


def check_weights_fit(expected: dict[str, tuple], weights: dict[str, np.ndarray], where: str) -> None:
    """Every expected key present with its shape, nothing extra; else one line naming the key."""
    missing = [k for k in expected if k not in weights]
    extra = [k for k in weights if k not in expected]
    if missing:
        raise MlxflowError(f"{where} does not fit the model: missing weight '{missing[0]}'"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise MlxflowError(f"{where} does not fit the model: unexpected weight '{extra[0]}'"
                           + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for k, shape in expected.items():
        if tuple(weights[k].shape) != tuple(shape):
            raise MlxflowError(f"{where} does not fit the model: '{k}' has shape {tuple(weights[k].shape)}, "
                               f"the model expects {tuple(shape)}")


def checkpoint_to_resume(run_dir, resume: str, family: str, train_config: TrainConfig) -> tuple[Checkpoint, TrainConfig]:
    """The checkpoint `--resume latest|PATH` names, and the train config to continue with.

    The architecture and the data/schedule settings come from the checkpoint; only the
    step budget and the logging/checkpoint/sample cadence may change on resume. Both
    trainers (MLX and torch) resume through here.
    """
    from dataclasses import replace

    run_dir = Path(run_dir)
    if resume == "latest" and not list_checkpoints(run_dir):
        raise MlxflowError(f"--resume latest: no checkpoint in {run_dir}")
    ckpt = load_checkpoint(resolve_checkpoint(run_dir if resume == "latest" else Path(resume)), family=family,
                           with_optimizer=True)
    merged = replace(ckpt.train_config, steps=train_config.steps, log_every=train_config.log_every,
                     ckpt_every=train_config.ckpt_every, sample_every=train_config.sample_every)
    if ckpt.step >= merged.steps:
        raise MlxflowError(f"checkpoint {ckpt.path} is already at step {ckpt.step} >= --steps {merged.steps}")
    if ckpt.optimizer is None:
        raise MlxflowError(f"checkpoint {ckpt.path} has no optimizer state; cannot resume exactly")
    return ckpt, merged
