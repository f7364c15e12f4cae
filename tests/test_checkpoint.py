"""Checkpoints survive full disks, SIGKILL at any moment and damage; one trainer per run folder."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mlxflow import checkpoint as ck
from mlxflow.checkpoint import broken_checkpoints, checkpoint_problem, list_checkpoints, resolve_checkpoint
from mlxflow.config import TrainConfig
from mlxflow.families import load_checkpoint
from mlxflow.train.loop import checkpoint_to_resume
from mlxflow.errors import MlxflowError
from mlxflow.runlock import RunLock

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}

# Shared by the test process and the child processes it kills (they import it too).
HELPERS = "from ckpt_helpers import save, save_checkpoint, tensors\n"
from ckpt_helpers import save, tensors  # noqa: E402


def one_line(e) -> str:
    msg = str(e.value if hasattr(e, "value") else e)
    assert "\n" not in msg, msg
    return msg


def same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes(), k


def assert_exact(path: Path):
    """The checkpoint loads and holds exactly the tensors written for its (step, variant)."""
    c = load_checkpoint(path, with_optimizer=True)
    assert c.step == int(path.name.split("-")[1])
    w, ema, opt = tensors(c.step, c.state["variant"], c.state["n"])
    same(c.weights, w)
    same(c.ema, ema)
    same(c.optimizer, opt)
    return c


def check_invariant(run: Path, min_count: int = 1) -> list[Path]:
    ckpts = list_checkpoints(run)
    assert len(ckpts) >= min_count, sorted(p.name for p in run.iterdir())
    for p in ckpts:
        assert_exact(p)
    assert broken_checkpoints(run) == []
    assert resolve_checkpoint(run) == ckpts[-1]
    return ckpts


def leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith((".tmp-", ".old-", ".trash-")))


# --- full disk, bad paths, Ctrl-C ----------------------------------------------------------------

def _raise(err):
    def boom(*a, **k):
        raise err
    return boom


@pytest.mark.parametrize("where, code", [
    ("ema", errno.ENOSPC), ("model", errno.EDQUOT), ("rename", errno.EROFS), ("fsync_dir", errno.EACCES)])
def test_os_error_on_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where, code):
    run = tmp_path / "run"
    first = save(run, 1)
    before = {f.name: f.read_bytes() for f in first.iterdir()}
    err = OSError(code, os.strerror(code))
    if where in ("ema", "model"):
        real = ck._write_safetensors

        def failing(t, path):
            if path.name == f"{where}.safetensors":
                raise OSError(code, os.strerror(code), str(path))
            real(t, path)
        monkeypatch.setattr(ck, "_write_safetensors", failing)
    elif where == "rename":
        real_replace = os.replace
        monkeypatch.setattr(os, "replace", lambda a, b: (_raise(err)() if Path(b).name == "step-0000002"
                                                         else real_replace(a, b)))
    else:
        real_fsync_dir = ck._fsync_dir
        monkeypatch.setattr(ck, "_fsync_dir", lambda p: _raise(err)() if p.name.startswith(".tmp-")
                            else real_fsync_dir(p))
    with pytest.raises(MlxflowError) as e:
        save(run, 2)
    msg = one_line(e)
    assert str(run) in msg and os.strerror(code) in msg and "step-0000001" in msg, msg
    monkeypatch.undo()
    assert leftovers(run) == [] and list_checkpoints(run) == [first]
    assert {f.name: f.read_bytes() for f in first.iterdir()} == before
    assert_exact(first)


def test_enospc_before_any_checkpoint_says_none_was_written(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "_write_safetensors", _raise(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(MlxflowError) as e:
        save(tmp_path / "run", 1)
    assert "No space left on device" in one_line(e) and "no checkpoint was written yet" in one_line(e)
    assert leftovers(tmp_path / "run") == []


def test_failed_same_step_resave_restores_the_old_one(tmp_path, monkeypatch):
    run = tmp_path / "run"
    save(run, 1)
    save(run, 2)
    real_replace = os.replace

    def replace(a, b):
        if Path(a).name.startswith(".tmp-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(a, b)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(MlxflowError, match="No space left on device.*step-0000002"):
        save(run, 2, variant=1)
    monkeypatch.undo()
    assert leftovers(run) == []
    assert assert_exact(run / "step-0000002").state["variant"] == 0


def test_keyboard_interrupt_mid_save_cleans_up_and_reraises(tmp_path, monkeypatch):
    run = tmp_path / "run"
    first = save(run, 1)
    monkeypatch.setattr(ck, "_write_safetensors", _raise(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save(run, 2)
    assert leftovers(run) == [] and list_checkpoints(run) == [first]


def test_run_folder_that_is_a_file(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(MlxflowError, match="is a file, not a folder") as e:
        save(tmp_path / "run", 1)
    assert str(tmp_path / "run") in one_line(e)
    with pytest.raises(MlxflowError) as e:  # a parent is a file
        save(tmp_path / "run" / "sub", 1)
    assert "Not a directory" in one_line(e)


@pytest.mark.skipif(not (Path("/dev/full").exists() and stat.S_ISCHR(os.stat("/dev/full").st_mode)),
                    reason="needs the /dev/full device")
def test_safetensors_writer_reports_a_full_disk():
    # A real ENOSPC from the kernel arrives as OSError with errno (safetensors' save_file gives a SafetensorError).
    with pytest.raises(OSError) as e:
        ck._write_safetensors({"a": np.zeros(100_000, np.float32)}, Path("/dev/full"))
    assert e.value.errno == errno.ENOSPC


def test_safetensors_writer_round_trips(tmp_path):
    from safetensors.numpy import load_file

    t = {"f32": np.arange(12, dtype=np.float32).reshape(3, 4), "f16": np.ones(3, np.float16),
         "f64": np.array(2.5), "i64": np.array([1, -2], np.int64), "u8": np.arange(5, dtype=np.uint8),
         "b": np.array([True, False, True]), "empty": np.zeros((0, 3), np.float32),
         "big_endian": np.arange(4, dtype=">f4"), "strided": np.arange(20, dtype=np.float32)[::2]}
    ck._write_safetensors(t, tmp_path / "x.safetensors")
    assert ck._safetensors_problem(tmp_path / "x.safetensors") is None
    back = load_file(str(tmp_path / "x.safetensors"))
    for k, v in t.items():
        assert back[k].shape == v.shape and np.array_equal(back[k], v), k
    try:
        import mlx.core as mx
    except ImportError:
        return
    del t["f64"]  # MLX has no float64
    ck._write_safetensors(t, tmp_path / "y.safetensors")
    m = mx.load(str(tmp_path / "y.safetensors"))
    assert np.array_equal(np.array(m["f32"]), t["f32"]) and np.array_equal(np.array(m["i64"]), t["i64"])


# --- damaged checkpoints ---------------------------------------------------------------------------

def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[:-10])


DAMAGE = {
    "model.safetensors": _truncate,
    "ema.safetensors": lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "),
    "optimizer.safetensors": lambda p: p.write_bytes(p.read_bytes() + b"junk"),
    "config.json": lambda p: p.write_text('{"model": {}}'),
    "state.json": lambda p: p.write_text('{"step": 2,'),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_newest_checkpoint_is_skipped(tmp_path, name):
    run = tmp_path / "run"
    first, second = save(run, 1), save(run, 2)
    DAMAGE[name](second / name)
    assert list_checkpoints(run) == [first]
    intact, broken = list_checkpoints(run, with_broken=True)
    assert intact == [first] and [p for p, _ in broken] == [second] and name in broken[0][1]
    assert name in checkpoint_problem(second)
    assert resolve_checkpoint(run) == first
    assert_exact(load_checkpoint(run).path)
    with pytest.raises(MlxflowError) as e:
        load_checkpoint(second)
    assert name in one_line(e) and str(second) in one_line(e)


def test_run_with_only_damaged_checkpoints_names_the_file(tmp_path):
    run = tmp_path / "run"
    p = save(run, 1)
    _truncate(p / "model.safetensors")
    with pytest.raises(MlxflowError) as e:
        resolve_checkpoint(run)
    assert "step-0000001/model.safetensors is truncated" in one_line(e)
    with pytest.raises(MlxflowError, match="no checkpoint in .*damaged step-0000001"):
        checkpoint_to_resume(run, "latest", "emoji", TrainConfig(steps=10))
    (p / "model.safetensors").unlink()
    with pytest.raises(MlxflowError, match="model.safetensors is missing"):
        load_checkpoint(p)


def test_keep_prunes_to_the_newest_and_resave_replaces(tmp_path):
    run = tmp_path / "run"
    for s in range(1, 6):
        save(run, s, keep=2)
    assert [p.name for p in list_checkpoints(run)] == ["step-0000004", "step-0000005"]
    save(run, 5, variant=1, keep=2)
    assert assert_exact(run / "step-0000005").state["variant"] == 1
    assert leftovers(run) == [] and sorted(p.name for p in run.iterdir()) == ["step-0000004", "step-0000005"]


def test_leftovers_of_live_processes_and_other_hosts_are_kept(tmp_path):
    run = tmp_path / "run"
    save(run, 1)
    live = run / f".tmp-step-0000002-{os.getppid()}-{ck._host_tag()}"
    remote = run / ".tmp-step-0000002-1-someotherhost"
    dead_legacy = run / ".tmp-step-0000002-999999999"
    for d in (live, remote, dead_legacy):
        d.mkdir()
    save(run, 2)
    assert live.exists() and remote.exists() and not dead_legacy.exists()


# --- SIGKILL in the middle of a save -------------------------------------------------------------

KILL_SCRIPT = HELPERS + r'''
import os, shutil, signal, sys
from pathlib import Path
import mlxflow.checkpoint as ck

point, run = sys.argv[1], Path(sys.argv[2])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_write, real_replace, real_rmtree = ck._write_safetensors, os.replace, shutil.rmtree
if point == "after_model":
    save(run, 1)
    def write(t, path):
        real_write(t, path)
        if path.name == "model.safetensors":
            die()
    ck._write_safetensors = write
    save(run, 2)
elif point == "between_renames":
    save(run, 1); save(run, 2)
    def replace(a, b):
        real_replace(a, b)
        if Path(b).name.startswith(".old-"):
            die()
    os.replace = replace
    save(run, 2, variant=1)
elif point in ("prune_rename", "prune_delete"):
    save(run, 1); save(run, 2); save(run, 3)
    def replace(a, b):
        real_replace(a, b)
        if Path(b).name.startswith(".trash-"):
            die()
    def rmtree(p, *a, **k):
        if Path(p).name.startswith(".trash-"):
            (Path(p) / "model.safetensors").unlink()  # half deleted
            die()
        real_rmtree(p, *a, **k)
    if point == "prune_rename":
        os.replace = replace
    else:
        shutil.rmtree = rmtree
    save(run, 4, keep=1)
print("not killed")
'''

EXPECTED = {  # (names listed, newest step's variant)
    "after_model": (["step-0000001"], 0),
    "between_renames": (["step-0000001", "step-0000002"], 0),
    "prune_rename": (["step-0000002", "step-0000003", "step-0000004"], 0),
    "prune_delete": (["step-0000004"], 0),
}


@pytest.mark.parametrize("point", list(EXPECTED))
def test_sigkill_mid_save_leaves_only_intact_checkpoints(tmp_path, point):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, point, str(run)], env=CHILD_ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=50)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert leftovers(run), "the kill should have left a hidden folder behind"
    if point == "between_renames":
        assert not (run / "step-0000002").exists()  # only .old-step-0000002-... holds step 2 now
    names, variant = EXPECTED[point]
    ckpts = check_invariant(run)
    assert [p.name for p in ckpts] == names
    assert (run / names[-1]).is_dir() and assert_exact(resolve_checkpoint(run)).state["variant"] == variant
    assert_exact(load_checkpoint(run).path)
    # The next save (another process: this one) sweeps the dead writer's leftovers.
    save(run, 9)
    assert leftovers(run) == []
    check_invariant(run)


LOOP_SCRIPT = HELPERS + r'''
import sys
from pathlib import Path
run, step = Path(sys.argv[1]), int(sys.argv[2])
save(run, step, n=20_000, keep=2)
print("ready", flush=True)
while True:
    step += 1
    save(run, step, n=20_000, keep=2)
    if step % 3 == 0:
        save(run, step, variant=1, n=20_000, keep=2)  # same-step re-save
'''


def test_sigkill_at_random_moments_of_a_save_loop(tmp_path):
    run, rng = tmp_path / "run", random.Random(1234)
    step = 1
    for _ in range(10):
        p = subprocess.Popen([sys.executable, "-c", LOOP_SCRIPT, str(run), str(step)], env=CHILD_ENV, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()[-2000:]
            time.sleep(rng.uniform(0, 0.3))
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=10)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()
            p.stderr.close()
        assert p.returncode == -signal.SIGKILL
        ckpts = check_invariant(run)
        assert len(ckpts) <= 3  # keep=2, plus at most the one a prune was killed before removing
        step = int(ckpts[-1].name.split("-")[1]) + 1


# --- run lock -------------------------------------------------------------------------------------

LOCK_SCRIPT = r'''
import sys, time
from mlxflow.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
'''


def test_run_lock_refuses_a_second_process_and_frees_on_sigkill(tmp_path):
    run = tmp_path / "run" / "nested"
    p = subprocess.Popen([sys.executable, "-c", LOCK_SCRIPT, str(run)], env=CHILD_ENV, cwd=ROOT,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        info = json.loads((run / ".lock").read_text())
        assert info["pid"] == p.pid and info["host"] == socket.gethostname() and info["argv"] and info["started"]
        with pytest.raises(MlxflowError) as e:
            RunLock(run).acquire()
        msg = one_line(e)
        assert msg.startswith(f"{run} is in use by another mlxflow process (pid {p.pid} on {socket.gethostname()}, "
                              f"since {info['started']}); wait for it to finish or choose another --out"), msg
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
    lock = RunLock(run).acquire()  # at once: the kernel dropped the dead process's lock
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (run / ".lock").exists()  # never deleted
    with RunLock(run) as held:
        assert held.held
        with pytest.raises(MlxflowError, match=f"pid {os.getpid()}"):
            RunLock(run).acquire()  # a second lock object, even in the same process
    RunLock(run).acquire().release()


def test_run_lock_on_a_file_path(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(MlxflowError, match="is a file"):
        RunLock(tmp_path / "f").acquire()
