"""Checkpoint folders that move between machines and frameworks.

A checkpoint is a folder:
    config.json            family, model config, train config, text encoder, versions
    model.safetensors      weights in the canonical (MLX) key names and layouts, fp32
    ema.safetensors        EMA weights (same keys), when training keeps an EMA
    ema2.safetensors       a second, faster EMA (JiT keeps 0.9999 and 0.9996), when configured
    optimizer.safetensors  optimizer state, flattened
    state.json             step, data position, RNG state, last loss

A run folder holds checkpoints as step-0000500/ ... ; "latest" is the newest *intact* one.

Crash safety (power loss, SIGKILL, full disk, Ctrl-C):
  * a checkpoint is written under `.tmp-step-X-PID-HOST`, every file and the folder are
    fsynced, then it is renamed to `step-X` and the run folder is fsynced: `step-X`
    appears complete or not at all;
  * a same-step re-save moves the old folder to `.old-step-X-PID-HOST` first; if the
    process dies between the two renames, listing/saving renames it back;
  * pruning renames old checkpoints to `.trash-step-X-PID-HOST` before deleting them, so
    a half-deleted checkpoint never looks like a checkpoint;
  * leftovers of dead processes (same host, pid no longer alive) are swept at the next
    save; a live process's temporary folders are never touched;
  * listing validates every folder (JSON files parse, each safetensors header is readable
    and its data length matches the file size) and skips damaged ones.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from ._version import __version__
from .config import TrainConfig, from_dict, to_dict
from .errors import MlxflowError

try:  # F_FULLFSYNC: on macOS plain fsync does not flush the drive's cache
    import fcntl
except ImportError:  # Windows
    fcntl = None

CKPT_PREFIX = "step-"
_STEP_RE = re.compile(r"^step-(\d+)$")
# .tmp-step-0000002-1234-myhost ; legacy names had no host part
_AUX_RE = re.compile(r"^\.(tmp|old|trash)-(step-\d+)-(\d+)(?:-([A-Za-z0-9]*))?$")
_SAFETENSORS = ("model.safetensors", "ema.safetensors", "ema2.safetensors", "optimizer.safetensors")


@dataclass
class Checkpoint:
    path: Path
    family: str
    model_config: object
    train_config: TrainConfig
    text_encoder: str
    weights: dict[str, np.ndarray]
    ema: dict[str, np.ndarray] | None = None
    optimizer: dict[str, np.ndarray] | None = None
    state: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    ema2: dict[str, np.ndarray] | None = None

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))

    def inference_weights(self, which: str = "ema") -> dict[str, np.ndarray]:
        """The weights to sample with: "ema" (the default; raw weights when the run kept
        none), "ema2" (the second EMA) or "raw"."""
        if which == "raw":
            return self.weights
        if which == "ema2":
            if self.ema2 is None:
                raise MlxflowError(f"checkpoint {self.path} has no second EMA (its run set no ema_decay2)")
            return self.ema2
        if which != "ema":
            raise MlxflowError(f"unknown weights '{which}' (known: ema, ema2, raw)")
        return self.ema if self.ema is not None else self.weights


def _versions(framework: str | None = None) -> dict:
    """Versions of what wrote the checkpoint: the frameworks this process has loaded.

    (Importing torch just to record its version would cost a second per save.)"""
    v = {"mlxflow": __version__, "python": platform.python_version()}
    for mod in ("mlx", "torch"):
        if mod not in sys.modules and mod != framework:
            continue
        try:
            v[mod] = __import__(mod).__version__ if mod != "mlx" else __import__("mlx.core").core.__version__
        except Exception:
            pass
    return v


# --- durable writes --------------------------------------------------------------------------

def _fsync_fd(fd: int) -> None:
    if fcntl is not None and hasattr(fcntl, "F_FULLFSYNC"):
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:
            pass  # not supported by this filesystem: plain fsync below
    os.fsync(fd)


def _fsync_dir(path: Path) -> None:
    """Make renames/creations inside `path` durable (no-op where folders can't be opened)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        _fsync_fd(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # some filesystems refuse dir fsync
            raise
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        _fsync_fd(f.fileno())


# Bytes per element of each safetensors dtype: lets a header be checked against the file size.
_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
             "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _write_safetensors(tensors: dict, path: Path) -> None:
    """Serialise with safetensors, write with Python file I/O, and fsync.

    safetensors' own save_file reports a full disk as a SafetensorError carrying only a
    message; a plain write raises OSError with errno and strerror (ENOSPC, EDQUOT, EROFS...),
    which save_checkpoint turns into one line. The price is one in-memory copy of the file.
    """
    from safetensors.numpy import save

    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    # np.ascontiguousarray would turn 0-d scalars (the optimizer's step) into shape (1,).
    _write_bytes(path, save({k: a if a.flags.c_contiguous else np.array(a, order="C") for k, a in arrays.items()}))


# --- temporary folders of this and other processes --------------------------------------------

def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _aux_name(kind: str, name: str) -> str:
    return f".{kind}-{name}-{os.getpid()}-{_host_tag()}"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate it on Windows: assume alive, never sweep
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: alive, another user's
    return True


def _dead_leftovers(run_dir: Path):
    """(kind, step name, path) of .tmp/.old/.trash folders whose writer is gone.

    A writer on another host (shared filesystem) can't be checked: its folders are kept.
    """
    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return []
    host, out = _host_tag(), []
    for p in entries:
        m = _AUX_RE.match(p.name)
        if not m:
            continue
        kind, name, pid, phost = m.group(1), m.group(2), int(m.group(3)), m.group(4)
        if kind == "trash" or ((phost is None or phost == host) and not _pid_alive(pid)):
            out.append((kind, name, p))  # trash is already condemned: safe to finish from anywhere
    return out


def _recover_old(run_dir: Path) -> bool:
    """Rename `.old-step-X-*` of a dead process back to `step-X` when `step-X` is missing.

    (The writer died between moving the old checkpoint aside and renaming the new one in.)
    """
    recovered = False
    for kind, name, p in _dead_leftovers(run_dir):
        if kind == "old" and not (run_dir / name).exists() and checkpoint_problem(p) is None:
            try:
                os.replace(p, run_dir / name)
                recovered = True
            except OSError:
                pass  # read-only run folder: it stays hidden; a later save recovers it
    if recovered:
        try:
            _fsync_dir(run_dir)
        except OSError:
            pass
    return recovered


def _sweep(run_dir: Path) -> None:
    """Recover `.old` checkpoints, then delete leftovers of dead processes (before a save)."""
    _recover_old(run_dir)
    for kind, name, p in _dead_leftovers(run_dir):
        if kind == "old":
            target = run_dir / name
            if not target.exists() or checkpoint_problem(target) is not None:
                continue  # keep the only (or only intact) copy of this step
        _remove_tree(p)


def _remove_tree(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)


# --- save --------------------------------------------------------------------------------------

def save_checkpoint(run_dir, step: int, *, family: str, model_config, train_config: TrainConfig,
                    text_encoder: str, weights: dict, ema: dict | None = None, optimizer: dict | None = None,
                    state: dict | None = None, keep: int = 0, framework: str = "mlx",
                    ema2: dict | None = None, keep_every: int = 0) -> Path:
    """Write run_dir/step-XXXXXXX atomically and durably; prune to the newest `keep` (0 keeps all),
    never pruning a step that is a multiple of `keep_every` (milestones of a long run).

    On failure (full disk, quota, read-only or missing permission, Ctrl-C) the partial
    folder is removed and every existing checkpoint is left as it was; OS errors become
    one-line MlxflowErrors naming the newest checkpoint that remains.
    """
    run_dir = Path(run_dir)
    final = run_dir / f"{CKPT_PREFIX}{step:07d}"
    if run_dir.exists() and not run_dir.is_dir():
        raise MlxflowError(f"cannot write checkpoint {final.name}: {run_dir} is a file, not a folder; "
                           "choose another --out")
    tmp = run_dir / _aux_name("tmp", final.name)
    old: Path | None = None
    renamed = False
    try:
        if not run_dir.is_dir():
            run_dir.mkdir(parents=True, exist_ok=True)
            _fsync_dir(run_dir.parent)
        _sweep(run_dir)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        config = {
            "family": family,
            "model": to_dict(model_config),
            "train": to_dict(train_config),
            "text_encoder": text_encoder,
            "framework": framework,
            "versions": _versions(framework),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        _write_bytes(tmp / "config.json", json.dumps(config, indent=2).encode())
        _write_safetensors(_np32(weights), tmp / "model.safetensors")
        if ema is not None:
            _write_safetensors(_np32(ema), tmp / "ema.safetensors")
        if ema2 is not None:
            _write_safetensors(_np32(ema2), tmp / "ema2.safetensors")
        if optimizer is not None:
            _write_safetensors(optimizer, tmp / "optimizer.safetensors")
        _write_bytes(tmp / "state.json", json.dumps({"step": step, **(state or {})}, indent=2).encode())
        _fsync_dir(tmp)
        # Same-step re-save (e.g. a resumed run saving again): move the old one aside first,
        # so at every instant one complete checkpoint of this step exists (as step-X or .old-step-X).
        if final.exists():
            old = run_dir / _aux_name("old", final.name)
            os.replace(final, old)
        os.replace(tmp, final)
        renamed = True
        _fsync_dir(run_dir)
    except BaseException as e:
        _remove_tree(tmp)
        restored = True
        if old is not None:
            if renamed:
                _remove_tree(old)
            else:
                try:
                    os.replace(old, final)
                except OSError:
                    restored = False
        if isinstance(e, OSError):
            raise MlxflowError(_save_error(run_dir, final, e, None if restored else old)) from None
        raise
    if old is not None:
        _remove_tree(old)
    if keep > 0:
        _prune(run_dir, keep, protect=final, keep_every=keep_every)
    return final


def _save_error(run_dir: Path, final: Path, e: OSError, hidden_old: Path | None) -> str:
    reason = e.strerror or _one_line(e) or type(e).__name__
    if e.filename and not str(e.filename).startswith(str(run_dir)):
        reason += f" ({e.filename})"  # e.g. a parent folder that is not writable
    try:
        intact = list_checkpoints(run_dir)
    except Exception:
        intact = []
    if intact:
        kept = f"the newest intact checkpoint is still {intact[-1]}"
    else:
        kept = "no checkpoint was written yet" if hidden_old is None else ""
    if hidden_old is not None:
        kept += ("; " if kept else "") + f"the previous {final.name} is kept as {hidden_old}"
    return f"cannot write checkpoint {final}: {reason}; {kept}"


def _prune(run_dir: Path, keep: int, protect: Path, keep_every: int = 0) -> None:
    """Keep the newest `keep` intact checkpoints; older step folders (damaged ones too) go.

    Each is renamed to `.trash-*` first (one atomic step), then deleted: a killed prune
    leaves hidden trash that the next save removes, never a half-deleted step-X.
    """
    intact = list_checkpoints(run_dir)
    kept = intact[-keep:]
    if protect not in kept:
        kept.append(protect)
    oldest_kept = min(_step_of(p) for p in kept)
    stale = [p for p in _step_folders(run_dir) if _step_of(p) < oldest_kept and p not in kept
             and not (keep_every > 0 and p in intact and _step_of(p) % keep_every == 0)]
    trash = []
    for p in stale:
        t = run_dir / _aux_name("trash", p.name)
        try:
            os.replace(p, t)
        except OSError:
            continue  # can't prune now (permissions...): the checkpoint stays, the save succeeded
        trash.append(t)
    for t in trash:
        _remove_tree(t)


def _np32(tree: dict) -> dict:
    out = {}
    for k, v in tree.items():
        a = np.asarray(v)
        out[k] = np.ascontiguousarray(a.astype(np.float32) if a.dtype != np.float32 else a)
    return out


# --- validation & listing ---------------------------------------------------------------------

def _step_of(p: Path) -> int:
    return int(p.name[len(CKPT_PREFIX):])


def _step_folders(run_dir: Path) -> list[Path]:
    try:
        found = [p for p in run_dir.iterdir() if _STEP_RE.match(p.name) and p.is_dir()]
    except OSError:
        return []
    return sorted(found, key=_step_of)


def _one_line(e) -> str:
    return " ".join(str(e).split())


def _json_problem(path: Path, need_family: bool) -> str | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return f"{path.name} is missing"
    except OSError as e:
        return f"{path.name} cannot be read ({e.strerror or _one_line(e)})"
    except (ValueError, UnicodeDecodeError) as e:
        return f"{path.name} is not valid JSON ({_one_line(e)})"
    if not isinstance(data, dict):
        return f"{path.name} is not a JSON object"
    if need_family and not isinstance(data.get("family"), str):
        return f"{path.name} names no model family"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """Check the 8-byte length, the JSON header and that the data length matches the file size."""
    name = path.name
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                return f"{name} is truncated ({size} bytes)"
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8 or n > 100_000_000:
                return f"{name} is truncated (its header alone needs {n} bytes, the file has {size})"
            raw = f.read(n)
    except OSError as e:
        return f"{name} cannot be read ({e.strerror or _one_line(e)})"
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
        end = 0
        for k, info in header.items():
            if k == "__metadata__":
                continue
            b, e = (int(x) for x in info["data_offsets"])
            count = int(np.prod([int(d) for d in info["shape"]], dtype=np.int64))
            item = _ST_SIZES.get(info["dtype"])
            if b < 0 or e < b or (item is not None and (e - b) != count * item):
                raise ValueError(f"bad offsets for '{k}'")
            end = max(end, e)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"{name} has an unreadable header ({_one_line(e)})"
    if 8 + n + end != size:
        return (f"{name} is truncated ({size} bytes, its header describes {8 + n + end})" if size < 8 + n + end
                else f"{name} has {size - 8 - n - end} unexpected trailing bytes")
    return None


def checkpoint_problem(folder) -> str | None:
    """Why `folder` is not an intact checkpoint (one line naming the file), or None.

    Reads only the JSON files and the safetensors headers, never the tensors.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "it is not a folder"
    problem = _json_problem(folder / "config.json", need_family=True) or _json_problem(folder / "state.json", False)
    if problem:
        return problem
    if not (folder / "model.safetensors").exists():
        return "model.safetensors is missing"
    for name in _SAFETENSORS:
        if (folder / name).exists():
            problem = _safetensors_problem(folder / name)
            if problem:
                return problem
    return None


def list_checkpoints(run_dir, with_broken: bool = False):
    """Intact checkpoints of a run, oldest -> newest.

    with_broken=True returns (intact, broken) where broken is [(path, reason), ...], so
    callers can warn about damaged folders that are skipped. A `.old-step-X` left by a
    process killed mid re-save is renamed back to `step-X` first.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return ([], []) if with_broken else []
    _recover_old(run_dir)
    intact, broken = [], []
    for p in _step_folders(run_dir):
        problem = checkpoint_problem(p)
        if problem is None:
            intact.append(p)
        else:
            broken.append((p, problem))
    return (intact, broken) if with_broken else intact


def broken_checkpoints(run_dir) -> list[tuple[Path, str]]:
    """[(step folder, one-line reason)] for the damaged checkpoints `list_checkpoints` skips."""
    return list_checkpoints(run_dir, with_broken=True)[1]


def _looks_like_checkpoint(path: Path) -> bool:
    if any((path / n).exists() for n in ("config.json", "model.safetensors", "state.json")):
        return True
    return bool(_STEP_RE.match(path.name)) and not _step_folders(path)


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder (which must be intact), or a run folder meaning its newest intact checkpoint."""
    path = Path(path)
    if not path.exists():
        raise MlxflowError(f"checkpoint not found: {path}")
    if path.is_dir() and _looks_like_checkpoint(path):
        problem = checkpoint_problem(path)
        if problem:
            raise MlxflowError(f"checkpoint {path} is damaged: {problem}")
        return path
    ckpts, broken = list_checkpoints(path, with_broken=True)
    if not ckpts:
        if broken:
            p, why = broken[-1]
            raise MlxflowError(f"{path} holds no intact checkpoint: {p.name}/{why}"
                               + (f" (and {len(broken) - 1} more damaged)" if len(broken) > 1 else ""))
        raise MlxflowError(f"{path} is neither a checkpoint folder (config.json + model.safetensors) "
                           f"nor a run folder containing {CKPT_PREFIX}* checkpoints")
    return ckpts[-1]


def _load_tensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise MlxflowError(f"cannot read {path}: {e}") from None


def load_checkpoint(path, config_class, family: str | None = None, with_optimizer: bool = False) -> Checkpoint:
    """Load a checkpoint folder (or a run's latest intact one).

    config_class: family name -> its model config dataclass (the registry supplies it:
    mlxflow.families.load_checkpoint); `family` asserts what the caller expects.
    Errors: MlxflowError naming the folder and what is wrong with it.
    """
    path = resolve_checkpoint(path)
    try:
        config = json.loads((path / "config.json").read_text())
        ckpt_family = config["family"]
        model_class = config_class(ckpt_family)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise MlxflowError(f"{path}/config.json is not an mlxflow checkpoint config ({e})") from None
    if family is not None and ckpt_family != family:
        raise MlxflowError(f"{path} is a '{ckpt_family}' checkpoint, not '{family}'")
    state_file = path / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    ema_file, ema2_file, opt_file = path / "ema.safetensors", path / "ema2.safetensors", path / "optimizer.safetensors"
    return Checkpoint(
        path=path,
        family=ckpt_family,
        model_config=from_dict(model_class, config["model"]),
        train_config=from_dict(TrainConfig, config.get("train", {})),
        text_encoder=config.get("text_encoder", "minilm"),
        weights=_load_tensors(path / "model.safetensors"),
        ema=_load_tensors(ema_file) if ema_file.exists() else None,
        optimizer=_load_tensors(opt_file) if with_optimizer and opt_file.exists() else None,
        state=state,
        meta=config,
        ema2=_load_tensors(ema2_file) if ema2_file.exists() else None,
    )


def load_weights_into(module, weights: dict, where: str) -> None:
    """Fill an MLX module from numpy arrays (MLX key names and layouts).

    Errors: MlxflowError naming the first missing, unexpected or mis-shaped key."""
    import mlx.core as mx  # checkpoints are also read where only torch is wanted
    from mlx.utils import tree_flatten

    expected = {k: v.shape for k, v in tree_flatten(module.parameters())}
    check_weights_fit(expected, weights, where)
    module.load_weights([(k, mx.array(v)) for k, v in weights.items()])


def check_weights_fit(expected: dict[str, tuple], weights: dict[str, np.ndarray], where: str) -> None:
    """Every expected key present with its shape, nothing extra; else one line naming the key."""
    missing = [k for k in expected if k not in weights]
    extra = [k for k in weights if k not in expected]
    if missing:
        raise MlxflowError(f"{where} does not fit the model: missing weight '{missing[0]}'"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise MlxflowError(f"{where} does not fit the model: unexpected weight '{extra[0]}'"
                           + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for k, shape in expected.items():
        if tuple(weights[k].shape) != tuple(shape):
            raise MlxflowError(f"{where} does not fit the model: '{k}' has shape {tuple(weights[k].shape)}, "
                               f"the model expects {tuple(shape)}")


def checkpoint_step(path) -> int:
    """The optimizer step a checkpoint folder was saved at (from its state.json, not its name)."""
    path = Path(path)
    try:
        return int(json.loads((path / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MlxflowError(f"{path}/state.json is unreadable ({e})") from None
