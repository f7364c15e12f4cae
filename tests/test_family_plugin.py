"""A family is a plug-in: one registered in this file alone trains (MLX and torch), resumes,
samples and cross-checks through the same pipeline as emoji, without touching any other file.

The throwaway family is a two-conv pixel model that predicts the clean image (x), so the
x -> velocity conversion of flow.to_velocity is exercised everywhere it is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as mnn
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn

from conftest import quick_train_config  # noqa: E402
from mlxflow.families import load_checkpoint  # noqa: E402
from mlxflow.errors import MlxflowError  # noqa: E402
from mlxflow.families import Family, get_family, register, unregister  # noqa: E402


@dataclass
class PixelXConfig:
    image_size: int = 16
    in_channels: int = 3
    width: int = 16
    text_dim: int = 8
    text_tokens: int = 1

    def validate(self):
        if self.width % 4:
            raise MlxflowError(f"width {self.width} must be divisible by 4")
        return self


class PixelXNet(mnn.Module):
    """(x_t (B,H,W,C), t (B,), text (B,L,D)) -> clean image (B,H,W,C)."""

    def __init__(self, cfg: PixelXConfig):
        super().__init__()
        self.config = cfg
        self.stem = mnn.Conv2d(cfg.in_channels, cfg.width, 3, padding=1)
        self.cond = mnn.Linear(cfg.text_dim + 1, cfg.width)
        self.out = mnn.Conv2d(cfg.width, cfg.in_channels, 3, padding=1)

    def __call__(self, x, t, text):
        c = self.cond(mx.concatenate([text.mean(axis=1), t[:, None]], axis=-1))
        return self.out(mnn.silu(self.stem(x) + c[:, None, None, :]))


class TorchPixelXNet(tnn.Module):
    """The torch twin: (x_t (B,C,H,W), t (B,), text (B,L,D)) -> (B,C,H,W)."""

    def __init__(self, cfg: PixelXConfig):
        super().__init__()
        self.config = cfg
        self.stem = tnn.Conv2d(cfg.in_channels, cfg.width, 3, padding=1)
        self.cond = tnn.Linear(cfg.text_dim + 1, cfg.width)
        self.out = tnn.Conv2d(cfg.width, cfg.in_channels, 3, padding=1)

    def forward(self, x, t, text):
        c = self.cond(torch.cat([text.mean(dim=1), t[:, None]], dim=-1))
        return self.out(torch.nn.functional.silu(self.stem(x) + c[:, :, None, None]))


@pytest.fixture
def pixelx():
    fam = register(Family(
        name="pixelx", config_class=PixelXConfig, model_presets={"default": {}},
        train_presets={"default": dict(batch_size=8, lr=3e-3, warmup_steps=2, ema_decay=0.9)},
        mlx_model=PixelXNet, torch_model=TorchPixelXNet, prediction="x", probe_points=lambda cfg: ["stem", "out"]))
    yield fam
    unregister("pixelx")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def test_plugin_family_end_to_end(tmp_path, pixelx, shapes_dataset):
    from mlxflow import api
    from mlxflow.crosscheck import crosscheck
    from mlxflow.train.mlx_session import train
    from mlxflow.train.torch_session import train_torch

    from conftest import caption_code_encoder
    from mlxflow import encoders as text

    ds, emb = shapes_dataset
    cfg = pixelx.model_config()
    run = tmp_path / "run"
    # The run records a text encoder that maps the set's captions to their codes, so that
    # sampling from prompts works offline.
    text._CACHE["codes"] = caption_code_encoder("codes", ds.captions, emb)
    kw = dict(family="pixelx", embeddings=emb, text_encoder="codes")

    # MLX: 4 steps in one go vs 2 + 2 with a resume: bitwise equal.
    full = train(tmp_path / "full", ds, cfg, quick_train_config(steps=4, ckpt_every=0), **kw)
    first = train(run, ds, cfg, quick_train_config(steps=2, ckpt_every=0), **kw)
    rest = train(run, ds, cfg, quick_train_config(steps=4, ckpt_every=0), resume="latest", **kw)
    assert first["losses"] + rest["losses"] == full["losses"]
    a, b = load_checkpoint(tmp_path / "full").weights, load_checkpoint(run).weights
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    # torch picks up the MLX run (weights, EMA, AdamW state), and the loss keeps falling.
    more = train_torch(run, ds, cfg, quick_train_config(steps=30, ckpt_every=0), resume="latest", **kw)
    ck = load_checkpoint(run)
    assert ck.family == "pixelx" and ck.step == 30 and ck.meta["framework"] == "torch"
    assert isinstance(ck.model_config, PixelXConfig)
    assert np.mean(more["losses"][-5:]) < np.mean(full["losses"][:2])

    # Crosscheck: per block (from the family's probe points), output, x-pred trajectory, train step.
    report = crosscheck(run, batch=2, steps=3)
    assert report.passed, [(r.name, r.max_abs, r.limit) for r in report.rows if not r.passed]
    assert [r.name for r in report.rows[:2]] == ["block stem", "block out"]

    # Sampling through the public API: a grid PNG with a row per prompt.
    try:
        grid = api.sample(run, ["red square", "blue disc"], tmp_path / "grid.png", n=3, steps=4, solver="heun")
    finally:
        text._CACHE.pop("codes")
    from PIL import Image

    img = np.asarray(Image.open(grid))
    assert img.shape[1] > img.shape[0] and img.std() > 0  # 3 columns x 2 rows, not a blank page


def test_plugin_family_is_visible_to_the_cli(pixelx):
    import cli

    args = cli.build_parser().parse_args(["train", "pixelx", "--data", "D", "--out", "R"])
    assert args.family == "pixelx"
    assert get_family("pixelx").prediction == "x"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "nope", "--data", "D", "--out", "R"])


def test_x_prediction_reaches_every_consumer(pixelx):
    """The sampler's velocity for an x-predicting net is (x_hat - x_t) / (1 - t)."""
    from mlxflow.sample import sample_steps

    cfg = pixelx.model_config()
    mx.random.seed(0)
    net = PixelXNet(cfg)
    noise = mx.random.normal((2, 16, 16, 3), key=mx.random.key(1))
    text = mx.zeros((2, 1, 8))
    *_, (_, t, x) = sample_steps(net, text, steps=1, solver="euler", noise=noise)
    x_hat = net(noise, mx.zeros((2,)), text)
    # One Euler step of size 1 from t=0: x = x0 + (x_hat - x0) / 1 = x_hat.
    np.testing.assert_allclose(np.array(x), np.array(x_hat), atol=1e-5)
