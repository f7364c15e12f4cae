"""DDP on the CPU: two gloo ranks agree with each other and with one process on the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch without gloo", allow_module_level=True)

from mlxflow.families import load_checkpoint  # noqa: E402
from mlxflow.errors import MlxflowError  # noqa: E402
from mlxflow.train.torch_session import train_torch  # noqa: E402

from conftest import make_shapes_dataset, micro_emoji_config, quick_train_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_single_process(tmp_path):
    import torch.multiprocessing as mp

    import ddp_worker

    ds, emb = make_shapes_dataset(tmp_path / "data")
    np.save(tmp_path / "emb.npy", emb)
    # Global batch 8 (4 rows per rank), 2 micro-batches per step so no_sync is exercised;
    # losses are read back at steps 3 and 4 only, where both ranks meet for the stop check.
    cfg = dict(steps=4, batch_size=8, grad_accum=2, ckpt_every=0, log_every=3)
    mp.spawn(ddp_worker.run_rank, nprocs=2, join=True,
             args=(2, free_port(), str(tmp_path / "ddp"), str(tmp_path / "data"), str(tmp_path / "emb.npy"),
                   cfg, {}, str(tmp_path)))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # All-reduced gradients + identical optimizer math: the ranks are bitwise identical.
    assert r0["world_size"] == 2 and r0["digest"] == r1["digest"] and r0["losses"] == r1["losses"]

    torch.set_num_threads(1)
    single = train_torch(tmp_path / "single", ds, micro_emoji_config(), quick_train_config(**cfg), family="emoji",
                         embeddings=emb)
    # Same data, same noise (drawn for the global batch, then sliced), same start weights,
    # but not the same arithmetic: a rank's loss is a mean over 4 rows and gloo averages
    # two such gradients, where one process sums 8 rows in one reduction. Re-associating a
    # float sum changes it by ~1e-7 relative, so losses agree to rtol 1e-5.
    np.testing.assert_allclose(r0["losses"], single["losses"], rtol=1e-5)
    a, b = load_checkpoint(tmp_path / "ddp").weights, load_checkpoint(tmp_path / "single").weights
    diff = np.concatenate([np.abs(a[k] - b[k]).ravel() for k in a])
    # AdamW divides each gradient entry by its own running RMS, so a relative gradient
    # difference eps becomes an update difference ~ lr * eps * (tensor scale / |g|): ~lr * 1e-7
    # for typical entries, but up to ~2 lr per step for the few entries whose gradient is
    # itself at rounding level (k_proj.bias, which softmax cannot see; the cross-attention
    # q/k over one text token, whose exact gradient is 0; chance near-zeros). Which entries
    # those are depends on the machine's summation order, so no per-key list can be right
    # everywhere: the bulk is held tight, the tail to Adam's bound, and the function the
    # weights compute (below) to 1e-5.
    lr, steps = quick_train_config(**cfg).lr, cfg["steps"]
    assert np.median(diff) <= 1e-7 and np.quantile(diff, 0.99) <= 1e-5, (np.median(diff), np.quantile(diff, 0.99))
    assert diff.max() <= 2 * lr * steps, diff.max()
    from convert.torch_mlx import mlx_to_torch
    from mlxflow.torch_ref.emoji import EmojiFlow

    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(4, 3, 16, 16, generator=g), torch.rand(4, generator=g), torch.from_numpy(emb[:4])
    outs = []
    for w in (a, b):
        net = EmojiFlow(micro_emoji_config())
        net.load_state_dict(mlx_to_torch(w, micro_emoji_config()))
        with torch.no_grad():
            outs.append(net(x, t, text))
    out_diff = float((outs[0] - outs[1]).abs().max())
    print(f"DDP vs single process: |dw| median {np.median(diff):.1e}, p99 {np.quantile(diff, 0.99):.1e}, "
          f"max {diff.max():.1e}; max |d output| {out_diff:.1e}")
    assert out_diff < 1e-5, out_diff
    assert json.loads((tmp_path / "ddp" / "step-0000004" / "state.json").read_text())["world_size"] == 2


def test_torchrun_entry_point(tmp_path):
    """The documented command: torchrun --nproc_per_node 2 -m mlxflow train emoji --framework torch ..."""
    _, emb = make_shapes_dataset(tmp_path / "data", size=32)
    np.save(tmp_path / "emb.npy", emb)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "mlxflow", "train", "emoji", "--framework", "torch", "--data", str(tmp_path / "data"),
           "--preset", "tiny", "--steps", "2", "--batch-size", "4", "--ckpt-every", "0",
           "--embeddings", str(tmp_path / "emb.npy"), "--out", str(tmp_path / "run")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: step 2") == 1  # only rank 0 prints
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.step == 2 and ckpt.meta["framework"] == "torch" and ckpt.state["world_size"] == 2


def test_batch_must_split_across_ranks(tmp_path, monkeypatch):
    ds, emb = make_shapes_dataset(tmp_path / "data")
    # A 1-rank "world" of 3 would need a real group; check the message on a fake world size
    # without joining one by patching the setup to report 3 ranks.
    import mlxflow.train.torch_session as tt

    monkeypatch.setattr(tt, "_setup_distributed", lambda device: (0, 3, torch.device("cpu"), False))
    with pytest.raises(MlxflowError, match="batch_size 8 must be divisible by the number of processes \\(3\\)"):
        train_torch(tmp_path / "run", ds, micro_emoji_config(), quick_train_config(), family="emoji", embeddings=emb)
