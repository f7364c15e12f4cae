"""MLX models, one file per family, plus the frozen encoders (text.py).

Which class belongs to which family is the registry's business (mlxflow/families.py);
this module builds MLX models and fills them with checkpoint weights.
"""

from __future__ import annotations


def model_class(family: str, framework: str = "mlx"):
    """The model class of `family` in MLX or torch (as the registry names it)."""
    from ..families import get_family

    return get_family(family).model_class(framework)


def build_model(family: str, model_config):
    """A fresh MLX model of `family` (weights initialised from MLX's global RNG)."""
    return model_class(family, "mlx")(model_config)


def load_weights_into(module, weights: dict, where: str) -> None:
    """Fill an MLX module from numpy arrays; one-line MlxflowError naming the first bad key."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from ..checkpoint import check_weights_fit

    expected = {k: v.shape for k, v in tree_flatten(module.parameters())}
    check_weights_fit(expected, weights, where)
    module.load_weights([(k, mx.array(v)) for k, v in weights.items()])


def load_model(ckpt_or_path, use_ema: bool | str = True):
    """(MLX model with the checkpoint's weights, evaluated; Checkpoint).

    use_ema: True / "ema" (the EMA, when the run kept one), "ema2" (the second EMA), or
    False / "raw" (the raw weights).
    """
    import mlx.core as mx

    from ..checkpoint import Checkpoint, load_checkpoint

    ckpt = ckpt_or_path if isinstance(ckpt_or_path, Checkpoint) else load_checkpoint(ckpt_or_path)
    model = build_model(ckpt.family, ckpt.model_config)
    which = {True: "ema", False: "raw"}.get(use_ema, use_ema)
    load_weights_into(model, ckpt.inference_weights(which), f"checkpoint {ckpt.path}")
    mx.eval(model.parameters())
    return model, ckpt
