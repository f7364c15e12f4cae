"""MLX <-> PyTorch weight maps: pure key/value functions with full coverage asserted.

The twins in mlxflow/models/ and mlxflow/torch_ref/ have identical parameter names by
construction, so the map is the identity on keys. Only layouts change, and only for
convolution kernels:

    Conv{1,2,3}d           MLX (O, *k, I)   torch (O, I, *k)
    ConvTranspose{1,2,3}d  MLX (O, *k, I)   torch (I, O, *k)

Which keys are kernels is read from freshly built models of both frameworks (the module
that owns the parameter and its rank), never guessed from names. Checkpoints store the
MLX names and layouts (see mlxflow/checkpoint.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlxflow.checkpoint import Checkpoint, check_weights_fit
from mlxflow.families import load_checkpoint, load_model
from mlxflow.families import Family, family_of, get_family

SAME, CONV, CONV_T = "same", "conv", "conv_transpose"


def _family(model_config, family: str | Family | None) -> Family:
    """The family named, or the one whose config class `model_config` is."""
    if family is None:
        return family_of(model_config)
    return family if isinstance(family, Family) else get_family(family)


def _config_key(model_config) -> tuple:
    # Dataclasses with tuple fields are not hashable when unfrozen; key the cache by value.
    return (type(model_config).__name__, repr(model_config))


_TABLES: dict = {}


def layout_table(model_config, family: str | None = None) -> dict[str, tuple[str, tuple, tuple]]:
    """key -> (kind, MLX shape, torch shape) for every parameter of the family's model.

    Built from one MLX model (lazy arrays, nothing computed) and one torch model on the
    meta device (no memory, no init), and cross-checked: the key sets must be equal and
    every torch shape must be the layout change of the MLX shape.
    """
    fam = _family(model_config, family)
    family = fam.name
    cache_key = (family, id(fam), _config_key(model_config))
    if cache_key in _TABLES:
        return _TABLES[cache_key]
    import torch
    from mlx.utils import tree_flatten

    mlx_shapes = {k: tuple(v.shape) for k, v in tree_flatten(fam.build(model_config, "mlx").parameters())}
    with torch.device("meta"):
        tmodel = fam.build(model_config, "torch")
    torch_shapes = {k: tuple(v.shape) for k, v in tmodel.state_dict().items()}
    if set(mlx_shapes) != set(torch_shapes):
        only_m = sorted(set(mlx_shapes) - set(torch_shapes))
        only_t = sorted(set(torch_shapes) - set(mlx_shapes))
        raise AssertionError(f"{family} twins disagree on parameter names: MLX-only {only_m[:3]}, torch-only {only_t[:3]}")

    kinds = {}
    for name, module in tmodel.named_modules():
        if isinstance(module, torch.nn.modules.conv._ConvNd) and module.weight is not None:
            kinds[f"{name}.weight" if name else "weight"] = CONV_T if module.transposed else CONV
    table = {}
    for key, mshape in mlx_shapes.items():
        kind = kinds.get(key, SAME)
        tshape = torch_shapes[key]
        if _torch_shape(kind, mshape) != tshape:
            raise AssertionError(f"{family} twins disagree on '{key}': MLX {mshape} ({kind}) vs torch {tshape}")
        table[key] = (kind, mshape, tshape)
    _TABLES[cache_key] = table
    return table


def _torch_shape(kind: str, mshape: tuple) -> tuple:
    if kind == SAME:
        return mshape
    o, k, i = mshape[0], mshape[1:-1], mshape[-1]
    return (o, i, *k) if kind == CONV else (i, o, *k)


def _mlx_to_torch_array(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == SAME:
        return a
    n = a.ndim
    if kind == CONV:  # (O, *k, I) -> (O, I, *k)
        return a.transpose(0, n - 1, *range(1, n - 1))
    return a.transpose(n - 1, 0, *range(1, n - 1))  # (O, *k, I) -> (I, O, *k)


def _torch_to_mlx_array(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == SAME:
        return a
    n = a.ndim
    if kind == CONV:  # (O, I, *k) -> (O, *k, I)
        return a.transpose(0, *range(2, n), 1)
    return a.transpose(1, *range(2, n), 0)  # (I, O, *k) -> (O, *k, I)


def mlx_to_torch(weights: dict, model_config, family: str | None = None, where: str = "weights") -> dict:
    """MLX-named, MLX-layout arrays (numpy or mx) -> a torch state_dict (CPU tensors, same dtype).

    Raises MlxflowError naming the first missing / unexpected / misshapen key.
    """
    import torch

    table = layout_table(model_config, family)
    weights = {k: np.asarray(v) for k, v in weights.items()}
    check_weights_fit({k: m for k, (_, m, _) in table.items()}, weights, where)
    return {k: torch.from_numpy(np.ascontiguousarray(_mlx_to_torch_array(table[k][0], v))) for k, v in weights.items()}


def torch_to_mlx(state_dict: dict, model_config, family: str | None = None, where: str = "state_dict") -> dict:
    """A torch state_dict (any device; numpy values pass too) -> MLX-named, MLX-layout numpy arrays (same dtype; bf16 -> fp32)."""
    import torch

    table = layout_table(model_config, family)

    def to_np(v):
        if isinstance(v, np.ndarray):
            return v
        v = v.detach().cpu()
        return (v.float() if v.dtype == torch.bfloat16 else v).numpy()

    arrays = {k: to_np(v) for k, v in state_dict.items()}
    check_weights_fit({k: t for k, (_, _, t) in table.items()}, arrays, where)
    return {k: np.ascontiguousarray(_torch_to_mlx_array(table[k][0], v)) for k, v in arrays.items()}


def _as_checkpoint(ckpt_or_path) -> Checkpoint:
    return ckpt_or_path if isinstance(ckpt_or_path, Checkpoint) else load_checkpoint(Path(ckpt_or_path))


def _pick_weights(ckpt: Checkpoint, use_ema: bool | str) -> dict:
    return ckpt.inference_weights({True: "ema", False: "raw"}.get(use_ema, use_ema))


def load_torch_model(ckpt_or_path, device: str = "cpu", use_ema: bool | str = True):
    """-> (torch model in eval mode on `device`, Checkpoint). use_ema: True/"ema", "ema2", or False/"raw"."""
    ckpt = _as_checkpoint(ckpt_or_path)
    model = get_family(ckpt.family).build(ckpt.model_config, "torch")
    state = mlx_to_torch(_pick_weights(ckpt, use_ema), ckpt.model_config, ckpt.family, where=f"checkpoint {ckpt.path}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), ckpt


def load_mlx_model(ckpt_or_path, use_ema: bool = True):
    """-> (MLX model with the checkpoint's weights, evaluated, Checkpoint)."""


    return load_model(_as_checkpoint(ckpt_or_path), use_ema=use_ema)
