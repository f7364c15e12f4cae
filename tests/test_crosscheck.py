"""crosscheck: the same weights in both frameworks agree (forward, trajectory, train step);
a tampered twin is caught."""

from __future__ import annotations

import io

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from rich.console import Console

from conftest import micro_emoji_config
from convert.torch_mlx import load_mlx_model, load_torch_model
from mlxflow.checkpoint import save_checkpoint
from mlxflow.config import TrainConfig
from cli import build_parser, cmd_crosscheck
from cli import render_crosscheck as render
from mlxflow.crosscheck import crosscheck, crosscheck_models
from mlxflow.errors import MlxflowError
from mlxflow.models.emoji import EmojiFlow as MlxEmojiFlow

FAST = dict(batch=2, steps=3, solver="heun", cfg_scale=3.0)


@pytest.fixture(autouse=True, scope="module")
def _torch_threads(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint of a jittered random MLX model: 3 text tokens, weight decay and clipping on."""
    cfg = micro_emoji_config(text_tokens=3)
    mx.random.seed(0)
    rng = np.random.default_rng(0)
    weights = {k: (np.array(v) * (1 + 0.5 * rng.standard_normal(v.shape)) + 0.05 * rng.standard_normal(v.shape))
               .astype(np.float32) for k, v in tree_flatten(MlxEmojiFlow(cfg).parameters())}
    train = TrainConfig(lr=2e-3, betas=(0.9, 0.99), weight_decay=0.1, grad_clip=0.5)
    return save_checkpoint(tmp_path_factory.mktemp("xc") / "run", 10, family="emoji", model_config=cfg,
                           train_config=train, text_encoder="test", weights=weights)


def test_crosscheck_passes_on_a_checkpoint(ckpt):
    report = crosscheck(ckpt, **FAST)
    assert report.passed, [(r.name, r.max_abs, r.limit) for r in report.rows if not r.passed]
    names = [r.name for r in report.rows]
    for expected in ("block stem", "block down.0", "block down.1", "block mid", "block up.0", "block up.1",
                     "forward output", "train loss", "train gradients (all params)", "AdamW step, same gradients",
                     "train updated weights"):
        assert expected in names
    assert any(n.startswith("trajectory") for n in names)
    assert report.row("forward output").max_abs <= 1e-5
    # Every block is held to the relative tolerance, and twins built from the same weights sit far inside it.
    for name in ("block stem", "block down.1", "block mid", "block up.1"):
        row = report.row(name)
        assert (row.metric, row.limit) == ("rel", 1e-4) and row.rel_err <= 1e-5, (name, row.rel_err)
    text = io.StringIO()
    Console(file=text, width=140).print(render(report))
    assert "forward output" in text.getvalue() and "FAIL" not in text.getvalue()


def test_train_step_agrees(ckpt):
    """Loss, gradients (clipping active) and AdamW-updated weights agree; state is restored."""
    mlx_model, c = load_mlx_model(ckpt)
    torch_model, _ = load_torch_model(c)
    before_m = {k: np.array(v) for k, v in tree_flatten(mlx_model.parameters())}
    before_t = {k: v.clone() for k, v in torch_model.state_dict().items()}
    report = crosscheck_models(mlx_model, torch_model, c.model_config, train_config=c.train_config, batch=3, steps=0)
    for name in ("train loss", "train grad norm", "train gradients (all params)", "AdamW step, same gradients",
                 "train updated weights"):
        row = report.row(name)
        assert row.passed, (name, row.max_abs, row.rel_err, row.limit)
    assert report.row("train loss").max_abs <= 1e-5
    assert report.row("train gradients (all params)").rel_err <= 1e-4
    assert report.row("train updated weights").max_abs <= 1e-2 * c.train_config.lr
    # Both models keep their weights.
    assert all(np.array_equal(np.array(v), before_m[k]) for k, v in tree_flatten(mlx_model.parameters()))
    assert all(torch.equal(v, before_t[k]) for k, v in torch_model.state_dict().items())


def test_tampered_twin_fails(ckpt):
    mlx_model, c = load_mlx_model(ckpt)
    torch_model, _ = load_torch_model(c)
    with torch.no_grad():
        torch_model.mid.blocks[1].conv1.weight[0, 0, 1, 1] += 0.05  # one weight, after loading
    report = crosscheck_models(mlx_model, torch_model, c.model_config, train_config=c.train_config, steps=2,
                               train_step=False)
    assert not report.passed
    assert not report.row("forward output").passed
    assert report.row("block down.1").passed and not report.row("block mid").passed  # localised


def run_crosscheck_cli(ckpt, console, train_step=True, batch=2, steps=8, solver="heun", cfg_scale=3.0, tol=1e-4):
    """`mlxflow crosscheck CKPT ...` printing to `console`; its exit code."""
    args = build_parser().parse_args(["crosscheck", str(ckpt), "--batch", str(batch), "--steps", str(steps),
                                      "--solver", solver, "--cfg", str(cfg_scale), "--tol", str(tol)]
                                     + ([] if train_step else ["--no-train-step"]))
    return cmd_crosscheck(args, console_out=console)


def test_cli_entry(ckpt, tmp_path):
    out = io.StringIO()
    assert run_crosscheck_cli(ckpt, console=Console(file=out, width=140), train_step=False, **FAST) == 0
    assert "cross-check passed" in out.getvalue()
    assert run_crosscheck_cli(ckpt, console=Console(file=io.StringIO()), tol=1e-12, train_step=False,
                              **FAST) == 1
    with pytest.raises(MlxflowError, match="checkpoint not found"):
        crosscheck(tmp_path / "missing")


@pytest.mark.parametrize("sabotage", [dict(bias_correction=False), dict(weight_decay=0.0)])
def test_optimizer_mismatch_is_caught(ckpt, monkeypatch, sabotage):
    """Missing bias correction or missing (decoupled) weight decay on the MLX side fails the step check."""
    import mlx.optimizers as optim

    real = optim.AdamW
    monkeypatch.setattr(optim, "AdamW", lambda **kw: real(**{**kw, **sabotage}))
    mlx_model, c = load_mlx_model(ckpt)
    torch_model, _ = load_torch_model(c)
    report = crosscheck_models(mlx_model, torch_model, c.model_config, train_config=c.train_config, steps=0)
    assert not report.row("AdamW step, same gradients").passed
    assert report.row("train gradients (all params)").passed


# --- token-level text (text_mask): padded keys, dropped conditions, live q/k gradients --------


@pytest.fixture(scope="module")
def masked_ckpt(tmp_path_factory):
    cfg = micro_emoji_config(text_tokens=3, text_mask=True)
    mx.random.seed(1)
    rng = np.random.default_rng(1)
    weights = {k: (np.array(v) * (1 + 0.5 * rng.standard_normal(v.shape)) + 0.05 * rng.standard_normal(v.shape))
               .astype(np.float32) for k, v in tree_flatten(MlxEmojiFlow(cfg).parameters())}
    return save_checkpoint(tmp_path_factory.mktemp("xcm") / "run", 10, family="emoji", model_config=cfg,
                           train_config=TrainConfig(lr=2e-3, grad_clip=0.5), text_encoder="test", weights=weights)


def test_masked_text_crosscheck_passes(masked_ckpt):
    """Forward, trajectory (CFG: an all-zero text each step) and train step (its last sample is a
    dropped, all-zero condition) agree between the twins with the mask on."""
    mlx_model, c = load_mlx_model(masked_ckpt)
    assert c.model_config.text_mask is True
    torch_model, _ = load_torch_model(c)
    report = crosscheck_models(mlx_model, torch_model, c.model_config, train_config=c.train_config, batch=3, **{
        k: v for k, v in FAST.items() if k != "batch"})
    assert report.passed, [(r.name, r.max_abs, r.rel_err, r.limit) for r in report.rows if not r.passed]
    assert report.row("train gradients (all params)").rel_err <= 1e-4


def _cross_attn_grads(model, text, framework="mlx"):
    """|grad| of the mid block's first cross-attention q/k projection weights for one flow-matching loss."""
    rng = np.random.default_rng(5)
    b = text.shape[0]
    x1 = np.tanh(rng.standard_normal((b, 16, 16, 3))).astype(np.float32)
    x0 = rng.standard_normal((b, 16, 16, 3)).astype(np.float32)
    t = rng.uniform(0.1, 0.9, b).astype(np.float32)
    if framework == "mlx":
        import mlx.nn as nn

        from mlxflow.train.mlx_session import flow_matching_loss

        loss_and_grad = nn.value_and_grad(model, lambda *a: flow_matching_loss(model, *a, "velocity"))
        _, g = loss_and_grad(mx.array(x1), mx.array(x0), mx.array(t), mx.array(text))
        g = g["mid"]["cross_attn"][0]["attn"]
        return float(mx.abs(g["q_proj"]["weight"]).max()), float(mx.abs(g["k_proj"]["weight"]).max())
    from mlxflow.train.torch_session import flow_matching_loss

    model.zero_grad(set_to_none=True)
    nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    flow_matching_loss(model, nchw(x1), nchw(x0), torch.from_numpy(t), torch.from_numpy(text), "velocity").backward()
    attn = model.mid.cross_attn[0].attn
    return float(attn.q_proj.weight.grad.abs().max()), float(attn.k_proj.weight.grad.abs().max())


def test_cross_attention_learns_from_several_real_tokens(masked_ckpt):
    """Over one key softmax is constant, so q/k get no gradient (the pooled-vector setup); over
    several real tokens they do. Padding keys count as absent: one real token + padding is
    again the dead case."""
    mlx_model, c = load_mlx_model(masked_ckpt)
    torch_model, _ = load_torch_model(c)
    text = np.random.default_rng(6).standard_normal((2, 3, 8)).astype(np.float32)
    one = text.copy()
    one[:, 1:] = 0.0
    for model, fw in ((mlx_model, "mlx"), (torch_model, "torch")):
        q, k = _cross_attn_grads(model, text, fw)
        q1, k1 = _cross_attn_grads(model, one, fw)
        assert q > 1e-4 and k > 1e-4, (fw, q, k)
        assert q1 <= 1e-6 * q and k1 <= 1e-6 * k, (fw, q1, k1)
