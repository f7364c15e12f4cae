"""Use an optimised BLAS with MLX's Linux CPU wheel.

MLX's CPU wheel for Linux links the reference BLAS, which runs matmuls ~10x slower than
OpenBLAS. When Debian/Ubuntu's OpenBLAS is installed we restart the process once with it
preloaded (its cblas_* symbols then win). On macOS MLX uses Metal/Accelerate and this does
nothing. Set MLXFLOW_BLAS=reference to opt out (e.g. to measure the difference).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
)
HOW_TO = "apt-get install libopenblas0-pthread (Debian/Ubuntu) to make MLX's CPU matmuls ~10x faster"


def find_openblas() -> str | None:
    for path in CANDIDATES:
        if Path(path).exists():
            return path
    return None


def blas_status() -> str:
    """'openblas (<path>)', 'reference' or 'native' (macOS)."""
    if sys.platform != "linux":
        return "native"
    preload = os.environ.get("LD_PRELOAD", "")
    lib = find_openblas()
    if lib and lib in preload:
        return f"openblas ({lib})"
    return "reference"


def reexec_with_fast_blas(argv: list[str]) -> None:
    """Replace this process by `argv` with OpenBLAS preloaded, when useful and possible."""
    if sys.platform != "linux" or os.environ.get("MLXFLOW_BLAS") == "reference":
        return
    lib = find_openblas()
    preload = os.environ.get("LD_PRELOAD", "")
    if lib is None or lib in preload or os.environ.get("_MLXFLOW_REEXEC"):
        return
    env = dict(os.environ, LD_PRELOAD=f"{lib}:{preload}" if preload else lib, _MLXFLOW_REEXEC="1")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)


def main(argv: list[str] | None = None) -> None:
    """`python -m mlxflow.blas MODULE [ARGS]`: run `python -m MODULE ARGS` with OpenBLAS preloaded.

    The README's test command uses it (`python -m mlxflow.blas pytest`), because a
    preload must be in place before the interpreter starts.
    """
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m mlxflow.blas MODULE [ARGS...]", file=sys.stderr)
        raise SystemExit(2)
    cmd = [sys.executable, "-m", *argv]
    reexec_with_fast_blas(cmd)
    os.execv(cmd[0], cmd)  # no OpenBLAS (or already preloaded): run as is


if __name__ == "__main__":
    main()
