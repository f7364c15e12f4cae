"""Import diffusers AutoencoderKL folders (the SD VAE) into mlxflow.models.vae names and layouts.

mlxflow's AutoencoderKL uses diffusers' parameter names, so the key map is the identity
except for:

- attention blocks saved before diffusers renamed them (query/key/value/proj_attn ->
  to_q/to_k/to_v/to_out.0); some of those old files also store the projections as 1x1
  convs, (C, C, 1, 1), which are the same numbers as a (C, C) Linear weight;
- conv kernels: torch (O, I, kH, kW) -> MLX (O, kH, kW, I).

Coverage and shapes are checked by the caller with `mlxflow.checkpoint.check_weights_fit`
against a freshly built model: a missing, extra or misshapen weight is a one-line error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from mlxflow.errors import MlxflowError

SAFETENSORS = "diffusion_pytorch_model.safetensors"
BIN = "diffusion_pytorch_model.bin"

# Old attention names (diffusers < 0.14 folders, e.g. early sd-vae-ft-mse uploads) -> current.
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_PROJECTION_RE = re.compile(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def vae_key(key: str) -> str:
    """diffusers key (current or old attention names) -> mlxflow.models.vae key."""
    m = _ATTENTION_RE.match(key)
    if m:
        return f"{m.group(1)}.{_OLD_ATTENTION[m.group(2)]}.{m.group(3)}"
    return key


def from_diffusers(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """diffusers state dict (torch layouts) -> mlxflow names and MLX layouts, float32."""
    out = {}
    for key, value in state.items():
        new = vae_key(key)
        a = np.asarray(value, dtype=np.float32)
        if _PROJECTION_RE.search(new):
            if a.ndim == 4 and a.shape[2:] == (1, 1):  # a 1x1 conv is a Linear over channels
                a = a[:, :, 0, 0]
        elif a.ndim == 4:
            a = a.transpose(0, 2, 3, 1)
        if new in out:
            raise MlxflowError(f"VAE weights hold '{new}' twice (old and new attention names: '{key}')")
        out[new] = np.ascontiguousarray(a)
    return out


def to_diffusers(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """mlxflow.models.vae weights -> diffusers' current names and torch layouts, float32."""
    out = {}
    for key, value in weights.items():
        a = np.asarray(value, dtype=np.float32)
        if a.ndim == 4:
            a = a.transpose(0, 3, 1, 2)
        out[key] = np.ascontiguousarray(a)
    return out


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    # mx.load reads fp16/bf16/fp32 alike; numpy has no bfloat16 to hold a bf16 file in.
    import mlx.core as mx

    try:
        tensors = mx.load(str(path))
    except Exception as e:  # truncated or not a safetensors file
        raise MlxflowError(f"cannot read VAE weights {path}: {' '.join(str(e).split())}") from None
    return {k: np.array(v.astype(mx.float32)) for k, v in tensors.items()}


def _read_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise MlxflowError(f"{path} is a PyTorch pickle and torch is not installed; install torch or use a "
                           f"folder with {SAFETENSORS}") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise MlxflowError(f"cannot read VAE weights {path}: {' '.join(str(e).split())}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise MlxflowError(f"{path} does not hold a state dict")
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise MlxflowError(f"{path}: entry '{k}' is not a tensor")
        out[k] = v.detach().to(torch.float32).numpy()
    return out


def read_diffusers_weights(folder) -> dict[str, np.ndarray]:
    """The folder's state dict as float32 numpy, diffusers names and torch layouts.
    The safetensors file is preferred over the pickle when both are there."""
    folder = Path(folder)
    if (folder / SAFETENSORS).is_file():
        return _read_safetensors(folder / SAFETENSORS)
    if (folder / BIN).is_file():
        return _read_bin(folder / BIN)
    raise MlxflowError(f"{folder} is not a diffusers VAE folder: it needs {SAFETENSORS} or {BIN}")


def read_config_json(path) -> dict:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise MlxflowError(f"VAE config not found: {path}") from None
    except (OSError, ValueError) as e:
        raise MlxflowError(f"cannot read VAE config {path}: {' '.join(str(e).split())}") from None
    if not isinstance(d, dict):
        raise MlxflowError(f"VAE config {path} is not a JSON object")
    return d


def read_hf_vae(folder) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, weights in mlxflow names and MLX layouts) from a diffusers AutoencoderKL folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MlxflowError(f"SD VAE folder not found: {folder}")
    config = read_config_json(folder / "config.json")
    cls = config.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise MlxflowError(f"{folder} holds a diffusers {cls}, not an AutoencoderKL")
    state = read_diffusers_weights(folder)
    if any(k.startswith(("encoder.down.", "decoder.up.", "first_stage_model.")) for k in state):
        # The original CompVis/LDM layout: diffusers' conversion script turns it into a folder.
        raise MlxflowError(f"{folder} holds original-LDM VAE weights, not diffusers ones; convert them with "
                           "diffusers (AutoencoderKL.from_single_file(...).save_pretrained(DIR)) first")
    return config, from_diffusers(state)


def write_diffusers_folder(folder, config: dict, weights: dict[str, np.ndarray]) -> Path:
    """Save mlxflow VAE weights as a diffusers folder (config.json + safetensors)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(to_diffusers(weights), str(folder / SAFETENSORS))
    return folder
