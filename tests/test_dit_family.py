"""DiT through the whole pipeline: tar shards -> latent cache (random tiny encoders, labelled)
-> both trainers reading token ids through the frozen T5 -> exact resume -> sampling,
crosscheck, run log and plot, bench; and the user errors on the way."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

import cli
from mlxflow import api
from mlxflow.families import load_checkpoint
from mlxflow.errors import MlxflowError
from mlxflow.families import get_family
from mlxflow.runlog import read_log

torch = pytest.importorskip("torch")

WORDS = ["red", "blue", "green", "yellow"]
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 40)}


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    yield


def write_shard(path, n: int, start: int = 0, corrupt: int | None = None):
    """A WebDataset tar: <key>.jpg + <key>.json {"prompt"}; sample `corrupt` gets broken jpeg bytes."""
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            word = WORDS[i % len(WORDS)]
            im = np.full((40, 56, 3), 245, np.uint8)  # wide: crop-then-resize keeps the square centre
            im[8 + i % 5: 28 + i % 5, 16:36] = COLOURS[word]
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="JPEG", quality=95)
            data = buf.getvalue() if i != corrupt else b"not a jpeg"
            for name, payload in ((f"{i:05d}.jpg", data),
                                  (f"{i:05d}.json", json.dumps({"prompt": f"a {word} square"}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    shards = root / "shards"
    shards.mkdir()
    write_shard(shards / "000.tar", 24, 0, corrupt=5)
    write_shard(shards / "001.tar", 24, 24)
    return api.build_latent_data(shards, root / "latents", random_encoders=True, size=64, shard_size=16,
                                 batch_size=16)


def tiny_train(**overrides):
    base = dict(steps=4, batch_size=8, lr=2e-3, warmup_steps=1, ema_decay=0.9, ckpt_every=2, keep_checkpoints=5,
                log_every=1, sample_every=0)
    return get_family("dit").train_config("tiny", **{**base, **overrides})


def test_cache_from_tar_shards_is_labelled_and_skips_the_corrupt_sample(cache):
    assert len(cache) == 47 and dict(cache.skipped) == {"bad_image": 1}
    assert cache.latent_shape == (8, 8, 4) and cache.text_tokens == 16
    assert cache.meta["random"] is True and cache.meta["text_dim"] == 32
    assert cache.caption(0) == "a red square"


def test_trainer_conditions_are_the_t5_states_of_the_captions(cache, tmp_path):
    from mlxflow.encoders import load_text_encoder
    from mlxflow.train.loop import prepare_run

    fam = get_family("dit")
    plan = prepare_run(tmp_path / "run", "dit", cache, fam.model_config("tiny"), tiny_train())
    assert plan.embeddings is None and plan.condition_encoder == cache.meta["text_encoder"]
    assert (plan.model_config.text_tokens, plan.model_config.text_dim) == (16, 32)
    assert plan.model_config.vae == cache.meta["vae"]
    assert any("RANDOM" in note for note in plan.notes)
    picks = np.array([3, 0, 7])
    t5 = load_text_encoder(plan.condition_encoder)
    got = api.grid_conditions(plan, picks)
    want = t5.encode([cache.caption(i) for i in picks])
    assert np.abs(got - want).max() < 1e-5
    assert (np.abs(got).sum(-1) == 0).any(axis=1).all()  # short captions: zero padding rows


def test_mlx_training_lowers_the_loss_logs_and_plots(cache, tmp_path):
    from mlxflow.train.mlx_session import train

    fam = get_family("dit")
    run = tmp_path / "run"
    result = train(run, cache, fam.model_config("tiny"), tiny_train(steps=40, eval_every=20, log_every=5),
                   family="dit")
    losses = np.array(result.losses)
    assert losses[-10:].mean() < 0.7 * losses[:5].mean()
    records = read_log(run)
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(5, 41, 5))
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40]
    assert {"eval_loss", "data_std", "v_pred_std", "v_target_std"} <= set(evals[0])
    ck = load_checkpoint(result.checkpoint)
    assert ck.state["random_encoders"] is True
    png = cli.main(["plot", str(run)])
    assert png == 0 and (run / "curves.png").is_file()


def test_resume_is_exact_and_crosses_frameworks(cache, tmp_path):
    from mlxflow.train.mlx_session import train
    from mlxflow.train.torch_session import train_torch

    fam = get_family("dit")
    mcfg = fam.model_config("tiny")
    straight = train(tmp_path / "a", cache, mcfg, tiny_train(steps=4), family="dit")
    train(tmp_path / "b", cache, mcfg, tiny_train(steps=2), family="dit")
    resumed = train(tmp_path / "b", cache, mcfg, tiny_train(steps=4), family="dit", resume="latest")
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert all(np.array_equal(a.weights[k], b.weights[k]) for k in a.weights)
    # torch continues an MLX run (and its log) from the same data position
    cont = train_torch(tmp_path / "b", cache, mcfg, tiny_train(steps=6), family="dit", resume="latest")
    assert cont.steps == 6 and load_checkpoint(cont.checkpoint).state["batches_consumed"] == 6
    steps = [r["step"] for r in read_log(tmp_path / "b") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_torch_trainer_matches_mlx_first_step(cache, tmp_path):
    from mlxflow.train.mlx_session import train
    from mlxflow.train.torch_session import train_torch

    fam = get_family("dit")
    mcfg = fam.model_config("tiny")
    m = train(tmp_path / "m", cache, mcfg, tiny_train(steps=1, cond_dropout=0.0), family="dit")
    t = train_torch(tmp_path / "t", cache, mcfg, tiny_train(steps=1, cond_dropout=0.0), family="dit")
    # Same data, same T5 states; noise streams differ by framework, so compare the scale only.
    assert abs(m.losses[0] - t.losses[0]) < 0.5 * m.losses[0]


def test_sample_crosscheck_and_cli(cache, tmp_path, capsys):
    from mlxflow.crosscheck import crosscheck
    from mlxflow.train.mlx_session import train

    fam = get_family("dit")
    run = tmp_path / "run"
    train(run, cache, fam.model_config("tiny"), tiny_train(steps=2), family="dit")
    assert crosscheck(run, batch=2, steps=3).passed
    out = tmp_path / "grid.png"
    assert cli.main(["sample", str(run), "a red square", "a blue square", "--output", str(out), "--n", "3",
                     "--steps", "4"]) == 0
    w, h = Image.open(out).size
    assert w > h > 128  # two rows (prompts) of three 64x64 decoded samples
    assert "RANDOM" in capsys.readouterr().out
    assert "a red square" in api.checkpoint_info(run)["examples"]  # the web demo's example prompts
    # the web demo's progressive frames: decoded grids every `preview` steps, then the final one
    frames = list(api.sample_frames(api.generator(run), ["a red square"], n=2, steps=4, preview=2))
    assert [f[0] for f in frames] == [2, 4] and frames[-1][2].size[0] > 64


def test_user_errors(cache, tmp_path):
    from mlxflow.train.mlx_session import train

    fam = get_family("dit")
    folder = tmp_path / "images"
    folder.mkdir()
    with pytest.raises(MlxflowError, match="latent cache"):
        train(tmp_path / "r", folder, fam.model_config("tiny"), tiny_train(), family="dit")
    assert cli.main(["train", "dit", "--data", str(folder), "--out", str(tmp_path / "r2")]) != 0
    assert cli.main(["data", "latents", str(tmp_path / "c2")]) != 0  # no --src
    # a checkpoint resumed on a cache made with other encoders is refused in one line
    run = tmp_path / "run"
    train(run, cache, fam.model_config("tiny"), tiny_train(steps=2), family="dit")
    write_shard(tmp_path / "s.tar", 12)
    other = api.build_latent_data(tmp_path / "s.tar", tmp_path / "other", random_encoders=True, shard_size=64)
    with pytest.raises(MlxflowError, match="does not fit the cache.*vae"):
        train(run, other, fam.model_config("tiny"), tiny_train(steps=4), family="dit", resume="latest")
    with pytest.raises(MlxflowError, match="batch size"):
        train(tmp_path / "big", cache, fam.model_config("tiny"), tiny_train(batch_size=100), family="dit")


def test_bench_finds_the_largest_batch_and_counts_flops():
    row = api.bench_largest_batch("dit", "tiny", framework="mlx", start=2, limit=8, steps=1, warmup=1)
    assert row["batch_size"] == 8 and [b for b, _ in row["tried"]] == [2, 4, 8]
    assert row["fwd_flops_per_image"] > 0


def test_torchrun_ddp_on_a_latent_cache(cache, tmp_path):
    """Two gloo ranks through the documented torchrun entry, each encoding its rows with the T5 twin."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch without gloo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "mlxflow", "train", "dit", "--framework", "torch", "--data", str(cache.path),
           "--preset", "tiny", "--steps", "2", "--batch-size", "8", "--ckpt-every", "0", "--out", str(tmp_path / "run")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.step == 2 and ckpt.state["world_size"] == 2 and ckpt.model_config.vae == cache.meta["vae"]
