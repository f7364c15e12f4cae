"""Values a user types, and contracts a run keeps: every numeric flag's boundaries end in one
`error:` line and a non-zero exit (never a traceback, never a silently different meaning);
resume keeps or refuses settings in one line; SIGTERM saves like Ctrl-C; a refused run
leaves nothing behind."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest

import cli
from conftest import caption_code_encoder, make_shapes_dataset, micro_emoji_config, quick_train_config
from mlxflow import api
from mlxflow import encoders as text
from mlxflow.checkpoint import checkpoint_step, list_checkpoints
from mlxflow.errors import MlxflowError
from mlxflow.families import load_checkpoint
from mlxflow.train.mlx_session import train
from test_long_runs import finish, start, wait_for_step


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_error(capsys, *argv) -> str:
    code, _, err = run(capsys, *argv)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, (code, err)
    return lines[0]


@pytest.fixture
def trained(tmp_path, monkeypatch):
    """A 3-step micro emoji run on the shapes set, with its caption encoder registered as "fake"."""
    ds, emb = make_shapes_dataset(tmp_path / "d", n=16)
    monkeypatch.setitem(text._CACHE, "fake", caption_code_encoder("fake", ds.captions, emb))
    train(tmp_path / "r", ds, micro_emoji_config(), quick_train_config(steps=3), family="emoji",
          text_encoder="fake", embeddings=emb)
    return tmp_path / "r"


@pytest.mark.parametrize("flags, message", [
    (["--n", "0"], "n must be a whole number >= 1, got 0"),
    (["--n", "-2"], "n must be a whole number >= 1, got -2"),
    (["--steps", "0"], "steps must be a whole number >= 1, got 0"),
    (["--steps", "-3"], "steps must be a whole number >= 1"),
    (["--shift", "0"], "shift must be a number > 0, got 0"),
    (["--shift", "-1.5"], "shift must be a number > 0"),
    (["--shift", "nan"], "shift must be a number > 0"),
    (["--seed", "-1"], "seed must be a whole number from 0 to"),
    (["--seed", str(2**64)], "seed must be a whole number from 0 to"),
    (["--cfg", "-1"], "CFG scale must be a number >= 0"),
    (["--cfg-interval", "0.8", "0.2"], "CFG interval must satisfy 0 <= LO <= HI <= 1"),
    (["--preview-dir", "p", "--preview-every", "-1"], "preview-every must be >= 0"),
    (["--device", "cuda"], "--device cuda is for the torch twin"),
    (["--class", "1"], "--class is for class-conditional models"),
])
def test_sample_flag_boundaries(trained, tmp_path, capsys, flags, message):
    line = one_error(capsys, "sample", trained, "red square", "--output", tmp_path / "x.png", *flags)
    assert message in line
    assert not (tmp_path / "x.png").exists()


def test_sample_torch_on_a_missing_cuda_is_one_line(trained, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = one_error(capsys, "sample", trained, "red square", "--output", tmp_path / "x.png", "--framework", "torch",
                     "--device", "cuda")
    assert "no CUDA device" in line


def test_unseen_prompt_names_the_nearest_training_caption(trained, tmp_path, capsys):
    code, out, err = run(capsys, "sample", trained, "red square", "purple cat wearing a hat", "--n", "1", "--steps", "2",
                         "--output", tmp_path / "x.png")
    assert code == 0, err
    assert "'purple cat wearing a hat' is not one of the training captions; the nearest" in out
    assert "'red square' is not" not in out and (tmp_path / "x.png").exists()


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "lr must be a number > 0, got -1"),
    (["--lr", "0"], "lr must be a number > 0"),
    (["--steps", "0"], "steps must be a whole number >= 1, got 0"),
    (["--batch-size", "0"], "batch-size must be a whole number >= 1"),
    (["--grad-accum", "0"], "grad-accum must be a whole number >= 1"),
    (["--ckpt-every", "-5"], "ckpt-every must be a whole number >= 0"),
    (["--t-shift", "0"], "t-shift must be a number > 0, got 0"),
    (["--t-shift", "-2"], "t-shift must be a number > 0, got -2"),
    (["--t-shift", "nan"], "t-shift must be a number > 0, got nan"),
    (["--t-shift", "inf"], "t-shift must be a number > 0, got inf"),
    (["--t-unshifted", "-0.1"], "t-unshifted must be in [0, 1), got -0.1"),
    (["--t-unshifted", "1"], "t-unshifted must be in [0, 1), got 1"),
    (["--t-unshifted", "nan"], "t-unshifted must be in [0, 1), got nan"),
    (["--batch-size", "8", "--t-unshifted", "0.1", "--t-shift", "4"], "t-unshifted 0.1 marks no row of a batch of 8"),
    (["--t-unshifted", "0.25"], "t-unshifted 0.25 has no effect with t-shift 1"),
    (["--cond-dropout", "-0.1"], "cond-dropout must be in [0, 1), got -0.1"),
    (["--cond-dropout", "1"], "cond-dropout must be in [0, 1), got 1"),
    (["--cond-dropout", "nan"], "cond-dropout must be in [0, 1), got nan"),
    (["--device", "cuda"], "--device cuda is for the torch trainer"),
])
def test_train_flag_boundaries_write_nothing(tmp_path, capsys, flags, message):
    make_shapes_dataset(tmp_path / "d", n=16)
    line = one_error(capsys, "train", "emoji", "--data", tmp_path / "d", "--out", tmp_path / "r", "--preset", "tiny",
                     "--steps", "3", *flags)
    assert message in line
    assert not (tmp_path / "r").exists()  # no checkpoint, and no empty run folder either


def test_a_refused_start_leaves_no_folder(tmp_path, capsys):
    """A run refused after the run lock was taken (too few images for the batch) leaves nothing."""
    ds, emb = make_shapes_dataset(tmp_path / "d", n=4)
    np.save(tmp_path / "emb.npy", emb)
    line = one_error(capsys, "train", "emoji", "--data", tmp_path / "d", "--out", tmp_path / "r", "--preset", "tiny",
                     "--batch-size", "16", "--embeddings", tmp_path / "emb.npy")
    assert "batch size 16" in line
    assert not (tmp_path / "r").exists()


def test_resume_keeps_or_refuses_settings_in_one_line(tmp_path, capsys):
    ds, emb = make_shapes_dataset(tmp_path / "d", n=16)
    np.save(tmp_path / "emb.npy", emb)
    base = ["train", "emoji", "--data", tmp_path / "d", "--out", tmp_path / "r", "--preset", "tiny",
            "--batch-size", "8", "--embeddings", tmp_path / "emb.npy", "--ckpt-every", "2"]
    code, _, err = run(capsys, *base, "--steps", "2")
    assert code == 0, err
    for flags, message in [(["--batch-size", "4"], "--batch-size 4: a resumed run keeps its batch size 8"),
                           (["--preset", "default"], "--preset default: a resumed run keeps its preset 'tiny'"),
                           (["--grad-accum", "2"], "--grad-accum 2: a resumed run keeps its grad accum 1"),
                           (["--text-encoder", "minilm"], "--text-encoder minilm: a resumed run keeps its encoder"),
                           (["--t-shift", "3"], "--t-shift 3.0: a resumed run keeps its t shift 1.0"),
                           (["--cond-dropout", "0.3"], "--cond-dropout 0.3: a resumed run keeps its cond dropout 0.15")]:
        argv = [a for a in base if a not in ("--preset", "tiny")] if "--preset" in flags else list(base)
        if "--batch-size" in flags:
            argv = argv[:argv.index("--batch-size")] + argv[argv.index("--batch-size") + 2:]
        assert message in one_error(capsys, *argv, "--steps", "4", "--resume", "latest", *flags)
    assert checkpoint_step(list_checkpoints(tmp_path / "r")[-1]) == 2  # nothing was trained by the refusals
    # lr is honoured (and said); the schedule continues at the new peak.
    code, _, err = run(capsys, *base, "--steps", "4", "--resume", "latest", "--lr", "1e-4")
    assert code == 0, err
    assert "resuming with lr 0.0001 (the run had 0.002)" in err
    assert load_checkpoint(tmp_path / "r").train_config.lr == 1e-4


def test_checkpoint_records_the_resolved_dataset_path(tmp_path, capsys, monkeypatch):
    ds, emb = make_shapes_dataset(tmp_path / "d", n=16)
    np.save(tmp_path / "emb.npy", emb)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "train", "emoji", "--data", "d", "--out", "r", "--preset", "tiny", "--steps", "1",
                       "--batch-size", "8", "--embeddings", "emb.npy")
    assert code == 0, err
    state = json.loads(next((tmp_path / "r").glob("step-*/state.json")).read_text())
    assert state["dataset"] == str((tmp_path / "d").resolve())


def test_sigterm_saves_like_ctrl_c(tmp_path):
    ds, emb = make_shapes_dataset(tmp_path / "data")
    np.save(tmp_path / "data" / "codes.npy", emb)
    run_dir = tmp_path / "run"
    proc, lines = start(tmp_path / "data", run_dir, "--steps", "100000", "--ckpt-every", "0"), []
    wait_for_step(proc, 3, lines)
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc, lines)
    assert code == 130, err[-2000:]
    assert "SIGTERM: stopping at the next step report and saving a checkpoint" in err
    step = checkpoint_step(list_checkpoints(run_dir)[-1])
    assert step >= 3 and f"interrupted at step {step}" in err


def test_data_emoji_with_a_bad_encoder_writes_nothing(tmp_path, capsys):
    line = one_error(capsys, "data", "emoji", tmp_path / "e", "--limit", "4", "--text-encoder", "nope")
    assert "unknown text encoder 'nope'" in line
    assert not (tmp_path / "e").exists()


def test_fidelity_and_solvers_on_unconditional_and_class_models(tmp_path, capsys):
    from PIL import Image

    from test_jit_family import micro_jit, write_class_folder

    src = tmp_path / "faces"
    src.mkdir()
    for i in range(8):
        Image.fromarray(np.full((20, 24, 3), 30 * i, np.uint8)).save(src / f"{i}.jpg")
    assert cli.main(["data", "folder", str(tmp_path / "u"), "--images", str(src), "--unconditional", "--size", "16"]) == 0
    api.train_model("jit", tmp_path / "u", tmp_path / "ru", preset="tiny", steps=2, model_overrides=vars(micro_jit()),
                    train_overrides=dict(batch_size=4, ckpt_every=0), sample_prompts=0)
    capsys.readouterr()
    assert "needs a conditioned model; this checkpoint is unconditional" in \
        one_error(capsys, "fidelity", tmp_path / "ru", "--data", tmp_path / "u")
    code, out, err = run(capsys, "solvers", tmp_path / "ru", "--n", "2", "--schedule", "euler:2", "heun:1")
    assert code == 0, err
    assert "euler" in out and "heun" in out

    write_class_folder(tmp_path / "photos", ("blue", "red"))
    assert cli.main(["data", "classes", str(tmp_path / "c"), "--images", str(tmp_path / "photos"), "--size", "16"]) == 0
    api.train_model("jit", tmp_path / "c", tmp_path / "rc", preset="tiny", steps=2,
                    model_overrides=dict(vars(micro_jit()), text_dim=8),
                    train_overrides=dict(batch_size=4, ckpt_every=0), sample_prompts=0)
    capsys.readouterr()
    code, out, err = run(capsys, "fidelity", tmp_path / "rc", "--data", tmp_path / "c", "--k", "16", "--n", "2",
                         "--steps", "2")
    assert code == 0, err
    assert "for each of 2 prompts" in out  # two classes, however many were asked for


def test_export_refuses_a_non_empty_folder(trained, tmp_path, capsys):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "keep.txt").write_text("mine")
    line = one_error(capsys, "export", "coreml", trained, tmp_path / "app")
    assert "already exists and is not empty" in line and "--overwrite" in line
    assert (tmp_path / "app" / "keep.txt").read_text() == "mine"


def test_schedule_values_are_checked(trained, capsys):
    for spec in ("euler", "euler:0", "euler:4:0", "dopri:4", "euler:x"):
        assert "--schedule" in one_error(capsys, "solvers", trained, "red square", "--schedule", spec)


def test_t_shift_flags_are_honoured_and_kept(tmp_path, capsys):
    """--t-shift and --t-unshifted reach the trainer's config and are recorded in the checkpoint."""
    ds, emb = make_shapes_dataset(tmp_path / "d", n=16)
    np.save(tmp_path / "emb.npy", emb)
    code, _, err = run(capsys, "train", "emoji", "--data", tmp_path / "d", "--out", tmp_path / "r", "--preset", "tiny",
                       "--batch-size", "8", "--steps", "1", "--embeddings", tmp_path / "emb.npy", "--t-shift", "4",
                       "--t-unshifted", "0.25")
    assert code == 0, err
    kept = load_checkpoint(tmp_path / "r").train_config
    assert (kept.t_shift, kept.t_unshifted) == (4.0, 0.25)
    line = one_error(capsys, "train", "emoji", "--data", tmp_path / "d", "--out", tmp_path / "r", "--preset", "tiny",
                     "--batch-size", "8", "--steps", "2", "--embeddings", tmp_path / "emb.npy", "--resume", "latest",
                     "--t-shift", "4", "--t-unshifted", "0.5")
    assert "--t-unshifted 0.5: a resumed run keeps its t unshifted 0.25" in line


def test_cond_dropout_flag_and_a_run_without_guidance(tmp_path, capsys):
    """--cond-dropout reaches the trainer and the checkpoint; a run trained with 0 has no
    unconditional model, so it samples without guidance by default and refuses --cfg 3 in one line."""
    ds, emb = make_shapes_dataset(tmp_path / "d", n=16)
    np.save(tmp_path / "emb.npy", emb)
    base = ["train", "emoji", "--data", tmp_path / "d", "--preset", "tiny", "--batch-size", "8", "--steps", "1",
            "--embeddings", tmp_path / "emb.npy", "--sample-every", "0"]
    code, _, err = run(capsys, *base, "--out", tmp_path / "r", "--cond-dropout", "0.05")
    assert code == 0, err
    assert load_checkpoint(tmp_path / "r").train_config.cond_dropout == 0.05
    # 0 trains (its end-of-run grid samples without guidance) and is kept.
    code, _, err = run(capsys, *base, "--out", tmp_path / "r0", "--cond-dropout", "0")
    assert code == 0, err
    assert load_checkpoint(tmp_path / "r0").train_config.cond_dropout == 0.0
    gen = api.generator(tmp_path / "r0")
    assert gen.defaults.cfg == 1.0 and api.generator(tmp_path / "r").defaults.cfg == 3.0
    images = gen(conditions=emb[:2], steps=2)
    assert images.shape == (2, 32, 32, 3)
    with pytest.raises(MlxflowError, match="CFG 3 needs an unconditional model"):
        gen(conditions=emb[:2], steps=2, cfg=3.0)
