"""JiT: patch unfold/fold, MLX <-> torch twin parity, zero init, budgets of the presets, config errors."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as mnn
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlx.utils import tree_flatten

from mlxflow.errors import MlxflowError
from mlxflow.configs.jit import JIT_PRESETS, JiTConfig, jit_flops_per_image, jit_macs_per_image
from mlxflow.models import jit as mjit
from mlxflow.torch_ref import jit as tjit

try:
    import pytest_timeout  # noqa: F401

    pytestmark = pytest.mark.timeout(60)
except ImportError:
    pass


def micro(**overrides) -> JiTConfig:
    """A ~40k-parameter JiT on 16x16 images: every block type, milliseconds per forward."""
    base = dict(image_size=16, patch_size=4, patch_stride=4, bottleneck=16, dim=32, depth=3, heads=2,
                in_context_tokens=3, in_context_start=1, conditioning="text", num_classes=5,
                text_dim=8, text_tokens=2)
    return JiTConfig(**{**base, **overrides}).validate()


def n_params(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def nhwc(x: torch.Tensor) -> mx.array:
    return mx.array(x.permute(0, 2, 3, 1).numpy())


def to_nchw(y: mx.array) -> np.ndarray:
    return np.asarray(y).transpose(0, 3, 1, 2)


# --- patches ---------------------------------------------------------------------------


@pytest.mark.parametrize("size,patch,stride", [(16, 4, 4), (12, 4, 2), (16, 4, 3), (10, 6, 2)])
def test_fold_inverts_unfold_both_twins(size, patch, stride):
    x = torch.randn(2, 3, size, size)
    back = tjit.fold(tjit.unfold(x, patch, stride), (size, size), patch, stride)
    assert torch.allclose(back, x, atol=1e-6)
    xm = nhwc(x)
    backm = mjit.fold(mjit.unfold(xm, patch, stride), (size, size), patch, stride)
    assert np.allclose(np.asarray(backm), np.asarray(xm), atol=1e-6)


@pytest.mark.parametrize("size,patch,stride", [(16, 4, 4), (12, 4, 2), (16, 8, 4)])
def test_mlx_unfold_matches_torch_unfold_reordered(size, patch, stride):
    x = torch.randn(2, 3, size, size)
    ref = F.unfold(x, kernel_size=patch, stride=stride).numpy()  # (B, C*p*p, T), patch order (C, p, p)
    B, _, T = ref.shape
    ref = ref.reshape(B, 3, patch, patch, T).transpose(0, 4, 2, 3, 1).reshape(B, T, -1)  # -> (p, p, C)
    assert np.allclose(np.asarray(mjit.unfold(nhwc(x), patch, stride)), ref, atol=0)
    assert np.allclose(tjit.unfold(x, patch, stride).numpy(), ref, atol=0)


def test_unnormalised_fold_of_ones_counts_overlaps():
    size, patch, stride = 12, 4, 2
    T = ((size - patch) // stride + 1) ** 2
    count = np.zeros((size, size))
    for i in range(0, size - patch + 1, stride):
        for j in range(0, size - patch + 1, stride):
            count[i:i + patch, j:j + patch] += 1
    assert count[4, 4] == 4 and count[0, 0] == 1  # interior of patch 4 / stride 2 is covered 4 times
    m = mjit.fold(mx.ones((1, T, patch * patch * 3)), (size, size), patch, stride, normalize=False)
    t = tjit.fold(torch.ones(1, T, patch * patch * 3), (size, size), patch, stride, normalize=False)
    for c in range(3):
        assert np.array_equal(np.asarray(m)[0, :, :, c], count)
        assert np.array_equal(t.numpy()[0, c], count)


# --- twin parity -----------------------------------------------------------------------


def twins(cfg: JiTConfig, seed: int = 0):
    """A torch JiT with every tensor nudged off its init (zero init would make outputs 0), and
    an MLX JiT loaded with the same tensors by name."""
    torch.manual_seed(seed)
    tm = tjit.JiT(cfg).eval()
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    mm = mjit.JiT(cfg)
    sd = tm.state_dict()
    mine = dict(tree_flatten(mm.parameters()))
    assert set(sd) == set(mine)
    assert all(tuple(sd[k].shape) == tuple(mine[k].shape) for k in sd)
    mm.load_weights([(k, mx.array(v.numpy())) for k, v in sd.items()])
    return tm, mm


def cond_for(cfg: JiTConfig, B: int):
    """Matching (torch, mlx) conditions for a batch; the last row is the unconditional one."""
    if cfg.conditioning == "class":
        labels = torch.arange(B) % cfg.num_classes
        labels[-1] = cfg.num_classes  # null class
        return labels, mx.array(labels.numpy())
    if cfg.conditioning == "text":
        text = torch.randn(B, cfg.text_tokens, cfg.text_dim)
        text[-1] = 0  # zero text
        return text, mx.array(text.numpy())
    return None, None


@pytest.mark.parametrize("conditioning", ["text", "class", "none"])
@pytest.mark.parametrize("stride", [4, 2])
def test_twin_parity(conditioning, stride):
    cfg = micro(conditioning=conditioning, patch_stride=stride, image_size=16 if stride == 4 else 14)
    tm, mm = twins(cfg)
    B = 3
    x = torch.randn(B, 3, cfg.image_size, cfg.image_size)
    t = torch.tensor([0.05, 0.5, 0.95])
    ct, cm = cond_for(cfg, B)
    with torch.no_grad():
        yt = tm(x, t, ct).numpy()
    ym = mm(nhwc(x), mx.array(t.numpy()), cm)
    assert ym.shape == (B, cfg.image_size, cfg.image_size, 3)
    assert np.abs(yt).max() > 1e-2  # the comparison is not between two zeros
    assert np.abs(to_nchw(ym) - yt).max() < 1e-4


def test_tiny_preset_parity_and_compile():
    cfg = JiTConfig(**JIT_PRESETS["tiny"]).validate()
    tm, mm = twins(cfg, seed=1)
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([0.3, 0.8])
    text = torch.randn(2, 1, cfg.text_dim)
    with torch.no_grad():
        yt = tm(x, t, text).numpy()
    args = (nhwc(x), mx.array(t.numpy()), mx.array(text.numpy()))
    ym = mm(*args)
    assert np.abs(to_nchw(ym) - yt).max() < 1e-4
    # The fixed tables live outside the parameter tree; compiling must still see them.
    assert np.allclose(np.asarray(mx.compile(mm)(*args)), np.asarray(ym), atol=1e-5)


# --- behaviour -------------------------------------------------------------------------


@pytest.mark.parametrize("conditioning", ["text", "class", "none"])
def test_fresh_model_outputs_exact_zero(conditioning):
    cfg = micro(conditioning=conditioning, patch_stride=2, image_size=14)
    x = torch.randn(2, 3, 14, 14)
    ct, cm = cond_for(cfg, 2)
    y = mjit.JiT(cfg)(nhwc(x), mx.array([0.2, 0.7]), cm)
    assert y.shape == (2, 14, 14, 3) and not np.asarray(y).any()
    with torch.no_grad():
        yt = tjit.JiT(cfg)(x, torch.tensor([0.2, 0.7]), ct)
    assert yt.shape == (2, 3, 14, 14) and not yt.any()


def test_tables_are_not_parameters():
    cfg = micro()
    names = {k for k, _ in tree_flatten(mjit.JiT(cfg).parameters())}
    assert not any(n.startswith(("pos_embed", "rope_")) for n in names)
    tm = tjit.JiT(cfg)
    assert not any(n.startswith(("pos_embed", "rope_")) for n in tm.state_dict())
    assert {n for n, _ in tm.named_buffers()} == {"pos_embed", "rope_cos", "rope_sin", "rope_cos_ctx", "rope_sin_ctx"}


def test_in_context_tokens_keep_length_and_carry_the_condition():
    # With and without in-context tokens the output is an image of the input's shape.
    for n_ctx in (0, 5):
        cfg = micro(in_context_tokens=n_ctx)
        _, mm = twins(cfg)
        y = mm(mx.zeros((2, 16, 16, 3)), mx.array([0.4, 0.4]), mx.ones((2, 2, 8)))
        assert y.shape == (2, 16, 16, 3)
    # The condition changes the output; None is the same as the unconditional input.
    _, mm = twins(micro(conditioning="class"))
    x, t = mx.random.normal((2, 16, 16, 3)), mx.array([0.5, 0.5])
    a, b = mm(x, t, mx.array([0, 1])), mm(x, t, mx.array([5, 5]))
    assert not np.allclose(np.asarray(a), np.asarray(b))
    assert np.allclose(np.asarray(mm(x, t, None)), np.asarray(b), atol=1e-6)
    _, mm = twins(micro(conditioning="text"))
    assert np.allclose(np.asarray(mm(x, t, None)), np.asarray(mm(x, t, mx.zeros((2, 2, 8)))), atol=1e-6)


def test_mlx_gradients_flow_through_overlapping_fold():
    cfg = micro(patch_stride=2, image_size=14)
    _, mm = twins(cfg)
    x = mx.random.normal((2, 14, 14, 3))

    def loss(model):
        return mx.mean(model(x, mx.array([0.3, 0.6]), mx.ones((2, 2, 8))) ** 2)

    value, grads = mnn.value_and_grad(mm, loss)(mm)
    flat = dict(tree_flatten(grads))
    assert np.isfinite(value.item()) and set(flat) == {k for k, _ in tree_flatten(mm.parameters())}
    assert np.abs(np.asarray(flat["patch_embed.proj1.weight"])).sum() > 0


def test_wrong_inputs_are_one_line_errors():
    mm = mjit.JiT(micro())
    with pytest.raises(MlxflowError, match="16x16"):
        mm(mx.zeros((1, 12, 12, 3)), mx.array([0.5]), mx.zeros((1, 2, 8)))
    with pytest.raises(MlxflowError, match="text embedding"):
        mm(mx.zeros((1, 16, 16, 3)), mx.array([0.5]), mx.zeros((1, 1, 8)))
    tm = tjit.JiT(micro())
    with pytest.raises(MlxflowError, match="16x16"):
        tm(torch.zeros(1, 3, 12, 12), torch.tensor([0.5]), torch.zeros(1, 2, 8))
    with pytest.raises(MlxflowError, match="text embedding"):
        tm(torch.zeros(1, 3, 16, 16), torch.tensor([0.5]), torch.zeros(1, 1, 8))


# --- budgets ---------------------------------------------------------------------------


def test_b16_matches_the_paper():
    cfg = JiTConfig(**JIT_PRESETS["B/16"]).validate()
    params = n_params(mjit.JiT(cfg))  # lazy arrays: building is cheap, nothing is initialised
    macs, flops = jit_macs_per_image(cfg), jit_flops_per_image(cfg)
    print(f"JiT-B/16 @256: {params / 1e6:.1f}M params, {macs / 1e9:.1f} GMACs = {flops / 1e9:.1f} GFLOPs per image")
    assert abs(params / 131e6 - 1) < 0.10
    # The paper's "25 Gflops" count a multiply-add as one (fvcore, as DiT): compare MACs.
    assert abs(macs / 25e9 - 1) < 0.10
    assert flops == 2 * macs


@pytest.mark.parametrize("preset,lo,hi", [("seed", 100e6, 140e6), ("emoji64", 10e6, 20e6), ("tiny", 1.0e6, 1.6e6)])
def test_preset_budgets(preset, lo, hi):
    cfg = JiTConfig(**JIT_PRESETS[preset]).validate()
    params = n_params(mjit.JiT(cfg))
    print(f"JiT {preset}: {cfg.image_size}px, {cfg.num_patches} tokens, {params / 1e6:.2f}M params, "
          f"{jit_flops_per_image(cfg) / 1e9:.2f} GFLOPs per image")
    assert lo <= params <= hi


# --- config ----------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,match", [
    (dict(image_size=250, patch_size=16, patch_stride=12), "divisible by patch_stride"),
    (dict(dim=768, heads=10), "divisible by heads"),
    (dict(dim=768, heads=128), "divisible by 4"),
    (dict(conditioning="audio"), "unknown conditioning 'audio'"),
    (dict(conditioning="class", num_classes=1), "num_classes >= 2"),
    (dict(patch_stride=20), "patch_stride"),
    (dict(in_context_start=12), "in_context_start"),
])
def test_validate_errors(overrides, match):
    with pytest.raises(MlxflowError, match=match):
        JiTConfig(**overrides).validate()


def test_validate_returns_self_and_presets_validate():
    cfg = JiTConfig()
    assert cfg.validate() is cfg
    for overrides in JIT_PRESETS.values():
        JiTConfig(**overrides).validate()


def test_axial_rope_is_relative_and_twins_agree():
    from mlxflow.layers import apply_rope, axial_rope_2d
    from mlxflow.torch_ref.layers import apply_rope as t_apply_rope, axial_rope_2d as t_axial_rope_2d

    prefix, g, hd = 2, 5, 8
    cos, sin = axial_rope_2d(hd, g, g, prefix=prefix)
    tcos, tsin = t_axial_rope_2d(hd, g, g, prefix=prefix)
    assert np.array_equal(np.asarray(cos), tcos.numpy()) and np.array_equal(np.asarray(sin), tsin.numpy())
    rng = np.random.default_rng(0)
    q = mx.array(np.broadcast_to(rng.normal(size=hd), (1, 1, prefix + g * g, hd)).astype(np.float32))
    k = mx.array(np.broadcast_to(rng.normal(size=hd), (1, 1, prefix + g * g, hd)).astype(np.float32))
    Q, K = apply_rope(q, cos, sin)[0, 0], apply_rope(k, cos, sin)[0, 0]
    assert np.allclose(np.asarray(Q[:prefix]), np.asarray(q[0, 0, :prefix]))  # in-context tokens unrotated
    tQ = t_apply_rope(torch.from_numpy(np.asarray(q)), tcos, tsin)[0, 0]
    assert np.allclose(tQ.numpy(), np.asarray(Q), atol=1e-6)

    def score(a, b):  # (row, col) positions
        return (Q[prefix + a[0] * g + a[1]] * K[prefix + b[0] * g + b[1]]).sum().item()

    # The q.k score depends only on the offset, in rows and in columns separately.
    assert np.isclose(score((0, 0), (1, 2)), score((2, 1), (3, 3)), atol=1e-5)
    assert not np.isclose(score((0, 0), (1, 2)), score((0, 0), (2, 1)), atol=1e-3)


def test_bf16_forward_both_twins():
    from mlx.utils import tree_map

    cfg = micro(patch_stride=2, image_size=14)
    tm, mm = twins(cfg)
    x, t, text = torch.randn(2, 3, 14, 14), torch.tensor([0.3, 0.7]), torch.randn(2, 2, 8)
    with torch.no_grad():
        ref = tm(x, t, text)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the torch trainer's bf16 path
            yt = tm(x, t, text)
    mm.update(tree_map(lambda p: p.astype(mx.bfloat16), mm.parameters()))  # the MLX trainer's
    ym = mm(nhwc(x).astype(mx.bfloat16), mx.array(t.numpy()).astype(mx.bfloat16),
            mx.array(text.numpy()).astype(mx.bfloat16))
    assert ym.dtype == mx.bfloat16
    assert (yt.float() - ref).abs().max() < 0.05
    assert np.abs(to_nchw(ym.astype(mx.float32)) - ref.numpy()).max() < 0.05


def test_fused_bf16_attention_path():
    """The fused path (bf16 SDPA, on by default with CUDA + bf16) changes only precision: it
    is the fp32 path without autocast, near it under bf16 autocast, and it really runs in bf16."""
    from mlxflow.torch_ref.layers import set_fused_attention

    cfg = micro(patch_stride=2, image_size=14)
    tm, _ = twins(cfg)
    x, t, text = torch.randn(2, 3, 14, 14), torch.tensor([0.3, 0.7]), torch.randn(2, 2, 8)
    with torch.no_grad():
        ref = tm(x, t, text)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            slow = tm(x, t, text)
        assert set_fused_attention(tm, True) == cfg.depth
        assert torch.equal(tm(x, t, text), ref)  # without autocast the flag changes nothing
        seen = []
        hook = torch.nn.functional.scaled_dot_product_attention

        def spy(q, k, v, **kw):
            seen.append(q.dtype)
            return hook(q, k, v, **kw)

        torch.nn.functional.scaled_dot_product_attention = spy
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fast = tm(x, t, text)
        finally:
            torch.nn.functional.scaled_dot_product_attention = hook
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert (fast.float() - ref).abs().max() < 0.05
    assert (fast.float() - slow.float()).abs().max() < 0.05
