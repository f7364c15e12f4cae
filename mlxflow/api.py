"""The one door: everything the CLI and the web demo do, as plain functions.

    data      build_emoji_data, import_folder_data, import_class_data, build_latent_data
    train     train_model (MLX or torch; torchrun runs the same call on every rank)
    generate  generator (a loaded mlxflow.pipeline.Generator), sample, sample_frames
    evaluate  fidelity, fid, solvers
    tools     bench, crosscheck, export_coreml, plot, demo, checkpoint_info

Functions take plain arguments and optional progress callbacks and return numbers, paths
or images; printing and progress bars are the faces' job. Sampling arguments left as None
take the family's defaults (mlxflow.pipeline.SamplingSettings), so the CLI, Python callers
and `serve` draw the same images for the same checkpoint, prompts and seed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import bench as _bench
from . import crosscheck as _crosscheck
from . import evaluate
from .blas import reexec_with_fast_blas
from .checkpoint import checkpoint_step, list_checkpoints
from .data.classes import import_class_folder
from .data.dataset import ImageTextDataset, subset_dataset_folder
from .data.inputs import describe_skipped
from .data.emoji import build_emoji_dataset
from .data.folder import import_image_folder
from .data.latent_cache import build_latent_cache
from .data.shards import open_samples
from .encoders import load_latent_vae, load_text_encoder, random_encoder_folders
from .errors import MlxflowError
from .families import build_model, family_names, get_family, load_checkpoint
from .pipeline import Generator, check_count
from .plot import plot_run
from .sample import make_grid, model_evals, save_png
from .solvers import SOLVERS
from .torch_ref import check_device
from .train.loop import load_training_data
from .train.resume import resume_rules
from .train.watch import RunWatcher, grid_conditions
from .train.mlx_session import train as train_mlx

__all__ = ["MlxflowError", "Generator", "family_names", "SOLVERS", "save_png", "make_grid", "model_evals", "describe_skipped",
           "grid_conditions"]

# Per-token MiniLM states: what the emoji family's cross-attention reads (families.Family.text_encoder).
DEFAULT_TEXT_ENCODER = "minilm-tokens"
bench_largest_batch, bench_trainer = _bench.bench_largest_batch, _bench.bench_trainer


def use_fast_blas(argv: list[str]) -> None:
    """Restart this process as `argv` with OpenBLAS preloaded when that helps (Linux; mlxflow.blas)."""
    reexec_with_fast_blas(argv)


def presets(family: str) -> list[str]:
    """The named presets of a family."""
    return list(get_family(family).model_presets)


# --- data ------------------------------------------------------------------------------

def build_emoji_data(out_dir, size: int = 64, font=None, limit: int | None = None, overwrite: bool = False,
                     skin_tones: bool = True, text_encoder: str | None = DEFAULT_TEXT_ENCODER,
                     on_render: Callable[[int, int], None] | None = None,
                     on_embed: Callable[[int, int], None] | None = None) -> dict:
    """Render the emoji set to `out_dir` and cache its text embeddings; returns dataset.json's dict."""
    if text_encoder:
        load_text_encoder(text_encoder)  # a bad spec fails here, before anything is written
    info = build_emoji_dataset(out_dir, size=size, font=font, limit=limit, on_progress=on_render, overwrite=overwrite,
                               skin_tones=skin_tones)
    if text_encoder:
        embed_dataset(out_dir, text_encoder, on_embed)
    return info


def build_latent_data(source, out_dir, *, vae: str = "sd-vae", text_encoder: str = "t5", random_encoders: bool = False,
                      size: int = 64, limit: int | None = None, shard_size: int = 4096, batch_size: int = 64,
                      captions=None, on_progress: Callable[[int, int, int | None], None] | None = None):
    """Encode tar shards, an image folder with captions or a dataset folder into a latent
    cache: SD-VAE latents + T5 token ids, sharded and resumable (run it again after an
    interruption). Returns the LatentCache."""
    if random_encoders:
        text_encoder, vae = random_encoder_folders(out_dir)
    t5, autoencoder = load_text_encoder(text_encoder), load_latent_vae(vae)
    if not hasattr(t5, "encode_ids"):
        raise MlxflowError(f"a latent cache stores token ids: '{text_encoder}' is not a token encoder (use t5)")
    if size % autoencoder.downsample:
        raise MlxflowError(f"--size {size} is not a multiple of the VAE's downsampling ({autoencoder.downsample})")
    samples = open_samples(source, size=size, limit=limit, captions=captions)
    meta = {"vae": autoencoder.spec, "text_encoder": t5.spec, "text_dim": int(t5.dim), "image_size": int(size),
            "random": bool(getattr(t5, "random", False) or autoencoder.random), "source": samples.describe()}
    return build_latent_cache(
        samples, out_dir, meta=meta, shard_size=shard_size, batch_size=batch_size, on_progress=on_progress,
        encode_images=lambda images: autoencoder.encode(images.astype(np.float32) / 127.5 - 1.0),
        tokenize=t5.tokenize)


def import_folder_data(src_dir, out_dir, size: int = 64, captions=None, overwrite: bool = False,
                       text_encoder: str | None = DEFAULT_TEXT_ENCODER, unconditional: bool = False,
                       on_render: Callable[[int, int], None] | None = None,
                       on_embed: Callable[[int, int], None] | None = None) -> dict:
    """A folder of images + captions file (or no captions, `unconditional`) -> dataset folder.

    Unreadable images are skipped and counted ("skipped", "skipped_details": name and reason)."""
    if text_encoder and not unconditional:
        load_text_encoder(text_encoder)  # a bad spec fails here, before anything is written
    info = import_image_folder(src_dir, out_dir, size=size, captions=captions, on_progress=on_render,
                               overwrite=overwrite, unconditional=unconditional)
    if text_encoder and not unconditional:
        embed_dataset(out_dir, text_encoder, on_embed)
    return info


def import_class_data(src_dir, out_dir, size: int = 64, overwrite: bool = False,
                      on_render: Callable[[int, int], None] | None = None) -> dict:
    """A folder with one subfolder of images per class -> class-labelled dataset folder."""
    return import_class_folder(src_dir, out_dir, size=size, on_progress=on_render, overwrite=overwrite)


def embed_dataset(data_dir, text_encoder: str = DEFAULT_TEXT_ENCODER, on_progress=None) -> np.ndarray:
    """The (N, L, D) caption embeddings of a dataset folder, computed once and cached in it."""
    return ImageTextDataset.load(data_dir).text_embeddings(load_text_encoder(text_encoder), on_progress=on_progress)


def load_embeddings(path) -> np.ndarray:
    """float32 (N, L, D) caption embeddings from a .npy file; MlxflowError when unreadable or misshapen."""
    try:
        emb = np.load(path)
    except (OSError, ValueError) as e:
        raise MlxflowError(f"cannot read embeddings {path}: {e}") from None
    if emb.ndim != 3 or not np.issubdtype(emb.dtype, np.floating):
        raise MlxflowError(f"{path}: embeddings must be a float (N, L, D) array, got {emb.dtype} {emb.shape}")
    return emb.astype(np.float32)


# --- train -------------------------------------------------------------------------------

def train_model(family: str, data_dir, out_dir, *, preset: str | None = None, steps: int | None = None,
                resume: str | None = None, text_encoder: str | None = None, model_overrides: dict | None = None,
                train_overrides: dict | None = None, framework: str = "mlx", device: str | None = None,
                embeddings: np.ndarray | None = None, on_step=None, on_checkpoint=None, on_sample=None,
                on_message=None, sample_prompts: int = 8):
    """Train `family` on a dataset folder (or latent cache) with MLX or torch; under torchrun
    every rank calls this and rank 0 writes. Periodic sample grids go to OUT/samples/step-*.png;
    evaluations log FID when the FID network's weights are on this machine.
    `embeddings`: precomputed (N, L, D) conditions instead of the text encoder's.

    Returns the trainer's TrainResult (checkpoint, losses, steps, interrupted, ...)."""
    fam = get_family(family)
    mcfg = fam.model_config(preset, **(model_overrides or {}))
    tcfg = fam.train_config(preset, steps=steps, **(train_overrides or {}))
    if resume:
        tcfg = resume_rules(fam, out_dir, resume, tcfg, preset, text_encoder, train_overrides or {}, on_message)
    dataset = load_training_data(fam, data_dir)
    watch = RunWatcher(family, out_dir, data_dir, len(dataset), sample_prompts, on_sample)
    kwargs = dict(family=family, text_encoder=text_encoder, resume=resume, embeddings=embeddings, on_step=on_step,
                  on_checkpoint=on_checkpoint, on_sample=watch.samples if sample_prompts else None,
                  on_message=on_message, on_eval=watch.fid)
    if framework == "mlx":
        if device not in (None, "cpu", "gpu"):
            raise MlxflowError(f"--device {device} is for the torch trainer; MLX uses its default device "
                               "(add --framework torch to train on it)")
        return train_mlx(out_dir, dataset, mcfg, tcfg, **kwargs)
    if framework == "torch":
        from .train.torch_session import train_torch  # torch is optional

        device = check_device(device) if device else None
        return train_torch(out_dir, dataset, mcfg, tcfg, device=device, **kwargs)
    raise MlxflowError(f"unknown framework '{framework}' (known: mlx, torch)")


def is_rank_zero() -> bool:
    """False in the ranks > 0 of a torchrun or mlx.launch job (they train silently)."""
    return int(os.environ.get("RANK", os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))) == 0


# --- generate ----------------------------------------------------------------------------

def generator(ckpt, *, weights: str = "ema", framework: str = "mlx", device: str | None = None) -> Generator:
    """A checkpoint (or run folder) loaded for sampling; see mlxflow.pipeline.Generator."""
    return Generator.from_checkpoint(ckpt, weights=weights, framework=framework, device=device)


def checkpoint_info(ckpt, *, examples: int = 8) -> dict:
    """What a front end shows beside a checkpoint (Generator.info), read without building the network."""
    return Generator(load_checkpoint(ckpt), network=None).info(examples)


def sample(ckpt, prompts: list[str], output, *, n: int = 1, steps: int | None = None, solver: str | None = None,
           cfg_scale: float | None = None, seed: int = 0, interval=None, shift: float | None = None,
           preview_dir=None, preview_every: int = 0, on_step: Callable[[int, int], None] | None = None,
           weights: str = "ema", framework: str = "mlx", device: str | None = None) -> Path:
    """Generate n images per prompt into one grid PNG (a row per prompt, 2x nearest); returns its path.

    `ckpt` is a path or a Generator. None settings are the family's defaults. With
    `preview_dir`, a grid is also written every `preview_every` steps."""
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise MlxflowError(f"--output must end in .png, got {out}")
    if preview_every < 0:
        raise MlxflowError(f"--preview-every must be >= 0, got {preview_every}")
    gen = ckpt if isinstance(ckpt, Generator) else generator(ckpt, weights=weights, framework=framework, device=device)
    frame = None
    for frame in gen.generate(prompts, n=n, steps=steps, solver=solver, cfg=cfg_scale, cfg_interval=interval,
                              shift=shift, seed=seed):
        if preview_dir and preview_every and (frame.step % preview_every == 0 or frame.step == frame.total):
            save_png(make_grid(gen.decode(frame.x), ncols=n), Path(preview_dir) / f"step-{frame.step:03d}.png")
        if on_step:
            on_step(frame.step, frame.total)
    return save_png(make_grid(gen.decode(frame.x), ncols=n, scale=2), out)


def sample_frames(gen: Generator, prompts: list[str], *, n: int = 1, steps: int | None = None,
                  solver: str | None = None, cfg_scale: float | None = None, seed: int = 0, preview: int = 1,
                  interval=None, shift: float | None = None) -> Iterator[tuple[int, int, object]]:
    """Yield (step, steps, grid PIL image) every `preview` solver steps and always after the last.

    The frame with step == steps is the final grid (unscaled): n samples of every prompt, a
    row per prompt; the same samples sample() writes with the same arguments."""
    preview = check_count(preview, "preview interval")
    for frame in gen.generate(prompts, n=n, steps=steps, solver=solver, cfg=cfg_scale, cfg_interval=interval,
                              shift=shift, seed=seed):
        if frame.step % preview and frame.step != frame.total:
            continue
        yield frame.step, frame.total, make_grid(gen.decode(frame.x), ncols=n)


# --- evaluate ----------------------------------------------------------------------------

def fidelity(ckpt, data_dir, *, baseline: bool = False, seed: int = 0, framework: str = "mlx",
             device: str | None = None, **kwargs) -> list[dict]:
    """Prompt fidelity of a checkpoint (evaluate.prompt_fidelity), and with `baseline` also of
    an untrained network of the same shape: [trained, (untrained)], each with "model"."""
    gen = generator(ckpt, framework=framework, device=device)
    rows = [{"model": "trained", **evaluate.prompt_fidelity(gen, data_dir, seed=seed, **kwargs)}]
    if baseline:
        import mlx.core as mx  # the untrained network's initialisation draws from MLX's global RNG

        mx.random.seed(seed)
        fresh = Generator(gen.checkpoint, build_model(gen.family.name, gen.model_config))
        rows.append({"model": "untrained", **evaluate.prompt_fidelity(fresh, data_dir, seed=seed, **kwargs), "step": 0})
    return rows


def fid(ckpt, data_dir, *, weights: str = "ema", **kwargs) -> dict:
    """FID of a checkpoint against its training data (evaluate.fid_score)."""
    return evaluate.fid_score(generator(ckpt, weights=weights), data_dir, **kwargs)


def parse_schedule(spec: str) -> tuple[str, int, float]:
    """'SOLVER:STEPS[:SHIFT]' -> (solver, steps, shift); MlxflowError when malformed."""
    parts = spec.split(":")
    try:
        solver, steps, shift = parts[0], int(parts[1]), float(parts[2]) if len(parts) > 2 else 1.0
    except (IndexError, ValueError):
        raise MlxflowError(f"--schedule wants SOLVER:STEPS[:SHIFT], got '{spec}'") from None
    if solver not in SOLVERS or steps < 1 or not shift > 0 or len(parts) > 3:
        raise MlxflowError(f"--schedule '{spec}': need a solver of {', '.join(sorted(SOLVERS))}, steps >= 1, shift > 0")
    return solver, steps, shift


def solvers(ckpt, prompts: list[str], schedules: list[str], **kwargs) -> list[dict]:
    """Few-step schedules ('SOLVER:STEPS[:SHIFT]') against a fine reference solve (evaluate.solver_comparison)."""
    return evaluate.solver_comparison(generator(ckpt), prompts, [parse_schedule(s) for s in schedules], **kwargs)


# --- tools -------------------------------------------------------------------------------

def bench(family: str, preset: str | None = None, **kwargs) -> dict:
    """Train-step and trainer throughput, memory, FLOPs and MFU (mlxflow.bench.bench_rows)."""
    return _bench.bench_rows(family, preset, **kwargs)


def crosscheck(ckpt, **kwargs):
    """MLX against the torch twin on one checkpoint's weights: a crosscheck.Report (rows of errors)."""
    return _crosscheck.crosscheck(ckpt, **kwargs)


def export_coreml(ckpt, out_dir, **kwargs) -> dict:
    """A verified Core ML denoiser + label table + text encoder for an app (convert.export.export_app)."""
    from convert.export import export_app  # coremltools is optional

    return export_app(load_checkpoint(ckpt), out_dir, **kwargs)


def plot(run_dir, out=None) -> Path:
    """A run's curves (RUN/log.jsonl) drawn to a PNG; returns its path."""
    return plot_run(run_dir, out)


# The demo's emoji: distinct shapes and colours a person names at a glance.
DEMO_PROMPTS = ["grinning face", "red heart", "thumbs up", "fire", "pizza", "rocket", "sun", "snowman",
                "watermelon", "ghost", "four leaf clover", "crying face"]


def demo(out_dir="runs/demo", *, steps: int | None = None, font=None, full: bool = False, k: int = 256,
         on_render=None, on_embed=None, on_step=None, on_message=None, on_sample_step=None) -> dict:
    """Build the emoji set, train, write a grid of the demo's dozen prompts and score it; what a
    user would type. Re-running resumes each stage.

    Default: `tiny` on those twelve emoji only (800 steps: minutes on a laptop CPU).
    full=True: the `laptop` preset on all 1,898 emoji (its 6,250 steps = 200k images: about 2
    hours of MLX on one core of a Linux CPU), scored over `k` training prompts spread over the set, one sample each.
    Returns {"grid", "checkpoint", "prompts", "fidelity" (evaluate.prompt_fidelity's dict)}:
    a sample counts when, of all the emoji the font draws, the nearest is the prompted one."""
    root = Path(out_dir)
    data, subset, grid = root / "emoji-data", root / "emoji-demo", root / ("samples-full.png" if full else "samples.png")
    run = root / ("run-full" if full else "run-demo")
    if not (data / "images.npy").exists():
        # Without skin-tone variants: 1.9k distinct emoji instead of 3.8k near-duplicates.
        build_emoji_data(data, size=64, font=font, skin_tones=False, on_render=on_render, on_embed=on_embed)
    if not full and not (subset / "images.npy").exists():
        subset_dataset_folder(data, subset, DEMO_PROMPTS)
    preset = "laptop" if full else "tiny"
    steps = steps or get_family("emoji").train_config(preset).steps if full else steps or 800
    overrides = {} if full else {"batch_size": len(DEMO_PROMPTS)}
    ckpts = list_checkpoints(run)
    if not ckpts or checkpoint_step(ckpts[-1]) < steps:
        result = train_model("emoji", data if full else subset, run, preset=preset, steps=steps,
                             resume="latest" if ckpts else None, train_overrides=overrides, on_step=on_step,
                             on_message=on_message)
        if result.interrupted:
            raise KeyboardInterrupt
    gen = generator(run)
    sample(gen, DEMO_PROMPTS, grid, n=4, on_step=on_sample_step)
    score = evaluate.prompt_fidelity(gen, data, k=k, n=1) if full else \
        evaluate.prompt_fidelity(gen, data, prompts=DEMO_PROMPTS, n=4)
    return {"grid": grid.resolve(), "checkpoint": gen.checkpoint.path, "prompts": DEMO_PROMPTS, "fidelity": score}
