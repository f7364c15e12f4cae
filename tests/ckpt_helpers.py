"""Checkpoint writers shared by tests/test_checkpoint.py and the child processes it kills."""

import numpy as np
from conftest import micro_emoji_config
from mlxflow.config import TrainConfig
from mlxflow.checkpoint import save_checkpoint

def tensors(step, variant=0, n=32):
    rng = np.random.default_rng(1000 * step + variant)
    w = {"a.weight": rng.standard_normal((n, 4)).astype(np.float32), "b.bias": rng.standard_normal(3).astype(np.float32)}
    ema = {k: v * np.float32(0.5) for k, v in w.items()}
    opt = {"step": np.array(step, np.int64), "m.a.weight": rng.standard_normal((n, 4)).astype(np.float32)}
    return w, ema, opt

def save(run, step, variant=0, keep=0, n=32):
    w, ema, opt = tensors(step, variant, n)
    return save_checkpoint(run, step, family="emoji", model_config=micro_emoji_config(),
                           train_config=TrainConfig(steps=10_000), text_encoder="minilm", weights=w, ema=ema,
                           optimizer=opt, state={"variant": variant, "n": n}, keep=keep)
