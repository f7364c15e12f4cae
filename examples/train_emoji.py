"""Build the emoji set, train the tiny preset for a few minutes, sample a grid — all from Python.

    python examples/train_emoji.py [OUT_DIR] [STEPS]

On Linux, start it as `python -m mlxflow.blas examples/train_emoji.py`-style or set
LD_PRELOAD to OpenBLAS for ~10x faster MLX matmuls (see README).
"""

import sys
from pathlib import Path

from mlxflow import api
from mlxflow.checkpoint import checkpoint_step, list_checkpoints

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/example")
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 300
data = out / "emoji-data"

if not (data / "images.npy").exists():
    info = api.build_emoji_data(data, size=64)  # system colour-emoji font, MiniLM embeddings cached
    print(f"rendered {info['count']} emoji ({info['skipped']} skipped)")

run = out / "run"
ckpts = list_checkpoints(run)
if not ckpts or checkpoint_step(ckpts[-1]) < steps:
    # resume="latest" starts a fresh run the first time and continues it with a larger STEPS.
    result = api.train_model(
        "emoji", data, run, preset="tiny", steps=steps, resume="latest",
        on_step=lambda s: print(f"step {s.step}/{s.total} loss {s.loss:.4f} {s.img_per_s:.0f} img/s")
        if s.step % 50 == 0 else None,
    )
    print("checkpoint:", result["checkpoint"])

grid = api.sample(run, ["red heart", "grinning face", "pizza"], out / "samples.png",
                  n=4, steps=20, solver="heun", cfg_scale=3.0)
print("samples:", grid)
print(api.prompt_fidelity(run, data, k=16, n=2))
