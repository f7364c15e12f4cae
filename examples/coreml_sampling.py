"""Generate an emoji with an exported Core ML denoiser, exactly as an app would.

    python examples/coreml_sampling.py --model app/EmojiDenoiser.mlpackage --labels app/ --prompt "red heart" \
        --out heart.png

Without --steps/--solver/--cfg it samples with the family's defaults, which the exporter
wrote into the package's metadata (the ones `mlxflow sample` uses: ab2, 20 steps, CFG 3 for
the emoji family). noise -> solver steps over t: 0 -> 1 with classifier-free guidance, where the
unconditional branch is the zero text embedding and both branches run as one batch-2 call
(exported packages take batch sizes 1 and 2 by default):  v = v_u + s * (v_c - v_u).
macOS runs the package with Core ML (MLModel.predict); elsewhere its ML Program is
evaluated in numpy (convert/mil_eval.py) - slow but the same numbers.
Without --labels, a random embedding is used (handy for smoke tests of a package).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convert.coreml import load_label_table, open_denoiser  # noqa: E402
from mlxflow.errors import MlxflowError  # noqa: E402
from mlxflow.solvers import SOLVERS, guided, integrate  # noqa: E402


def sample(denoise, text, shape, *, steps=20, cfg=3.0, solver="ab2", seed=0):
    """Integrate dx/dt = v from noise (t=0) to data (t=1) with mlxflow's own numpy-ready
    solvers; CFG runs conditional and unconditional (zero embedding) as one batch-2 call.
    Yields (step, x) after each step."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)

    def model_fn(x, t, c):
        return denoise(x, np.full((x.shape[0],), t, np.float32), c)

    velocity = guided(model_fn, text, np.zeros_like(text), cfg)
    for i, _, x in integrate(velocity, x, steps, solver):
        yield i + 1, x.astype(np.float32)


def to_png(x, path):
    from PIL import Image

    img = ((np.clip(x[0], -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 0)  # CHW -> HWC
    Image.fromarray(img).save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="exported .mlpackage")
    p.add_argument("--labels", help="folder with labels.json + label_embeddings.bin")
    p.add_argument("--prompt", help="label text (exact or substring match) from the label table")
    p.add_argument("--index", type=int, default=0, help="label row when no --prompt")
    p.add_argument("--steps", type=int, help="solver steps (default: the package's mlxflow.sample_steps)")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the package's mlxflow.sample_cfg)")
    p.add_argument("--solver", choices=sorted(SOLVERS), help="(default: the package's mlxflow.sample_solver)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("coreml-predict", "mil-numpy"), default=None)
    p.add_argument("--out", default="emoji.png")
    a = p.parse_args(argv)
    try:
        denoise, info = open_denoiser(a.model, backend=a.backend)
        _, c, h, w = info["shapes"]["x_t"]
        _, L, D = info["shapes"]["text"]
        meta = info["metadata"]
        # The family's defaults travel in the package (older packages: the emoji family's).
        a.steps = a.steps or int(json.loads(meta.get("mlxflow.sample_steps", "20")))
        a.solver = a.solver or str(meta.get("mlxflow.sample_solver", "ab2")).strip('"')
        a.cfg = a.cfg if a.cfg is not None else float(json.loads(meta.get("mlxflow.sample_cfg", "3.0")))
        if 2 not in json.loads(info["metadata"].get("mlxflow.batch_sizes", "[1]")) and a.cfg != 1.0:
            raise MlxflowError("this package does not take batch 2; export with --batch-sizes 1 2 or use --cfg 1")
        if a.labels:
            emb, prompts, _ = load_label_table(a.labels)
            if emb.shape[1:] != (L, D):
                raise MlxflowError(f"label embeddings are {emb.shape[1:]}, the model wants ({L}, {D})")
            idx = a.index
            if a.prompt:
                hits = [i for i, s in enumerate(prompts) if s == a.prompt] or \
                       [i for i, s in enumerate(prompts) if a.prompt.lower() in s.lower()]
                if not hits:
                    raise MlxflowError(f"no label matches {a.prompt!r}")
                idx = hits[0]
            text, name = emb[idx:idx + 1], prompts[idx]
        else:
            text, name = np.random.default_rng(a.seed + 1).standard_normal((1, L, D)).astype(np.float32), "random"
        print(f"{name!r}: {a.solver} {a.steps} steps, cfg {a.cfg}, backend {info['backend']}")
        x = None
        for step, x in sample(denoise, text, (1, c, h, w), steps=a.steps, cfg=a.cfg, solver=a.solver,
                              seed=a.seed):
            print(f"  step {step}/{a.steps}", end="\r", flush=True)
        to_png(x, a.out)
        print(f"\nwrote {a.out}")
    except MlxflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
