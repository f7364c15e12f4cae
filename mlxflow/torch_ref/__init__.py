"""PyTorch reference twins of the MLX models (same file, class and attribute names as models/).

Importing this package stays cheap: the model modules import torch only when you import them.
"""

from __future__ import annotations

import os

from ..errors import MlxflowError


def default_device() -> str:
    """The best torch device here: 'cuda' > 'mps' > 'cpu'."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def check_device(device: str) -> str:
    """`device` when torch can use it here; else MlxflowError in one line (not torch's assertion)."""
    import torch

    kind = str(device).split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise MlxflowError(f"--device {device}: this machine has no CUDA device torch can use "
                           "(use --device cpu, or leave --device out for the best available)")
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise MlxflowError(f"--device {device}: Metal (MPS) is not available to torch here")
    if kind not in ("cpu", "cuda", "mps"):
        raise MlxflowError(f"unknown torch device '{device}' (known: cpu, cuda, mps)")
    return device


def cpu_threads() -> int:
    """Intra-op threads for torch on the CPU: $OMP_NUM_THREADS when set, else half the cores
    this process may use (at least 1).

    Why not all of them (torch's default): each op's parallel region waits at a barrier for
    its slowest thread, so when another process holds one of the cores, every op waits a
    scheduler time slice. Measured on a 2-core machine with another busy process (emoji
    `tiny` training step, batch 32, `mlxflow bench`): 2 threads 6.6 img/s, 1 thread 44.6.
    """
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)


def use_cpu_threads(device) -> None:
    """Set torch's intra-op threads (cpu_threads()) when `device` is the CPU."""
    import torch

    if str(device).split(":")[0] == "cpu":
        torch.set_num_threads(cpu_threads())
