"""mlxflow: flow-matching image generators in MLX, with a PyTorch twin and Core ML export."""

__version__ = "0.1.0"
