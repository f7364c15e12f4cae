"""`mlxflow plot RUN`: the curves of a run's ``log.jsonl`` as one PNG.

One panel per metric, step on x: loss (train, with eval_loss on the same axes when
present) on a log y-axis, then lr, grad_norm, img_per_s, fid, and every other metric
found, train ones first. matplotlib is imported lazily with the Agg backend, so the rest
of mlxflow never pays for it and it works without a display.
"""

from __future__ import annotations

import math
from pathlib import Path

from .errors import MlxflowError
from .runlog import LOG_NAME, read_log

_FIELDS = ("step", "time", "kind")
_FIRST = ("loss", "lr", "grad_norm", "img_per_s", "fid")  # panel order; the rest follow
_TITLES = {"loss": "loss", "lr": "learning rate", "grad_norm": "grad norm", "img_per_s": "images / s", "fid": "FID"}
PANEL_W, PANEL_H, COLUMNS, DPI = 4.0, 3.0, 3, 100


def _series(records: list[dict], kind: str, name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, skipping nulls and non-numbers."""
    xs, ys = [], []
    for r in records:
        v = r.get(name)
        if r.get("kind") == kind and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _panels(records: list[dict]) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(title, [(kind, metric), ...]), ...]: which curves go on which panel, in order."""
    names = {"train": [], "eval": []}  # metrics with at least one finite value, first-seen order
    for r in records:
        kind = r.get("kind")
        if kind in names:
            names[kind] += [k for k in r if k not in _FIELDS and k not in names[kind] and _series([r], kind, k)[0]]

    def title(kind, name):
        base = _TITLES.get(name, name)
        other = "eval" if kind == "train" else "train"
        return f"{base} ({kind})" if name in names[other] else base

    panels, shown = [], set()
    loss = [c for c in (("train", "loss"), ("eval", "eval_loss")) if c[1] in names[c[0]]]
    if loss:
        panels.append(("loss", loss))
        shown.update(loss)
    ordered = [(kind, name) for name in _FIRST[1:] for kind in ("train", "eval") if name in names[kind]]
    ordered += [(kind, name) for kind in ("train", "eval") for name in names[kind]]
    for curve in ordered:
        if curve not in shown:
            panels.append((title(*curve), [curve]))
            shown.add(curve)
    return panels


def plot_run(run_dir, out=None) -> Path:
    """Draw ``<run_dir>/log.jsonl`` to a PNG (default ``<run_dir>/curves.png``); returns its path.

    The figure is COLUMNS panels wide, PANEL_W x PANEL_H inches each at DPI.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MlxflowError(f"run folder not found: {run_dir}")
    if not (run_dir / LOG_NAME).is_file():
        raise MlxflowError(f"{run_dir} has no {LOG_NAME} (runs write it while training)")
    records = read_log(run_dir)
    panels = _panels(records)
    if not panels:
        raise MlxflowError(f"{run_dir / LOG_NAME} has no metric records to plot")
    out = Path(out) if out is not None else run_dir / "curves.png"

    # Agg canvas on a bare Figure: no pyplot, so no global backend switch or GUI needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(COLUMNS, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(PANEL_W * cols, PANEL_H * rows), dpi=DPI)
    FigureCanvasAgg(fig)
    for i, (title, curves) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        positive = True
        for kind, name in curves:
            xs, ys = _series(records, kind, name)
            positive &= all(y > 0 for y in ys)
            style = dict(marker="o", markersize=3) if kind == "eval" or len(xs) < 3 else {}
            ax.plot(xs, ys, label=kind if len(curves) > 1 else None, linewidth=1, **style)
        if title == "loss" and positive:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if len(curves) > 1:
            ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix or '.png'}")
    fig.savefig(tmp, format="png", dpi=DPI)
    tmp.replace(out)
    return out
