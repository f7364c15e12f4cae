"""Runs `mlxflow` in a child process for the tests that signal, kill or race real runs.

    python tests/cli_runner.py DATASET_DIR train emoji --data DATASET_DIR ...

Before handing the arguments to cli.main it registers, inside the child, what the tests'
in-process runs use: a text encoder named "codes" that maps the synthetic set's captions
to their codes (saved by the test as DATASET_DIR/codes.npy), and a "micro" emoji preset.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import caption_code_encoder, micro_emoji_config  # noqa: E402


def main(argv: list[str]) -> int:
    import cli
    from mlxflow.configs import emoji as config
    from mlxflow.data.dataset import ImageTextDataset
    from mlxflow import encoders as text

    data = Path(argv[0])
    ds = ImageTextDataset.load(data)
    text._CACHE["codes"] = caption_code_encoder("codes", ds.captions, np.load(data / "codes.npy"))
    micro = {k: v for k, v in vars(micro_emoji_config()).items() if k not in ("text_dim", "text_tokens")}
    config.EMOJI_PRESETS["micro"] = micro
    config.EMOJI_TRAIN_PRESETS["micro"] = dict(batch_size=8, lr=2e-3, warmup_steps=2, ema_decay=0.9)
    return cli.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
