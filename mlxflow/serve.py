"""`mlxflow serve`: a Gradio page in front of one checkpoint.

The page streams the image while the ODE integrates: the click handler is a generator,
and every frame it yields (a decoded grid every `preview` solver steps) is pushed to the
browser by Gradio's queue; the last one is the final grid, also offered as a PNG download.
The checkpoint is loaded once at start-up; requests run one at a time (queue concurrency
1), so several tabs can generate at once and each waits its turn.

No model logic lives here: everything goes through mlxflow.api (a loaded Generator), so the
page draws what `mlxflow sample` draws for the same settings. Gradio is an optional extra
(`pip install 'mlxflow[demo]'`), imported only when a page is built.
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from . import api
from .api import MlxflowError

MAX_STEPS = 200
MAX_PROMPTS = 16
MAX_PER_PROMPT = 16
MAX_IMAGES = 64
DISPLAY_WIDTH = 512  # frames are scaled up (nearest) to about this width, at most 8x
CSS = "#mlxflow-image img { image-rendering: pixelated; }"
FALLBACK_DEFAULTS = dict(steps=20, solver="heun", cfg=3.0, cfg_interval=None)


def solver_names() -> tuple[str, ...]:
    """The registered ODE solvers (mlxflow.solvers): euler, heun, midpoint, rk4, ..."""
    return tuple(api.SOLVERS)


@dataclass
class Loaded:
    """What start-up produced: the loaded Generator, or the reason there is none."""
    info: dict = field(default_factory=dict)  # Generator.info()
    generator: object = None  # mlxflow.pipeline.Generator
    defaults: dict = field(default_factory=lambda: dict(FALLBACK_DEFAULTS))  # steps, solver, cfg, cfg_interval
    error: str | None = None


def load(ckpt) -> Loaded:
    """Read the checkpoint once, build the network with its (EMA) weights and warm the text
    encoder. Raises MlxflowError for a path that is not a usable checkpoint.
    """
    gen = api.generator(ckpt)
    d = gen.defaults  # the family's own (JiT: 50 steps, CFG interval), as `mlxflow sample` uses
    defaults = dict(steps=d.steps, solver=d.solver, cfg=d.cfg, cfg_interval=d.cfg_interval, shift=d.shift)
    if gen.kind == "text":
        gen.conditions(["warm-up"])  # the encoder is cached by spec: the first request does not pay for it
    return Loaded(info=gen.info(), generator=gen, defaults=defaults)


def _scaled(grid, k: int):
    from PIL import Image

    return grid.resize((grid.width * k, grid.height * k), Image.NEAREST) if k > 1 else grid


def _for_display(grid):
    """Small grids (16-64 px images) scaled up by a whole factor, pixels kept sharp."""
    return _scaled(grid, max(1, min(8, DISPLAY_WIDTH // max(grid.width, 1))))


def parse_request(kind: str, prompts_text: str | None, classes: list[str] | None, n, steps, solver, cfg,
                  seed, preview) -> dict:
    """The page's inputs -> sample_frames arguments; MlxflowError with a message a person can act on."""
    def integer(value, name, lo, hi):
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise MlxflowError(f"{name} must be a number, got {value!r}") from None
        if v != int(v) or not lo <= v <= hi:
            raise MlxflowError(f"{name} must be a whole number from {lo} to {hi}, got {value}")
        return int(v)

    if kind == "text":
        prompts = [p.strip() for p in (prompts_text or "").splitlines() if p.strip()]
        if not prompts:
            raise MlxflowError("enter a prompt (one per line)")
    elif kind == "class":
        prompts = [str(c) for c in (classes or [])]
        if not prompts:
            raise MlxflowError("pick at least one class")
    else:
        prompts = []
    if len(prompts) > MAX_PROMPTS:
        raise MlxflowError(f"at most {MAX_PROMPTS} prompts at a time, got {len(prompts)}")
    n = integer(n, "number of images", 1, MAX_PER_PROMPT)
    if max(1, len(prompts)) * n > MAX_IMAGES:
        raise MlxflowError(f"at most {MAX_IMAGES} images at a time ({len(prompts)} prompts x {n})")
    steps = integer(steps, "steps", 1, MAX_STEPS)
    if solver not in solver_names():
        raise MlxflowError(f"unknown solver '{solver}' (known: {', '.join(solver_names())})")
    try:
        cfg = float(cfg)
    except (TypeError, ValueError):
        raise MlxflowError(f"CFG scale must be a number, got {cfg!r}") from None
    if not 0.0 <= cfg <= 30.0:
        raise MlxflowError(f"CFG scale must be from 0 to 30, got {cfg}")
    seed = integer(seed, "seed", 0, 2**31 - 1)
    preview = integer(preview, "preview interval", 1, MAX_STEPS)
    return dict(prompts=prompts, n=n, steps=steps, solver=solver, cfg_scale=cfg, seed=seed, preview=preview)


def run_request(loaded: Loaded, req: dict):
    """(step, total, grid) frames for a parsed request (parse_request), on the page's checkpoint;
    what the request leaves out (CFG interval, time shift) is the family's, as in `mlxflow sample`."""
    return api.sample_frames(loaded.generator, **req)


def _metadata_markdown(info: dict, defaults: dict) -> str:
    rows = [("family", info.get("family")), ("preset", info.get("preset") or "-"),
            ("training step", info.get("step")), ("trained with", info.get("framework")),
            ("conditioning", info.get("conditioning")), ("image size", f"{info.get('image_size')} px")]
    if info.get("conditioning") == "text":
        rows.append(("text encoder", info.get("text_encoder") or "-"))
    if info.get("conditioning") == "class":
        rows.append(("classes", len(info.get("classes") or [])))
    if defaults.get("cfg_interval") and info.get("conditioning") != "none":
        lo, hi = defaults["cfg_interval"]
        rows.append(("CFG applied for t in", f"[{lo:g}, {hi:g}]"))
    rows.append(("folder", f"`{info.get('path')}`"))
    return "### Checkpoint\n\n" + "\n".join(f"- {k}: **{v}**" if k != "folder" else f"- {k}: {v}" for k, v in rows)


class _Outputs:
    """Final grids to download: a private temp folder keeping only the newest few files."""

    def __init__(self, keep: int = 8):
        self.dir = Path(tempfile.mkdtemp(prefix="mlxflow-serve-"))
        self.keep, self.count = keep, 0

    def save(self, image, stem: str) -> str:
        self.count += 1
        path = api.save_png(image, self.dir / f"{stem}-{self.count:04d}.png")
        for old in sorted(self.dir.glob("*.png"), key=lambda p: p.stat().st_mtime)[:-self.keep]:
            old.unlink(missing_ok=True)
        return str(path)


def build_app(ckpt=None, *, loaded: Loaded | None = None):
    """The Gradio Blocks page for one checkpoint (not launched; see launch()).

    A checkpoint that fails to load gives a page that says why, with generation turned
    off, instead of no page at all.
    """
    gr = _gradio()
    if loaded is None:
        try:
            loaded = load(ckpt)
        except Exception as e:  # noqa: BLE001 - shown in the page; the server still starts
            if not isinstance(e, MlxflowError):
                traceback.print_exc()
            loaded = Loaded(error=f"{type(e).__name__ + ': ' if not isinstance(e, MlxflowError) else ''}{e}")
    info, defaults = loaded.info, loaded.defaults
    kind = info.get("conditioning", "none")
    outputs_dir = _Outputs()
    title = (f"mlxflow · {info['family']}/{info.get('preset') or 'custom'} · step {info['step']}"
             if not loaded.error else "mlxflow · no checkpoint")

    def generate(prompts_text, classes, n, steps, solver, cfg, seed, preview):
        """Yields (image, status, download) updates: a frame every `preview` steps, then the final grid."""
        if loaded.error:
            raise gr.Error(f"no model loaded: {loaded.error}")
        try:
            req = parse_request(kind, prompts_text, classes, n, steps, solver, cfg, seed, preview)
            yield None, "starting...", gr.update(value=None, visible=False)
            tic = time.perf_counter()
            for step, total, grid in run_request(loaded, req):
                if step < total:
                    yield _for_display(grid), f"step {step}/{total}", gr.skip()
            # The download is what `mlxflow sample` writes: the grid at 2x.
            path = outputs_dir.save(_scaled(grid, 2), f"mlxflow-{info['family']}-seed{req['seed']}")
            count = max(1, len(req["prompts"])) * req["n"]
            summary = (f"done: {count} image{'s' * (count > 1)}, {req['solver']} {req['steps']} steps, "
                       f"CFG {req['cfg_scale']:g}, seed {req['seed']} in {time.perf_counter() - tic:.1f} s")
            yield _for_display(grid), summary, gr.update(value=path, visible=True)
        except MlxflowError as e:
            # The person's input: say what to change, in a toast and in the status line (which stays).
            gr.Warning(str(e))
            yield gr.skip(), f"**Cannot generate:** {e}", gr.skip()
        except Exception as e:  # noqa: BLE001 - a bug: log it, tell the page, keep serving
            traceback.print_exc()
            raise gr.Error(f"sampling failed ({type(e).__name__}: {e}); the server is still running") from None

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"# {title}")
        if loaded.error:
            gr.Markdown(f"**Could not load the checkpoint:** {loaded.error}\n\n"
                        "Start `mlxflow serve` again with a checkpoint folder or a run folder.",
                        elem_id="mlxflow-load-error")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                prompts = gr.Textbox(label="Prompts (one per line)", lines=3, placeholder="red heart\npizza",
                                     visible=kind == "text", elem_id="mlxflow-prompts")
                classes = gr.Dropdown(choices=list(info.get("classes") or []), multiselect=True, label="Classes",
                                      visible=kind == "class", elem_id="mlxflow-classes")
                if kind == "none" and not loaded.error:
                    gr.Markdown("Unconditional model: no prompt, choose how many images.")
                button = gr.Button("Generate", variant="primary", interactive=not loaded.error,
                                   elem_id="mlxflow-generate")
                n = gr.Slider(1, MAX_PER_PROMPT, value=4, step=1, elem_id="mlxflow-n",
                              label="Images" + (" per prompt" if kind != "none" else ""))
                steps = gr.Slider(1, MAX_STEPS, value=defaults["steps"], step=1, label="Steps",
                                  elem_id="mlxflow-steps")
                solver = gr.Radio(list(solver_names()), value=defaults["solver"], label="Solver",
                                  elem_id="mlxflow-solver")
                cfg = gr.Slider(0.0, 15.0, value=defaults["cfg"], step=0.5, label="CFG scale (1 = off)",
                                visible=kind != "none", elem_id="mlxflow-cfg")
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="mlxflow-seed")
                preview = gr.Slider(1, 50, value=1, step=1, label="Preview every N steps", elem_id="mlxflow-preview")
            with gr.Column(scale=2, min_width=320):
                image = gr.Image(label="Samples", type="pil", format="png", interactive=False, height=340,
                                 buttons=["download", "fullscreen"], elem_id="mlxflow-image")
                status = gr.Markdown("", elem_id="mlxflow-status")
                download = gr.File(label="Final grid (PNG)", interactive=False, visible=False,
                                   elem_id="mlxflow-download")
            with gr.Column(scale=1, min_width=240):
                gr.Markdown(_metadata_markdown(info, defaults) if not loaded.error else "", elem_id="mlxflow-meta")
                if kind == "text" and info.get("examples"):
                    gr.Examples([[e] for e in info["examples"]], inputs=[prompts], label="Training captions")
        button.click(generate, inputs=[prompts, classes, n, steps, solver, cfg, seed, preview],
                     outputs=[image, status, download], concurrency_limit=1, api_name="generate")
    app.queue(default_concurrency_limit=1, max_size=32)
    return app


def launch(app, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True,
           quiet: bool = False):
    """Start the page's server; with block=False return at once (app.close() stops it)."""
    try:
        return app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                          quiet=quiet, css=CSS, show_error=True, footer_links=["gradio"])
    except OSError as e:  # port taken, host not ours
        raise MlxflowError(f"cannot serve on {host}:{port}: {e}") from None


def serve(ckpt, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    """`mlxflow serve`: load the checkpoint (a bad one ends here, with MlxflowError), then serve until Ctrl-C."""
    _gradio()
    loaded = load(ckpt)
    print(f"serving {loaded.info['path']} ({loaded.info['family']}, step {loaded.info['step']})", file=sys.stderr)
    launch(build_app(loaded=loaded), host=host, port=port, share=share)


def _gradio():
    try:
        import gradio as gr
    except ImportError:
        raise MlxflowError("the web demo needs Gradio: pip install 'mlxflow[demo]'") from None
    return gr
