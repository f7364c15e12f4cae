"""The family registry: the one place that lists model families.

A family is data, not a branch in the pipeline. Everything downstream (CLI choices,
both trainers, sampling, crosscheck, bench, export) asks this registry:

    Family(name, config class, model presets, train presets,
           MLX model class, torch model class,
           prediction  "velocity" | "x"       flow.to_velocity converts, once, for everyone
           codec       how data maps to the network's space and back (pixels: identity)
           conditioning "text" | "none"
           probe points for crosscheck, Core ML export support)

A new family is its two model files (`models/X.py`, `torch_ref/X.py`) and one config file,
`configs/X.py`: its config dataclass, presets, FLOP formula and `register(Family(...))`.
`mlxflow/configs/__init__.py` imports every module of that folder, so nothing shared is edited.
Model classes may be given as "module:Class" strings so that importing the registry
never imports torch (or even MLX) before a caller needs it.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Callable

from .checkpoint import Checkpoint, load_weights_into
from .checkpoint import load_checkpoint as read_checkpoint
from .codecs import Codec, get_codec
from .config import TrainConfig, from_dict
from .errors import MlxflowError

PREDICTIONS = ("velocity", "x")
CONDITIONINGS = ("text", "class", "none")


@dataclass(frozen=True)
class Family:
    name: str
    config_class: type
    model_presets: dict[str, dict]
    train_presets: dict[str, dict]
    mlx_model: str | type  # "package.module:Class" or the class itself
    torch_model: str | type
    prediction: str = "velocity"
    codec: str = "pixels"
    conditioning: str = "text"  # a config with a `conditioning` field chooses its own (JiT)
    # model config -> names of submodules whose outputs crosscheck compares, in execution order
    probe_points: Callable[[object], list[str]] = field(default=lambda cfg: [])
    coreml: bool = False  # `mlxflow export coreml` supports it
    default_preset: str = "default"
    description: str = ""
    # Sampling defaults a user gets without flags: steps, solver, cfg, cfg_interval[, shift]
    # (the time-grid shift belongs to the default solver: another solver gets 1).
    sample_defaults: dict = field(default_factory=lambda: dict(steps=20, solver="heun", cfg=3.0, cfg_interval=None))
    # model config -> forward FLOPs of one image (2 x multiply-adds of its matmuls); None: unknown
    flops_per_image: Callable[[object], float] | None = None
    # The text encoder a run uses unless told otherwise (mlxflow.models.text spec).
    text_encoder: str = "minilm"

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"family {self.name}: prediction must be one of {PREDICTIONS}")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"family {self.name}: conditioning must be one of {CONDITIONINGS}")
        if self.default_preset not in self.model_presets:
            raise ValueError(f"family {self.name}: default preset '{self.default_preset}' is not a preset")

    # --- configs -------------------------------------------------------------------

    def model_config(self, preset: str | None = None, **overrides):
        """The model config of a named preset, with field overrides, validated."""
        preset = preset or self.default_preset
        if preset not in self.model_presets:
            raise MlxflowError(f"unknown preset '{preset}' for {self.name} (known: {', '.join(self.model_presets)})")
        return self.config_class(**{**self.model_presets[preset], **overrides}).validate()

    def train_config(self, preset: str | None = None, **overrides) -> TrainConfig:
        preset = preset or self.default_preset
        base = self.train_presets.get(preset, {})
        return TrainConfig(preset=preset, **{**base, **{k: v for k, v in overrides.items() if v is not None}}).validate()

    def config_from_dict(self, d: dict):
        return from_dict(self.config_class, d)

    # --- models --------------------------------------------------------------------

    def model_class(self, framework: str = "mlx") -> type:
        ref = {"mlx": self.mlx_model, "torch": self.torch_model}.get(framework)
        if ref is None:
            raise MlxflowError(f"unknown framework '{framework}' (known: mlx, torch)")
        if isinstance(ref, str):
            module, _, name = ref.partition(":")
            return getattr(importlib.import_module(module), name)
        return ref

    def build(self, model_config, framework: str = "mlx"):
        return self.model_class(framework)(model_config)

    def get_codec(self) -> Codec:
        return get_codec(self.codec)

    def network_shape(self, model_config) -> tuple[int, int, int]:
        """(H, W, C) of what the network sees (channels-last), after the codec."""
        return self.get_codec().network_shape(model_config)


_FAMILIES: dict[str, Family] = {}


def register(family: Family, *, replace: bool = False) -> Family:
    """Add a family to the registry (`replace=True` lets a test or plug-in redefine one)."""
    if family.name in _FAMILIES and not replace:
        raise ValueError(f"family '{family.name}' is already registered")
    if not dataclasses.is_dataclass(family.config_class) or not hasattr(family.config_class, "validate"):
        raise ValueError(f"family {family.name}: config_class must be a dataclass with validate()")
    _FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    _FAMILIES.pop(name, None)


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise MlxflowError(f"unknown model family '{name}' (known: {', '.join(family_names())})")
    return _FAMILIES[name]


def family_names() -> list[str]:
    return sorted(_FAMILIES)


def family_of(model_config) -> Family:
    """The registered family whose config class `model_config` is."""
    for fam in _FAMILIES.values():
        if type(model_config) is fam.config_class:
            return fam
    raise MlxflowError(f"no registered family uses {type(model_config).__name__}")


def model_config(family: str, preset: str | None = None, **overrides):
    """The model config of a named preset of a registered family, with field overrides."""
    return get_family(family).model_config(preset, **overrides)


def train_config(family: str, preset: str | None = None, **overrides) -> TrainConfig:
    """The train config of a named preset of a registered family; None overrides are ignored."""
    return get_family(family).train_config(preset, **overrides)


def load_checkpoint(path, family: str | None = None, with_optimizer: bool = False) -> Checkpoint:
    """A checkpoint folder (or a run folder's newest intact checkpoint) of a registered family,
    its model config rebuilt as that family's dataclass; `family` asserts what the caller
    expects. Errors: MlxflowError naming the folder and the problem (unknown family included)."""
    return read_checkpoint(path, lambda name: get_family(name).config_class, family=family,
                           with_optimizer=with_optimizer)


def build_model(family: str, model_config):
    """A fresh MLX network of `family` (weights initialised from MLX's global RNG)."""
    return get_family(family).build(model_config, "mlx")


def load_model(ckpt_or_path, use_ema: bool | str = True):
    """(MLX network with a checkpoint's weights, evaluated; the Checkpoint).

    use_ema: True / "ema" (the EMA, when the run kept one), "ema2" (the second EMA), or
    False / "raw" (the raw weights). Errors: MlxflowError for a bad folder or weights that
    do not fit the network."""
    import mlx.core as mx  # the registry itself never needs MLX

    ckpt = ckpt_or_path if isinstance(ckpt_or_path, Checkpoint) else load_checkpoint(ckpt_or_path)
    model = build_model(ckpt.family, ckpt.model_config)
    which = {True: "ema", False: "raw"}.get(use_ema, use_ema)
    load_weights_into(model, ckpt.inference_weights(which), f"checkpoint {ckpt.path}")
    mx.eval(model.parameters())
    return model, ckpt
