"""MLX trainer: loss falls, exact resume, atomic checkpoints, NaN handling, accumulation, bf16."""

import json

import numpy as np
import pytest

from mlxflow.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from mlxflow.errors import MlxflowError
from mlxflow.train import train

from conftest import quick_train_config


def test_loss_falls_on_tiny_data(tmp_path, shapes_dataset, micro_config):
    ds, emb = shapes_dataset
    cfg = quick_train_config(steps=60, lr=3e-3, warmup_steps=5, ckpt_every=0)
    out = train(tmp_path / "run", ds, micro_config, cfg, embeddings=emb)
    losses = out["losses"]
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.step == 60 and ckpt.ema is not None and ckpt.model_config.text_dim == 8


def test_resume_is_exact(tmp_path, shapes_dataset, micro_config):
    ds, emb = shapes_dataset
    full = train(tmp_path / "full", ds, micro_config, quick_train_config(steps=6), embeddings=emb)["losses"]
    first = train(tmp_path / "split", ds, micro_config, quick_train_config(steps=3), embeddings=emb)["losses"]
    rest = train(tmp_path / "split", ds, micro_config, quick_train_config(steps=6), embeddings=emb,
                 resume="latest")["losses"]
    assert first + rest == full  # bitwise on CPU
    a = load_checkpoint(tmp_path / "full").weights
    b = load_checkpoint(tmp_path / "split").weights
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_grad_accumulation_matches_effective_batch_shape(tmp_path, shapes_dataset, micro_config):
    ds, emb = shapes_dataset
    out = train(tmp_path / "acc", ds, micro_config, quick_train_config(steps=2, batch_size=4, grad_accum=2),
                embeddings=emb)
    assert len(out["losses"]) == 2
    assert json.loads((out["checkpoint"] / "state.json").read_text())["batches_consumed"] == 4


def test_bf16_trains(tmp_path, shapes_dataset, micro_config):
    ds, emb = shapes_dataset
    out = train(tmp_path / "bf", ds, micro_config, quick_train_config(steps=3, bf16=True), embeddings=emb)
    assert all(np.isfinite(out["losses"]))
    assert load_checkpoint(out["checkpoint"]).weights["stem.weight"].dtype == np.float32


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, shapes_dataset, micro_config):
    ds, emb = shapes_dataset
    train(tmp_path / "run", ds, micro_config, quick_train_config(steps=3), embeddings=emb)
    good = list_checkpoints(tmp_path / "run")[-1]
    before = (good / "model.safetensors").read_bytes()
    bad = emb.copy()
    bad[:] = np.nan
    with pytest.raises(MlxflowError, match=r"loss became nan at step 4.*step-0000003"):
        train(tmp_path / "run", ds, micro_config, quick_train_config(steps=6), embeddings=bad, resume="latest")
    assert list_checkpoints(tmp_path / "run")[-1] == good
    assert (good / "model.safetensors").read_bytes() == before


def test_resume_errors(tmp_path, shapes_dataset, micro_config):
    ds, emb = shapes_dataset
    with pytest.raises(MlxflowError, match="no checkpoint"):
        train(tmp_path / "empty", ds, micro_config, quick_train_config(), embeddings=emb, resume="latest")
    train(tmp_path / "r", ds, micro_config, quick_train_config(steps=3), embeddings=emb)
    with pytest.raises(MlxflowError, match="expects"):
        train(tmp_path / "r", ds, micro_config, quick_train_config(steps=6), embeddings=np.zeros((16, 1, 5), np.float32),
              resume="latest")


def test_wrong_checkpoint_is_refused(tmp_path, micro_config):
    from mlxflow.sample import load_model

    from conftest import micro_emoji_config, quick_train_config as q
    other = micro_emoji_config(channels=(8, 16), groups=4)
    save_checkpoint(tmp_path / "x", 1, family="emoji", model_config=micro_config, train_config=q(),
                    text_encoder="minilm", weights={"stem.weight": np.zeros((3, 3, 3, 3), np.float32)})
    with pytest.raises(MlxflowError, match="missing weight"):
        load_model(tmp_path / "x")
    with pytest.raises(MlxflowError, match="neither a checkpoint"):
        load_model(tmp_path)
    with pytest.raises(MlxflowError, match="not found"):
        load_model(tmp_path / "nope")
    assert other.channels == (8, 16)
