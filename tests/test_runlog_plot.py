"""Run log (log.jsonl) and `plot_run`: torn lines, resume truncation, NaN -> null, the PNG."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mlxflow.errors import MlxflowError
from mlxflow.plot import COLUMNS, DPI, PANEL_H, PANEL_W, _panels, plot_run
from mlxflow.runlog import LOG_NAME, RunLog, read_log


def _write_run(run, steps=range(0, 50, 10), eval_every=20):
    with RunLog(run) as log:
        for s in steps:
            log.write("train", s, loss=1.0 / (s + 1), lr=1e-4 * s, grad_norm=0.5 + s, img_per_s=100.0 + s)
            if s % eval_every == 0:
                log.write("eval", s, eval_loss=2.0 / (s + 1), fid=300.0 - s, latent_std=np.float32(0.9))


def test_write_read_roundtrip_and_types(tmp_path):
    with RunLog(tmp_path) as log:
        rec = log.write("train", 3, loss=np.float32(0.25), lr=1e-3, grad_norm=np.float64(2.0), count=7)
    lines = (tmp_path / LOG_NAME).read_text().splitlines()
    assert len(lines) == 1
    got = json.loads(lines[0])
    assert got == rec
    assert got["step"] == 3 and got["kind"] == "train" and got["loss"] == 0.25 and got["count"] == 7
    assert isinstance(got["time"], float) and abs(got["time"] - rec["time"]) < 1e-9
    assert read_log(tmp_path) == [got]


def test_record_is_on_disk_before_close(tmp_path):
    log = RunLog(tmp_path)
    log.write("eval", 5, fid=12.5)
    # Flushed per record: another reader sees it while the log is still open.
    assert read_log(tmp_path)[0]["fid"] == 12.5
    log.close()


def test_nonfinite_written_as_null(tmp_path):
    with RunLog(tmp_path) as log:
        log.write("train", 1, loss=float("nan"), grad_norm=np.float32("inf"), lr=-math.inf, img_per_s=3.0)
    text = (tmp_path / LOG_NAME).read_text()
    assert "NaN" not in text and "Infinity" not in text
    rec = json.loads(text)  # strict JSON parses it
    assert rec["loss"] is None and rec["grad_norm"] is None and rec["lr"] is None and rec["img_per_s"] == 3.0


def test_bad_kind_and_reserved_names(tmp_path):
    with RunLog(tmp_path) as log:
        with pytest.raises(ValueError):
            log.write("test", 1, loss=1.0)
        with pytest.raises(ValueError):
            log.write("train", 1, time=1.0)
        with pytest.raises(TypeError):
            log.write("train", 1, loss=[1.0, 2.0])
    assert read_log(tmp_path) == []


def test_torn_last_line_tolerated_and_repaired_on_append(tmp_path):
    _write_run(tmp_path, steps=[0, 10])
    path = tmp_path / LOG_NAME
    with open(path, "a") as f:
        f.write('{"step": 20, "time": 1.0, "kind": "tra')  # a crash mid-write
    assert [r["step"] for r in read_log(tmp_path)] == [0, 0, 10]
    with RunLog(tmp_path) as log:  # reopening without resume must not glue onto the torn line
        log.write("train", 20, loss=0.1)
    assert [r["step"] for r in read_log(tmp_path)] == [0, 0, 10, 20]


def test_resume_drops_records_after_checkpoint(tmp_path):
    _write_run(tmp_path, steps=range(0, 50, 10))  # steps 0..40, evals at 0, 20, 40
    with open(tmp_path / LOG_NAME, "a") as f:
        f.write('{"step": 50, "ti')
    with RunLog(tmp_path, resume_step=20) as log:
        assert [r["step"] for r in read_log(tmp_path)] == [0, 0, 10, 20, 20]
        log.write("train", 30, loss=0.5)
    recs = read_log(tmp_path)
    assert [(r["step"], r["kind"]) for r in recs][-3:] == [(20, "train"), (20, "eval"), (30, "train")]
    assert recs[-1]["loss"] == 0.5
    assert not list(tmp_path.glob("*.tmp-*"))  # the rewrite left no temp file


def test_resume_with_nothing_to_drop_keeps_file(tmp_path):
    _write_run(tmp_path, steps=[0, 10])
    before = (tmp_path / LOG_NAME).read_bytes()
    RunLog(tmp_path, resume_step=10).close()
    assert (tmp_path / LOG_NAME).read_bytes() == before


def test_runlog_missing_folder(tmp_path):
    with pytest.raises(MlxflowError, match="not found"):
        RunLog(tmp_path / "nope")


def test_plot_png_size_and_panels(tmp_path):
    from PIL import Image

    _write_run(tmp_path)
    panels = _panels(read_log(tmp_path))
    titles = [t for t, _ in panels]
    # loss (train + eval on one log axis), lr, grad norm, img/s, FID, then the other eval metric.
    assert titles == ["loss", "learning rate", "grad norm", "images / s", "FID", "latent_std"]
    assert panels[0][1] == [("train", "loss"), ("eval", "eval_loss")]
    out = plot_run(tmp_path)
    assert out == tmp_path / "curves.png"
    with Image.open(out) as im:
        im.load()
        rows = math.ceil(len(panels) / COLUMNS)
        assert im.format == "PNG"
        assert im.size == (round(PANEL_W * COLUMNS * DPI), round(PANEL_H * rows * DPI))
        assert np.asarray(im.convert("L")).std() > 1  # something was drawn


def test_plot_custom_out_torn_line_and_nulls(tmp_path):
    from PIL import Image

    with RunLog(tmp_path) as log:
        log.write("train", 0, loss=float("nan"), lr=1e-4)
        log.write("train", 1, loss=0.5, lr=2e-4)
    with open(tmp_path / LOG_NAME, "a") as f:
        f.write('{"step": 2, "kind": "train", "loss": 0.')
    out = plot_run(tmp_path, out=tmp_path / "sub" / "c.png")
    assert out.is_file()
    with Image.open(out) as im:  # two panels: loss, lr
        assert im.size == (round(PANEL_W * 2 * DPI), round(PANEL_H * DPI))


def test_plot_errors(tmp_path):
    with pytest.raises(MlxflowError, match="not found"):
        plot_run(tmp_path / "missing")
    with pytest.raises(MlxflowError, match="no log.jsonl"):
        plot_run(tmp_path)
    (tmp_path / LOG_NAME).write_text('{"step": 1, "kind": "tr')
    with pytest.raises(MlxflowError, match="no metric records") as e:
        plot_run(tmp_path)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "curves.png").exists()


def test_runs_log_a_fidelity_estimate_with_every_grid(tmp_path, monkeypatch):
    """`sample_every` writes a grid and logs the share of spread training prompts drawn nearest
    their own image; `mlxflow plot` gives it a panel."""
    from conftest import caption_code_encoder, make_shapes_dataset, micro_emoji_config

    from mlxflow import api
    from mlxflow import encoders as text

    ds, emb = make_shapes_dataset(tmp_path / "d", n=16)
    monkeypatch.setitem(text._CACHE, "fake", caption_code_encoder("fake", ds.captions, emb))
    micro = {k: v for k, v in vars(micro_emoji_config()).items() if k not in ("text_dim", "text_tokens")}
    api.train_model("emoji", tmp_path / "d", tmp_path / "r", preset="tiny", steps=4, text_encoder="fake",
                    model_overrides=dict(micro, text_dim=emb.shape[2], text_tokens=emb.shape[1]),
                    train_overrides=dict(batch_size=8, sample_every=2, ckpt_every=0, sample_steps=2),
                    sample_prompts=4)
    evals = [r for r in read_log(tmp_path / "r") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0.0 <= r["sample_fidelity"] <= 1.0 for r in evals)
    assert sorted(p.name for p in (tmp_path / "r" / "samples").iterdir()) == ["step-0000002.png", "step-0000004.png"]
    assert ("eval", "sample_fidelity") in [curve for _, curves in _panels(read_log(tmp_path / "r")) for curve in curves]
    assert plot_run(tmp_path / "r").is_file()
