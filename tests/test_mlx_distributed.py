"""Data-parallel MLX training (mlx.launch, ring backend) on localhost: two ranks agree with
each other and with one process on the same global batch; runs move between world sizes;
a lost rank stops the other with one line; bad input is refused in one line.

Run alone (two cores shared: one thread per rank):
    OMP_NUM_THREADS=1 python -m mlxflow.blas pytest tests/test_mlx_distributed.py

This file is also the ranks' program: `python tests/test_mlx_distributed.py JOBS.json`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

from conftest import make_shapes_dataset, micro_emoji_config, quick_train_config  # noqa: E402

LAUNCH = shutil.which("mlx.launch", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> int:
    """A first port p with p .. p+n-1 free (mlx.launch's ring listens on consecutive ports)."""
    for _ in range(50):
        p = free_port()
        try:
            socks = []
            for i in range(n):
                s = socket.socket()
                s.bind(("127.0.0.1", p + i))
                socks.append(s)
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def _ring_available() -> str | None:
    """None when `mlx.launch --backend ring` works here, else why not."""
    if LAUNCH is None:
        return "mlx.launch is not installed"
    try:
        import mlx.core as mx
    except ImportError:
        return "mlx is not installed"
    if not hasattr(mx.distributed, "init") or not mx.distributed.is_available():
        return "this MLX has no distributed backend"
    return None


SKIP = _ring_available()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=f"mlx.launch ring backend unavailable: {SKIP}")


def env(**extra) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(REPO))
    e.pop("MLX_RANK", None)
    e.update(extra)
    return e


def launch(args: list[str], n: int = 2, timeout: float = 120, **extra) -> subprocess.CompletedProcess:
    """`mlx.launch -n N --backend ring -- python ARGS` on localhost."""
    cmd = [LAUNCH, "-n", str(n), "--backend", "ring", "--starting-port", str(free_ports(n)), "--",
           sys.executable, *args]
    # A session of its own: on a timeout the launcher and both ranks go, not the launcher alone.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"mlx.launch did not finish in {timeout} s:\n{out[-2000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_jobs(tmp_path: Path, jobs: list[dict], n: int = 2, **kw) -> subprocess.CompletedProcess:
    spec = tmp_path / f"jobs-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps(jobs))
    return launch([str(Path(__file__).resolve()), str(spec)], n=n, **kw)


def worker(spec: str) -> None:
    """The ranks' program: each job trains micro emoji with train.mlx_session.train and writes
    what the test compares (losses, weights digest) to OUT/rankR.json."""
    from mlxflow.train.mlx_session import train

    for job in json.loads(Path(spec).read_text()):
        if job.get("nan_rank") == int(os.environ.get("MLX_RANK", "0")):
            poison(job["nan_from"])
        out = train(job["run"], job["data"], micro_emoji_config(), quick_train_config(**job["cfg"]), family="emoji",
                    embeddings=np.load(job["emb"]), resume=job.get("resume"))
        Path(job["run"], f"rank{out['rank']}.json").write_text(json.dumps(
            {"losses": out["losses"], "digest": out["digest"], "world_size": out["world_size"],
             "interrupted": out["interrupted"], "steps": out["steps"]}))


def poison(first: int) -> None:
    """This rank's images turn to NaN from its `first`-th micro-batch on (0-based)."""
    import itertools

    from mlxflow.train.mlx_session import MLXSession

    calls, original = itertools.count(), MLXSession.batch_arrays

    def batch_arrays(self, batch):
        image, cond = original(self, batch)
        return (image * float("nan") if next(calls) >= first else image), cond

    MLXSession.batch_arrays = batch_arrays


# ----------------------------------------------------------------------------- tolerance

def assert_same_run(a, b):
    """Two ranks x 4 rows against one process x 8 rows, same data, noise and start weights.

    The arithmetic differs in one place: a rank's loss and gradient are means over its 4 rows,
    and the all-reduce averages the two (mean of means), where one process reduces 8 rows at
    once. Re-associating a float32 sum of 8 terms moves it by a few ulp, ~1e-7 relative, in
    the gradient and the loss. The losses of later steps then also see weights that differ by
    what the earlier updates carried, so losses agree to rtol 1e-5.

    Weights: AdamW divides each gradient entry by its running RMS, so a relative gradient
    difference eps becomes an update difference ~ lr * eps for ordinary entries (~1e-10 here),
    but up to ~2 lr per step for the few entries whose gradient is itself at rounding level
    (the k_proj bias, which softmax cannot see; attention over a single text token, whose
    exact gradient is 0; chance near-zeros): there m / sqrt(v) is the ratio of two rounding
    errors, anything in [-1, 1]. So: the bulk tight (median <= 1e-7, 99th percentile <= 1e-5),
    every entry within Adam's bound 2 * lr * steps, and the function the weights compute
    (checked on a fixed input) to 1e-5 (tests/test_ddp.py, the torch twin, makes the same
    argument).
    """
    import mlx.core as mx
    from mlxflow.families import load_checkpoint
    from mlxflow.checkpoint import load_weights_into
    from mlxflow.families import get_family

    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca.step == cb.step
    wa, wb = ca.weights, cb.weights
    assert wa.keys() == wb.keys()
    diff = np.concatenate([np.abs(wa[k] - wb[k]).ravel() for k in wa])
    lr, steps = ca.train_config.lr, ca.step
    assert np.median(diff) <= 1e-7 and np.quantile(diff, 0.99) <= 1e-5, (np.median(diff), np.quantile(diff, 0.99))
    assert diff.max() <= 2 * lr * steps, diff.max()
    fam = get_family("emoji")
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((4, 16, 16, 3)).astype(np.float32))
    t = mx.array(rng.uniform(size=4).astype(np.float32))
    text = mx.array(rng.standard_normal((4, 1, 8)).astype(np.float32))
    outs = []
    for w in (wa, wb):
        net = fam.build(ca.model_config, "mlx")
        load_weights_into(net, w, "test")
        outs.append(np.array(net(x, t, text)))
    out_diff = float(np.abs(outs[0] - outs[1]).max())
    print(f"{Path(a).name} vs {Path(b).name}: |dw| median {np.median(diff):.1e}, p99 {np.quantile(diff, 0.99):.1e}, "
          f"max {diff.max():.1e}; max |d output| {out_diff:.1e}")
    assert out_diff < 1e-5, out_diff
    return float(diff.max())


def digest(run, rank) -> dict:
    return json.loads((Path(run) / f"rank{rank}.json").read_text())


# ----------------------------------------------------------------------------- tests

@pytest.fixture
def data(tmp_path):
    ds, emb = make_shapes_dataset(tmp_path / "data")
    np.save(tmp_path / "emb.npy", emb)
    return ds, emb


def test_two_ranks_match_one_process_and_resume_across_world_sizes(tmp_path, data):
    from mlxflow.families import load_checkpoint
    from mlxflow.train.mlx_session import train

    ds, emb = data
    # Global batch 8 (4 rows per rank), 2 micro-batches per step; checkpoints at steps 2 and 4;
    # losses read back at steps 3 and 4 (the read-back window) and at the checkpoint step 2.
    cfg = dict(steps=4, batch_size=8, grad_accum=2, ckpt_every=2, log_every=3)
    # One process: straight to 4 (with a checkpoint at 2 for the 1 -> 2 ranks resume).
    single = train(tmp_path / "single", ds, micro_emoji_config(), quick_train_config(**cfg), family="emoji",
                   embeddings=emb)
    common = dict(data=str(tmp_path / "data"), emb=str(tmp_path / "emb.npy"), cfg=cfg)
    jobs = [dict(run=str(tmp_path / "two"), **common),  # two ranks straight to 4
            # one process to 2, then two ranks to 4
            dict(run=str(tmp_path / "one_two"), resume=str(tmp_path / "single" / "step-0000002"), **common)]
    proc = run_jobs(tmp_path, jobs)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r0, r1 = digest(tmp_path / "two", 0), digest(tmp_path / "two", 1)
    # Averaged gradients arrive bitwise equal on both ranks; same optimizer math: same weights.
    assert r0["world_size"] == 2 and r0["digest"] == r1["digest"] and r0["losses"] == r1["losses"]
    assert digest(tmp_path / "one_two", 0)["digest"] == digest(tmp_path / "one_two", 1)["digest"]
    np.testing.assert_allclose(r0["losses"], single["losses"], rtol=1e-5)
    assert_same_run(tmp_path / "two", tmp_path / "single")
    ck = load_checkpoint(tmp_path / "two")
    assert ck.step == 4 and ck.state["world_size"] == 2 and ck.state["batches_consumed"] == 8
    # 1 -> 2: same schedule and data position as one process straight to 4.
    assert_same_run(tmp_path / "one_two", tmp_path / "single")
    np.testing.assert_allclose(digest(tmp_path / "one_two", 0)["losses"], single["losses"][2:], rtol=1e-5)
    # 2 -> 1: two ranks to 2, one process on to 4, against two ranks straight to 4.
    two_one = train(tmp_path / "two_one", ds, micro_emoji_config(), quick_train_config(**cfg), family="emoji",
                    embeddings=emb, resume=str(tmp_path / "two" / "step-0000002"))
    assert load_checkpoint(tmp_path / "two_one").state["world_size"] == 1
    np.testing.assert_allclose(two_one["losses"], r0["losses"][2:], rtol=1e-5)
    assert_same_run(tmp_path / "two_one", tmp_path / "two")
    # Only rank 0 wrote: one log, checkpoints of the two runs only.
    assert sorted(p.name for p in (tmp_path / "two").glob("step-*")) == ["step-0000002", "step-0000004"]



def start_ranks(tmp_path: Path, jobs: list[dict], n: int = 2, **extra) -> list[subprocess.Popen]:
    """The ranks without mlx.launch (which would end the others when one dies): this tests the
    trainer's own guards. The hostfile is the one mlx.launch writes for the ring backend."""
    port = free_ports(n)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(n)]))
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs))
    return [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(spec)], cwd=REPO,
                             env=env(MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile), **extra),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(n)]


def wait_for(path: Path, procs, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            raise AssertionError(f"{path} never appeared: " + " | ".join(p.communicate()[1][-1500:] for p in procs))
        time.sleep(0.2)


def errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_lost_rank_stops_the_other_with_one_line_and_the_run_resumes(tmp_path, data, how):
    """killed: the peer's sockets close, the ring says so at once. stopped (SIGSTOP: a hung
    machine) : nothing closes, the watchdog's timeout (MLXFLOW_DIST_TIMEOUT) ends the wait."""
    from mlxflow.checkpoint import list_checkpoints
    from mlxflow.families import load_checkpoint
    from mlxflow.train.mlx_session import train

    ds, emb = data
    run = tmp_path / "run"
    cfg = dict(steps=100000, batch_size=8, ckpt_every=5, log_every=5, keep_checkpoints=2)
    procs = start_ranks(tmp_path, [dict(run=str(run), data=str(tmp_path / "data"), emb=str(tmp_path / "emb.npy"),
                                        cfg=cfg)], MLXFLOW_DIST_TIMEOUT="8")
    try:
        wait_for(run / "step-0000010", procs)
        procs[1].send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        tic = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        waited = time.monotonic() - tic
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 1, err[-3000:]
    (line,) = errors(err) or [err[-3000:]]
    if how == "killed":
        assert "rank 0: lost the other ranks" in line and waited < 30, (line, waited)
    else:
        assert "rank 0: no answer from the other ranks for 8 s" in line and 8 <= waited < 40, (line, waited)
    assert "Traceback" not in err
    intact, broken = list_checkpoints(run, with_broken=True)
    assert intact and not broken
    newest = load_checkpoint(run)
    assert newest.state["world_size"] == 2
    # It resumes: one process, two more steps, same global batch and data position.
    out = train(run, ds, micro_emoji_config(), quick_train_config(**{**cfg, "steps": newest.step + 2}),
                family="emoji", embeddings=emb, resume="latest")
    assert out["steps"] == newest.step + 2 and out["start_step"] == newest.step
    assert load_checkpoint(run).state["batches_consumed"] == newest.step + 2


def test_ctrl_c_on_one_rank_stops_both_at_one_step_with_one_checkpoint(tmp_path, data):
    from mlxflow.checkpoint import list_checkpoints
    from mlxflow.families import load_checkpoint

    run = tmp_path / "run"
    cfg = dict(steps=100000, batch_size=8, ckpt_every=0, log_every=5)
    procs = start_ranks(tmp_path, [dict(run=str(run), data=str(tmp_path / "data"), emb=str(tmp_path / "emb.npy"),
                                        cfg=cfg)])
    try:
        wait_for(run / "log.jsonl", procs)
        time.sleep(1.0)
        procs[1].send_signal(signal.SIGINT)  # rank 1 alone: the stop check is a collective
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    r0, r1 = digest(run, 0), digest(run, 1)
    assert r0["interrupted"] and r1["interrupted"] and r0["steps"] == r1["steps"] and r0["digest"] == r1["digest"]
    assert [p.name for p in list_checkpoints(run)] == [f"step-{r0['steps']:07d}"]
    assert load_checkpoint(run).step == r0["steps"] and r0["steps"] % 5 == 0


def test_nan_on_one_rank_stops_both_at_the_same_step_with_one_line(tmp_path, data):
    from mlxflow.checkpoint import list_checkpoints

    run = tmp_path / "run"
    cfg = dict(steps=40, batch_size=8, ckpt_every=5, log_every=5)
    # Rank 1's rows of step 7 on are NaN; rank 0's are fine. The loss and gradients are
    # all-reduced, so both ranks read the same NaN at the same step.
    procs = start_ranks(tmp_path, [dict(run=str(run), data=str(tmp_path / "data"), emb=str(tmp_path / "emb.npy"),
                                        cfg=cfg, nan_rank=1, nan_from=6)])
    try:
        outs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [1, 1], [o[1][-2000:] for o in outs]
    lines = errors(outs[0][1]) + errors(outs[1][1])
    assert len(lines) == 1 and "became nan at step 7" in lines[0] and "step-0000005" in lines[0], lines
    assert [p.name for p in list_checkpoints(run)] == ["step-0000005"]


def cli(tmp_path, *args, steps=2, batch=4) -> list[str]:
    return ["-m", "mlxflow", "train", "emoji", "--data", str(tmp_path / "data32"), "--preset", "tiny",
            "--steps", str(steps), "--batch-size", str(batch), "--ckpt-every", "0",
            "--embeddings", str(tmp_path / "emb32.npy"), *args]


@pytest.fixture
def data32(tmp_path):
    _, emb = make_shapes_dataset(tmp_path / "data32", size=32)
    np.save(tmp_path / "emb32.npy", emb)


def test_cli_under_mlx_launch(tmp_path, data32):
    """The documented command: mlx.launch -n 2 --backend ring -- python -m mlxflow train ..."""
    from mlxflow.families import load_checkpoint

    proc = launch(cli(tmp_path, "--out", str(tmp_path / "run")), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: step 2") == 1  # only rank 0 prints
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.step == 2 and ckpt.meta["framework"] == "mlx" and ckpt.state["world_size"] == 2


def test_global_batch_must_split_across_ranks(tmp_path, data32):
    proc = launch(cli(tmp_path, "--out", str(tmp_path / "run"), batch=5), timeout=180)
    # mlx.launch itself exits 0 whatever its ranks do; it names a rank that failed. Every rank
    # refuses alike, so whichever exits first is named (the launcher then stops the other).
    assert re.search(r"Node with rank [01] exited with code 1", proc.stderr), proc.stderr[-3000:]
    assert errors(proc.stderr) == ["error: batch_size 5 must be divisible by the number of processes (2)"], \
        proc.stderr[-3000:]
    assert not list((tmp_path / "run").glob("step-*"))


def test_two_runs_on_one_folder(tmp_path, data32):
    from mlxflow.runlock import RunLock

    with RunLock(tmp_path / "run"):  # another trainer holds the folder
        proc = launch(cli(tmp_path, "--out", str(tmp_path / "run")), timeout=180)
    # Rank 0 refuses; rank 1 then stops on the lost peer; either may be the one mlx.launch names.
    assert re.search(r"Node with rank [01] exited with code 1", proc.stderr), proc.stderr[-3000:]
    (line,) = errors(proc.stderr)
    assert "is in use by another mlxflow process" in line and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not list((tmp_path / "run").glob("step-*"))

if __name__ == "__main__":
    from mlxflow.errors import MlxflowError

    try:
        worker(sys.argv[1])
    except MlxflowError as e:  # as the CLI reports it
        if os.environ.get("MLX_RANK", "0") == "0" or not getattr(e, "every_rank", False):
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
