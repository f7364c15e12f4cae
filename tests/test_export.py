"""End to end on trained checkpoints: crosscheck after MLX and torch training, `mlxflow export coreml`."""

import json

import numpy as np
import pytest

import cli
from mlxflow.checkpoint import save_checkpoint
from mlxflow.crosscheck import crosscheck
from mlxflow.train.mlx_session import train

from conftest import caption_code_encoder, micro_emoji_config, quick_train_config

pytest.importorskip("torch", reason="torch is not installed")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A micro checkpoint trained 4 steps by the MLX trainer on the synthetic shapes set."""
    from conftest import make_shapes_dataset

    from mlxflow import encoders as text

    root = tmp_path_factory.mktemp("trained")
    ds, emb = make_shapes_dataset(root / "data", n=16)

    text._CACHE["shapes"] = caption_code_encoder("shapes", ds.captions, emb)
    out = train(root / "run", ds, micro_emoji_config(), quick_train_config(steps=4, weight_decay=0.01),
                family="emoji", text_encoder="shapes", embeddings=emb)
    yield root, out["checkpoint"]
    text._CACHE.pop("shapes")


def test_crosscheck_on_mlx_trained_checkpoint(trained):
    _, ckpt = trained
    report = crosscheck(ckpt, batch=2, steps=4)
    assert report.passed, [r for r in report.rows]


def test_crosscheck_on_torch_trained_checkpoint(tmp_path):
    from conftest import make_shapes_dataset
    from mlxflow.train.torch_session import train_torch

    ds, emb = make_shapes_dataset(tmp_path / "data", n=16)
    out = train_torch(tmp_path / "run", ds, micro_emoji_config(), quick_train_config(steps=3), family="emoji",
                      embeddings=emb)
    assert crosscheck(out["checkpoint"], batch=2, steps=4).passed


def test_export_coreml_cli(trained, capsys):
    pytest.importorskip("coremltools", reason="coremltools is not installed")
    root, ckpt = trained
    code = cli.main(["export", "coreml", str(ckpt), str(root / "app"), "--precision", "fp16"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert (root / "app" / "EmojiDenoiser.mlpackage").is_dir()
    report = json.loads((root / "app" / "export.json").read_text())
    assert report["denoiser_psnr_db"] >= 35 and report["trajectory_psnr_db"] >= 35
    assert report["metadata"]["train_steps"] == 4 and report["metadata"]["family"] == "emoji"
    labels = json.loads((root / "app" / "labels.json").read_text())
    assert labels["shape"] == [16, 1, 8] and labels["prompts"][0] == "red square"
    assert report["text_encoder"].startswith("skipped")  # only MiniLM encoders export to Core ML


def test_export_refuses_bad_checkpoints(trained, tmp_path, capsys):
    root, _ = trained
    save_checkpoint(tmp_path / "broken", 1, family="emoji", model_config=micro_emoji_config(),
                    train_config=quick_train_config(), text_encoder="minilm",
                    weights={"stem.weight": np.zeros((2, 2), np.float32)})
    code = cli.main(["export", "coreml", str(tmp_path / "broken"), str(tmp_path / "app")])
    err = capsys.readouterr().err
    assert code == 1 and "does not fit the model" in err and not (tmp_path / "app").exists()
    ck = tmp_path / "broken" / "step-0000001"
    cfg = json.loads((ck / "config.json").read_text())
    cfg["family"] = "dit"
    (ck / "config.json").write_text(json.dumps(cfg))
    code = cli.main(["export", "coreml", str(ck), str(tmp_path / "app")])
    err = capsys.readouterr().err
    assert code == 1 and "error:" in err and "Traceback" not in err
