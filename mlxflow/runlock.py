"""One writer per run folder: an exclusive, non-blocking flock on RUN/.lock.

    with RunLock(run_dir):
        ... train, save checkpoints ...

A second trainer pointed at the same --out fails at once with one line naming the
holder (pid, host, start time). The kernel drops an flock when its process dies, so a
run killed with SIGKILL (or by the OOM killer, or a power cut) never leaves the folder
locked: the lock file may stay behind, but it is only information. The file is never
deleted on release: deleting it would let a waiting process lock the unlinked inode
while a third one creates a fresh file and locks that too.

The lock belongs to the open file, so processes forked (without exec) while it is held
share it and keep it until they exit too.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path

from .errors import MlxflowError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not protected there (documented limitation)
    fcntl = None

LOCK_NAME = ".lock"


class RunLock:
    """Exclusive lock on a run folder (created if needed). Context manager or acquire()/release()."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self._held = False
        self._created = False  # this lock made the folder: a run that wrote nothing leaves nothing

    @property
    def held(self) -> bool:
        return self._held

    def acquire(self) -> "RunLock":
        if self._held:
            return self
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise MlxflowError(f"{self.run_dir} is a file, not a folder; choose another --out")
        try:
            self._created = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MlxflowError(f"cannot create run folder {self.run_dir}: {e.strerror or e}") from None
        if fcntl is None:
            self._held = True  # no locking on this platform
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise MlxflowError(f"cannot open the run lock {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise MlxflowError(f"{self.run_dir} is in use by another mlxflow process ({holder}); "
                               "wait for it to finish or choose another --out") from None
        except OSError as e:
            # ENOLCK/EOPNOTSUPP: a filesystem without flock (some network/FUSE mounts).
            os.close(fd)
            warnings.warn(f"cannot lock {self.path} ({e.strerror or e}); "
                          "nothing stops two runs writing the same folder", stacklevel=2)
            self._held = True
            return self
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": list(sys.argv)}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:
            pass  # the lock holds without the description (e.g. a full disk)
        self._fd, self._held = fd, True
        return self

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # still ours: clear the description, keep the file
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        self._remove_if_empty()

    def _remove_if_empty(self) -> None:
        """A folder this lock created that holds only the lock (a refused or failed start) goes again."""
        try:
            if self._created and [p.name for p in self.run_dir.iterdir()] == [LOCK_NAME]:
                self.path.unlink()
                self.run_dir.rmdir()
        except OSError:
            pass  # another process got in between: leave the folder to it

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass


def _read_holder(fd: int) -> str:
    """'pid N on HOST, since TIME' from the lock file (retrying briefly: the holder may be writing it)."""
    for _ in range(20):
        try:
            raw = os.pread(fd, 65536, 0)
            info = json.loads(raw) if raw else None
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict) and "pid" in info:
            return f"pid {info.get('pid')} on {info.get('host', '?')}, since {info.get('started', '?')}"
        time.sleep(0.01)
    return "pid unknown: its lock file gives no details"
