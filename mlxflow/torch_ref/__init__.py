"""PyTorch reference twins of the MLX models (same file, class and attribute names as models/).

Importing this package stays cheap: the model modules import torch only when you import them.
"""

from __future__ import annotations

from ..errors import MlxflowError


def default_device() -> str:
    """The best torch device here: 'cuda' > 'mps' > 'cpu'."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def check_device(device: str) -> str:
    """`device` when torch can use it here; else MlxflowError in one line (not torch's assertion)."""
    import torch

    kind = str(device).split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise MlxflowError(f"--device {device}: this machine has no CUDA device torch can use "
                           "(use --device cpu, or leave --device out for the best available)")
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise MlxflowError(f"--device {device}: Metal (MPS) is not available to torch here")
    if kind not in ("cpu", "cuda", "mps"):
        raise MlxflowError(f"unknown torch device '{device}' (known: cpu, cuda, mps)")
    return device
