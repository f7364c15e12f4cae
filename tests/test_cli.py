"""The command line: one clear line and a non-zero exit for user mistakes; the happy path end to end."""

import json

import numpy as np
import pytest

import cli
from mlxflow.checkpoint import save_checkpoint

from conftest import caption_code_encoder, make_shapes_dataset, micro_emoji_config, quick_train_config


def run(capsys, *argv):
    code = cli.main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    return lines[0]


def test_unknown_preset(capsys, tmp_path):
    make_shapes_dataset(tmp_path / "d", n=8)
    code, _, err = run(capsys, "train", "emoji", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"),
                       "--preset", "huge", "--steps", "1")
    assert code == 1 and "unknown preset 'huge'" in one_error_line(err)


def test_missing_dataset(capsys, tmp_path):
    code, _, err = run(capsys, "train", "emoji", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"))
    assert code == 1 and str(tmp_path / "nope") in one_error_line(err)


def test_corrupt_image_in_folder(capsys, tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    (src / "a.png").write_bytes(b"not a png")
    (src / "captions.tsv").write_text("a.png\ta thing\n")
    code, _, err = run(capsys, "data", "folder", str(tmp_path / "ds"), "--images", str(src), "--no-embed")
    assert code == 1 and "a.png" in one_error_line(err)


def test_no_font(capsys, tmp_path, monkeypatch):
    from mlxflow.data import emoji as emoji_data

    monkeypatch.setattr(emoji_data, "_FONT_CANDIDATES", ())
    monkeypatch.setattr(emoji_data, "_fc_match", lambda: None)
    code, _, err = run(capsys, "data", "emoji", str(tmp_path / "e"), "--no-embed")
    assert code == 1 and "fonts-noto-color-emoji" in one_error_line(err)


def test_wrong_checkpoint(capsys, tmp_path):
    save_checkpoint(tmp_path / "run", 1, family="emoji", model_config=micro_emoji_config(),
                    train_config=quick_train_config(), text_encoder="minilm",
                    weights={"stem.weight": np.zeros((1,), np.float32)})
    code, _, err = run(capsys, "sample", str(tmp_path / "run"), "a", "--output", str(tmp_path / "x.png"))
    assert code == 1 and "does not fit the model" in one_error_line(err)
    code, _, err = run(capsys, "sample", str(tmp_path), "a", "--output", str(tmp_path / "x.png"))
    assert code == 1 and "neither a checkpoint" in one_error_line(err)
    (tmp_path / "run" / "step-0000001" / "config.json").write_text("{broken")
    code, _, err = run(capsys, "sample", str(tmp_path / "run"), "a", "--output", str(tmp_path / "x.png"))
    assert code == 1 and "config.json" in one_error_line(err)
    assert not (tmp_path / "x.png").exists()


def test_train_sample_round_trip(capsys, tmp_path, monkeypatch):
    """Train through the CLI on a tiny synthetic set with a fake encoder, then sample a grid."""
    from mlxflow.configs import emoji as config
    from mlxflow import encoders as text

    ds, emb = make_shapes_dataset(tmp_path / "d", n=16)

    monkeypatch.setitem(text._CACHE, "fake", caption_code_encoder("fake", ds.captions, emb))
    micro = {k: v for k, v in vars(micro_emoji_config()).items() if k not in ("text_dim", "text_tokens")}
    monkeypatch.setitem(config.EMOJI_PRESETS, "micro", micro)
    monkeypatch.setitem(config.EMOJI_TRAIN_PRESETS, "micro", dict(batch_size=8, lr=2e-3, warmup_steps=2))
    code, out, err = run(capsys, "train", "emoji", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"),
                         "--preset", "micro", "--steps", "4", "--text-encoder", "fake", "--ckpt-every", "2")
    assert code == 0, err
    assert (tmp_path / "r" / "step-0000004" / "model.safetensors").exists()
    assert (tmp_path / "r" / "samples" / "step-0000004.png").exists()
    state = json.loads((tmp_path / "r" / "step-0000004" / "state.json").read_text())
    assert state["step"] == 4
    code, out, err = run(capsys, "train", "emoji", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"),
                         "--steps", "6", "--resume", "latest")
    assert code == 0, err
    code, out, err = run(capsys, "sample", str(tmp_path / "r"), "red square", "blue disc", "--n", "3", "--steps", "4",
                         "--solver", "euler", "--output", str(tmp_path / "g.png"), "--preview-dir",
                         str(tmp_path / "prev"), "--preview-every", "2")
    assert code == 0, err
    from PIL import Image

    grid = Image.open(tmp_path / "g.png")
    assert grid.size[0] > grid.size[1]  # 3 columns x 2 rows
    assert sorted(p.name for p in (tmp_path / "prev").iterdir()) == ["step-002.png", "step-004.png"]
    code, out, err = run(capsys, "sample", str(tmp_path / "r"), "x", "--output", str(tmp_path / "g.jpg"))
    assert code == 1 and ".png" in one_error_line(err)


def test_export_options_parse():
    args = cli.build_parser().parse_args(["export", "coreml", "RUN", "OUT", "--target", "iOS18",
                                          "--compress", "palettize6", "--batch-sizes", "1", "2", "4"])
    assert (args.target, args.deployment_target, args.compress, args.batch_sizes) == \
        ("coreml", "iOS18", "palettize6", [1, 2, 4])


def test_sample_with_the_torch_twin_matches_mlx(capsys, tmp_path, monkeypatch):
    """`sample --framework torch` draws the same images as MLX from the same checkpoint and seed."""
    pytest.importorskip("torch")
    from PIL import Image

    from mlxflow import encoders as text
    from mlxflow.train.mlx_session import train

    ds, emb = make_shapes_dataset(tmp_path / "d", n=16)
    monkeypatch.setitem(text._CACHE, "fake", caption_code_encoder("fake", ds.captions, emb))
    train(tmp_path / "r", ds, micro_emoji_config(), quick_train_config(steps=3), family="emoji",
          text_encoder="fake", embeddings=emb)
    grids = {}
    for fw in ("mlx", "torch"):
        code, out, err = run(capsys, "sample", str(tmp_path / "r"), "red square", "blue disc", "--n", "2",
                             "--steps", "4", "--framework", fw, "--device", "cpu", "--output", str(tmp_path / f"{fw}.png"))
        assert code == 0, err
        grids[fw] = np.asarray(Image.open(tmp_path / f"{fw}.png"), np.int16)
    assert grids["mlx"].shape == grids["torch"].shape
    # Same noise, same weights, fp32 in both: pixels differ by rounding at most one level.
    assert np.abs(grids["mlx"] - grids["torch"]).max() <= 1


def test_cli_api_and_serve_draw_the_same_images(capsys, tmp_path, monkeypatch):
    """No sampling flags anywhere: `mlxflow sample`, api.sample, a Generator and the web page's
    defaults all resolve the family's defaults in one place and give bit-identical images."""
    from PIL import Image

    from mlxflow import api
    from mlxflow import encoders as text
    from mlxflow.serve import load, parse_request, run_request
    from mlxflow.train.mlx_session import train

    ds, emb = make_shapes_dataset(tmp_path / "d", n=16)
    monkeypatch.setitem(text._CACHE, "fake", caption_code_encoder("fake", ds.captions, emb))
    train(tmp_path / "r", ds, micro_emoji_config(), quick_train_config(steps=3), family="emoji",
          text_encoder="fake", embeddings=emb)
    prompts = ["red square", "blue disc"]
    code, _, err = run(capsys, "sample", str(tmp_path / "r"), *prompts, "--output", str(tmp_path / "cli.png"))
    assert code == 0, err
    cli_grid = np.asarray(Image.open(tmp_path / "cli.png"))
    api.sample(tmp_path / "r", prompts, tmp_path / "api.png", n=4)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "api.png")), cli_grid)
    gen = api.generator(tmp_path / "r")
    assert (gen.defaults.solver, gen.defaults.steps, gen.defaults.cfg) == ("ab2", 20, 3.0)  # the emoji family's
    images = gen(prompts, n=4)
    assert np.array_equal(np.asarray(api.make_grid(images, ncols=4, scale=2)), cli_grid)
    loaded = load(tmp_path / "r")
    d = loaded.defaults
    req = parse_request("text", "\n".join(prompts), None, 4, d["steps"], d["solver"], d["cfg"], 0, 5)
    *_, (step, total, grid) = run_request(loaded, req)
    assert step == total == 20
    assert np.array_equal(np.asarray(grid), cli_grid[::2, ::2])
