"""Emoji U-Net: shapes, parameter budgets of the presets, conditioning reaches the output."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxflow.families import model_config
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


# --- token-level text with a padding mask (text_mask) -----------------------------------------


def _masked_model(seed=0, **overrides):
    cfg = micro_emoji_config(text_tokens=4, text_mask=True, **overrides)
    mx.random.seed(seed)
    return EmojiFlow(cfg), cfg


def _padded_text(seed=0, batch=3, tokens=4, dim=8, real=(3, 1, 2)):
    """Random token rows; sample i keeps its first real[i] rows, the rest are padding (exact zeros)."""
    text = np.random.default_rng(seed).standard_normal((batch, tokens, dim)).astype(np.float32)
    for i, n in enumerate(real):
        text[i, n:] = 0.0
    return text


def _inputs(batch=3, seed=1):
    rng = np.random.default_rng(seed)
    return (mx.array(rng.standard_normal((batch, 16, 16, 3)).astype(np.float32)),
            mx.array(rng.uniform(0.05, 0.95, batch).astype(np.float32)))


def test_every_preset_masks_text():
    for preset in ("tiny", "default", "seed"):
        assert model_config("emoji", preset).text_mask is True


def test_appending_padding_rows_changes_nothing():
    model, _ = _masked_model()
    x, t = _inputs()
    text = _padded_text()
    y = np.asarray(model(x, t, mx.array(text)))
    longer = np.concatenate([text, np.zeros((3, 5, 8), np.float32)], axis=1)
    # Masked keys add exact zeros, but a longer key axis may be reduced in another order
    # (the BLAS picks its blocking by shape), so agreement is to rounding, not bitwise.
    np.testing.assert_allclose(np.asarray(model(x, t, mx.array(longer))), y, rtol=0, atol=1e-5)
    # Reordering zero rows among the real ones is no change of tokens either (no positions in the keys).
    shuffled = text[:, [0, 3, 1, 2]]
    assert np.allclose(np.asarray(model(x, t, mx.array(shuffled))), y, atol=1e-5)


def test_changing_a_real_row_changes_the_output_but_a_padding_row_is_not_read():
    model, _ = _masked_model()
    x, t = _inputs()
    text = _padded_text()
    y = np.asarray(model(x, t, mx.array(text)))
    moved = text.copy()
    moved[0, 1] += 0.5  # a real token of sample 0
    y2 = np.asarray(model(x, t, mx.array(moved)))
    assert np.abs(y2[0] - y[0]).max() > 1e-3
    assert np.array_equal(y2[1:], y[1:])  # samples stay independent


def test_zero_text_is_the_unconditional_path_and_cross_attention_adds_nothing():
    model, cfg = _masked_model()
    x, t = _inputs()
    zeros = mx.zeros((3, 4, 8))
    y = np.asarray(model(x, t, zeros))
    # One all-zero row or eight: the same (nothing to attend to, pooled text 0).
    assert np.array_equal(np.asarray(model(x, t, mx.zeros((3, 8, 8)))), y)
    # Every cross-attention is an exact identity on a dropped condition...
    from mlxflow.models.emoji import text_context

    _, mask, has_text = text_context(zeros, True)
    h = mx.random.normal((3, 8, 8, 32))
    block = model.mid.cross_attn[0]
    assert np.array_equal(np.asarray(block(h, zeros, mask, has_text)), np.asarray(h))
    # ...so the whole network equals one without any cross-attention (and text_proj sees 0).
    for stage in [*model.down, model.mid, *model.up]:
        stage.cross_attn = []
    assert np.allclose(np.asarray(model(x, t, zeros)), y, atol=1e-6)


def test_pooled_text_is_the_normalised_masked_mean():
    from mlxflow.models.emoji import text_context

    text = _padded_text()
    pooled, mask, has_text = text_context(mx.array(text), True)
    ref = np.stack([text[i, :n].mean(0) for i, n in enumerate((3, 1, 2))])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert np.allclose(np.asarray(pooled), ref, atol=1e-6)
    assert np.asarray(mask)[:, 0, 0].tolist() == [[0, 0, 0, -1e4], [0, -1e4, -1e4, -1e4], [0, 0, -1e4, -1e4]]
    assert np.asarray(has_text).tolist() == [1, 1, 1]
    pooled0, _, has0 = text_context(mx.zeros((2, 4, 8)), True)
    assert np.array_equal(np.asarray(pooled0), np.zeros((2, 8))) and np.asarray(has0).tolist() == [0, 0]


def _pre_mask_forward(model, x, t, text):
    """The forward as it was before text_mask: FiLM on the plain mean over L, every cross-attention
    reading every row unmasked and ungated."""
    import mlx.nn as nn

    from mlxflow.layers import upsample_nearest_2x

    def stage(st, h, cond):
        for i, block in enumerate(st.blocks):
            h = block(h, cond)
            if st.self_attn:
                h = st.self_attn[i](h)
            for ca in st.cross_attn[i:i + 1]:
                B, H, W, C = h.shape
                h = h + ca.attn(ca.norm(h).reshape(B, H * W, C), context=text).reshape(B, H, W, C)
        return h

    cond = model.time_embed(t) + model.text_proj(text.mean(axis=1))
    h, skips = model.stem(x), []
    for lvl, st in enumerate(model.down):
        h = stage(st, h, cond)
        skips.append(h)
        if lvl < len(model.downsample):
            h = model.downsample[lvl](h)
    h = stage(model.mid, h, cond)
    for i, st in enumerate(model.up):
        h = stage(st, mx.concatenate([h, skips.pop()], axis=-1), cond)
        if i < len(model.upsample):
            h = model.upsample[i](upsample_nearest_2x(h))
    return model.out_conv(nn.silu(model.out_norm(h)))


def test_old_config_without_text_mask_loads_and_behaves_as_before():
    """A checkpoint config.json written before text_mask existed: plain mean, unmasked attention."""
    import dataclasses

    from mlxflow.config import from_dict
    from mlxflow.configs.emoji import EmojiConfig

    old = dataclasses.asdict(micro_emoji_config(text_tokens=4))
    del old["text_mask"]
    cfg = from_dict(EmojiConfig, old)
    assert cfg.text_mask is False
    mx.random.seed(0)
    model = EmojiFlow(cfg)
    x, t = _inputs()
    text = _padded_text()
    y = model(x, t, mx.array(text))
    assert np.array_equal(np.asarray(y), np.asarray(_pre_mask_forward(model, x, t, mx.array(text))))
    h = mx.random.normal((3, 8, 8, 32))
    block = model.mid.cross_attn[0]
    unmasked = h + block.attn(block.norm(h).reshape(3, 64, 32), context=mx.array(text)).reshape(3, 8, 8, 32)
    assert np.allclose(np.asarray(block(h, mx.array(text))), np.asarray(unmasked), atol=1e-6)
    # Padding rows ARE read without the mask: the old behaviour, kept for old checkpoints.
    longer = np.concatenate([text, np.zeros((3, 2, 8), np.float32)], axis=1)
    assert not np.allclose(np.asarray(model(x, t, mx.array(longer))), np.asarray(y), atol=1e-4)
