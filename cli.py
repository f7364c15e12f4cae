"""`mlxflow` command line: parses arguments, draws progress, calls mlxflow.api. No model logic here."""

from __future__ import annotations

import argparse
import importlib.util
import time
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True, soft_wrap=True)
# Piped or logged output (not a terminal) gets room for the bench and crosscheck tables
# instead of rich's 80-column fallback, which truncates their cells.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)


def _bar(*extra) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *extra,
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True)


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
    from mlxflow import api

    from mlxflow.errors import MlxflowError

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
    if cache.meta.get("random"):
        out.print("note: encoded with RANDOM tiny encoders (--random-encoders): a pipeline check, not real latents")
    return 0


def cmd_data(args) -> int:
    from mlxflow import api

    if args.source == "latents":
        return cmd_latents(args)
    encoder = None if args.no_embed else (args.text_encoder or api.DEFAULT_TEXT_ENCODER)
    with _bar() as progress:
        render, embed = _progress_callback(progress, "render"), _progress_callback(progress, f"embed ({encoder})")
        if args.source == "emoji":
            info = api.build_emoji_data(args.out, size=args.size, font=args.font, limit=args.limit,
                                        overwrite=args.overwrite, skin_tones=not args.no_skin_tones, text_encoder=encoder, on_render=render, on_embed=embed)
        else:
            if not args.images:
                raise SystemExit(f"mlxflow data {args.source}: give --images DIR")
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
    return 0


# --- train -----------------------------------------------------------------------------

def cmd_train(args) -> int:
    from mlxflow import api

    overrides = {"batch_size": args.batch_size, "lr": args.lr, "grad_accum": args.grad_accum,
                 "bf16": args.bf16, "seed": args.seed, "ckpt_every": args.ckpt_every,
                 "sample_every": args.sample_every, "log_every": None, "compile": args.compile,
                 "fused_adamw": args.fused_adamw, "fused_attention": args.fused_attention,
                 "device_data": args.device_data}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    log_every = args.log_every
    label = "train" if args.framework == "mlx" else f"train ({args.framework})"
    with _bar(TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} img/s")) as progress:
        task = progress.add_task(label, total=None, loss="-", lr="-", speed="-")

        def on_step(info):
            progress.update(task, completed=info.step, total=info.total, loss=f"{info.loss:.4f}",
                            lr=f"{info.lr:.2e}", speed=f"{info.img_per_s:.1f}")
            if not console.is_terminal and (info.step % log_every == 0 or info.step == info.total):
                # No live bar in logs and CI: print a line now and then instead.
                console.print(f"step {info.step}/{info.total} loss {info.loss:.4f} lr {info.lr:.2e} "
                              f"{info.img_per_s:.1f} img/s", highlight=False)

        result = api.train_model(args.family, args.data, args.out, preset=args.preset, steps=args.steps,
                                 resume=args.resume, text_encoder=args.text_encoder, train_overrides=overrides,
                                 framework=args.framework, device=args.device, on_step=on_step,
                                 on_message=lambda msg: progress.console.print(msg, highlight=False),
                                 on_sample=lambda step, path: progress.console.print(f"step {step}: samples {path}"))
    if result.interrupted:
        resume = " ".join(["mlxflow", "train", args.family, "--data", args.data, "--out", args.out, "--resume", "latest"]
                          + (["--framework", args.framework] if args.framework != "mlx" else [])
                          + (["--steps", str(args.steps)] if args.steps else []))
        print(f"interrupted at step {result.steps}: checkpoint {result.checkpoint}\nresume with: {resume}",
              file=sys.stderr)
        return 130
    out.print(f"checkpoint: {result.checkpoint}")
    return 0


# --- sample ----------------------------------------------------------------------------

def cmd_sample(args) -> int:
    from mlxflow import api

    defaults = api.sampling_defaults(args.ckpt)
    steps = args.steps or defaults["steps"]
    solver = args.solver or defaults["solver"]
    cfg = args.cfg if args.cfg is not None else defaults["cfg"]
    interval = tuple(args.cfg_interval) if args.cfg_interval else defaults["cfg_interval"]
    if args.shift is None:
        args.shift = api.default_shift(defaults, solver)
    prompts = list(args.prompts) + [str(c) for c in (args.classes or [])]
    tic = time.perf_counter()
    with _bar() as progress:
        task = progress.add_task(f"sample ({solver})", total=steps)
        path = api.sample(args.ckpt, prompts, args.output, n=args.n, steps=steps, solver=solver,
                          cfg_scale=cfg, seed=args.seed, interval=interval, shift=args.shift,
                          preview_dir=args.preview_dir, preview_every=args.preview_every, weights=args.weights,
                          framework=args.framework, device=args.device,
                          on_step=lambda i, total: progress.update(task, completed=i))
    fake = api.random_encoders(args.ckpt)
    if fake:
        out.print(f"note: this model was trained with RANDOM tiny encoders ({', '.join(fake)}): "
                  "its images check the pipeline, they are not meant to look like anything")
    if args.verbose:
        from mlxflow.sample import model_evals

        images = args.n * max(len(prompts), 1)
        took = time.perf_counter() - tic
        out.print(f"{images} images in {took:.1f} s ({took / images:.2f} s/image, model load included): {solver}, "
                  f"{steps} steps = {model_evals(steps, solver, cfg)} network evaluations, CFG {cfg:g}, "
                  f"shift {args.shift:g}, {args.framework}")
    out.print(str(path))
    return 0


def cmd_fid(args) -> int:
    from mlxflow import api

    with _bar() as progress:
        task = progress.add_task("sample + Inception features", total=None)
        r = api.fid_score(args.ckpt, args.data, n=args.n, steps=args.steps, solver=args.solver, cfg_scale=args.cfg,
                          seed=args.seed, shift=args.shift, fid_weights=args.fid_weights,
                          on_progress=lambda i, total: progress.update(task, completed=i, total=total))
    out.print(f"FID {r['fid']:.2f}  ({r['n']} samples vs the first {r['n']} training images; {r['solver']}, "
              f"{r['steps']} steps, shift {r['shift']:g}, CFG {r['cfg']:g}, seed {r['seed']}; step {r['step']}; "
              f"{r['network']})")
    return 0


def cmd_solvers(args) -> int:
    from mlxflow import api
    from mlxflow.errors import MlxflowError

    schedules = []
    for spec in args.schedule:
        parts = spec.split(":")
        try:
            schedules.append((parts[0], int(parts[1]), float(parts[2]) if len(parts) > 2 else 1.0))
        except (IndexError, ValueError):
            raise MlxflowError(f"--schedule wants SOLVER:STEPS[:SHIFT], got '{spec}'") from None
    table = Table(title="solver schedules against a fine reference solve (same noise)")
    for col in ("solver", "steps", "shift", "NFE", "RMSE vs reference", "fidelity"):
        table.add_column(col)
    with console.status("sampling...") as status:
        rows = api.solver_comparison(args.ckpt, args.prompts, schedules, n=args.n, seed=args.seed, cfg_scale=args.cfg,
                                     data_dir=args.data,
                                     on_done=lambda r: status.update(f"{r['solver']} {r['steps']} done"))
    for r in rows:
        table.add_row(r["solver"], str(r["steps"]), f"{r['shift']:g}", str(r["nfe"]), f"{r['rmse']:.4f}",
                      f"{r['fidelity']:.3f}" if "fidelity" in r else "-")
    table.caption = (f"reference: rk4 50 steps (200 NFE); {args.n} samples for each of {len(args.prompts)} prompts, "
                     f"seed {args.seed}; RMSE of images in [0, 1]; NFE per CFG batch")
    out.print(table)
    return 0


def cmd_plot(args) -> int:
    from mlxflow.plot import plot_run

    out.print(str(plot_run(args.run, args.out)))
    return 0


# --- bench / fidelity -------------------------------------------------------------------

def cmd_bench(args) -> int:
    from mlxflow import api
    from mlxflow.errors import MlxflowError

    if args.framework == "both" and importlib.util.find_spec("torch") is None:
        console.print("torch is not installed: timing MLX only (pip install 'mlxflow[torch]' to compare)")
        args.framework = "mlx"
    frameworks = ["mlx", "torch"] if args.framework == "both" else [args.framework]
    rows = []
    auto = args.batch_size == "auto"
    if not auto and not args.batch_size.isdigit():
        raise MlxflowError(f"--batch-size must be a number or 'auto', got '{args.batch_size}'")
    for fw in frameworks:
        kw = dict(framework=fw, device=args.torch_device if fw == "torch" else None, bf16=args.bf16)
        with console.status(f"timing {fw} train steps...") as status:
            if auto:
                def tried(batch, row, fw=fw):
                    status.update(f"{fw}: batch {batch} " + (f"{row['img_per_s']:.1f} img/s" if row
                                                             else "out of memory"))
                rows.append(api.bench_largest_batch(args.family, args.preset, limit=args.max_batch,
                                                    on_try=tried, steps=args.steps, **kw))
            else:
                rows.append(api.bench(args.family, args.preset, int(args.batch_size), args.steps, **kw))
        if args.trainer:
            with console.status(f"timing the {fw} trainer..."):
                rows[-1].update(api.bench_trainer(args.family, args.preset, rows[-1]["batch_size"], args.steps,
                                                  data=args.data, device_data=args.device_data, **kw))
    title = "largest batch that fits (up to --max-batch)" if auto else f"batch {args.batch_size}"
    table = Table(title=f"{args.family}/{args.preset or 'default'} train step, {title}")
    for col in ("framework", "device", "batch", "img/s", "trainer img/s", "peak MB", "params", "GFLOP/img fwd",
                "MFU", "trainer MFU", "BLAS"):
        table.add_column(col)
    for r in rows:
        flops = r.get("fwd_flops_per_image")
        trainer = r.get("trainer_img_per_s")
        trainer_mfu = r["mfu"] * trainer / r["img_per_s"] if r.get("mfu") is not None and trainer else None
        table.add_row(r["framework"], str(r["device"]), str(r.get("batch_size", args.batch_size)),
                      f"{r['img_per_s']:.1f}", f"{trainer:.1f}" if trainer else "-", f"{r.get('peak_mem_mb', 0):.0f}",
                      f"{r.get('params', 0) / 1e6:.2f}M", f"{flops / 1e9:.2f}" if flops else "-",
                      f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-",
                      f"{100 * trainer_mfu:.1f}%" if trainer_mfu is not None else "-", r.get("blas", "-"))
    out.print(table)
    if any(r.get("fwd_flops_per_image") for r in rows):
        out.print("FLOPs: 2 x multiply-adds of the matmuls; a training image costs 3 x forward. "
                  f"MFU: {rows[-1]['mfu_peak']}.")
    if len(rows) == 2:
        out.print(f"MLX/torch throughput ratio: {rows[0]['img_per_s'] / rows[1]['img_per_s']:.2f}")
    if any(r.get("blas") == "reference" for r in rows):
        from mlxflow.blas import HOW_TO

        out.print(f"note: MLX is using the slow reference BLAS; {HOW_TO}")
    return 0


def cmd_fidelity(args) -> int:
    from mlxflow import api

    table = Table(title="prompt fidelity (nearest training image is the prompted one)")
    for col in ("model", "step", "fidelity", "samples", "chance"):
        table.add_column(col)
    defaults = api.sampling_defaults(args.ckpt)
    steps, solver = args.steps or defaults["steps"], args.solver or defaults["solver"]
    cfg = args.cfg if args.cfg is not None else defaults["cfg"]
    if args.shift is None:
        args.shift = api.default_shift(defaults, solver)
    table.caption = f"{solver}, {steps} steps, shift {args.shift:g}, CFG {cfg:g}, {args.n} samples for each of {len(args.prompts) if args.prompts else args.k} prompts, seed {args.seed}"
    for untrained in ((False, True) if args.baseline else (False,)):
        with console.status("sampling..."):
            r = api.prompt_fidelity(args.ckpt, args.data, k=args.k, n=args.n, steps=steps, solver=solver,
                                    cfg_scale=cfg, seed=args.seed, untrained=untrained,
                                    interval=defaults["cfg_interval"], shift=args.shift,
                                    prompts=args.prompts or None)
        table.add_row("untrained" if untrained else "trained", str(0 if untrained else r["step"]),
                      f"{r['fidelity']:.3f}", str(r["samples"]), f"{r['chance']:.4f}")
    out.print(table)
    return 0


# --- crosscheck / export ----------------------------------------------------------------

def cmd_crosscheck(args) -> int:
    from mlxflow.crosscheck import run_crosscheck_cli

    with console.status("running both frameworks..."):
        return run_crosscheck_cli(args.ckpt, console=out, batch=args.batch, steps=args.steps, solver=args.solver,
                                  cfg_scale=args.cfg, seed=args.seed, tol=args.tol, device=args.device,
                                  train_step=not args.no_train_step)


def cmd_export(args) -> int:
    from mlxflow.export import export_coreml

    with console.status("converting and verifying..."):
        report = export_coreml(args.ckpt, args.out, precision=args.precision, compress=args.compress,
                               batch_sizes=tuple(args.batch_sizes), min_psnr=args.min_psnr, data=args.data,
                               deployment_target=args.deployment_target)
    table = Table(title=f"Core ML export: {args.out}")
    table.add_column("item")
    table.add_column("value")
    for k, v in report.items():
        table.add_row(k, f"{v:.2f}" if isinstance(v, float) else str(v))
    out.print(table)
    return 0


# --- serve -------------------------------------------------------------------------------

def cmd_serve(args) -> int:
    """A Gradio page in front of one checkpoint; a bad checkpoint ends here with one line."""
    from mlxflow.serve import serve

    serve(args.ckpt, host=args.host, port=args.port, share=args.share)
    return 0


# --- demo --------------------------------------------------------------------------------

# The demo's emoji: distinct shapes and colours a person names at a glance.
DEMO_PROMPTS = ["grinning face", "red heart", "thumbs up", "fire", "pizza", "rocket", "sun", "snowman",
                "watermelon", "ghost", "four leaf clover", "crying face"]


def cmd_demo(args) -> int:
    """Build the emoji set, train the tiny preset on the demo's dozen emoji, write a sample grid
    and score it: the commands a user would type, sized for minutes on a laptop CPU."""
    from mlxflow import api
    from mlxflow.checkpoint import checkpoint_step, list_checkpoints
    from mlxflow.data.dataset import subset_dataset_folder

    root = Path(args.out)
    data, demo_data, run, grid = root / "emoji-data", root / "emoji-demo", root / "run-demo", root / "samples.png"
    parse = build_parser().parse_args
    if not (data / "images.npy").exists():
        # Without skin-tone variants: 1.9k distinct emoji instead of 3.8k near-duplicates.
        cmd_data(parse(["data", "emoji", str(data), "--no-skin-tones"] + (["--font", args.font] if args.font else [])))
    if not (demo_data / "images.npy").exists():
        subset_dataset_folder(data, demo_data, DEMO_PROMPTS)
    ckpts = list_checkpoints(run)
    done = checkpoint_step(ckpts[-1]) if ckpts else 0
    if done < args.steps:
        rc = cmd_train(parse(["train", "emoji", "--data", str(demo_data), "--out", str(run), "--preset", "tiny",
                              "--steps", str(args.steps), "--batch-size", str(len(DEMO_PROMPTS))]
                             + (["--resume", "latest"] if ckpts else [])))
        if rc:
            return rc
    cmd_sample(parse(["sample", str(run), *DEMO_PROMPTS, "--n", "4", "--output", str(grid)]))
    with console.status("scoring the grid..."):
        # Nearest image among all 1.9k emoji, not only the dozen trained on: a sample counts
        # only when it is closer to its own emoji than to any other the font draws.
        d = api.sampling_defaults(run)
        score = api.prompt_fidelity(run, data, prompts=DEMO_PROMPTS, n=4, steps=d["steps"], solver=d["solver"],
                                    cfg_scale=d["cfg"], interval=d["cfg_interval"])
    out.print(f"[bold green]sample grid:[/] {grid.resolve()} (rows: {', '.join(DEMO_PROMPTS)})")
    out.print(f"prompt fidelity {score['fidelity']:.0%} of {score['samples']} samples: the nearest of all "
              f"{round(1 / score['chance'])} emoji is the prompted one (chance {score['chance']:.2%})")
    return 0


# --- parser --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from mlxflow.families import family_names
    from mlxflow.solvers import SOLVERS

    p = argparse.ArgumentParser(prog="mlxflow", description="Flow-matching image generators in MLX.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="build a dataset folder")
    d.add_argument("source", choices=["emoji", "folder", "classes", "latents"],
                   help="emoji: render the colour-emoji font; folder: your images (+ captions); "
                        "classes: one subfolder of images per class; latents: a VAE-latent + T5-token "
                        "cache (the dit family) from --src tar shards / image folder / dataset folder")
    d.add_argument("out", help="output dataset folder")
    d.add_argument("--size", type=int, default=64)
    d.add_argument("--font", help="colour emoji font file (default: the system's)")
    d.add_argument("--images", help="(folder) source folder of images")
    d.add_argument("--captions", help="(folder) captions file: filename<TAB>caption lines, or JSON")
    d.add_argument("--unconditional", action="store_true", help="(folder) no captions: every image, no text")
    d.add_argument("--limit", type=int, help="only the first N emoji")
    d.add_argument("--no-skin-tones", action="store_true", help="(emoji) leave out the skin-tone variants")
    d.add_argument("--text-encoder", help="minilm-tokens (default) | minilm | minilm:DIR | minilm-tokens:DIR | clip | "
                                          "clip:WEIGHTS (latents: t5 | t5:DIR)")
    d.add_argument("--src", help="(latents) WebDataset tar shards (file, folder or glob), an image folder "
                                 "with captions, or a dataset folder")
    d.add_argument("--vae", default="sd-vae", help="(latents) sd-vae (hub cache / hub) or sd-vae:DIR")
    d.add_argument("--random-encoders", action="store_true",
                   help="(latents) tiny RANDOM T5 and VAE instead of the real weights: a labelled pipeline check")
    d.add_argument("--shard-size", type=int, default=4096, help="(latents) samples per cache shard")
    d.add_argument("--no-embed", action="store_true", help="skip caching text embeddings")
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(func=cmd_data)

    t = sub.add_parser("train", help="train a model")
    t.add_argument("family", choices=family_names())
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True, help="run folder (checkpoints, samples)")
    t.add_argument("--preset", help="named preset of the family (default: the family's default)")
    t.add_argument("--steps", type=int)
    t.add_argument("--resume", help="latest | PATH")
    t.add_argument("--text-encoder", help="frozen text encoder spec (default: the family's: emoji minilm-tokens, "
                                          "jit minilm; dit reads its latent cache's)")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--grad-accum", type=int)
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
    t.add_argument("--seed", type=int)
    t.add_argument("--ckpt-every", type=int)
    t.add_argument("--sample-every", type=int)
    t.add_argument("--framework", choices=["mlx", "torch"], default="mlx")
    t.add_argument("--device", help="(torch) cpu | cuda | mps (default: best available)")
    t.add_argument("--log-every", type=int, default=25, help="steps between log lines when not on a terminal")
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
    s.add_argument("--cfg", type=float, help="classifier-free guidance scale (1 = off; default: the family's)")
    s.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"), help="apply CFG only for t in [LO, HI]")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--framework", choices=["mlx", "torch"], default="mlx",
                   help="sample with MLX, or with the torch twin (faster on a Linux CPU; CUDA)")
    s.add_argument("--device", help="(torch) cpu | cuda | mps (default: best available)")
    s.add_argument("--weights", choices=["ema", "ema2", "raw"], default="ema",
                   help="which weights to sample with: the EMA, the second EMA (JiT), or the raw weights")
    s.add_argument("--preview-dir", help="write a grid every --preview-every steps here")
    s.add_argument("--preview-every", type=int, default=0)
    s.set_defaults(func=cmd_sample)

    fd = sub.add_parser("fid", help="FID (standard Inception) of a checkpoint against its training data")
    fd.add_argument("ckpt")
    fd.add_argument("--data", required=True, help="the dataset folder or latent cache it trained on")
    fd.add_argument("--n", type=int, default=1000, help="samples (and reference images); keep it fixed to compare")
    fd.add_argument("--steps", type=int, help="solver steps (default: the family's)")
    fd.add_argument("--solver", choices=sorted(SOLVERS), help="(default: the family's)")
    fd.add_argument("--shift", type=float, help="time-grid shift (default: the family's for its solver)")
    fd.add_argument("--cfg", type=float, help="guidance scale (default: the family's)")
    fd.add_argument("--seed", type=int, default=0)
    fd.add_argument("--fid-weights", help="inception-2015-12-05.pt (default: $MLXFLOW_FID_WEIGHTS, caches)")
    fd.set_defaults(func=cmd_fid)

    so = sub.add_parser("solvers", help="compare few-step solver schedules against a fine reference solve")
    so.add_argument("ckpt")
    so.add_argument("prompts", nargs="+")
    so.add_argument("--schedule", nargs="+", metavar="SOLVER:STEPS[:SHIFT]",
                    default=["euler:50", "euler:10", "heun:5", "midpoint:5", "ab2:10", "ab2:10:2"],
                    help="schedules to compare (default: euler 50 and five 10-evaluation ones)")
    so.add_argument("--data", help="dataset folder: also score prompt fidelity (prompts must be its captions)")
    so.add_argument("--n", type=int, default=4)
    so.add_argument("--cfg", type=float)
    so.add_argument("--seed", type=int, default=0)
    so.set_defaults(func=cmd_solvers)

    pl = sub.add_parser("plot", help="draw a run's curves (RUN/log.jsonl) to a PNG")
    pl.add_argument("run", help="run folder")
    pl.add_argument("--out", help="PNG path (default: RUN/curves.png)")
    pl.set_defaults(func=cmd_plot)

    b = sub.add_parser("bench", help="train-step throughput and peak memory")
    b.add_argument("family", choices=family_names())
    b.add_argument("--preset", help="named preset (default: the family's default)")
    b.add_argument("--batch-size", default="32",
                   help="batch size, or 'auto': double from 8 until memory (or --max-batch) runs out")
    b.add_argument("--max-batch", type=int, default=1024, help="largest batch 'auto' tries")
    b.add_argument("--trainer", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the whole trainer (data, step, EMA, syncs) beside the bare step")
    b.add_argument("--data", help="(--trainer) dataset folder or latent cache (default: random images; "
                                  "dit needs a cache)")
    b.add_argument("--device-data", action=argparse.BooleanOptionalAction,
                   help="(--trainer) hold the set on the device (default: the trainer's choice: when it fits)")
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--framework", choices=["mlx", "torch", "both"], default="both",
                   help="both (default) times MLX and torch on the same preset and batch")
    b.add_argument("--torch-device", default=None, help="cpu | cuda | mps (default: best available)")
    b.add_argument("--bf16", action="store_true", help="(torch) bf16 autocast")
    b.set_defaults(func=cmd_bench)

    f = sub.add_parser("fidelity", help="prompt fidelity against the training images")
    f.add_argument("ckpt")
    f.add_argument("--data", required=True)
    f.add_argument("--k", type=int, default=16, help="number of training prompts")
    f.add_argument("--n", type=int, default=2, help="samples per prompt")
    f.add_argument("--steps", type=int, help="solver steps (default: the family's)")
    f.add_argument("--solver", choices=sorted(SOLVERS), help="(default: the family's)")
    f.add_argument("--shift", type=float, help="time-grid shift (default: the family's for its solver)")
    f.add_argument("--prompts", nargs="+", help="training captions to score (default: --k spread over the set)")
    f.add_argument("--cfg", type=float, help="(default: the family's)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--baseline", action="store_true", help="also score an untrained model of the same shape")
    f.set_defaults(func=cmd_fidelity)

    c = sub.add_parser("crosscheck", help="compare MLX and torch on the same weights")
    c.add_argument("ckpt")
    c.add_argument("--batch", type=int, default=2)
    c.add_argument("--steps", type=int, default=8)
    c.add_argument("--solver", default="heun")
    c.add_argument("--cfg", type=float, default=3.0)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--tol", type=float, default=1e-4)
    c.add_argument("--device", default="cpu")
    c.add_argument("--no-train-step", action="store_true")
    c.set_defaults(func=cmd_crosscheck)

    e = sub.add_parser("export", help="export a checkpoint")
    e.add_argument("target", choices=["coreml"])
    e.add_argument("ckpt")
    e.add_argument("out", help="output folder")
    e.add_argument("--precision", choices=["fp16", "fp32"], default="fp16")
    e.add_argument("--compress", choices=["palettize6", "palettize8", "int8"])
    e.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    e.add_argument("--min-psnr", type=float, default=35.0, help="refuse an export below this PSNR (dB) vs torch")
    e.add_argument("--target", dest="deployment_target", default="iOS17", choices=["iOS17", "iOS18", "macOS14", "macOS15"],
                   help="deployment target; iOS18/macOS15 give true enumerated batch shapes")
    e.add_argument("--data", help="training dataset folder for the label table (default: the one the run used)")
    e.set_defaults(func=cmd_export)

    w = sub.add_parser("serve", help="web demo: a Gradio page that streams samples as they integrate")
    w.add_argument("ckpt", help="checkpoint folder, or run folder (its latest checkpoint)")
    w.add_argument("--port", type=int, default=7860)
    w.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve your network")
    w.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    w.set_defaults(func=cmd_serve)

    m = sub.add_parser("demo", help="build the emoji set, train the tiny preset on a dozen emoji, write and score a grid")
    m.add_argument("--out", default="runs/demo")
    m.add_argument("--steps", type=int, default=800)
    m.add_argument("--font")
    m.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        from mlxflow.blas import reexec_with_fast_blas

        reexec_with_fast_blas([sys.executable, sys.argv[0], *sys.argv[1:]])
    args = build_parser().parse_args(argv)
    from mlxflow.errors import MlxflowError

    try:
        return args.func(args)
    except MlxflowError as e:
        # Plain print: one line, never wrapped or styled, whatever the terminal width.
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; checkpoints already written are intact (--resume latest continues a run)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
