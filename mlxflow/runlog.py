"""A run's metric history: ``<run>/log.jsonl``, one JSON object per line.

Each record is ``{"step": int, "time": float, "kind": "train" | "eval", ...metrics}``:
train records carry e.g. loss, lr, grad_norm, img_per_s; eval records eval_loss, fid,
latent_mean, latent_std, v_pred_std, v_target_std... (any float metric is accepted).
``time`` is Unix time (seconds) when the record was written.

Appends are line-buffered and flushed per record, so a crash leaves at most a torn last
line, which `read_log` skips. Resuming from a checkpoint at step S first drops records
with step > S: they were written by a run that died after its last checkpoint and would
otherwise show the same steps twice with different values. JSON has no NaN/Infinity, so
non-finite floats are written as null.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from .errors import MlxflowError

LOG_NAME = "log.jsonl"
KINDS = ("train", "eval")


def _clean(value):
    """JSON-safe value: numpy/MLX scalars -> Python numbers, non-finite floats -> None."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:  # numpy / mlx / torch scalar
        value = value.item()
        if isinstance(value, (bool, int)):
            return value
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"run log metrics must be numbers, got {type(value).__name__}") from None
    return value if math.isfinite(value) else None


def _parse_lines(text: str) -> list[dict]:
    """Records of a log file; an unparsable line (a torn write) is skipped."""
    records = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def read_log(run_dir) -> list[dict]:
    """All complete records of ``<run_dir>/log.jsonl`` in file order ([] when there is no log)."""
    path = Path(run_dir) / LOG_NAME
    if not path.is_file():
        return []
    return _parse_lines(path.read_text(encoding="utf-8", errors="replace"))


def _truncate_after(path: Path, step: int) -> None:
    """Keep only the lines whose step <= `step` (and drop torn ones): temp file + os.replace."""
    text = path.read_text(encoding="utf-8", errors="replace")
    kept = [line for line in text.splitlines() if line.strip()]
    out = []
    for line in kept:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            out.append(line)
    if len(out) == len(kept) and text.endswith("\n") or not kept:
        return  # nothing to drop: leave the file (and its mtime) alone
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in out))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunLog:
    """Appender for ``<run_dir>/log.jsonl``; use as a context manager or call `close`.

    resume_step: the step of the checkpoint this run resumes from; records after it are
    dropped before anything is appended. None keeps the file as it is (a fresh run
    starts an empty one, since its folder is new).
    """

    def __init__(self, run_dir, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise MlxflowError(f"run folder not found: {self.run_dir}")
        self.path = self.run_dir / LOG_NAME
        if self.path.is_file():
            if resume_step is not None:
                _truncate_after(self.path, int(resume_step))
            elif self.path.stat().st_size:
                # A torn last line has no newline: end it so the next record starts cleanly.
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    torn = f.read(1) != b"\n"
                if torn:
                    with open(self.path, "a", encoding="utf-8") as f:
                        f.write("\n")
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)

    def write(self, kind: str, step: int, **metrics) -> dict:
        """Append one record and flush; returns what was written."""
        if kind not in KINDS:
            raise ValueError(f"run log kind must be one of {KINDS}, got {kind!r}")
        if self._file is None:
            raise ValueError("run log is closed")
        record = {"step": int(step), "time": time.time(), "kind": kind}
        for name, value in metrics.items():
            if name in ("step", "time", "kind"):
                raise ValueError(f"{name!r} is a reserved run log field")
            record[name] = _clean(value)
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
