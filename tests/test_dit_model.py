"""DiT (seed 002): shapes, zero init, preset budgets, MLX <-> torch parity through the registry's
weight map, text-padding masks, the unconditional / CFG contract, config errors, the family entry."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from convert.torch_mlx import mlx_to_torch, torch_to_mlx
from mlxflow.configs.dit import DIT_PRESETS, DIT_TRAIN_PRESETS, DiTConfig, dit_flops_per_image, dit_macs_per_image
from mlxflow.errors import MlxflowError
from mlxflow.families import get_family
from mlxflow.models import dit as mdit
from mlxflow.torch_ref import dit as tdit

try:
    import pytest_timeout  # noqa: F401

    pytestmark = pytest.mark.timeout(60)
except ImportError:
    pass


def micro(**overrides) -> DiTConfig:
    """A ~30k-parameter DiT on 32x32 images (4x4x4 latents, 16 tokens) and 6 text tokens of width 8."""
    base = dict(image_size=32, latent_downsample=8, in_channels=4, patch_size=1, dim=32, depth=2, heads=4,
                mlp_ratio=2.0, time_dim=16, text_dim=8, text_tokens=8)
    return DiTConfig(**{**base, **overrides}).validate()


# The variants parity runs over: the recommended block, the seed's block, qk-norm, 2x2 patches.
VARIANTS = {
    "base": dict(),
    "seed": dict(gates=False, final_norm=False, prenorm=False),
    "qk_norm": dict(qk_norm=True, gates=False, final_norm=True),
    "patch2": dict(image_size=64, patch_size=2, prenorm=False),
}


def n_params(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def randomized_mlx(cfg: DiTConfig, seed: int = 0) -> mdit.DiT:
    """An MLX DiT with every parameter drawn at random (the zero-initialised gates and output
    layer would otherwise hide most of the network from a parity check)."""
    model = mdit.DiT(cfg)
    rng = np.random.default_rng(seed)
    model.update(_unflatten({k: mx.array((0.2 * rng.standard_normal(v.shape)).astype(np.float32))
                             for k, v in tree_flatten(model.parameters())}))
    mx.eval(model.parameters())
    return model


def _unflatten(flat: dict):
    from mlx.utils import tree_unflatten

    return tree_unflatten(list(flat.items()))


def torch_twin(mlx_model: mdit.DiT) -> tdit.DiT:
    """The torch DiT loaded with the MLX model's weights through convert.torch_mlx."""
    cfg = mlx_model.config
    model = tdit.DiT(cfg).eval()
    weights = {k: np.array(v) for k, v in tree_flatten(mlx_model.parameters())}
    model.load_state_dict(mlx_to_torch(weights, cfg), strict=True)
    return model


def inputs(cfg: DiTConfig, B: int = 3, L: int | None = None, pad: int = 0, seed: int = 1):
    """numpy x (B,h,w,C), t (B,), cond (B,L,D) whose last `pad` rows per sample are zero padding."""
    rng = np.random.default_rng(seed)
    s = cfg.latent_size
    x = rng.standard_normal((B, s, s, cfg.in_channels)).astype(np.float32)
    t = rng.uniform(0.05, 0.95, B).astype(np.float32)
    L = cfg.text_tokens if L is None else L
    cond = rng.standard_normal((B, L, cfg.text_dim)).astype(np.float32)
    if pad:
        cond[:, L - pad:] = 0
    return x, t, cond


def run_mlx(model, x, t, cond) -> np.ndarray:
    return np.array(model(mx.array(x), mx.array(t), None if cond is None else mx.array(cond)))


def run_torch(model, x, t, cond) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                    None if cond is None else torch.from_numpy(cond))
    return out.numpy().transpose(0, 2, 3, 1)


# --- shapes, init, budgets -------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_output_shape_both_twins(variant):
    cfg = micro(**VARIANTS[variant])
    x, t, cond = inputs(cfg, B=2, L=5)
    m = randomized_mlx(cfg)
    out = run_mlx(m, x, t, cond)
    assert out.shape == x.shape and np.isfinite(out).all()
    assert run_torch(torch_twin(m), x, t, cond).shape == x.shape


def test_fresh_gated_model_outputs_exact_zeros():
    cfg = micro(gates=True)
    x, t, cond = inputs(cfg)
    assert not np.any(run_mlx(mdit.DiT(cfg), x, t, cond))
    assert not np.any(run_torch(tdit.DiT(cfg), x, t, cond))
    # Without gates (the seed) the output layer is small but not zero: the network is live.
    assert np.any(run_mlx(mdit.DiT(micro(gates=False)), x, t, cond))


def test_seed_preset_parameter_budget():
    fam = get_family("dit")
    seed = fam.model_config("seed")
    n = n_params(fam.build(seed))
    # The seed's code counts ~147M (two full MLPs per block); its README says ~120M.
    assert 140e6 < n < 150e6, n
    assert n == 147_005_444
    with torch.device("meta"):  # the twin has the same count, without allocating it
        assert sum(p.numel() for p in tdit.DiT(seed).parameters()) == n
    assert 150e6 < n_params(fam.build(fam.model_config("base"))) < 165e6
    assert n_params(fam.build(fam.model_config("tiny"))) < 500_000


def test_macs_count_every_matmul():
    """An independent count: each Linear's weight size times the tokens through it, plus
    QK^T and AV over the joint sequence."""
    for cfg in (micro(), micro(**VARIANTS["patch2"]), DiTConfig(**DIT_PRESETS["tiny"])):
        n, L = cfg.num_patches, cfg.text_tokens
        model = mdit.DiT(cfg)
        macs = 0
        for name, m in model.named_modules():
            if not isinstance(m, mdit.nn.Linear):
                continue
            if name.startswith("time_embed") or name.endswith("modulation"):
                tokens = 1
            elif name == "text_proj" or ".mlp_text." in name:
                tokens = L
            elif ".attn." in name:
                tokens = n + L
            else:  # patch_embed.proj, mlp_image, final_layer.linear
                tokens = n
            macs += tokens * m.weight.size
        macs += cfg.depth * 2 * (n + L) ** 2 * cfg.dim
        assert dit_macs_per_image(cfg) == macs
        assert dit_flops_per_image(cfg) == 2 * macs


# --- twin parity -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_twin_parity(variant):
    cfg = micro(**VARIANTS[variant])
    m = randomized_mlx(cfg, seed=3)
    tm = torch_twin(m)
    for L, pad in [(cfg.text_tokens, 0), (6, 3)]:
        x, t, cond = inputs(cfg, L=L, pad=pad)
        cond[1] = 0  # one dropped (unconditional) sample in the batch
        a, b = run_mlx(m, x, t, cond), run_torch(tm, x, t, cond)
        assert np.abs(b).max() > 0.1  # a live network, not a zero-init one
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    x, t, _ = inputs(cfg)
    np.testing.assert_allclose(run_mlx(m, x, t, None), run_torch(tm, x, t, None), atol=1e-5, rtol=0)


def test_weight_map_round_trip():
    cfg = micro(qk_norm=True)
    m = randomized_mlx(cfg)
    weights = {k: np.array(v) for k, v in tree_flatten(m.parameters())}
    back = torch_to_mlx(mlx_to_torch(weights, cfg), cfg)
    assert set(back) == set(weights)
    assert all(np.array_equal(back[k], weights[k]) for k in weights)
    assert "patch_embed.pos_embed" in weights and "blocks.1.mlp_text.fc2.weight" in weights


def test_probe_points_exist_in_both_twins_and_compare():
    from mlxflow.crosscheck import compare_forward, make_inputs, probe_points

    cfg = micro()
    names = probe_points(cfg)
    assert names == ["time_embed", "patch_embed", "text_proj", "blocks.0", "blocks.1", "final_layer"]
    m = randomized_mlx(cfg)
    tm = torch_twin(m)
    rows = compare_forward(m, tm, make_inputs(cfg, batch=2, seed=0), tol=1e-5)
    assert [r.name for r in rows] == [f"block {n}" for n in names] + ["forward output"]
    assert all(r.passed for r in rows), [(r.name, r.max_abs, r.rel_err) for r in rows]


# --- masking and the unconditional input -----------------------------------------------


@pytest.mark.parametrize("framework", ["mlx", "torch"])
def test_padding_rows_do_not_change_the_image(framework):
    cfg = micro(**VARIANTS["seed"])
    m = randomized_mlx(cfg, seed=5)
    run, model = (run_mlx, m) if framework == "mlx" else (run_torch, torch_twin(m))
    x, t, cond5 = inputs(cfg, L=5)
    cond8 = np.concatenate([cond5, np.zeros((cond5.shape[0], 3, cfg.text_dim), np.float32)], axis=1)
    out5, out8 = run(model, x, t, cond5), run(model, x, t, cond8)
    np.testing.assert_allclose(out5, out8, atol=1e-5, rtol=0)  # fp32 sums of other lengths

    changed = cond8.copy()
    changed[:, 2] += 1.0  # a real token
    assert np.abs(run(model, x, t, changed) - out8).max() > 1e-3

    zeros = np.zeros((x.shape[0], cfg.text_tokens, cfg.text_dim), np.float32)
    uncond = run(model, x, t, None)
    np.testing.assert_allclose(uncond, run(model, x, t, zeros), atol=1e-5, rtol=0)
    assert np.abs(uncond - out8).max() > 1e-3  # the text does condition the output


def test_per_sample_masks_in_one_batch():
    """Samples with different text lengths batched together give what each gives alone."""
    cfg = micro()
    m = randomized_mlx(cfg, seed=7)
    x, t, cond = inputs(cfg, B=3, L=8)
    cond[0, 3:] = 0
    cond[1, 6:] = 0
    cond[2] = 0
    batched = run_mlx(m, x, t, cond)
    for i, L in enumerate([3, 6]):
        alone = run_mlx(m, x[i:i + 1], t[i:i + 1], cond[i:i + 1, :L])
        np.testing.assert_allclose(batched[i:i + 1], alone, atol=1e-5, rtol=0)
    np.testing.assert_allclose(batched[2:], run_mlx(m, x[2:], t[2:], None), atol=1e-5, rtol=0)


def test_cfg_batch_and_sampler_shape_contract():
    from mlxflow.flow import cfg_combine
    from mlxflow.sample import sample_steps

    cfg = micro()
    m = randomized_mlx(cfg, seed=2)
    x, t, cond = inputs(cfg, B=2, L=cfg.text_tokens, pad=2)
    # CFG as one batched call: [cond | zeros] on a doubled batch.
    both = run_mlx(m, np.concatenate([x, x]), np.concatenate([t, t]), np.concatenate([cond, np.zeros_like(cond)]))
    assert both.shape == (4, *x.shape[1:])
    np.testing.assert_allclose(both[2:], run_mlx(m, x, t, None), atol=1e-5, rtol=0)
    np.testing.assert_allclose(both[:2], run_mlx(m, x, t, cond), atol=1e-5, rtol=0)
    assert cfg_combine(both[:2], both[2:], 4.0).shape == x.shape
    # The sampler users run: Euler with guidance, from given noise.
    *_, (_, _, final) = sample_steps(m, mx.array(cond), steps=2, solver="euler", cfg_scale=4.0, noise=mx.array(x))
    assert final.shape == x.shape and np.isfinite(np.array(final)).all()


# --- config errors, family entry -----------------------------------------------------


@pytest.mark.parametrize("overrides,match", [
    (dict(dim=30, heads=4), "divisible by heads"),
    (dict(image_size=40, patch_size=2), "divisible by patch_size"),
    (dict(image_size=36), "latent_downsample"),
    (dict(depth=0), "depth"),
    (dict(time_dim=15), "time_dim"),
])
def test_validate_errors(overrides, match):
    with pytest.raises(MlxflowError, match=match):
        micro(**overrides)


def test_input_errors_are_one_line():
    cfg = micro()
    m = mdit.DiT(cfg)
    x, t, cond = inputs(cfg)
    with pytest.raises(MlxflowError, match="latents"):
        m(mx.zeros((1, 8, 8, 4)), mx.array(t[:1]), None)
    with pytest.raises(MlxflowError, match="text states"):
        m(mx.array(x), mx.array(t), mx.zeros((3, cfg.text_tokens + 1, cfg.text_dim)))
    with pytest.raises(MlxflowError, match="text states"):
        tdit.DiT(cfg)(torch.zeros(3, 4, 4, 4), torch.from_numpy(t), torch.zeros(3, 2, cfg.text_dim + 1))


def test_family_entry_and_presets():
    fam = get_family("dit")
    tiny = fam.model_config("tiny")
    assert (tiny.text_dim, tiny.text_tokens) == (32, 16)  # a tiny random T5: d_model 32, max_length 16
    x, t, cond = inputs(tiny, B=1, L=16, pad=4)
    assert run_mlx(fam.build(tiny), x, t, cond).shape == (1, 8, 8, 4)
    assert (fam.prediction, fam.codec, fam.conditioning, fam.default_preset) == ("velocity", "sd-vae", "text", "tiny")
    assert fam.sample_defaults["solver"] == "euler" and fam.sample_defaults["steps"] == 50
    seed = fam.model_config("seed")
    assert (seed.gates, seed.final_norm, seed.prenorm, seed.latent_size) == (False, False, False, 8)
    for name in ("debug", "overfit", "hparam_tuning", "stability", "full_scale"):
        assert fam.model_config(name) == seed  # `--preset stability` is the seed's network
    assert set(DIT_PRESETS) <= set(DIT_TRAIN_PRESETS)
    for name in DIT_TRAIN_PRESETS:
        fam.train_config(name)  # every preset is a valid TrainConfig
    st = fam.train_config("stability")
    assert (st.steps, st.batch_size, st.grad_accum, st.lr, st.warmup_steps) == (30_000, 96, 3, 5e-4, 1_500)
    assert (st.warmup_start, st.min_lr_ratio, st.weight_decay, st.grad_clip) == (0.1, 0.1, 1e-2, 5.0)
    assert (st.cond_dropout, st.time_sampler, st.keep_every) == (0.1, "uniform", 10_000)
    assert fam.train_config("overfit").max_samples == 4_096  # the seed overfits 4,096 images
    fs = fam.train_config("full_scale")
    assert (fs.steps, fs.warmup_steps, fs.keep_every) == (300_000, 15_000, 50_000)
    assert dataclasses.asdict(fam.config_from_dict(dataclasses.asdict(seed))) == dataclasses.asdict(seed)
