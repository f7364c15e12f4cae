"""`mlxflow` command line: parses arguments, draws progress and tables, calls mlxflow.api. No model logic here.

`python -m mlxflow ...` runs the same commands, and `torchrun ... -m mlxflow train ... --framework
torch` runs `train` on every rank (rank 0 prints and writes); so does
`mlx.launch -n 2 --backend ring -- python -m mlxflow train ...` with MLX (docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mlxflow import api
from mlxflow.api import MlxflowError

console = Console(stderr=True, soft_wrap=True)
# Piped or logged output (not a terminal) gets room for the bench and crosscheck tables
# instead of rich's 80-column fallback, which truncates their cells.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)


def _bar(*extra) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *extra,
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
                    # Not a terminal (logs, CI, pipes): no live bar, which would leave a blank line.
                    disable=not api.is_rank_zero() or not console.is_terminal)


def _progress_callback(progress: Progress, description: str):
    task = None

    def update(done: int, total: int):
        nonlocal task
        if task is None:
            task = progress.add_task(description, total=total)
        progress.update(task, completed=done, total=total)

    return update


# --- data ------------------------------------------------------------------------------

def cmd_latents(args) -> int:
    if not args.src:
        raise MlxflowError("mlxflow data latents: give --src (tar shards, an image folder or a dataset folder)")
    with _bar(TextColumn("{task.fields[skipped]} skipped")) as progress:
        task = progress.add_task("encode (VAE + tokens)", total=None, skipped=0)

        def on_progress(done, skipped, total):
            progress.update(task, completed=done + skipped, total=total, skipped=skipped)

        cache = api.build_latent_data(args.src, args.out, vae=args.vae, text_encoder=args.text_encoder or "t5",
                                      random_encoders=args.random_encoders, size=args.size, limit=args.limit,
                                      shard_size=args.shard_size, captions=args.captions, on_progress=on_progress)
    h, w, c = cache.latent_shape
    skipped = sum(cache.skipped.values())
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(cache.skipped.items()))
    if cache.build_status:
        out.print(cache.build_status)
    out.print(f"latent cache {args.out}: {len(cache)} samples, latents {h}x{w}x{c}, {cache.text_tokens} tokens"
              + (f"; skipped {skipped} ({reasons})" if skipped else ""))
    if api.describe_skipped(cache):
        out.print(api.describe_skipped(cache))
    if cache.meta.get("random"):
        out.print("note: encoded with RANDOM tiny encoders (--random-encoders): a pipeline check, not real latents")
    return 0


def cmd_data(args) -> int:
    if args.source == "latents":
        return cmd_latents(args)
    encoder = None if args.no_embed else (args.text_encoder or api.DEFAULT_TEXT_ENCODER)
    with _bar() as progress:
        render, embed = _progress_callback(progress, "render"), _progress_callback(progress, f"embed ({encoder})")
        if args.source == "emoji":
            info = api.build_emoji_data(args.out, size=args.size, font=args.font, limit=args.limit,
                                        overwrite=args.overwrite, skin_tones=not args.no_skin_tones,
                                        text_encoder=encoder, on_render=render, on_embed=embed)
        else:
            if not args.images:
                raise MlxflowError(f"mlxflow data {args.source}: give --images DIR")
            if args.source == "classes":
                info = api.import_class_data(args.images, args.out, size=args.size, overwrite=args.overwrite,
                                             on_render=render)
            else:
                info = api.import_folder_data(args.images, args.out, size=args.size, captions=args.captions,
                                              overwrite=args.overwrite, unconditional=args.unconditional,
                                              text_encoder=None if args.unconditional else encoder,
                                              on_render=render, on_embed=embed)
    skipped = f", skipped {info.get('skipped', 0)} the font cannot draw" if args.source == "emoji" else \
        f", skipped {info['skipped']} unreadable" if info.get("skipped") else ""
    if info.get("classes"):
        skipped += f"; {len(info['classes'])} classes"
    out.print(f"wrote {info['count']} images at {info['size']}x{info['size']} to {args.out}{skipped}")
    if args.source != "emoji" and api.describe_skipped(info):
        out.print(api.describe_skipped(info))
    return 0


# --- train -----------------------------------------------------------------------------

def cmd_train(args) -> int:
    overrides = {"batch_size": args.batch_size, "lr": args.lr, "grad_accum": args.grad_accum,
                 "bf16": args.bf16, "seed": args.seed, "ckpt_every": args.ckpt_every,
                 "sample_every": args.sample_every, "compile": args.compile,
                 "fused_adamw": args.fused_adamw, "fused_attention": args.fused_attention,
                 "device_data": args.device_data, "t_shift": args.t_shift,
                 "t_unshifted": args.t_unshifted, "cond_dropout": args.cond_dropout}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    embeddings = api.load_embeddings(args.embeddings) if args.embeddings else None
    log_every = args.log_every
    label = "train" if args.framework == "mlx" else f"train ({args.framework})"
    with _bar(TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} img/s")) as progress:
        task = progress.add_task(label, total=None, loss="-", lr="-", speed="-")

        def on_step(info):
            progress.update(task, completed=info.step, total=info.total, loss=f"{info.loss:.4f}",
                            lr=f"{info.lr:.2e}", speed=f"{info.img_per_s:.1f}")
            if api.is_rank_zero() and not console.is_terminal and (info.step % log_every == 0
                                                                   or info.step == info.total):
                # No live bar in logs and CI: print a line now and then instead.
                console.print(f"step {info.step}/{info.total} loss {info.loss:.4f} lr {info.lr:.2e} "
                              f"{info.img_per_s:.1f} img/s", highlight=False)

        def say(msg):
            if api.is_rank_zero():
                progress.console.print(msg, highlight=False)

        result = api.train_model(args.family, args.data, args.out, preset=args.preset, steps=args.steps,
                                 resume=args.resume, text_encoder=args.text_encoder, train_overrides=overrides,
                                 framework=args.framework, device=args.device, embeddings=embeddings,
                                 on_step=on_step, on_message=say,
                                 on_sample=lambda step, path: say(f"step {step}: samples {path}"))
    if not api.is_rank_zero():
        return 130 if result.interrupted else 0
    if result.interrupted:
        resume = " ".join(["mlxflow", "train", args.family, "--data", args.data, "--out", args.out, "--resume", "latest"]
                          + (["--framework", args.framework] if args.framework != "mlx" else [])
                          + (["--steps", str(args.steps)] if args.steps else []))
        print(f"interrupted at step {result.steps}: checkpoint {result.checkpoint}\nresume with: {resume}",
              file=sys.stderr)
        return 130
    loss = result["loss"]
    out.print(f"done: step {result.steps}" + (f", loss {loss:.4f}" if loss is not None else "")
              + f", checkpoint {result.checkpoint}")
    return 0


# --- sample ----------------------------------------------------------------------------

def cmd_sample(args) -> int:
    prompts = list(args.prompts) + [str(c) for c in (args.classes or [])]
    tic = time.perf_counter()
    gen = api.generator(args.ckpt, weights=args.weights, framework=args.framework, device=args.device)
    settings = gen.defaults.resolve(steps=args.steps, solver=args.solver, cfg=args.cfg, cfg_interval=args.cfg_interval,
                                    shift=args.shift)
    if args.classes and gen.kind != "class":
        raise MlxflowError(f"--class is for class-conditional models; this checkpoint is conditioned on {gen.kind}"
                           + (" (give text prompts)" if gen.kind == "text" else " (give no prompt)"))
    if args.prompts and gen.kind == "class":
        raise MlxflowError("this checkpoint is class-conditional: name classes with --class NAME|INDEX")
    with _bar() as progress:
        task = progress.add_task(f"sample ({settings.solver})", total=settings.steps)
        path = api.sample(gen, prompts, args.output, n=args.n, steps=settings.steps, solver=settings.solver,
                          cfg_scale=settings.cfg, seed=args.seed, interval=settings.cfg_interval, shift=settings.shift,
                          preview_dir=args.preview_dir, preview_every=args.preview_every,
                          on_step=lambda i, total: progress.update(task, completed=i))
    for prompt, nearest in gen.unseen_prompts(args.prompts):
        out.print(f"note: '{prompt}' is not one of the training captions; the nearest in the text encoder's "
                  f"space is '{nearest}' (sampled anyway: the model draws what it learnt)", highlight=False)
    fake = gen.random_encoders()
    if fake:
        out.print(f"note: this model was trained with RANDOM tiny encoders ({', '.join(fake)}): "
                  "its images check the pipeline, they are not meant to look like anything")
    if args.verbose:
        images = args.n * max(len(prompts), 1)
        took = time.perf_counter() - tic
        out.print(f"{images} images in {took:.1f} s ({took / images:.2f} s/image, model load included): "
                  f"{settings.solver}, {settings.steps} steps = "
                  f"{api.model_evals(settings.steps, settings.solver, settings.cfg)} network evaluations, "
                  f"CFG {settings.cfg:g}, shift {settings.shift:g}, {args.framework}")
    out.print(str(path))
    return 0


def cmd_fid(args) -> int:
    with _bar() as progress:
        task = progress.add_task("sample + Inception features", total=None)
        r = api.fid(args.ckpt, args.data, n=args.n, steps=args.steps, solver=args.solver, cfg=args.cfg,
                    seed=args.seed, shift=args.shift, fid_weights=args.fid_weights,
                    on_progress=lambda i, total: progress.update(task, completed=i, total=total))
    out.print(f"FID {r['fid']:.2f}  ({r['n']} samples vs the first {r['n']} training images; {r['solver']}, "
              f"{r['steps']} steps, shift {r['shift']:g}, CFG {r['cfg']:g}, seed {r['seed']}; step {r['step']}; "
              f"{r['network']})")
    return 0


def cmd_solvers(args) -> int:
    table = Table(title="solver schedules against a fine reference solve (same noise)")
    for col in ("solver", "steps", "shift", "NFE", "RMSE vs reference", "fidelity"):
        table.add_column(col)
    with console.status("sampling...") as status:
        rows = api.solvers(args.ckpt, args.prompts, args.schedule, n=args.n, seed=args.seed, cfg=args.cfg,
                           data_dir=args.data, on_done=lambda r: status.update(f"{r['solver']} {r['steps']} done"))
    for r in rows:
        table.add_row(r["solver"], str(r["steps"]), f"{r['shift']:g}", str(r["nfe"]), f"{r['rmse']:.4f}",
                      f"{r['fidelity']:.3f}" if "fidelity" in r else "-")
    table.caption = (f"reference: rk4 50 steps (200 NFE); {args.n} samples for each of {max(len(args.prompts), 1)} "
                     f"prompts, seed {args.seed}; RMSE of images in [0, 1]; NFE per CFG batch")
    out.print(table)
    return 0


def cmd_plot(args) -> int:
    out.print(str(api.plot(args.run, args.out)))
    return 0


# --- bench / fidelity -------------------------------------------------------------------

def cmd_bench(args) -> int:
    frameworks = ["mlx", "torch"] if args.framework == "both" else [args.framework]
    with console.status("timing...") as status:
        result = api.bench(args.family, args.preset, batch_size=args.batch_size, frameworks=frameworks,
                           steps=args.steps, max_batch=args.max_batch, trainer=args.trainer, data=args.data,
                           device_data=args.device_data, torch_device=args.torch_device, bf16=args.bf16,
                           on_status=status.update)
    if not api.is_rank_zero():  # under mlx.launch rank 0 prints
        return 0
    table = Table(title=result["title"])
    for col in ("framework", "device", "batch", "img/s", "trainer img/s", "peak MB", "params", "GFLOP/img fwd",
                "MFU", "trainer MFU", "BLAS"):
        table.add_column(col)
    for r in result["rows"]:
        flops, trainer = r.get("fwd_flops_per_image"), r.get("trainer_img_per_s")
        table.add_row(r["framework"], str(r["device"]), str(r["batch_size"]), f"{r['img_per_s']:.1f}",
                      f"{trainer:.1f}" if trainer else "-", f"{r.get('peak_mem_mb', 0):.0f}",
                      f"{r.get('params', 0) / 1e6:.2f}M", f"{flops / 1e9:.2f}" if flops else "-",
                      f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-",
                      f"{100 * r['trainer_mfu']:.1f}%" if r.get("trainer_mfu") is not None else "-", r.get("blas", "-"))
    out.print(table)
    for note in result["notes"]:
        out.print(note)
    return 0


def cmd_fidelity(args) -> int:
    with console.status("sampling..."):
        rows = api.fidelity(args.ckpt, args.data, k=args.k, n=args.n, prompts=args.prompts or None, seed=args.seed,
                            steps=args.steps, solver=args.solver, cfg=args.cfg, shift=args.shift,
                            baseline=args.baseline)
    table = Table(title="prompt fidelity (nearest training image is the prompted one)")
    for col in ("model", "step", "fidelity", "samples", "chance"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], str(r["step"]), f"{r['fidelity']:.3f}", str(r["samples"]), f"{r['chance']:.4f}")
    s = rows[0]["settings"]
    table.caption = (f"{s.solver}, {s.steps} steps, shift {s.shift:g}, CFG {s.cfg:g}, {args.n} samples for each of "
                     f"{rows[0]['prompts']} prompts, seed {args.seed}")
    out.print(table)
    return 0


# --- crosscheck / export ----------------------------------------------------------------

def render_crosscheck(report) -> Table:
    """A rich Table of a crosscheck.Report's rows."""
    title = "MLX vs PyTorch cross-check" + (f" ({report.info['checkpoint']})" if "checkpoint" in report.info else "")
    table = Table(title=title, caption=f"device {report.info.get('device', '?')}; rel err = max abs / max |torch|")
    for col, justify in (("check", "left"), ("max abs", "right"), ("rel err", "right"), ("limit", "right"),
                         ("", "center")):
        table.add_column(col, justify=justify)
    for r in report.rows:
        table.add_row(r.name, f"{r.max_abs:.2e}", f"{r.rel_err:.2e}", f"{r.metric} <= {r.limit:.0e}",
                      "[green]ok[/green]" if r.passed else "[red]FAIL[/red]")
    return table


def cmd_crosscheck(args, console_out=None) -> int:
    printer = console_out or out
    with console.status("running both frameworks..."):
        report = api.crosscheck(args.ckpt, batch=args.batch, steps=args.steps, solver=args.solver, cfg_scale=args.cfg,
                                seed=args.seed, tol=args.tol, device=args.device, train_step=not args.no_train_step)
    printer.print(render_crosscheck(report))
    failed = [r.name for r in report.rows if not r.passed]
    if failed:
        printer.print(f"[red]cross-check failed:[/red] {', '.join(failed)}")
        return 1
    printer.print("[green]cross-check passed[/green]")
    return 0


def cmd_export(args) -> int:
    with console.status("converting and verifying..."):
        report = api.export_coreml(args.ckpt, args.out, precision=args.precision, compress=args.compress,
                                   batch_sizes=tuple(args.batch_sizes), min_psnr=args.min_psnr, data=args.data,
                                   deployment_target=args.deployment_target, overwrite=args.overwrite)
    table = Table(title=f"Core ML export: {args.out}")
    table.add_column("item")
    table.add_column("value")
    for k, v in report.items():
        table.add_row(k, f"{v:.2f}" if isinstance(v, float) else str(v))
    out.print(table)
    return 0


# --- serve / demo ---------------------------------------------------------------------------

def cmd_serve(args) -> int:
    """A Gradio page in front of one checkpoint; a bad checkpoint ends here with one line."""
    from mlxflow.serve import serve  # the face for browsers (Gradio is an optional extra)

    serve(args.ckpt, host=args.host, port=args.port, share=args.share)
    return 0


def cmd_demo(args) -> int:
    """Build the emoji set, train the tiny preset on the demo's dozen emoji, write a sample grid and score it."""
    with _bar(TextColumn("{task.fields[info]}")) as progress:
        bars: dict = {}

        def stage(name):
            def update(done, total, info=""):
                if name not in bars:
                    bars[name] = progress.add_task(name, total=total, info="")
                progress.update(bars[name], completed=done, total=total, info=info)
            return update

        train_bar = stage("train")
        result = api.demo(args.out, steps=args.steps, font=args.font, full=args.full, k=args.k,
                          on_render=stage("render"),
                          on_embed=stage("embed"), on_sample_step=stage("sample"),
                          on_step=lambda i: train_bar(i.step, i.total, f"loss {i.loss:.4f}"),
                          on_message=lambda msg: progress.console.print(msg, highlight=False))
    score = result["fidelity"]
    out.print(f"[bold green]sample grid:[/] {result['grid']} (rows: {', '.join(result['prompts'])})")
    if args.full:
        out.print(f"prompt fidelity over {score['prompts']} training prompts spread over the set, one sample each:")
    out.print(f"prompt fidelity {score['fidelity']:.0%} of {score['samples']} samples: the nearest of all "
              f"{round(1 / score['chance'])} emoji is the prompted one (chance {score['chance']:.2%})")
    return 0


# --- parser --------------------------------------------------------------------------------

def preset_names() -> str:
    """'dit: ...; emoji: tiny, default, seed; jit: ...': every family's presets."""
    return "; ".join(f"{f}: {', '.join(api.presets(f))}" for f in api.family_names())


class Parser(argparse.ArgumentParser):
    """argparse, but a value it cannot parse ends in one `error:` line (exit 2), like every other mistake."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    family_names, SOLVERS = api.family_names, api.SOLVERS
    p = Parser(prog="mlxflow", description="Flow-matching image generators in MLX.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="build a dataset folder (emoji, folder, classes) or a latent cache (latents)")
    sources = d.add_subparsers(dest="source", required=True, metavar="SOURCE")
    encoders = "minilm-tokens (default) | minilm | minilm:DIR | minilm-tokens:DIR | clip | clip:WEIGHTS"
    kinds = {
        "emoji": "render the colour-emoji font (Apple Color Emoji / Noto Color Emoji), labelled with CLDR names",
        "folder": "your images with captions (captions.tsv/.txt/.csv/.json/.jsonl, or a.txt beside a.png), "
                  "or --unconditional",
        "classes": "one subfolder of images per class (class-conditional JiT)",
        "latents": "SD-VAE latents + T5 token ids (the dit family) from tar shards, an image folder or a dataset folder",
    }
    for name, what in kinds.items():
        ds = sources.add_parser(name, help=what, description=what)
        ds.add_argument("out", help="output dataset folder" if name != "latents" else "output latent cache folder")
        ds.add_argument("--size", type=int, default=64, help="image side in pixels after centre-crop and resize "
                                                               "(default 64)")
        if name in ("folder", "classes"):
            ds.add_argument("--images", help="source folder of images (required)")
        if name == "emoji":
            ds.add_argument("--font", help="colour emoji font file (default: the system's)")
            ds.add_argument("--no-skin-tones", action="store_true", help="leave out the skin-tone variants "
                                                                        "(1.9k distinct emoji instead of 3.8k)")
        if name in ("emoji", "latents"):
            ds.add_argument("--limit", type=int, help="only the first N emoji / samples")
        if name == "folder":
            ds.add_argument("--captions", help="captions file (default: captions.* in the image folder); "
                                               "UTF-8, a byte-order mark is fine (see README, Inputs)")
            ds.add_argument("--unconditional", action="store_true", help="no captions: every image, no text")
        if name in ("emoji", "folder"):
            ds.add_argument("--text-encoder", help=f"frozen text encoder to cache embeddings with: {encoders}")
            ds.add_argument("--no-embed", action="store_true", help="skip caching text embeddings")
        if name != "latents":
            ds.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
        if name == "latents":
            ds.add_argument("--src", help="(required) WebDataset tar shards (file, folder or glob), an image "
                                                         "folder with captions, or a dataset folder")
            ds.add_argument("--captions", help="captions file for an image folder --src")
            ds.add_argument("--text-encoder", help="t5 (default: google-t5/t5-small from the HF cache) | t5:DIR")
            ds.add_argument("--vae", default="sd-vae", help="sd-vae (the HF cache / hub) or sd-vae:DIR")
            ds.add_argument("--random-encoders", action="store_true",
                            help="tiny RANDOM T5 and VAE instead of the real weights: a labelled pipeline check")
            ds.add_argument("--shard-size", type=int, default=4096, help="samples per cache shard (default 4096)")
        ds.set_defaults(func=cmd_data, font=None, limit=None, images=None, captions=None, unconditional=False,
                        text_encoder=None, no_embed=False, overwrite=False, no_skin_tones=False)

    t = sub.add_parser("train", help="train a model")
    t.add_argument("family", choices=family_names(), help="model family")
    t.add_argument("--data", required=True, help="dataset folder (mlxflow data ...) or latent cache (dit)")
    t.add_argument("--out", required=True, help="run folder (checkpoints, samples)")
    t.add_argument("--preset", help="named preset (default: the family's): " + preset_names())
    t.add_argument("--steps", type=int, help="optimizer steps to train to (default: the preset's)")
    t.add_argument("--resume", help="latest (the run's newest intact checkpoint; starts fresh when there is "
                                    "none) | a checkpoint folder; see README, Long runs, for what a resumed run keeps")
    t.add_argument("--text-encoder", help="frozen text encoder spec (default: the family's: emoji minilm-tokens, "
                                          "jit minilm; dit reads its latent cache's)")
    t.add_argument("--batch-size", type=int, help="images per micro-batch, across all ranks; an optimizer step takes batch size x "
                                          "--grad-accum (default: the preset's)")
    t.add_argument("--lr", type=float, help="peak learning rate (warmup, then cosine; default: the preset's)")
    t.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default: 1)")
    t.add_argument("--t-shift", type=float,
                   help="shift of the training times: > 1 toward noise, < 1 toward clean images, 1 = none "
                        "(default: the preset's, emoji laptop 10; a resumed run keeps its own; README, "
                        "The full emoji set)")
    t.add_argument("--t-unshifted", type=float,
                   help="share of each batch, in [0, 1), whose training times skip --t-shift, so a strong "
                        "shift still trains the low-noise end; round-down(batch size x share) rows, at least one "
                        "(default: the preset's, 0 = none; a resumed run keeps its own)")
    t.add_argument("--cond-dropout", type=float,
                   help="share of training images whose condition (text or class) is dropped, in [0, 1): what "
                        "classifier-free guidance steers against (default: the preset's: emoji laptop 0.05, "
                        "other emoji 0.15, jit and dit 0.1; "
                        "0 trains no unconditional model, so sample with --cfg 1; a resumed run keeps its own)")
    t.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (default: the preset's)")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="(torch) torch.compile the model (default: on with CUDA)")
    t.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction,
                   help="(torch) fused AdamW kernel (default: on with CUDA)")
    t.add_argument("--fused-attention", action=argparse.BooleanOptionalAction,
                   help="(torch) bf16 fused SDPA (flash) attention instead of fp32 scores (default: on with CUDA + bf16)")
    t.add_argument("--device-data", action=argparse.BooleanOptionalAction,
                   help="hold the image set on the training device and draw batches there "
                        "(default: when it fits in 2 GiB)")
    t.add_argument("--seed", type=int, help="seed of the initial weights, data order and noise (default 0)")
    t.add_argument("--ckpt-every", type=int, help="steps between checkpoints (0: only at the end)")
    t.add_argument("--sample-every", type=int, help="steps between sample grids in RUN/samples (0: only at the end)")
    t.add_argument("--framework", choices=["mlx", "torch"], default="mlx",
                   help="MLX (the default; Metal on a Mac) or the torch twin (CUDA, DDP under torchrun)")
    t.add_argument("--device", help="(torch) cpu | cuda | mps (default: best available)")
    t.add_argument("--log-every", type=int, default=25, help="steps between log lines when not on a terminal")
    t.add_argument("--embeddings", help="precomputed float32 (N, L, D) caption embeddings (.npy) instead of the "
                                        "text encoder's")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="generate images from a checkpoint")
    s.add_argument("ckpt", help="checkpoint folder, or run folder (its latest checkpoint)")
    s.add_argument("prompts", nargs="*", help="text prompts (text-conditioned models)")
    s.add_argument("--class", dest="classes", action="append", metavar="NAME|INDEX",
                   help="class to draw (class-conditional models); repeat for more rows")
    s.add_argument("--output", required=True, help="grid PNG")
    s.add_argument("--n", type=int, default=4, help="images per prompt (or in all, for unconditional models)")
    s.add_argument("--steps", type=int, help="solver steps (default: the family's)")
    s.add_argument("--solver", choices=sorted(SOLVERS), help="ODE solver (default: the family's)")
    s.add_argument("--shift", type=float,
                   help="time-grid shift: > 1 spends more steps near noise, < 1 near the data (default: the "
                        "family's for its solver, else 1)")
    s.add_argument("--verbose", action="store_true", help="print sampling time per image and network evaluations")
    s.add_argument("--cfg", type=float, help="classifier-free guidance scale (1 = off; default: the family's, 1 for a run "
                                                   "trained with --cond-dropout 0)")
    s.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"), help="apply CFG only for t in [LO, HI]")
    s.add_argument("--seed", type=int, default=0, help="noise seed, a whole number >= 0 (default 0)")
    s.add_argument("--framework", choices=["mlx", "torch"], default="mlx",
                   help="sample with MLX, or with the torch twin (faster on a Linux CPU; CUDA)")
    s.add_argument("--device", help="(torch) cpu | cuda | mps (default: best available)")
    s.add_argument("--weights", choices=["ema", "ema2", "raw"], default="ema",
                   help="which weights to sample with: the EMA, the second EMA (JiT), or the raw weights")
    s.add_argument("--preview-dir", help="write a grid every --preview-every steps here")
    s.add_argument("--preview-every", type=int, default=0, help="steps between preview grids in --preview-dir")
    s.set_defaults(func=cmd_sample)

    fd = sub.add_parser("fid", help="FID (standard Inception) of a checkpoint against its training data")
    fd.add_argument("ckpt", help="checkpoint folder, or run folder (its latest checkpoint)")
    fd.add_argument("--data", required=True, help="the dataset folder or latent cache it trained on")
    fd.add_argument("--n", type=int, default=1000, help="samples (and reference images); keep it fixed to compare")
    fd.add_argument("--steps", type=int, help="solver steps (default: the family's)")
    fd.add_argument("--solver", choices=sorted(SOLVERS), help="(default: the family's)")
    fd.add_argument("--shift", type=float, help="time-grid shift (default: the family's for its solver)")
    fd.add_argument("--cfg", type=float, help="guidance scale (default: the family's; 1 after --cond-dropout 0)")
    fd.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    fd.add_argument("--fid-weights", help="inception-2015-12-05.pt (default: $MLXFLOW_FID_WEIGHTS, caches)")
    fd.set_defaults(func=cmd_fid)

    so = sub.add_parser("solvers", help="compare few-step solver schedules against a fine reference solve")
    so.add_argument("ckpt", help="checkpoint folder, or run folder (its latest checkpoint)")
    so.add_argument("prompts", nargs="*", help="prompts (text models), class names (class models), none (unconditional)")
    so.add_argument("--schedule", nargs="+", metavar="SOLVER:STEPS[:SHIFT]",
                    default=["euler:50", "euler:10", "heun:5", "midpoint:5", "ab2:10", "ab2:10:2"],
                    help="schedules to compare (default: euler 50 and five 10-evaluation ones)")
    so.add_argument("--data", help="dataset folder: also score prompt fidelity (prompts must be its captions)")
    so.add_argument("--n", type=int, default=4, help="samples per prompt (default 4)")
    so.add_argument("--cfg", type=float, help="guidance scale (default: the family's; 1 after --cond-dropout 0)")
    so.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    so.set_defaults(func=cmd_solvers)

    pl = sub.add_parser("plot", help="draw a run's curves (RUN/log.jsonl) to a PNG")
    pl.add_argument("run", help="run folder")
    pl.add_argument("--out", help="PNG path (default: RUN/curves.png)")
    pl.set_defaults(func=cmd_plot)

    b = sub.add_parser("bench", help="train-step throughput and peak memory")
    b.add_argument("family", choices=family_names(), help="model family")
    b.add_argument("--preset", help="named preset (default: the family's): " + preset_names())
    b.add_argument("--batch-size", default="32",
                   help="batch size, or 'auto': double from 8 until memory (or --max-batch) runs out")
    b.add_argument("--max-batch", type=int, default=1024, help="largest batch 'auto' tries")
    b.add_argument("--trainer", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the whole trainer (data, step, EMA, syncs) beside the bare step")
    b.add_argument("--data", help="(--trainer) dataset folder or latent cache (default: random images; "
                                  "dit needs a cache)")
    b.add_argument("--device-data", action=argparse.BooleanOptionalAction,
                   help="(--trainer) hold the set on the device (default: the trainer's choice: when it fits)")
    b.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    b.add_argument("--framework", choices=["mlx", "torch", "both"], default="both",
                   help="both (default) times MLX and torch on the same preset and batch")
    b.add_argument("--torch-device", default=None, help="cpu | cuda | mps (default: best available)")
    b.add_argument("--bf16", action="store_true", help="(torch) bf16 autocast")
    b.set_defaults(func=cmd_bench)

    f = sub.add_parser("fidelity", help="prompt fidelity against the training images")
    f.add_argument("ckpt", help="checkpoint folder, or run folder (its latest checkpoint)")
    f.add_argument("--data", required=True, help="the dataset folder it trained on (its images are the references)")
    f.add_argument("--k", type=int, default=16, help="number of training prompts")
    f.add_argument("--n", type=int, default=2, help="samples per prompt")
    f.add_argument("--steps", type=int, help="solver steps (default: the family's)")
    f.add_argument("--solver", choices=sorted(SOLVERS), help="(default: the family's)")
    f.add_argument("--shift", type=float, help="time-grid shift (default: the family's for its solver)")
    f.add_argument("--prompts", nargs="+", help="training captions to score (default: --k spread over the set)")
    f.add_argument("--cfg", type=float, help="(default: the family's; 1 after --cond-dropout 0)")
    f.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    f.add_argument("--baseline", action="store_true", help="also score an untrained model of the same shape")
    f.set_defaults(func=cmd_fidelity)

    c = sub.add_parser("crosscheck", help="compare MLX and torch on the same weights")
    c.add_argument("ckpt", help="checkpoint folder, or run folder (its latest checkpoint)")
    c.add_argument("--batch", type=int, default=2, help="images per compared batch")
    c.add_argument("--steps", type=int, default=8, help="solver steps of the compared trajectory")
    c.add_argument("--solver", default="heun", choices=sorted(SOLVERS), help="solver of the compared trajectory")
    c.add_argument("--cfg", type=float, default=3.0, help="guidance scale of the compared trajectory")
    c.add_argument("--seed", type=int, default=0, help="seed of the inputs and noise")
    c.add_argument("--tol", type=float, default=1e-4, help="relative tolerance per block and output")
    c.add_argument("--device", default="cpu", help="torch device of the twin (cpu | cuda | mps)")
    c.add_argument("--no-train-step", action="store_true", help="skip the compared AdamW training step")
    c.set_defaults(func=cmd_crosscheck)

    e = sub.add_parser("export", help="export a checkpoint")
    e.add_argument("target", choices=["coreml"], help="export format (coreml: an app bundle for Apple devices)")
    e.add_argument("ckpt", help="checkpoint folder, or run folder (its latest checkpoint)")
    e.add_argument("out", help="output folder")
    e.add_argument("--precision", choices=["fp16", "fp32"], default="fp16", help="compute precision of the package")
    e.add_argument("--compress", choices=["palettize6", "palettize8", "int8"], help="weight compression (default: none)")
    e.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2],
                   help="batch sizes the package takes (2 runs CFG as one call; default 1 2)")
    e.add_argument("--min-psnr", type=float, default=35.0, help="refuse an export below this PSNR (dB) vs torch")
    e.add_argument("--target", dest="deployment_target", default="iOS17", choices=["iOS17", "iOS18", "macOS14", "macOS15"],
                   help="deployment target; iOS18/macOS15 give true enumerated batch shapes")
    e.add_argument("--data", help="training dataset folder for the label table (default: the one the run used)")
    e.add_argument("--overwrite", action="store_true", help="replace what an existing output folder holds")
    e.set_defaults(func=cmd_export)

    w = sub.add_parser("serve", help="web demo: a Gradio page that streams samples as they integrate")
    w.add_argument("ckpt", help="checkpoint folder, or run folder (its latest checkpoint)")
    w.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    w.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve your network")
    w.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    w.set_defaults(func=cmd_serve)

    m = sub.add_parser("demo", help="build the emoji set, train the tiny preset on a dozen emoji, write and score a grid")
    m.add_argument("--out", default="runs/demo", help="folder for the data, the run and the grid")
    m.add_argument("--steps", type=int, help="training steps (default: 800; with --full the laptop preset's 6,250)")
    m.add_argument("--full", action="store_true",
                   help="train the laptop preset on all 1,898 emoji (200k images; about 2 hours of MLX on one "
                        "core of a Linux CPU, minutes on a Mac's GPU) and score it over --k prompts")
    m.add_argument("--k", type=int, default=256, help="(--full) training prompts to score, spread over the set")
    m.add_argument("--font", help="colour emoji font file (default: the system's)")
    m.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        api.use_fast_blas([sys.executable, sys.argv[0], *sys.argv[1:]])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MlxflowError as e:
        # Plain print: one line, never wrapped or styled, whatever the terminal width. An error
        # every rank of a data-parallel run raised alike is printed by rank 0 alone.
        if api.is_rank_zero() or not getattr(e, "every_rank", False):
            print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; checkpoints already written are intact (--resume latest continues a run)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
