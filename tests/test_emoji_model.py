"""Emoji U-Net: shapes, parameter budgets of the presets, conditioning reaches the output."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxflow.config import model_config
from mlxflow.errors import MlxflowError
from mlxflow.models.emoji import EmojiFlow

from conftest import micro_emoji_config


def n_params(model):
    return sum(v.size for _, v in tree_flatten(model.parameters()))


@pytest.mark.parametrize("preset,lo,hi", [("tiny", 0.5e6, 1.5e6), ("default", 4.5e6, 5.0e6), ("seed", 40e6, 55e6)])
def test_preset_parameter_budgets(preset, lo, hi):
    cfg = model_config("emoji", preset)
    assert lo <= n_params(EmojiFlow(cfg)) <= hi


def test_forward_shape_and_dependence_on_inputs():
    cfg = micro_emoji_config()
    mx.random.seed(0)
    model = EmojiFlow(cfg)
    x = mx.random.normal((3, 16, 16, 3))
    t = mx.array([0.1, 0.5, 0.9])
    text = mx.random.normal((3, 1, 8))
    y = model(x, t, text)
    assert y.shape == (3, 16, 16, 3) and y.dtype == mx.float32
    # time and text both change the output; batch elements are independent
    assert not np.allclose(np.asarray(model(x, t + 0.05, text)), np.asarray(y))
    assert not np.allclose(np.asarray(model(x, t, text * 0)), np.asarray(y))
    y0 = model(x[:1], t[:1], text[:1])
    assert np.allclose(np.asarray(y0), np.asarray(y[:1]), atol=1e-5)


def test_default_preset_runs_at_64():
    cfg = model_config("emoji", "default")
    y = EmojiFlow(cfg)(mx.zeros((1, 64, 64, 3)), mx.array([0.3]), mx.zeros((1, 1, 384)))
    assert y.shape == (1, 64, 64, 3)


def test_multi_token_text():
    cfg = micro_emoji_config(text_tokens=4)
    y = EmojiFlow(cfg)(mx.zeros((2, 16, 16, 3)), mx.array([0.3, 0.4]), mx.ones((2, 4, 8)))
    assert y.shape == (2, 16, 16, 3)


def test_bad_configs_and_presets():
    with pytest.raises(MlxflowError, match="unknown preset 'huge'"):
        model_config("emoji", "huge")
    with pytest.raises(MlxflowError, match="unknown model family"):
        model_config("gan", "tiny")
    with pytest.raises(MlxflowError, match="divisible"):
        model_config("emoji", "default", image_size=60)
