"""JiT through the whole pipeline: text, class and unconditional data; both trainers; exact
resume; crosscheck; sampling from the CLI; the user errors of its data and config."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import cli
from conftest import make_shapes_dataset, quick_train_config
from mlxflow.families import load_checkpoint
from mlxflow.configs.jit import JiTConfig
from mlxflow.errors import MlxflowError
from mlxflow.families import get_family
from mlxflow.train.mlx_session import train

torch = pytest.importorskip("torch")


def micro_jit(**overrides) -> JiTConfig:
    """16x16, overlapping 8-pixel patches every 4 (3x3 tokens), 2 blocks: milliseconds per step."""
    base = dict(image_size=16, patch_size=8, patch_stride=4, bottleneck=16, dim=32, depth=2, heads=2,
                in_context_tokens=2, in_context_start=1, conditioning="text", text_dim=8, text_tokens=1)
    return JiTConfig(**{**base, **overrides}).validate()


def jit_train_config(**overrides):
    """The paper's recipe (get_family("jit").train_config) at test scale."""
    fam = get_family("jit")
    base = dict(steps=6, batch_size=8, lr=3e-3, warmup_steps=2, ema_decay=0.9, ckpt_every=3, keep_checkpoints=5)
    return fam.train_config("tiny", **{**base, **overrides})


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    yield


def write_class_folder(root, classes=("red", "blue"), per_class=6, size=12):
    colours = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            im = np.full((size, size, 3), 255, np.uint8)
            im[2 + i % 3: 8 + i % 3, 3:9] = colours[name]
            Image.fromarray(im).save(root / name / f"{i}.png")
    return root


def test_recipe_is_the_papers():
    cfg = get_family("jit").train_config("B/16")
    assert (cfg.betas, cfg.weight_decay, cfg.grad_clip, cfg.min_lr_ratio) == ((0.9, 0.95), 0.0, 0.0, 1.0)
    assert (cfg.time_sampler, cfg.t_mean, cfg.t_std, cfg.cond_dropout) == ("logit_normal", -0.8, 0.8, 0.1)
    # mu = -0.8 - log(res / 256) (the seed's resolution shift) is the same distribution as t_shift = res / 256.
    from mlxflow.flow import logit_normal_time

    z = np.linspace(-3, 3, 7)
    res = 64
    shifted = logit_normal_time(z, -0.8, 0.8, shift=res / 256)
    direct = 1 / (1 + np.exp(-(-0.8 - np.log(res / 256) + 0.8 * z)))
    np.testing.assert_allclose(shifted, direct, rtol=1e-12)


def test_text_conditioned_jit_trains_resumes_exactly_and_crosschecks(tmp_path, shapes_dataset):
    from mlxflow.crosscheck import crosscheck
    from mlxflow.train.torch_session import train_torch

    ds, emb = shapes_dataset
    kw = dict(family="jit", embeddings=emb)
    losses = train(tmp_path / "long", ds, micro_jit(), jit_train_config(steps=40, ckpt_every=0), **kw)["losses"]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5]), (losses[:5], losses[-10:])

    full = train(tmp_path / "full", ds, micro_jit(), jit_train_config(steps=4), **kw)
    first = train(tmp_path / "split", ds, micro_jit(), jit_train_config(steps=2), **kw)
    rest = train(tmp_path / "split", ds, micro_jit(), jit_train_config(steps=4), resume="latest", **kw)
    assert first["losses"] + rest["losses"] == full["losses"]  # bitwise
    a, b = load_checkpoint(tmp_path / "full").weights, load_checkpoint(tmp_path / "split").weights
    assert all(np.array_equal(a[k], b[k]) for k in a)

    train_torch(tmp_path / "split", ds, micro_jit(), jit_train_config(steps=6), resume="latest", **kw)
    ck = load_checkpoint(tmp_path / "split")
    assert ck.family == "jit" and ck.step == 6 and ck.meta["framework"] == "torch"
    report = crosscheck(tmp_path / "split", batch=2, steps=3)
    assert report.passed, [(r.name, r.max_abs, r.limit) for r in report.rows if not r.passed]
    assert "block blocks.1" in [r.name for r in report.rows]


def test_class_folder_trains_a_class_conditional_jit_and_samples_by_name(tmp_path, capsys):
    from mlxflow import api

    write_class_folder(tmp_path / "photos", ("blue", "red"))
    (tmp_path / "photos" / "red" / "broken.png").write_bytes(b"not a png")
    code = cli.main(["data", "classes", str(tmp_path / "ds"), "--images", str(tmp_path / "photos"), "--size", "16"])
    assert code == 0
    assert "skipped 1 unreadable; 2 classes" in capsys.readouterr().out
    said = []
    out = api.train_model("jit", tmp_path / "ds", tmp_path / "run", preset="tiny", steps=3,
                          model_overrides=dict(vars(micro_jit()), text_dim=8),
                          train_overrides=dict(batch_size=4, ckpt_every=0), on_message=said.append, sample_prompts=2)
    ck = load_checkpoint(out["checkpoint"])
    assert ck.model_config.conditioning == "class" and ck.model_config.num_classes == 2
    assert ck.state["classes"] == ["blue", "red"] and any("has class labels: the model is class-conditioned" in s for s in said)
    code = cli.main(["sample", str(tmp_path / "run"), "--class", "red", "--class", "0", "--n", "2", "--steps", "3",
                     "--output", str(tmp_path / "g.png")])
    assert code == 0 and Image.open(tmp_path / "g.png").size[1] > 0
    assert cli.main(["sample", str(tmp_path / "run"), "--class", "cat", "--output", str(tmp_path / "x.png")]) == 1
    assert "unknown class 'cat' (known: blue, red)" in capsys.readouterr().err


def test_unconditional_folder_trains_and_samples_without_prompts(tmp_path, capsys):
    from mlxflow import api

    src = tmp_path / "faces"
    src.mkdir()
    for i in range(8):
        Image.fromarray(np.full((20, 24, 3), 30 * i, np.uint8)).save(src / f"{i}.jpg")
    code = cli.main(["data", "folder", str(tmp_path / "ds"), "--images", str(src), "--unconditional", "--size", "16"])
    assert code == 0
    out = api.train_model("jit", tmp_path / "ds", tmp_path / "run", preset="tiny", steps=2,
                          model_overrides=vars(micro_jit()), train_overrides=dict(batch_size=4, ckpt_every=0),
                          sample_prompts=2)
    assert load_checkpoint(out["checkpoint"]).model_config.conditioning == "none"
    code = cli.main(["sample", str(tmp_path / "run"), "--n", "3", "--steps", "2", "--output", str(tmp_path / "g.png")])
    assert code == 0
    assert cli.main(["sample", str(tmp_path / "run"), "a face", "--output", str(tmp_path / "x.png")]) == 1
    assert "unconditional: give no prompt" in capsys.readouterr().err


def test_jit_user_errors_are_one_line(tmp_path, capsys):
    write_class_folder(tmp_path / "one", ("red",))
    code = cli.main(["data", "classes", str(tmp_path / "ds"), "--images", str(tmp_path / "one")])
    assert code == 1 and "needs at least 2 class subfolders with images, found 1 (red)" in capsys.readouterr().err
    with pytest.raises(MlxflowError, match=r"image_size - patch_size \(30 - 8\) must be divisible by patch_stride 4"):
        get_family("jit").model_config("emoji64", image_size=30)
    # A captioned set cannot feed a family whose conditioning is fixed to something else.
    ds, emb = make_shapes_dataset(tmp_path / "shapes")
    meta = json.loads((tmp_path / "shapes" / "dataset.json").read_text())
    (tmp_path / "shapes" / "dataset.json").write_text(json.dumps({**meta, "kind": "images"}))
    from conftest import micro_emoji_config

    with pytest.raises(MlxflowError, match="the emoji family is text-conditioned, but .* has no captions"):
        train(tmp_path / "r", tmp_path / "shapes", micro_emoji_config(), quick_train_config(), family="emoji",
              embeddings=emb)


def test_heun_with_an_euler_last_step_never_evaluates_t1():
    from mlxflow.solvers import integrate

    seen = []

    def velocity(x, t):
        seen.append(t)
        return -x

    *_, (_, t, x) = integrate(velocity, np.ones(2), 4, "heun_euler_last")
    assert t == 1.0 and max(seen) < 1.0 and len(seen) == 2 * 4 - 1


def test_second_ema_is_kept_resumed_and_sampled(tmp_path, shapes_dataset, capsys):
    """JiT keeps two EMAs (0.9999 and 0.9996 in its presets); both trainers carry the second."""
    from mlxflow import encoders as text
    from mlxflow.train.torch_session import train_torch

    from conftest import caption_code_encoder

    ds, emb = shapes_dataset
    kw = dict(family="jit", embeddings=emb, text_encoder="codes")
    cfg = lambda steps: jit_train_config(steps=steps, ema_decay=0.9, ema_decay2=0.5, ckpt_every=0)  # noqa: E731
    full = train(tmp_path / "full", ds, micro_jit(), cfg(4), **kw)
    train(tmp_path / "split", ds, micro_jit(), cfg(2), **kw)
    train(tmp_path / "split", ds, micro_jit(), cfg(4), resume="latest", **kw)
    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(tmp_path / "split")
    assert all(np.array_equal(a.ema2[k], b.ema2[k]) for k in a.ema2)  # resumed exactly
    # A faster average sits between the slow one and the raw weights.
    k = "final_layer.linear.weight"
    assert np.abs(a.ema2[k] - a.weights[k]).max() < np.abs(a.ema[k] - a.weights[k]).max()
    train_torch(tmp_path / "split", ds, micro_jit(), cfg(5), resume="latest", **kw)
    assert load_checkpoint(tmp_path / "split").ema2 is not None
    text._CACHE["codes"] = caption_code_encoder("codes", ds.captions, emb)
    try:
        assert cli.main(["sample", str(tmp_path / "split"), "red square", "--weights", "ema2", "--steps", "2",
                         "--output", str(tmp_path / "g.png")]) == 0
    finally:
        text._CACHE.pop("codes")
    one = train(tmp_path / "one", ds, micro_jit(), jit_train_config(steps=1, ema_decay2=0.0), **kw)
    with pytest.raises(MlxflowError, match="has no second EMA"):
        load_checkpoint(one["checkpoint"]).inference_weights("ema2")
