"""The family registry: the one place that lists model families.

A family is data, not a branch in the pipeline. Everything downstream (CLI choices,
both trainers, sampling, crosscheck, bench, export) asks this registry:

    Family(name, config class, model presets, train presets,
           MLX model class, torch model class,
           prediction  "velocity" | "x"       flow.to_velocity converts, once, for everyone
           codec       how data maps to the network's space and back (pixels: identity)
           conditioning "text" | "none"
           probe points for crosscheck, Core ML export support)

A new family is its two model files (`models/X.py`, `torch_ref/X.py`), a config
dataclass with presets, and one `register(Family(...))` call below.
Model classes may be given as "module:Class" strings so that importing the registry
never imports torch (or even MLX) before a caller needs it.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Callable

from .codecs import Codec, get_codec
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

    def train_config(self, preset: str | None = None, **overrides):
        from .config import TrainConfig

        preset = preset or self.default_preset
        base = self.train_presets.get(preset, {})
        return TrainConfig(preset=preset, **{**base, **{k: v for k, v in overrides.items() if v is not None}})

    def config_from_dict(self, d: dict):
        from .config import from_dict

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


# --- the built-in families -------------------------------------------------------------

def _emoji_probe_points(cfg) -> list[str]:
    n = cfg.levels
    return ["time_embed", "stem", *[f"down.{i}" for i in range(n)], "mid", *[f"up.{i}" for i in range(n)]]


def _register_builtin() -> None:
    from .config import EMOJI_PRESETS, EMOJI_TRAIN_PRESETS, EmojiConfig

    register(Family(
        name="emoji", config_class=EmojiConfig, model_presets=EMOJI_PRESETS, train_presets=EMOJI_TRAIN_PRESETS,
        mlx_model="mlxflow.models.emoji:EmojiFlow", torch_model="mlxflow.torch_ref.emoji:EmojiFlow",
        prediction="velocity", codec="pixels", conditioning="text", probe_points=_emoji_probe_points,
        coreml=True, default_preset="default", text_encoder="minilm-tokens",
        # Second-order Adams-Bashforth, 20 evaluations: as close to a 200-evaluation RK4 solve
        # as Heun 20 (40 evaluations) on one trained model and closer than Euler 50 on another
        # (`mlxflow solvers`, RMSE in [0, 1]: 0.0055 vs 0.0055 and 0.0094 vs 0.0069 / 0.0142).
        sample_defaults=dict(steps=20, solver="ab2", cfg=3.0, cfg_interval=None),
        description="pixel-space U-Net for 64x64 emoji, conditioned on frozen text embeddings"))


def _jit_probe_points(cfg) -> list[str]:
    return ["time_embed", "patch_embed", *[f"blocks.{i}" for i in range(cfg.depth)], "final_layer"]


def _register_jit() -> None:
    from .config import JIT_PRESETS, JIT_TRAIN_PRESETS, JiTConfig, jit_flops_per_image

    register(Family(
        name="jit", config_class=JiTConfig, model_presets=JIT_PRESETS, train_presets=JIT_TRAIN_PRESETS,
        mlx_model="mlxflow.models.jit:JiT", torch_model="mlxflow.torch_ref.jit:JiT",
        prediction="x", codec="pixels", conditioning="text", probe_points=_jit_probe_points,
        coreml=False, default_preset="tiny", flops_per_image=jit_flops_per_image,
        # The paper's sampler: Heun with an Euler last step (t = 1 is never evaluated),
        # CFG only for 0.1 < t < 1.
        sample_defaults=dict(steps=50, solver="heun_euler_last", cfg=2.5, cfg_interval=(0.1, 1.0)),
        description="pixel-space ViT predicting the clean image (Back to Basics, seed 003)"))


def _dit_probe_points(cfg) -> list[str]:
    return ["time_embed", "patch_embed", "text_proj", *[f"blocks.{i}" for i in range(cfg.depth)], "final_layer"]


def _register_dit() -> None:
    from .config import DIT_PRESETS, DIT_TRAIN_PRESETS, DiTConfig, dit_flops_per_image

    register(Family(
        name="dit", config_class=DiTConfig, model_presets=DIT_PRESETS, train_presets=DIT_TRAIN_PRESETS,
        mlx_model="mlxflow.models.dit:DiT", torch_model="mlxflow.torch_ref.dit:DiT",
        prediction="velocity", codec="sd-vae", conditioning="text", probe_points=_dit_probe_points,
        coreml=False, default_preset="tiny", flops_per_image=dit_flops_per_image,
        # The seed samples with 50 Euler steps; CFG needs the text dropout of its train presets.
        sample_defaults=dict(steps=50, solver="euler", cfg=4.0, cfg_interval=None),
        description="latent text-to-image transformer on SD-VAE latents and frozen T5 states (seed 002)"))


_register_builtin()
_register_jit()
_register_dit()
