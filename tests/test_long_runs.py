"""Long runs a user can trust: Ctrl-C, a second Ctrl-C, two trainers on one folder, SIGKILL.

Each test drives a real `mlxflow train` in a child process (tests/cli_runner.py) on the
synthetic shapes set and the micro preset, and signals it the way a user or the OS would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_shapes_dataset
from mlxflow.checkpoint import checkpoint_step, list_checkpoints
from mlxflow.families import load_checkpoint

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def data(tmp_path):
    ds, emb = make_shapes_dataset(tmp_path / "data")
    np.save(tmp_path / "data" / "codes.npy", emb)
    return tmp_path / "data"


def start(data: Path, run: Path, *extra: str) -> subprocess.Popen:
    """`mlxflow train emoji` in a child that logs every step to stderr (not a terminal)."""
    cmd = [sys.executable, str(HERE / "cli_runner.py"), str(data), "train", "emoji", "--data", str(data),
           "--out", str(run), "--preset", "micro", "--text-encoder", "codes", "--log-every", "1", *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(proc: subprocess.Popen, step: int, lines: list[str], timeout: float = 60) -> None:
    """Read the child's stderr until it reports `step`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"child exited early ({proc.poll()}): {''.join(lines)[-2000:]}")
        lines.append(line)
        if line.startswith(f"step {step}/"):
            return
    raise AssertionError(f"no 'step {step}/' within {timeout}s: {''.join(lines)[-2000:]}")


def finish(proc: subprocess.Popen, lines: list[str]) -> tuple[int, str]:
    out, err = proc.communicate(timeout=60)
    return proc.returncode, "".join(lines) + err


def assert_every_checkpoint_loads(run: Path) -> None:
    for ck in list_checkpoints(run):
        loaded = load_checkpoint(ck, with_optimizer=True)
        assert loaded.step == checkpoint_step(ck) and loaded.weights and loaded.ema and loaded.optimizer
    assert not [p.name for p in run.iterdir() if p.name.startswith((".tmp-", ".old-", ".trash-"))]


def test_ctrl_c_stops_at_a_step_boundary_saves_and_says_how_to_resume(data, tmp_path):
    run = tmp_path / "run"
    proc, lines = start(data, run, "--steps", "100000", "--ckpt-every", "0"), []
    wait_for_step(proc, 3, lines)
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc, lines)
    assert code == 130, err[-2000:]
    assert "stopping at the next step report and saving a checkpoint" in err
    step = checkpoint_step(list_checkpoints(run)[-1])
    assert step >= 3 and f"interrupted at step {step}: checkpoint {run / f'step-{step:07d}'}" in err
    assert f"resume with: mlxflow train emoji --data {data} --out {run} --resume latest --steps 100000" in err
    assert_every_checkpoint_loads(run)

    # The command it printed continues the run from that step.
    proc, lines = start(data, run, "--steps", str(step + 2), "--resume", "latest"), []
    code, err = finish(proc, lines)
    assert code == 0, err[-2000:]
    assert checkpoint_step(list_checkpoints(run)[-1]) == step + 2


def test_second_ctrl_c_stops_at_once_and_loses_nothing_written(data, tmp_path):
    run = tmp_path / "run"
    # A checkpoint every step: the second Ctrl-C is likely to land inside a save.
    proc, lines = start(data, run, "--steps", "100000", "--ckpt-every", "1"), []
    wait_for_step(proc, 4, lines)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc, lines)
    assert code == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err
    assert list_checkpoints(run) and checkpoint_step(list_checkpoints(run)[-1]) >= 3
    assert_every_checkpoint_loads(run)


def test_a_second_trainer_on_the_same_run_folder_is_refused(data, tmp_path):
    run = tmp_path / "run"
    first, lines = start(data, run, "--steps", "100000", "--ckpt-every", "2"), []
    try:
        wait_for_step(first, 2, lines)
        second, second_lines = start(data, run, "--steps", "100000", "--resume", "latest"), []
        code, err = finish(second, second_lines)
        assert code == 1
        msg = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(msg) == 1 and f"is in use by another mlxflow process (pid {first.pid}" in msg[0], err[-2000:]
    finally:
        # A killed run leaves no stuck lock: the folder is usable at once.
        first.kill()
        first.wait(timeout=30)
    # How far the first run got depends on the machine's speed: continue from wherever that was.
    step = checkpoint_step(list_checkpoints(run)[-1])
    proc, lines = start(data, run, "--steps", str(step + 2), "--resume", "latest"), []
    code, err = finish(proc, lines)
    assert code == 0, err[-2000:]
    assert checkpoint_step(list_checkpoints(run)[-1]) == step + 2


@pytest.mark.parametrize("delay", [0.0, 0.15, 0.4])
def test_sigkill_mid_run_leaves_only_loadable_checkpoints(data, tmp_path, delay):
    run = tmp_path / "run"
    proc, lines = start(data, run, "--steps", "100000", "--ckpt-every", "1"), []
    wait_for_step(proc, 2, lines)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    newest = list_checkpoints(run)[-1]
    for ck in list_checkpoints(run):
        load_checkpoint(ck, with_optimizer=True)
    # The next run resumes from the newest intact checkpoint.
    step = checkpoint_step(newest)
    proc, lines = start(data, run, "--steps", str(step + 1), "--resume", "latest"), []
    code, err = finish(proc, lines)
    assert code == 0, err[-2000:]
    assert checkpoint_step(list_checkpoints(run)[-1]) == step + 1
