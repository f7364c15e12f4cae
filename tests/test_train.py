"""MLX trainer: loss falls, exact resume, atomic checkpoints, NaN handling, accumulation, bf16."""

import json

import numpy as np
import pytest

from mlxflow.checkpoint import list_checkpoints, save_checkpoint

from mlxflow.families import load_checkpoint
from mlxflow.errors import MlxflowError
from mlxflow.train.mlx_session import train

from conftest import assert_fast_path_changes_no_number, quick_train_config


def test_loss_falls_on_tiny_data(tmp_path, shapes_dataset, micro_config):
    ds, emb = shapes_dataset
    cfg = quick_train_config(steps=60, lr=3e-3, warmup_steps=5, ckpt_every=0)
    out = train(tmp_path / "run", ds, micro_config, cfg, family="emoji", embeddings=emb)
    losses = out["losses"]
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.step == 60 and ckpt.ema is not None and ckpt.model_config.text_dim == 8


def test_resume_is_exact(tmp_path, shapes_dataset, micro_config):
    ds, emb = shapes_dataset
    full = train(tmp_path / "full", ds, micro_config, quick_train_config(steps=6), family="emoji", embeddings=emb)["losses"]
    first = train(tmp_path / "split", ds, micro_config, quick_train_config(steps=3), family="emoji", embeddings=emb)["losses"]
    rest = train(tmp_path / "split", ds, micro_config, quick_train_config(steps=6), family="emoji", embeddings=emb,
                 resume="latest")["losses"]
    assert first + rest == full  # bitwise on CPU
    a = load_checkpoint(tmp_path / "full").weights
    b = load_checkpoint(tmp_path / "split").weights
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_optimizer_follows_the_shared_schedule(tmp_path, shapes_dataset, micro_config):
    """The MLX AdamW steps with schedule.lr_at (the numbers the torch trainer uses too)."""
    from mlxflow.schedule import lr_at

    ds, emb = shapes_dataset
    seen = []
    cfg = quick_train_config(steps=5, warmup_steps=3, ckpt_every=0)
    out = train(tmp_path / "run", ds, micro_config, cfg, family="emoji", embeddings=emb, on_step=seen.append)
    assert [s.lr for s in seen] == [lr_at(i, cfg) for i in range(5)]
    opt = load_checkpoint(out["checkpoint"], with_optimizer=True).optimizer
    assert float(opt["learning_rate"]) == np.float32(lr_at(4, cfg)) and int(opt["step"]) == 5


def test_compiled_step_reads_the_learning_rate_it_is_given(micro_config):
    """The trainer sets the lr before each compiled step; a traced constant would ignore it."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxflow.config import TrainConfig
    from mlxflow.families import build_model
    from mlxflow.train.mlx_session import make_optimizer, make_train_step, step_key

    cfg = TrainConfig(batch_size=2, lr=1e-2, ema_decay=0.9)
    model, ema = build_model("emoji", micro_config), build_model("emoji", micro_config)
    opt = make_optimizer(cfg)
    opt.init(model.trainable_parameters())
    step = make_train_step(model, ema, opt, cfg)
    images, text = mx.random.uniform(-1, 1, (1, 2, 16, 16, 3)), mx.random.normal((1, 2, 1, 8))

    def weights():
        return np.concatenate([np.array(v).ravel() for _, v in tree_flatten(model.parameters())])

    changes, before = [], None
    for i, lr in enumerate((1e-2, 0.0, 1e-2)):
        opt.learning_rate = mx.array(lr)
        mx.eval(step(images, text, step_key(0, i)), model.state, opt.state)
        after = weights()
        changes.append(None if before is None else float(np.abs(after - before).max()))
        before = after
    assert changes[1] == 0.0 and changes[2] > 1e-3


def test_grad_accumulation_matches_effective_batch_shape(tmp_path, shapes_dataset, micro_config):
    ds, emb = shapes_dataset
    out = train(tmp_path / "acc", ds, micro_config, quick_train_config(steps=2, batch_size=4, grad_accum=2), family="emoji",
                embeddings=emb)
    assert len(out["losses"]) == 2
    assert json.loads((out["checkpoint"] / "state.json").read_text())["batches_consumed"] == 4


def test_bf16_trains(tmp_path, shapes_dataset, micro_config):
    ds, emb = shapes_dataset
    out = train(tmp_path / "bf", ds, micro_config, quick_train_config(steps=3, bf16=True), family="emoji", embeddings=emb)
    assert all(np.isfinite(out["losses"]))
    assert load_checkpoint(out["checkpoint"]).weights["stem.weight"].dtype == np.float32


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, shapes_dataset, micro_config):
    ds, emb = shapes_dataset
    train(tmp_path / "run", ds, micro_config, quick_train_config(steps=3), family="emoji", embeddings=emb)
    good = list_checkpoints(tmp_path / "run")[-1]
    before = (good / "model.safetensors").read_bytes()
    bad = emb.copy()
    bad[:] = np.nan
    with pytest.raises(MlxflowError, match=r"loss became nan at step 4.*step-0000003"):
        train(tmp_path / "run", ds, micro_config, quick_train_config(steps=6), family="emoji", embeddings=bad, resume="latest")
    assert list_checkpoints(tmp_path / "run")[-1] == good
    assert (good / "model.safetensors").read_bytes() == before


def test_resume_errors(tmp_path, shapes_dataset, micro_config):
    ds, emb = shapes_dataset
    said = []
    out = train(tmp_path / "empty", ds, micro_config, quick_train_config(steps=2), family="emoji", embeddings=emb,
                resume="latest", on_message=said.append)
    assert out["start_step"] == 0 and out["steps"] == 2 and "has no checkpoint yet, starting from step 0" in said[0]
    with pytest.raises(MlxflowError, match="already holds checkpoints"):
        train(tmp_path / "empty", ds, micro_config, quick_train_config(steps=4), family="emoji", embeddings=emb)
    train(tmp_path / "r", ds, micro_config, quick_train_config(steps=3), family="emoji", embeddings=emb)
    with pytest.raises(MlxflowError, match="expects"):
        train(tmp_path / "r", ds, micro_config, quick_train_config(steps=6), family="emoji", embeddings=np.zeros((16, 1, 5), np.float32),
              resume="latest")


def test_wrong_checkpoint_is_refused(tmp_path, micro_config):
    from mlxflow.families import load_model

    from conftest import micro_emoji_config, quick_train_config as q
    save_checkpoint(tmp_path / "x", 1, family="emoji", model_config=micro_config, train_config=q(),
                    text_encoder="minilm", weights={"stem.weight": np.zeros((3, 3, 3, 3), np.float32)})
    with pytest.raises(MlxflowError, match="missing weight"):
        load_model(tmp_path / "x")
    # Weights of a narrower model under the config of a wider one: the first misfit is named.
    from mlx.utils import tree_flatten

    from mlxflow.families import build_model

    other = micro_emoji_config(channels=(8, 16), groups=4)
    narrow = {k: np.zeros(v.shape, np.float32) for k, v in tree_flatten(build_model("emoji", other).parameters())}
    save_checkpoint(tmp_path / "y", 1, family="emoji", model_config=micro_config, train_config=q(),
                    text_encoder="minilm", weights=narrow)
    with pytest.raises(MlxflowError, match=r"'stem.weight' has shape \(8, 3, 3, 3\), the model expects \(16, 3, 3, 3\)"):
        load_model(tmp_path / "y")
    with pytest.raises(MlxflowError, match="neither a checkpoint"):
        load_model(tmp_path)
    with pytest.raises(MlxflowError, match="not found"):
        load_model(tmp_path / "nope")


def test_device_resident_data_and_deferred_reads_change_no_number(tmp_path, shapes_dataset, micro_config):
    """MLX's fast path (one uint8 array gathered by index, asynchronous steps, losses read every
    log_every steps) trains exactly the host stream's run."""
    assert_fast_path_changes_no_number(train, tmp_path, *shapes_dataset, micro_config)


def test_nan_is_caught_at_its_step_when_losses_are_read_in_windows(tmp_path, shapes_dataset, micro_config):
    ds, emb = shapes_dataset
    train(tmp_path / "run", ds, micro_config, quick_train_config(steps=3, log_every=5), family="emoji", embeddings=emb)
    good = list_checkpoints(tmp_path / "run")[-1]
    with pytest.raises(MlxflowError, match=r"loss became nan at step 4.*step-0000003"):
        train(tmp_path / "run", ds, micro_config, quick_train_config(steps=9, log_every=5), family="emoji",
              embeddings=np.full_like(emb, np.nan), resume="latest")
    assert list_checkpoints(tmp_path / "run") == [good]


@pytest.mark.parametrize("seconds_per_step,reads", [(0.0, [10]), (2.0, [2] * 5)])
def test_losses_are_read_per_window_or_once_a_slow_window_passes_a_second(
        monkeypatch, tmp_path, shapes_dataset, micro_config, seconds_per_step, reads):
    """With log_every 100 and 5 steps: a fast device is read once, at the end (5 losses + 5
    norms); when every window takes two seconds, each step is read as it ends."""
    import itertools
    import types

    from mlxflow.train import loop as trainer
    from mlxflow.train.mlx_session import MLXSession

    clock = itertools.count(0.0, seconds_per_step)
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    seen, read = [], MLXSession.read
    monkeypatch.setattr(MLXSession, "read", lambda self, values: seen.append(len(values)) or read(self, values))
    ds, emb = shapes_dataset
    out = train(tmp_path / "run", ds, micro_config, quick_train_config(steps=5, log_every=100, ckpt_every=0),
                family="emoji", embeddings=emb)
    assert seen == reads and len(out["losses"]) == 5
