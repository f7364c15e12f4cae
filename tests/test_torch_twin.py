"""The PyTorch twin matches the MLX model: same keys, same parameter counts, same outputs."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from conftest import micro_emoji_config
from convert.torch_mlx import layout_table, mlx_to_torch
from mlxflow import layers as ml
from mlxflow.families import model_config
from mlxflow.models.emoji import EmojiFlow as MlxEmojiFlow
from mlxflow.torch_ref import default_device
from mlxflow.torch_ref import layers as tl
from mlxflow.torch_ref.emoji import EmojiFlow as TorchEmojiFlow


@pytest.fixture(autouse=True, scope="module")
def _torch_threads(one_torch_thread):
    yield


def random_mlx_model(cfg, seed=0):
    """An MLX model with every parameter jittered (norm gains != 1, biases != 0)."""
    mx.random.seed(seed)
    model = MlxEmojiFlow(cfg)
    rng = np.random.default_rng(seed)
    weights = {k: (np.array(v) * (1 + 0.5 * rng.standard_normal(v.shape)) + 0.05 * rng.standard_normal(v.shape))
               .astype(np.float32) for k, v in tree_flatten(model.parameters())}
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    return model, weights


def twin_of(cfg, weights):
    model = TorchEmojiFlow(cfg)
    model.load_state_dict(mlx_to_torch(weights, cfg))
    return model.eval()


def forward_both(mlx_model, torch_model, cfg, batch, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.image_size, cfg.image_size, cfg.in_channels)).astype(np.float32)
    t = rng.uniform(size=batch).astype(np.float32)
    text = rng.standard_normal((batch, cfg.text_tokens, cfg.text_dim)).astype(np.float32)
    out_m = np.array(mlx_model(mx.array(x), mx.array(t), mx.array(text)))
    with torch.no_grad():
        out_t = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t), torch.from_numpy(text))
    return out_m, out_t.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("preset", ["tiny", "default", "seed"])
def test_keys_and_param_counts_match(preset):
    cfg = model_config("emoji", preset)
    m_params = dict(tree_flatten(MlxEmojiFlow(cfg).parameters()))
    with torch.device("meta"):
        t_params = TorchEmojiFlow(cfg).state_dict()
    assert set(m_params) == set(t_params)
    assert sum(v.size for v in m_params.values()) == sum(v.numel() for v in t_params.values())
    table = layout_table(cfg)  # asserts every shape is the layout change of the other
    assert {k for k, (kind, _, _) in table.items() if kind == "conv"} == {k for k, v in m_params.items() if v.ndim == 4}


def test_none_and_empty_structure_mirrors_mlx():
    cfg = model_config("emoji", "tiny")
    m, t = MlxEmojiFlow(cfg), TorchEmojiFlow(cfg)
    assert m.down[0].blocks[0].skip is None and t.down[0].blocks[0].skip is None
    assert len(m.down[0].self_attn) == len(t.down[0].self_attn) == 0
    assert len(m.mid.cross_attn) == len(t.mid.cross_attn) == 2


@pytest.mark.parametrize("cfg,batch", [(micro_emoji_config(text_tokens=3), 3), (model_config("emoji", "tiny"), 2)],
                         ids=["micro-3tokens", "tiny"])
def test_forward_parity(cfg, batch):
    mlx_model, weights = random_mlx_model(cfg)
    out_m, out_t = forward_both(mlx_model, twin_of(cfg, weights), cfg, batch)
    assert out_m.shape == (batch, cfg.image_size, cfg.image_size, 3)
    assert np.abs(out_t).max() > 0.1  # jittered weights: nothing trivially zero
    assert np.abs(out_m - out_t).max() <= 1e-5


def test_forward_parity_default_preset():
    cfg = model_config("emoji", "default")
    mlx_model, weights = random_mlx_model(cfg, seed=3)
    out_m, out_t = forward_both(mlx_model, twin_of(cfg, weights), cfg, batch=1)
    assert np.abs(out_m - out_t).max() <= 1e-4


def test_shared_layers_match():
    rng = np.random.default_rng(0)
    t = rng.uniform(size=5).astype(np.float32)
    emb_m = np.array(ml.sinusoidal_embedding(mx.array(t), 64))
    emb_t = tl.sinusoidal_embedding(torch.from_numpy(t), 64).numpy()
    # Args reach 1000 rad, where one fp32 ulp is 6e-5: the two exp()s may differ by an ulp.
    np.testing.assert_allclose(emb_m, emb_t, atol=1e-4)
    np.testing.assert_allclose(emb_m[:, :32], np.cos(t[:, None] * 1000 * np.exp(-np.log(1e4) * np.arange(32) / 32)),
                               atol=1e-3)

    x = rng.standard_normal((2, 7, 16)).astype(np.float32)
    ctx = rng.standard_normal((2, 3, 8)).astype(np.float32)

    def copy_weights(m_mod, t_mod):
        w = {k: (np.array(v) + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
             for k, v in tree_flatten(m_mod.parameters())}
        m_mod.load_weights([(k, mx.array(v)) for k, v in w.items()])
        t_mod.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()}, strict=True)

    for m_mod, t_mod, args in [
        (ml.RMSNorm(16), tl.RMSNorm(16), (x,)),
        (ml.SwiGLU(16, 24), tl.SwiGLU(16, 24), (x,)),
        (ml.Attention(16, 4, qk_norm=True), tl.Attention(16, 4, qk_norm=True), (x,)),
        (ml.Attention(16, 2, kv_dim=8), tl.Attention(16, 2, kv_dim=8), (x, ctx)),
        (ml.TimestepEmbedding(16, 32), tl.TimestepEmbedding(16, 32), (t,)),
    ]:
        copy_weights(m_mod, t_mod)
        out_m = np.array(m_mod(*[mx.array(a) for a in args]))
        with torch.no_grad():
            out_t = t_mod(*[torch.from_numpy(a) for a in args]).numpy()
        np.testing.assert_allclose(out_m, out_t, atol=1e-5, err_msg=type(t_mod).__name__)

    shift, scale = rng.standard_normal((2, 16)).astype(np.float32), rng.standard_normal((2, 16)).astype(np.float32)
    np.testing.assert_allclose(np.array(ml.modulate(mx.array(x), mx.array(shift), mx.array(scale))),
                               tl.modulate(*map(torch.from_numpy, (x, shift, scale))).numpy(), atol=1e-6)
    img = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)  # NHWC
    up_m = np.array(ml.upsample_nearest_2x(mx.array(img)))
    up_t = tl.upsample_nearest_2x(torch.from_numpy(img.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(up_m, up_t)


def test_torch_twin_traces_and_runs_on_default_device():
    cfg = micro_emoji_config()
    model = TorchEmojiFlow(cfg).eval()
    x, t, text = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 1, cfg.text_dim)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x, t, text), check_trace=False)
        torch.testing.assert_close(traced(x, t, text), model(x, t, text), rtol=0, atol=1e-6)



def _padded(text, real):
    """Zero the rows of sample i from real[i] on: padding, as a per-token encoder writes it."""
    text = text.copy()
    for i, n in enumerate(real):
        text[i, n:] = 0.0
    return text


def test_forward_parity_with_padded_text():
    """text_mask: MLX and torch agree on padded text, a one-token text and a dropped (all-zero) one."""
    cfg = micro_emoji_config(text_tokens=5, text_mask=True)
    mlx_model, weights = random_mlx_model(cfg, seed=2)
    torch_model = twin_of(cfg, weights)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 16, 16, 3)).astype(np.float32)
    t = rng.uniform(size=4).astype(np.float32)
    text = _padded(rng.standard_normal((4, 5, 8)).astype(np.float32), (5, 3, 1, 0))
    out_m = np.array(mlx_model(mx.array(x), mx.array(t), mx.array(text)))
    with torch.no_grad():
        out_t = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                            torch.from_numpy(text)).numpy().transpose(0, 2, 3, 1)
    assert np.abs(out_t).max() > 0.1
    assert np.abs(out_m - out_t).max() <= 1e-5
    # The mask is computed in the graph, not baked in at trace time: a trace made with no
    # padding runs a padded batch exactly as eager torch does (what the Core ML export relies on).
    xt, tt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t)
    with torch.no_grad():
        traced = torch.jit.trace(torch_model, (xt, tt, torch.ones(4, 5, 8)), check_trace=False)
        torch.testing.assert_close(traced(xt, tt, torch.from_numpy(text)), torch.from_numpy(out_t.transpose(0, 3, 1, 2)),
                                   rtol=0, atol=1e-6)


def test_default_device_prefers_cuda_then_mps(monkeypatch):
    mps = torch.backends.mps
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mps, "is_available", lambda: True)
    assert default_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "mps"
    monkeypatch.setattr(mps, "is_available", lambda: False)
    assert default_device() == "cpu"
