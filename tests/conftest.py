"""Shared fixtures: tiny configs and a synthetic dataset, so the suite runs offline and fast."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Tests that claim bitwise equality (exact resume) need torch's CPU math to be a pure function
# of its inputs. MKL picks kernels by the memory alignment of its operands unless its
# conditional numerical reproducibility is on, so a resumed run, whose tensors live at other
# addresses, could round differently. STRICT makes results independent of alignment (with
# the best instruction set, AUTO); it must be set before MKL loads, i.e. before torch is
# imported, which conftest runs ahead of. The thread count is the other half (fixtures set 1).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxflow.config import TrainConfig  # noqa: E402
from mlxflow.configs.emoji import EmojiConfig  # noqa: E402


def micro_emoji_config(**overrides) -> EmojiConfig:
    """A ~60k-parameter U-Net on 16x16 images: every block type, milliseconds per step."""
    base = dict(image_size=16, channels=(16, 32), blocks_per_level=1, self_attn_levels=(1,),
                cross_attn_levels=(0, 1), heads=2, groups=8, cond_dim=32, text_dim=8, text_tokens=1)
    return EmojiConfig(**{**base, **overrides})


def make_shapes_dataset(path: Path, n: int = 16, size: int = 16, seed: int = 0):
    """Coloured squares/discs on white, captions naming colour and shape; text = one-hot-ish codes."""
    from mlxflow.data.dataset import ImageTextDataset, write_dataset_folder

    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (240, 200, 20)}
    yy, xx = np.mgrid[:size, :size]
    images, captions = [], []
    for i in range(n):
        name = list(colours)[i % 4]
        shape = "disc" if (i // 4) % 2 else "square"
        im = np.full((size, size, 3), 255, np.uint8)
        c = size // 2 + rng.integers(-1, 2)
        r = size // 4
        mask = ((yy - c) ** 2 + (xx - c) ** 2 <= r * r) if shape == "disc" else (abs(yy - c) <= r) & (abs(xx - c) <= r)
        im[mask] = colours[name]
        images.append(im)
        captions.append({"text": f"{name} {shape}"})
    write_dataset_folder(path, np.stack(images), captions, {"kind": "folder", "size": size})
    ds = ImageTextDataset.load(path)
    emb = np.zeros((n, 1, 8), np.float32)
    for i in range(n):
        emb[i, 0, i % 4] = 1.0
        emb[i, 0, 4 + (i // 4) % 2] = 1.0
    return ds, emb


@pytest.fixture
def shapes_dataset(tmp_path):
    return make_shapes_dataset(tmp_path / "shapes")


@pytest.fixture
def micro_config():
    return micro_emoji_config()


def quick_train_config(**overrides) -> TrainConfig:
    base = dict(steps=6, batch_size=8, lr=2e-3, warmup_steps=2, ema_decay=0.9, ckpt_every=3, log_every=1,
                keep_checkpoints=5, cond_dropout=0.15, seed=0)
    return TrainConfig(**{**base, **overrides})


def assert_fast_path_changes_no_number(trainer, tmp_path, dataset, embeddings, model_config):
    """Train 7 steps twice with `trainer` (train.train or train_torch.train_torch): through the
    host stream with a read-back every step, and with the set held on the device and losses
    read every 4 steps. Same batches, flips and noise: bitwise-equal reports and checkpoints."""
    from mlxflow.checkpoint import list_checkpoints
    from mlxflow.families import load_checkpoint

    runs = []
    for name, device_data, log_every in (("host", False, 1), ("fast", True, 4)):
        seen = []
        cfg = quick_train_config(steps=7, grad_accum=2, flip=True, ckpt_every=5, device_data=device_data,
                                 log_every=log_every)
        out = trainer(tmp_path / name, dataset, model_config, cfg, family="emoji", embeddings=embeddings,
                      on_step=seen.append)
        runs.append((out["losses"], [(s.step, s.loss, s.grad_norm, s.lr) for s in seen],
                     load_checkpoint(tmp_path / name, with_optimizer=True)))
    (host_losses, host_seen, a), (fast_losses, fast_seen, b) = runs
    assert fast_losses == host_losses and fast_seen == host_seen and len(fast_seen) == 7
    for tree_a, tree_b in ((a.weights, b.weights), (a.ema, b.ema), (a.optimizer, b.optimizer)):
        assert tree_a.keys() == tree_b.keys() and all(np.array_equal(tree_a[k], tree_b[k]) for k in tree_a)
    # Deferred reads still stop at the checkpoint step, so it holds that step's weights.
    assert [p.name for p in list_checkpoints(tmp_path / "fast")] == ["step-0000005", "step-0000007"]


def caption_code_encoder(spec: str, captions: list[str], embeddings: np.ndarray):
    """A text encoder that returns the synthetic set's caption codes (zeros for unknown text)."""
    from mlxflow.encoders import TextEncoder

    lookup = dict(zip(captions, embeddings))
    zeros = np.zeros(embeddings.shape[1:], np.float32)

    class CaptionCodes(TextEncoder):
        id = spec
        dim, tokens = embeddings.shape[2], embeddings.shape[1]

        def encode(self, texts):
            return np.stack([lookup.get(t, zeros) for t in texts])

    enc = CaptionCodes()
    enc.spec = spec
    return enc


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two cores shared with other processes: torch's OpenMP threads spin against them
    (a 40 ms forward became 2.5 s); one thread is fastest here."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
