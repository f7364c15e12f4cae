"""MLX <-> torch weight maps: bit-exact round trips and clear errors for checkpoints that don't fit."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from conftest import micro_emoji_config
from convert.torch_mlx import load_mlx_model, load_torch_model, mlx_to_torch, torch_to_mlx
from mlxflow.checkpoint import save_checkpoint
from mlxflow.config import TrainConfig
from mlxflow.families import model_config
from mlxflow.errors import MlxflowError
from mlxflow.models.emoji import EmojiFlow as MlxEmojiFlow
from mlxflow.torch_ref.emoji import EmojiFlow as TorchEmojiFlow


def random_weights(cfg, seed=0):
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    return {k: (np.array(v) * (1 + 0.5 * rng.standard_normal(v.shape)) + 0.05 * rng.standard_normal(v.shape))
            .astype(np.float32) for k, v in tree_flatten(MlxEmojiFlow(cfg).parameters())}


@pytest.mark.parametrize("cfg", [micro_emoji_config(), model_config("emoji", "tiny")], ids=["micro", "tiny"])
def test_round_trip_is_bit_exact(cfg):
    weights = random_weights(cfg)
    state = mlx_to_torch(weights, cfg)
    TorchEmojiFlow(cfg).load_state_dict(state, strict=True)  # torch accepts every key and shape
    back = torch_to_mlx(state, cfg)
    assert set(back) == set(weights)
    for k in weights:
        assert back[k].dtype == weights[k].dtype and np.array_equal(back[k], weights[k]), k


def test_conv_layout_and_linear_identity():
    cfg = micro_emoji_config()
    weights = random_weights(cfg)
    state = mlx_to_torch(weights, cfg)
    w_m, w_t = weights["stem.weight"], state["stem.weight"].numpy()  # MLX (O,kH,kW,I), torch (O,I,kH,kW)
    assert w_t.shape == (w_m.shape[0], w_m.shape[3], w_m.shape[1], w_m.shape[2])
    assert w_t[5, 2, 0, 1] == w_m[5, 0, 1, 2]
    skip = "down.1.blocks.0.skip.weight"  # 1x1 conv: still transposed
    assert state[skip].shape == (32, 16, 1, 1) and weights[skip].shape == (32, 1, 1, 16)
    assert np.array_equal(state["text_proj.weight"].numpy(), weights["text_proj.weight"])
    assert np.array_equal(state["out_norm.weight"].numpy(), weights["out_norm.weight"])


def test_state_dict_from_a_trained_torch_model_converts():
    cfg = micro_emoji_config()
    model = TorchEmojiFlow(cfg)
    back = mlx_to_torch(torch_to_mlx(model.state_dict(), cfg), cfg)
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k


@pytest.mark.parametrize("direction", ["mlx_to_torch", "torch_to_mlx"])
def test_checkpoints_that_do_not_fit_name_the_key(direction):
    cfg = micro_emoji_config()
    weights = random_weights(cfg)
    if direction == "torch_to_mlx":
        weights = mlx_to_torch(weights, cfg)
    fn = mlx_to_torch if direction == "mlx_to_torch" else torch_to_mlx

    missing = dict(weights)
    del missing["mid.cross_attn.1.attn.k_proj.weight"]
    with pytest.raises(MlxflowError, match=r"missing weight 'mid\.cross_attn\.1\.attn\.k_proj\.weight'"):
        fn(missing, cfg)

    extra = {**weights, "mid.blocks.0.extra.weight": weights["stem.bias"]}
    with pytest.raises(MlxflowError, match=r"unexpected weight 'mid\.blocks\.0\.extra\.weight'"):
        fn(extra, cfg)

    bad = dict(weights)
    bad["up.0.blocks.0.conv1.weight"] = bad["up.0.blocks.0.conv1.weight"][:1]
    with pytest.raises(MlxflowError, match=r"'up\.0\.blocks\.0\.conv1\.weight' has shape"):
        fn(bad, cfg)

    # Weights of a different config do not fit either.
    with pytest.raises(MlxflowError, match="does not fit"):
        fn(weights, micro_emoji_config(cond_dim=48))


def test_unknown_family():
    with pytest.raises(MlxflowError, match="unknown model family .nope."):
        mlx_to_torch({}, micro_emoji_config(), family="nope")


def test_load_models_from_checkpoint(tmp_path):
    cfg = micro_emoji_config()
    weights, ema = random_weights(cfg, 0), random_weights(cfg, 1)
    path = save_checkpoint(tmp_path / "run", 3, family="emoji", model_config=cfg, train_config=TrainConfig(),
                           text_encoder="test", weights=weights, ema=ema)
    tmodel, ckpt = load_torch_model(path)
    assert not tmodel.training and ckpt.step == 3
    assert np.array_equal(torch_to_mlx(tmodel.state_dict(), cfg)["stem.weight"], ema["stem.weight"])
    tmodel_raw, _ = load_torch_model(tmp_path / "run", use_ema=False)  # a run folder means its latest
    assert np.array_equal(torch_to_mlx(tmodel_raw.state_dict(), cfg)["stem.weight"], weights["stem.weight"])
    mmodel, _ = load_mlx_model(ckpt)
    got = dict(tree_flatten(mmodel.parameters()))
    assert all(np.array_equal(np.array(got[k]), ema[k]) for k in ema)

    # A checkpoint whose weights miss a key fails with one clear line naming it.
    del weights["out_conv.bias"]
    bad = save_checkpoint(tmp_path / "bad", 1, family="emoji", model_config=cfg, train_config=TrainConfig(),
                          text_encoder="test", weights=weights)
    for load in (load_torch_model, load_mlx_model):
        with pytest.raises(MlxflowError, match="missing weight 'out_conv.bias'"):
            load(bad, use_ema=False)
    with pytest.raises(MlxflowError, match="checkpoint not found"):
        load_torch_model(tmp_path / "nowhere")
