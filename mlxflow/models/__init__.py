"""MLX models, one file per family, plus the frozen text encoders (text.py)."""

from __future__ import annotations

import importlib

from ..errors import MlxflowError

# family -> (module, class). The torch twins live under the same names in mlxflow.torch_ref.
FAMILIES = {"emoji": ("emoji", "EmojiFlow")}


def model_class(family: str, framework: str = "mlx"):
    """The model class of `family` in MLX (`mlxflow.models`) or torch (`mlxflow.torch_ref`)."""
    if family not in FAMILIES:
        raise MlxflowError(f"unknown model family '{family}' (known: {', '.join(FAMILIES)})")
    module, name = FAMILIES[family]
    package = "mlxflow.models" if framework == "mlx" else "mlxflow.torch_ref"
    return getattr(importlib.import_module(f"{package}.{module}"), name)


def build_model(family: str, model_config):
    return model_class(family)(model_config)
