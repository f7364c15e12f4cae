"""Weight maps between MLX and PyTorch, model imports and exports (pure functions)."""
