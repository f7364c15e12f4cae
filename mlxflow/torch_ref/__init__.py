"""PyTorch reference twins of the MLX models (same file, class and attribute names as models/).

Importing this package stays cheap: the model modules import torch only when you import them.
"""

from __future__ import annotations


def default_device() -> str:
    """The best torch device here: 'cuda' > 'mps' > 'cpu'."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"
