"""PyTorch reference trainer: loss falls, exact resume, MLX reads its checkpoints, NaN handling."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mlxflow.checkpoint import list_checkpoints  # noqa: E402

from mlxflow.families import load_checkpoint  # noqa: E402
from mlxflow.errors import MlxflowError  # noqa: E402
from mlxflow.train.torch_session import benchmark_torch, flow_matching_loss, train_torch  # noqa: E402

from conftest import assert_fast_path_changes_no_number, quick_train_config  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core box torch's
    # spinning worker threads make each step ~10x slower.
    # One thread also makes CPU reductions run in one fixed order, which the bitwise resume
    # check relies on (with MKL's alignment-independent mode, set in conftest).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(n)


def test_flow_matching_loss_is_velocity_mse(micro_config):
    from mlxflow.torch_ref.emoji import EmojiFlow

    torch.manual_seed(0)
    model = EmojiFlow(micro_config)
    x1, x0 = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    t, text = torch.tensor([0.25, 0.75]), torch.randn(2, 1, 8)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * x1
    want = ((model(x_t, t, text) - (x1 - x0)) ** 2).mean()
    assert torch.allclose(flow_matching_loss(model, x1, x0, t, text), want)


def test_loss_falls_on_tiny_data(tmp_path, shapes_dataset, micro_config):
    ds, emb = shapes_dataset
    seen = []
    cfg = quick_train_config(steps=40, lr=3e-3, warmup_steps=5, ckpt_every=0)
    out = train_torch(tmp_path / "run", ds, micro_config, cfg, family="emoji", embeddings=emb,
                      on_step=seen.append)
    losses = out["losses"]
    # The same StepInfo the MLX trainer reports, after every step, with the shared schedule's lr.
    from mlxflow.schedule import lr_at

    assert len(losses) == 40 and [s.step for s in seen] == list(range(1, 41)) and seen[-1].total == 40
    assert [s.loss for s in seen] == losses and all(s.img_per_s > 0 and s.grad_norm > 0 for s in seen)
    assert [s.lr for s in seen] == [lr_at(i, cfg) for i in range(40)]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), (losses[:5], losses[-5:])
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.step == 40 and ckpt.ema is not None and ckpt.meta["framework"] == "torch"


def test_resume_is_exact_and_mlx_reads_the_checkpoint(tmp_path, shapes_dataset, micro_config):
    ds, emb = shapes_dataset
    # grad_accum=2 so the data position (batches consumed) is not simply the step.
    cfg = lambda steps: quick_train_config(steps=steps, grad_accum=2)  # noqa: E731
    full = train_torch(tmp_path / "full", ds, micro_config, cfg(6), family="emoji", embeddings=emb)
    first = train_torch(tmp_path / "split", ds, micro_config, cfg(3), family="emoji", embeddings=emb)
    rest = train_torch(tmp_path / "split", ds, micro_config, cfg(6), family="emoji", embeddings=emb, resume="latest")
    # Bitwise on CPU: same weights, same optimizer state, same data position, same draws.
    assert first["losses"] + rest["losses"] == full["losses"]
    a, b = load_checkpoint(tmp_path / "full", with_optimizer=True), load_checkpoint(tmp_path / "split", with_optimizer=True)
    for tree_a, tree_b in ((a.weights, b.weights), (a.ema, b.ema), (a.optimizer, b.optimizer)):
        assert tree_a.keys() == tree_b.keys()
        assert all(np.array_equal(tree_a[k], tree_b[k]) for k in tree_a)
    assert b.state["batches_consumed"] == 12 and int(b.optimizer["step"].reshape(-1)[0]) == 6

    # The checkpoint is in MLX names and layouts: an MLX model loads it as is and agrees
    # with the torch model fed the same weights.
    import mlx.core as mx

    from convert.torch_mlx import mlx_to_torch
    from mlxflow.models.emoji import EmojiFlow as MlxEmoji
    from mlxflow.torch_ref.emoji import EmojiFlow as TorchEmoji

    mcfg = b.model_config
    mlx_model = MlxEmoji(mcfg)
    mlx_model.load_weights(str(b.path / "model.safetensors"))
    torch_model = TorchEmoji(mcfg)
    torch_model.load_state_dict(mlx_to_torch(b.weights, mcfg))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
    t = np.array([0.3, 0.8], np.float32)
    text = emb[:2]
    out_mlx = np.array(mlx_model(mx.array(x), mx.array(t), mx.array(text)))
    with torch.no_grad():
        out_torch = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(text))
    assert np.isfinite(out_mlx).all()
    np.testing.assert_allclose(out_mlx, out_torch.permute(0, 2, 3, 1).numpy(), atol=1e-4)


def test_mlx_and_torch_resume_each_other(tmp_path, shapes_dataset, micro_config):
    """Weights, EMA and AdamW state cross frameworks: torch 3 steps -> MLX to 5 -> torch to 7."""
    from mlxflow.train.mlx_session import train

    ds, emb = shapes_dataset
    run = tmp_path / "run"
    first = train_torch(run, ds, micro_config, quick_train_config(steps=3), family="emoji", embeddings=emb)
    mid = train(run, ds, micro_config, quick_train_config(steps=5), family="emoji", embeddings=emb, resume="latest")
    last = train_torch(run, ds, micro_config, quick_train_config(steps=7), family="emoji", embeddings=emb, resume="latest")
    losses = first["losses"] + mid["losses"] + last["losses"]
    assert len(losses) == 7 and all(np.isfinite(losses))
    # Resumed optimizer state (not a fresh one with a warmup-less lr) keeps the loss going down.
    assert max(mid["losses"] + last["losses"]) < first["losses"][0]
    ckpt = load_checkpoint(run, with_optimizer=True)
    assert ckpt.step == 7 and ckpt.meta["framework"] == "torch" and ckpt.state["batches_consumed"] == 7


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, shapes_dataset, micro_config):
    ds, emb = shapes_dataset
    train_torch(tmp_path / "run", ds, micro_config, quick_train_config(steps=3), family="emoji", embeddings=emb)
    good = list_checkpoints(tmp_path / "run")[-1]
    before = {f.name: f.read_bytes() for f in good.iterdir()}
    bad = np.full_like(emb, np.nan)
    with pytest.raises(MlxflowError, match=r"loss became nan at step 4; .*last good checkpoint: .*step-0000003"):
        train_torch(tmp_path / "run", ds, micro_config, quick_train_config(steps=6), family="emoji", embeddings=bad, resume="latest")
    assert list_checkpoints(tmp_path / "run") == [good]
    assert {f.name: f.read_bytes() for f in good.iterdir()} == before
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".") and p.name != ".lock"]  # no temp folders


def test_bf16_autocast_trains_with_fp32_master_weights(tmp_path, shapes_dataset, micro_config):
    ds, emb = shapes_dataset
    out = train_torch(tmp_path / "bf", ds, micro_config, quick_train_config(steps=3, bf16=True), family="emoji", embeddings=emb)
    assert all(np.isfinite(out["losses"]))
    assert load_checkpoint(out["checkpoint"]).weights["stem.weight"].dtype == np.float32


def test_user_errors_are_one_line(tmp_path, shapes_dataset, micro_config):
    ds, emb = shapes_dataset
    # --resume latest on a run killed before its first save starts fresh, and says so.
    said = []
    out = train_torch(tmp_path / "empty", ds, micro_config, quick_train_config(steps=2), family="emoji",
                      embeddings=emb, resume="latest", on_message=said.append)
    assert out["start_step"] == 0 and out["steps"] == 2
    assert said == [f"--resume latest: {tmp_path / 'empty'} has no checkpoint yet, starting from step 0"]
    # A fresh run never trains over another run's checkpoints.
    with pytest.raises(MlxflowError, match=r"already holds checkpoints \(newest: step-0000002\); pass --resume latest"):
        train_torch(tmp_path / "empty", ds, micro_config, quick_train_config(steps=4), family="emoji", embeddings=emb)
    with pytest.raises(MlxflowError, match="fewer than the batch size"):
        train_torch(tmp_path / "big", ds, micro_config, quick_train_config(batch_size=64), family="emoji", embeddings=emb)


def test_state_json_records_position_and_loss(tmp_path, shapes_dataset, micro_config):
    ds, emb = shapes_dataset
    out = train_torch(tmp_path / "run", ds, micro_config, quick_train_config(steps=2, ckpt_every=0), family="emoji", embeddings=emb)
    state = json.loads((out["checkpoint"] / "state.json").read_text())
    assert state["step"] == 2 and state["batches_consumed"] == 2 and state["loss"] == out["losses"][-1]


def test_benchmark_reports_throughput(micro_config):
    r = benchmark_torch(micro_config, batch_size=4, family="emoji", steps=2, warmup=1)
    assert r["img_per_s"] > 0 and r["params"] > 0 and r["device"] == "cpu"
    assert r["peak_mem_kind"] == "process_max_rss" and r["peak_mem_mb"] > 0


def test_cuda_speed_options_default_off_on_cpu_and_can_be_forced(tmp_path, shapes_dataset, micro_config):
    """compile and fused AdamW are on by default only with CUDA; fused AdamW also runs on the CPU."""
    from mlxflow.train.torch_session import cuda_default

    assert cuda_default(None, torch.device("cuda")) and not cuda_default(None, torch.device("cpu"))
    assert cuda_default(True, torch.device("cpu")) and not cuda_default(False, torch.device("cuda"))
    ds, emb = shapes_dataset
    plain = train_torch(tmp_path / "a", ds, micro_config, quick_train_config(steps=3), family="emoji", embeddings=emb)
    torch.use_deterministic_algorithms(False)  # the fused kernel is not on the deterministic list
    fused = train_torch(tmp_path / "b", ds, micro_config, quick_train_config(steps=3, fused_adamw=True),
                        family="emoji", embeddings=emb)
    # Same math in one kernel: the losses agree to rounding.
    np.testing.assert_allclose(fused["losses"], plain["losses"], rtol=1e-4)
    r = benchmark_torch(micro_config, batch_size=4, family="emoji", steps=1, warmup=1)
    assert r["compile"] is False and r["fused_adamw"] is False


def test_device_resident_data_and_deferred_reads_change_no_number(tmp_path, shapes_dataset, micro_config):
    """The fast path (set held on the device, batches gathered by index, noise drawn there,
    losses read back every log_every steps) trains exactly the host stream's run."""
    assert_fast_path_changes_no_number(train_torch, tmp_path, *shapes_dataset, micro_config)


def test_nan_is_caught_at_its_step_when_losses_are_read_in_windows(tmp_path, shapes_dataset, micro_config):
    ds, emb = shapes_dataset
    train_torch(tmp_path / "run", ds, micro_config, quick_train_config(steps=3, log_every=5), family="emoji",
                embeddings=emb)
    good = list_checkpoints(tmp_path / "run")[-1]
    with pytest.raises(MlxflowError, match=r"loss became nan at step 4; .*last good checkpoint: .*step-0000003"):
        train_torch(tmp_path / "run", ds, micro_config, quick_train_config(steps=9, log_every=5), family="emoji",
                    embeddings=np.full_like(emb, np.nan), resume="latest")
    assert list_checkpoints(tmp_path / "run") == [good]


def test_device_data_on_a_streamed_set_is_one_line(tmp_path, micro_config):
    from dataclasses import replace

    from mlxflow.train.loop import keeps_data_on_device

    class Plan:  # what keeps_data_on_device reads of a RunPlan over a latent cache
        train_config = quick_train_config(device_data=True)
        dataset = type("Cache", (), {"path": "cache"})()
        embeddings = None

    with pytest.raises(MlxflowError, match="device_data needs an image dataset held in memory; cache is streamed"):
        keeps_data_on_device(Plan)
    Plan.train_config = replace(Plan.train_config, device_data=None)
    assert keeps_data_on_device(Plan) is False


@pytest.mark.parametrize("framework", ["mlx", "torch"])
def test_trainer_bench_times_a_window_with_either_data_path(framework):
    from mlxflow import api

    for device_data in (False, True):
        row = api.bench_trainer("emoji", "tiny", batch_size=4, steps=2, warmup=1, framework=framework,
                                device_data=device_data)
        assert np.isfinite(row["trainer_img_per_s"]) and row["trainer_img_per_s"] > 0
