"""Build the emoji set, train the tiny preset for a few minutes, sample a grid — all from Python.

    python examples/train_emoji.py [OUT_DIR] [STEPS]

On Linux the script restarts itself once with Debian's OpenBLAS preloaded (as the `mlxflow`
command does), which makes MLX's CPU matmuls about 10x faster; MLXFLOW_BLAS=reference opts out.
"""

import sys
from pathlib import Path

from mlxflow import api

api.use_fast_blas([sys.executable, *sys.argv])  # returns at once when there is nothing to gain

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/example")
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 300
data = out / "emoji-data"

if not (data / "images.npy").exists():
    info = api.build_emoji_data(data, size=64)  # system colour-emoji font, MiniLM embeddings cached
    print(f"rendered {info['count']} emoji ({info['skipped']} skipped)")

run = out / "run"
# resume="latest" starts a fresh run the first time and continues it with a larger STEPS.
try:
    result = api.train_model(
        "emoji", data, run, preset="tiny", steps=steps, resume="latest",
        on_step=lambda s: print(f"step {s.step}/{s.total} loss {s.loss:.4f} {s.img_per_s:.0f} img/s")
        if s.step % 50 == 0 else None,
    )
    print("checkpoint:", result["checkpoint"])
except api.MlxflowError as e:  # e.g. the run is already at STEPS
    print(e)

gen = api.generator(run)                         # the checkpoint, read once; the family's sampling defaults
images = gen(["red heart", "grinning face", "pizza"], n=4)  # uint8 (12, 32, 32, 3)
grid = api.save_png(api.make_grid(images, ncols=4, scale=2), out / "samples.png")
print("samples:", grid)
score = api.fidelity(run, data, k=16, n=2)[0]
print(f"prompt fidelity {score['fidelity']:.3f} over {score['samples']} samples (chance {score['chance']:.4f})")
