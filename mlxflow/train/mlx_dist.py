"""Data-parallel MLX training across processes (mlx.launch): the group, its guards, and the
collectives the trainer needs besides the gradient all-reduce.

    mlx.launch -n 2 --backend ring -- python -m mlxflow train emoji --data DIR --out RUN ...

Every rank runs the same command. Rank 0 holds the run lock, applies the resume rules, reads
the checkpoint, writes checkpoints, samples and logs; it sends the resolved run (model and
train config, start step, data position) to the others, which load the same data and take
their rows of each global batch. All ranks then take rank 0's weights, EMA and optimizer
state (an all-sum with zeros from the others: exact), so they start identical; averaged
gradients (all ranks receive the same bits from the all-reduce) keep them identical.

Failure: a collective whose peer died raises "[ring] connection to a peer was lost"; a
peer that is alive but stuck (stopped, swapping, a hung machine) would block forever, so a
watchdog ends any wait for the other ranks that lasts MLXFLOW_DIST_TIMEOUT seconds
(default 900: longer than a checkpoint, an FID evaluation or a sample grid on rank 0) with
one line. Checkpoints are written atomically, so the newest one on disk stays intact.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import pickle
import sys
import threading
import time

import mlx.core as mx
import numpy as np

from ..errors import MlxflowError

DEFAULT_TIMEOUT = 900.0
# What launchers set in every rank: mlx.launch (ring, jaccl) and mpirun.
LAUNCHER_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


class RankError(MlxflowError):
    """An error every rank raised alike (the same check on the same numbers): rank 0 reports
    it and the others stop quietly (`every_rank` tells the CLI)."""

    every_rank = True


def launched() -> bool:
    """Was this process started by a distributed launcher (mlx.launch, mpirun)?"""
    return any(k in os.environ for k in LAUNCHER_ENV)


def init_group():
    """The distributed group under a launcher, or None for a plain single process.

    A launched job of size 1 (mlx.launch -n 1) is also None: it trains exactly as one process."""
    global _GROUP
    if not launched():
        return None
    if _GROUP is None:  # joined once per process: a second init would open the ring again
        try:
            _GROUP = mx.distributed.init(strict=True)
        except (RuntimeError, ValueError) as e:
            raise MlxflowError(f"cannot join the distributed group ({e}); start every rank with mlx.launch") from None
    return _GROUP if _GROUP.size() > 1 else None


_GROUP = None


def timeout_s() -> float:
    value = os.environ.get("MLXFLOW_DIST_TIMEOUT", "")
    try:
        return float(value) if value else DEFAULT_TIMEOUT
    except ValueError:
        raise MlxflowError(f"MLXFLOW_DIST_TIMEOUT must be a number of seconds, got {value!r}") from None


class Watchdog:
    """Ends the process with one line when a wait for the other ranks lasts too long.

    `with dog.waiting("what"):` arms it around a blocking collective (MLX releases the GIL
    while it waits, so this thread runs). os._exit: the blocked call cannot be interrupted;
    the kernel drops the run lock, and checkpoints on disk are whole (written atomically).
    """

    def __init__(self, rank: int, timeout: float | None = None, say=None):
        self.rank, self.timeout = rank, timeout_s() if timeout is None else timeout
        self.say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.deadline: float | None = None
        self.what = ""
        self.step = 0
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        threading.Thread(target=self._watch, daemon=True, name="mlxflow-dist-watchdog").start()

    def close(self) -> None:
        """Stop watching (the run is over): the thread ends and the backstop is cancelled."""
        self.stopped.set()
        faulthandler.cancel_dump_traceback_later()

    @contextlib.contextmanager
    def waiting(self, what: str):
        with self.lock:
            self.what, self.deadline = what, time.monotonic() + self.timeout
        try:
            yield
        except RuntimeError as e:
            raise self.lost(e, what) from None
        finally:
            with self.lock:
                self.deadline = None

    def lost(self, e: RuntimeError, what: str = "training") -> Exception:
        """A communication error as one line (the ring, or MPI, saw a peer go away); others as they are."""
        if not any(word in str(e).lower() for word in ("[ring]", "[jaccl]", "[mpi]", "peer", "connection", "socket")):
            return e
        return MlxflowError(f"rank {self.rank}: lost the other ranks while {what} after step {self.step} ({e}); "
                            "the newest checkpoint on disk is intact (--resume latest)")

    def _watch(self):
        while not self.stopped.is_set():
            # Backstop for a wait inside a call that holds the GIL (this thread could not run):
            # faulthandler's own C thread ends the process, with a traceback, 60 s after this
            # thread last ran.
            faulthandler.dump_traceback_later(self.timeout + 60, exit=True)
            if self.stopped.wait(min(1.0, max(self.timeout / 10, 0.05))):
                break
            with self.lock:
                late = self.deadline is not None and time.monotonic() > self.deadline
                what = self.what
            if late and not self.stopped.is_set():
                self.say(f"error: rank {self.rank}: no answer from the other ranks for {self.timeout:g} s while {what} "
                         f"after step {self.step} (MLXFLOW_DIST_TIMEOUT); stopping; the newest checkpoint on disk "
                         "is intact (--resume latest)")
                os._exit(1)
        faulthandler.cancel_dump_traceback_later()


def all_sum(x, group):
    return mx.distributed.all_sum(x, group=group)


def _evaluated(x: mx.array) -> mx.array:
    """mx.eval first (it lets the watchdog's thread run while it waits), then read."""
    mx.eval(x)
    return x


def broadcast_arrays(arrays: list[mx.array], group) -> list[mx.array]:
    """Rank 0's arrays on every rank (an all-sum with zeros elsewhere: x + 0 == x, and every
    rank, rank 0 included, keeps the sum, so all hold the same bits)."""
    rank = group.rank()
    out = [all_sum(a if rank == 0 else mx.zeros_like(a), group) for a in arrays]
    mx.eval(out)
    return out


def broadcast_object(obj, group):
    """A picklable object from rank 0 to every rank (small: configs and positions)."""
    data = np.frombuffer(pickle.dumps(obj), np.uint8).astype(np.int32) if group.rank() == 0 else np.zeros(0, np.int32)
    n = int(_evaluated(all_sum(mx.array([data.size], mx.int32), group)).item())
    buf = mx.array(data) if group.rank() == 0 else mx.zeros((n,), mx.int32)
    got = np.array(_evaluated(all_sum(buf, group))).astype(np.uint8).tobytes()
    return pickle.loads(got) if group.rank() != 0 else obj


def agree(error: MlxflowError | None, group) -> None:
    """A collective check after a step some ranks may have failed: when any did, every rank
    raises. Rank 0's error wins (it is the one the user reads); a rank whose own error is
    reported elsewhere stops quietly."""
    rank, world = group.rank(), group.size()
    flags = np.zeros(world, np.int32)
    flags[rank] = error is not None
    failed = np.array(_evaluated(all_sum(mx.array(flags), group))).astype(bool)
    if not failed.any():
        return
    if error is not None and (rank == 0 or not failed[0]):
        if rank == 0:
            raise error
        raise MlxflowError(f"rank {rank}: {error}") from error
    first = int(np.flatnonzero(failed)[0])
    raise RankError(f"rank {first} stopped the run (its message is above)")
