"""One DDP rank for tests/test_ddp.py (a module of its own so torch.multiprocessing.spawn can import it)."""

import json
import os
from pathlib import Path


def run_rank(rank: int, world: int, port: int, run_dir: str, data_dir: str, emb_path: str, cfg_kwargs: dict,
             model_kwargs: dict, out_dir: str) -> None:
    import numpy as np
    import torch

    from conftest import micro_emoji_config, quick_train_config
    from mlxflow.train.torch_session import train_torch

    torch.set_num_threads(1)  # two ranks share two cores
    # What torchrun would set; train_torch reads it and joins a gloo group.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    out = train_torch(run_dir, data_dir, micro_emoji_config(**model_kwargs), quick_train_config(**cfg_kwargs), family="emoji",
                      embeddings=np.load(emb_path))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"digest": out["digest"], "losses": out["losses"], "world_size": out["world_size"]}))
