"""mlxflow: flow-matching image generators in MLX, with a PyTorch twin and Core ML export."""

from ._version import __version__  # noqa: F401

# The built-in families register themselves with the registry (mlxflow/families.py).
from . import configs  # noqa: E402,F401
