"""`python -m mlxflow ARGS` is the `mlxflow` command; under torchrun
(`torchrun --nproc_per_node N -m mlxflow train FAMILY --framework torch ...`) every rank runs it."""

import sys

from cli import main

from .blas import reexec_with_fast_blas

if __name__ == "__main__":
    reexec_with_fast_blas([sys.executable, "-m", "mlxflow", *sys.argv[1:]])
    sys.exit(main(sys.argv[1:]))
