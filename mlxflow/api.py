"""The Python API behind the CLI: build data, train, sample, evaluate.

Every function takes plain arguments and optional progress callbacks; the CLI adds rich
progress bars on top and nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from .errors import MlxflowError

# Per-token MiniLM states: what the emoji family's cross-attention reads (families.Family.text_encoder).
DEFAULT_TEXT_ENCODER = "minilm-tokens"


def build_emoji_data(out_dir, size: int = 64, font=None, limit: int | None = None, overwrite: bool = False,
                     skin_tones: bool = True, text_encoder: str | None = DEFAULT_TEXT_ENCODER,
                     on_render: Callable[[int, int], None] | None = None,
                     on_embed: Callable[[int, int], None] | None = None) -> dict:
    """Render the emoji set to `out_dir` and cache its text embeddings; returns dataset.json's dict."""
    from .data.emoji import build_emoji_dataset

    info = build_emoji_dataset(out_dir, size=size, font=font, limit=limit, on_progress=on_render, overwrite=overwrite,
                               skin_tones=skin_tones)
    if text_encoder:
        embed_dataset(out_dir, text_encoder, on_embed)
    return info


def random_encoder_folders(out_dir, text_tokens: int = 16) -> tuple[str, str]:
    """Tiny RANDOM T5 and VAE folders beside `out_dir` (made once, seed 0): (t5 spec, vae spec).

    For pipeline checks on a CPU without the real weights; everything built on them is
    labelled random (the cache's meta, the run's notes, the checkpoint, `sample`'s output)."""
    from .models.vae import make_tiny_vae
    from convert.hf_t5 import make_tiny_t5

    root = Path(out_dir).expanduser().resolve()
    root = root.with_name(root.name + ".random-encoders")
    t5, vae = root / "t5", root / "vae"
    if not (t5 / "config.json").is_file():
        make_tiny_t5(t5, max_length=text_tokens)
    if not (vae / "config.json").is_file():
        make_tiny_vae(vae)
    return f"t5:{t5}", f"sd-vae:{vae}"


def build_latent_data(source, out_dir, *, vae: str = "sd-vae", text_encoder: str = "t5", random_encoders: bool = False,
                      size: int = 64, limit: int | None = None, shard_size: int = 4096, batch_size: int = 64,
                      captions=None, on_progress: Callable[[int, int, int | None], None] | None = None):
    """Encode tar shards, an image folder with captions or a dataset folder into a latent
    cache: SD-VAE latents + T5 token ids, sharded and resumable (run it again after an
    interruption). Returns the LatentCache."""
    from .data.latent_cache import build_latent_cache
    from .data.shards import open_samples
    from .models.text import load_text_encoder
    from .models.vae import load_latent_vae

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

    Unreadable images are skipped and counted ("skipped", "skipped_files").
    """
    from .data.folder import import_image_folder

    info = import_image_folder(src_dir, out_dir, size=size, captions=captions, on_progress=on_render,
                               overwrite=overwrite, unconditional=unconditional)
    if text_encoder and not unconditional:
        embed_dataset(out_dir, text_encoder, on_embed)
    return info


def import_class_data(src_dir, out_dir, size: int = 64, overwrite: bool = False,
                      on_render: Callable[[int, int], None] | None = None) -> dict:
    """A folder with one subfolder of images per class -> class-labelled dataset folder."""
    from .data.classes import import_class_folder

    return import_class_folder(src_dir, out_dir, size=size, on_progress=on_render, overwrite=overwrite)


def embed_dataset(data_dir, text_encoder: str = DEFAULT_TEXT_ENCODER, on_progress=None) -> np.ndarray:
    from .data.dataset import ImageTextDataset
    from .models.text import load_text_encoder

    return ImageTextDataset.load(data_dir).text_embeddings(load_text_encoder(text_encoder), on_progress=on_progress)


def cache_conditions(cache, index: np.ndarray, text_encoder: str) -> np.ndarray:
    """float32 (K, L, D) text states of a latent cache's samples `index`: their token ids
    through the frozen encoder, padding rows zero (what the trainers feed the network)."""
    from .models.text import load_text_encoder

    rows = cache.gather(index)
    return load_text_encoder(text_encoder).encode_ids(rows["text"], rows["mask"])


def grid_conditions(plan, picks: np.ndarray) -> np.ndarray:
    """The conditions of training samples `picks` as the network takes them."""
    if plan.embeddings is not None:
        return plan.embeddings[picks]
    return cache_conditions(plan.dataset, picks, plan.condition_encoder)


def train_model(family: str, data_dir, out_dir, *, preset: str | None = None, steps: int | None = None,
                resume: str | None = None, text_encoder: str | None = None, model_overrides: dict | None = None,
                train_overrides: dict | None = None, framework: str = "mlx", device: str | None = None,
                on_step=None, on_checkpoint=None, on_sample=None, on_message=None, sample_prompts: int = 8):
    """Train `family` on a dataset folder with MLX or torch. Periodic sample grids go to OUT/samples/step-*.png.

    Returns the trainer's TrainResult (checkpoint, losses, steps, interrupted, ...).
    """
    from .families import get_family
    from .trainer import load_training_data

    fam = get_family(family)
    mcfg = fam.model_config(preset, **(model_overrides or {}))
    tcfg = fam.train_config(preset, steps=steps, **(train_overrides or {}))
    dataset = load_training_data(fam, data_dir)

    # A fixed, spread-out set of training prompts for the periodic grids.
    picks = np.linspace(0, len(dataset) - 1, min(sample_prompts, len(dataset))).astype(int)
    samples_dir = Path(out_dir) / "samples"

    def write_samples(step, ema_weights, plan):
        """A grid from the run's own conditions and settings (a resumed run's, not the preset's)."""
        from .models import load_weights_into
        from .sample import save_png

        model = fam.build(plan.model_config, "mlx")
        load_weights_into(model, ema_weights, "EMA weights")
        cfg = plan.train_config
        grid = sample_grid(model, grid_conditions(plan, picks), steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg, seed=0,
                           noise_scale=cfg.noise_scale, solver=fam.sample_defaults["solver"],
                           interval=fam.sample_defaults["cfg_interval"],
                           shift=default_shift(fam.sample_defaults, fam.sample_defaults["solver"]))
        path = save_png(grid, samples_dir / f"step-{step:07d}.png")
        if on_sample:
            on_sample(step, path)

    def evaluate_fid(step, ema_weights, plan):
        """FID of the EMA at each evaluation, when the FID network's weights are on this machine."""
        from .fid import fid_available
        from .models import load_weights_into

        if not fid_available():
            return None
        model = fam.build(plan.model_config, "mlx")
        load_weights_into(model, ema_weights, "EMA weights")
        cfg, d = plan.train_config, fam.sample_defaults
        return {"fid": fid_of_model(model, fam, plan.model_config, plan.dataset, data_dir, n=cfg.eval_samples,
                                    text_encoder=plan.condition_encoder or plan.text_encoder, steps=cfg.sample_steps,
                                    solver=d["solver"], cfg_scale=cfg.sample_cfg, interval=d["cfg_interval"],
                                    shift=default_shift(d, d["solver"]), noise_scale=cfg.noise_scale)}

    kwargs = dict(family=family, text_encoder=text_encoder, resume=resume, embeddings=None, on_step=on_step,
                  on_checkpoint=on_checkpoint, on_sample=write_samples if sample_prompts else None,
                  on_message=on_message, on_eval=evaluate_fid)
    if framework == "mlx":
        from .train import train

        return train(out_dir, dataset, mcfg, tcfg, **kwargs)
    if framework == "torch":
        from .train_torch import train_torch

        return train_torch(out_dir, dataset, mcfg, tcfg, device=device, **kwargs)
    raise MlxflowError(f"unknown framework '{framework}' (known: mlx, torch)")


def decode_images(model, x) -> np.ndarray:
    """Network-space samples (N,H,W,C) -> uint8 images through the model's family codec."""
    from .families import family_of
    from .sample import to_uint8

    return to_uint8(family_of(model.config).get_codec().decode(x, model.config))


def sample_grid(model, embeddings: np.ndarray, *, steps: int = 20, solver: str = "heun", cfg_scale: float = 3.0,
                seed: int = 0, ncols: int | None = None, noise_scale: float = 1.0, interval=None, shift: float = 1.0):
    """A grid of one sample per condition (text embeddings, class labels or placeholders)."""
    from .sample import make_grid, sample_steps

    *_, (_, _, x) = sample_steps(model, mx.array(embeddings), steps=steps, solver=solver, cfg_scale=cfg_scale,
                                 seed=seed, noise_scale=noise_scale, interval=interval, shift=shift)
    return make_grid(decode_images(model, x), ncols=ncols, scale=2)


def sample(ckpt, prompts: list[str], output, *, n: int = 1, steps: int = 20, solver: str = "heun",
           cfg_scale: float = 3.0, seed: int = 0, interval=None, preview_dir=None, preview_every: int = 0,
           on_step: Callable[[int, int], None] | None = None, weights: str = "ema", framework: str = "mlx",
           device: str | None = None, shift: float = 1.0) -> Path:
    """Generate n images per prompt into one grid PNG (a row per prompt); returns its path.

    framework="torch" samples with the torch twin (CPU, CUDA or MPS) from the same noise.
    """
    from .sample import generate, make_grid, save_png

    out = Path(output)
    if out.suffix.lower() != ".png":
        raise MlxflowError(f"--output must end in .png, got {out}")
    model, _, gen = generate(ckpt, prompts, n=n, steps=steps, solver=solver, cfg_scale=cfg_scale, seed=seed,
                             interval=interval, weights=weights, framework=framework, device=device, shift=shift)
    x = None
    for i, t, x in gen:
        if preview_dir and preview_every and ((i + 1) % preview_every == 0 or i + 1 == steps):
            save_png(make_grid(decode_images(model, x), ncols=n), Path(preview_dir) / f"step-{i + 1:03d}.png")
        if on_step:
            on_step(i + 1, steps)
    return save_png(make_grid(decode_images(model, x), ncols=n, scale=2), out)


def sample_frames(model, ckpt, prompts: list[str], *, n: int = 1, steps: int = 20, solver: str = "heun",
                  cfg_scale: float = 3.0, seed: int = 0, preview: int = 1,
                  interval: tuple[float, float] | None = None, shift: float = 1.0) -> Iterator[tuple[int, int, object]]:
    """Yield (step, steps, grid PIL image) every `preview` solver steps and always after the last.

    The frame with step == steps is the final grid (mlxflow.sample.make_grid, unscaled):
    n samples of every prompt, a row per prompt (prompts are text, class names or nothing,
    as the checkpoint is conditioned: mlxflow.sample.conditions_for). `model, ckpt` come
    from mlxflow.models.load_model, so a server builds the model once. The same samples
    as sample() with the same arguments.
    """
    from .sample import generate, make_grid

    _, _, gen = generate(None, prompts, n=n, steps=steps, solver=solver, cfg_scale=cfg_scale, seed=seed,
                         interval=interval, loaded=(model, ckpt), shift=shift)
    preview = max(1, int(preview))
    for i, _t, x in gen:
        step = i + 1
        if step % preview and step != steps:
            continue
        yield step, steps, make_grid(decode_images(model, x), ncols=n)


def prompt_fidelity(ckpt, data_dir, *, k: int = 16, n: int = 2, steps: int = 20, solver: str = "heun",
                    cfg_scale: float = 3.0, seed: int = 0, untrained: bool = False, interval=None,
                    shift: float = 1.0, prompts: list[str] | None = None) -> dict:
    """Share of samples whose nearest training image is the prompted one, for K training labels
    spread over the set, or for the given training captions (`prompts`, e.g. a demo's rows).

    `untrained=True` measures a randomly initialised model of the same architecture: the
    floor a trained model must beat.
    """
    from .data.dataset import ImageTextDataset
    from .data.transforms import resize_images
    from .metrics import prompt_fidelity as fidelity
    from .models import build_model, load_model
    from .models.text import load_text_encoder
    from .sample import sample_steps

    model, ck = load_model(ckpt)
    if untrained:
        mx.random.seed(seed)
        model = build_model(ck.family, ck.model_config)
    dataset = ImageTextDataset.load(data_dir)
    emb = dataset.text_embeddings(load_text_encoder(ck.text_encoder))
    if emb.shape[1:] != (ck.model_config.text_tokens, ck.model_config.text_dim):
        raise MlxflowError("the dataset's text embeddings do not match the checkpoint's encoder")
    if prompts:
        prompts = dataset.caption_index(prompts)
    else:
        prompts = np.linspace(0, len(dataset) - 1, min(k, len(dataset))).astype(int)
    text = mx.array(np.repeat(emb[prompts], n, axis=0))
    *_, (_, _, x) = sample_steps(model, text, steps=steps, solver=solver, cfg_scale=cfg_scale, seed=seed,
                                 interval=interval, noise_scale=ck.train_config.noise_scale, shift=shift)
    reference = resize_images(dataset.images, ck.model_config.image_size)
    score = fidelity(decode_images(model, x), np.repeat(prompts, n), reference)
    return {"fidelity": float(score), "prompts": len(prompts), "samples": len(prompts) * n,
            "chance": 1.0 / len(dataset), "untrained": untrained, "step": ck.step}


def fid_references(fam, model_config, dataset, n: int, text_encoder: str):
    """(conditions of the first n samples as the network takes them, images_fn for the FID
    reference statistics): a pixel dataset's own images at the model's size; a latent
    cache's VAE decodes (the images its latents stand for: the cache keeps no pixels)."""
    from .conditioning import kind_of
    from .sample import to_uint8

    n = min(n, len(dataset))
    if fam.get_codec().needs_cache:
        cond = cache_conditions(dataset, np.arange(n), text_encoder)

        def images_fn(count):
            for lo in range(0, count, 64):
                part = dataset.gather(np.arange(lo, min(lo + 64, count)))["image"]
                yield to_uint8(fam.get_codec().decode(part, model_config))
        return cond, images_fn
    from .data.transforms import resize_images
    from .trainer import condition_table

    cond = condition_table(kind_of(fam, model_config), dataset, text_encoder)[:n]
    return cond, lambda count: resize_images(dataset.images[:count], model_config.image_size)


def fid_of_model(model, fam, model_config, dataset, data_dir, *, n: int, text_encoder: str, steps: int, solver: str,
                 cfg_scale: float, interval=None, shift: float = 1.0, noise_scale: float = 1.0, seed: int = 0,
                 batch: int = 50, net=None, on_progress: Callable[[int, int], None] | None = None) -> float:
    """FID (standard Inception) of n samples drawn for the conditions of the first n training
    samples, against those samples' images (reference statistics cached in the data folder)."""
    from .fid import fid, load_fid_network, reference_statistics
    from .sample import sample_steps, to_uint8

    net = net or load_fid_network()
    cond, images_fn = fid_references(fam, model_config, dataset, n, text_encoder)
    n = len(cond)
    mu, sigma = reference_statistics(data_dir, images_fn, net, n, fingerprint=f"{fam.name}-{model_config.image_size}")
    images = []
    for lo in range(0, n, batch):
        *_, (_, _, x) = sample_steps(model, mx.array(cond[lo:lo + batch]), steps=steps, solver=solver,
                                     cfg_scale=cfg_scale, seed=seed + lo, interval=interval, shift=shift,
                                     noise_scale=noise_scale)
        images.append(to_uint8(fam.get_codec().decode(np.asarray(x), model_config)))
        if on_progress:
            on_progress(min(lo + batch, n), n)
    return fid(np.concatenate(images), mu, sigma, net)


def fid_score(ckpt, data_dir, *, n: int = 1000, steps: int | None = None, solver: str | None = None,
              cfg_scale: float | None = None, seed: int = 0, shift: float | None = None, fid_weights=None,
              weights: str = "ema", on_progress=None) -> dict:
    """FID of a checkpoint against its training data (a dataset folder or a latent cache)."""
    from .fid import load_fid_network
    from .families import get_family
    from .models import load_model

    model, ck = load_model(ckpt, use_ema=weights)
    fam = get_family(ck.family)
    d = fam.sample_defaults
    steps, solver = steps or d["steps"], solver or d["solver"]
    cfg_scale = d["cfg"] if cfg_scale is None else cfg_scale
    shift = default_shift(d, solver) if shift is None else shift
    net = load_fid_network(fid_weights)
    from .trainer import load_training_data

    dataset = load_training_data(fam, data_dir)
    score = fid_of_model(model, fam, ck.model_config, dataset, data_dir, n=n, text_encoder=ck.text_encoder,
                         steps=steps, solver=solver, cfg_scale=cfg_scale, interval=d["cfg_interval"], shift=shift,
                         noise_scale=ck.train_config.noise_scale, seed=seed, net=net, on_progress=on_progress)
    return {"fid": score, "n": min(n, len(dataset)), "steps": steps, "solver": solver, "cfg": cfg_scale,
            "shift": shift, "seed": seed, "step": ck.step, "network": net.id}


def solver_comparison(ckpt, prompts: list[str], schedules: list[tuple[str, int, float]], *, n: int = 4,
                      seed: int = 0, cfg_scale: float | None = None, reference: tuple[str, int, float] = ("rk4", 50, 1.0),
                      data_dir=None, on_done: Callable[[dict], None] | None = None) -> list[dict]:
    """Sample the same noise with several (solver, steps, shift) schedules and score each
    against a fine reference solve (`reference`, default RK4 50 steps = 200 evaluations):
    RMSE of the decoded images in [0, 1] and, with `data_dir`, prompt fidelity. Shows
    which few-step schedule reaches what a many-step one does."""
    from .data.transforms import resize_images
    from .families import get_family
    from .metrics import prompt_fidelity as fidelity
    from .models import load_model
    from .sample import conditions_for, model_evals, sample_steps, to_uint8

    model, ck = load_model(ckpt)
    fam = get_family(ck.family)
    d = fam.sample_defaults
    cfg_scale = d["cfg"] if cfg_scale is None else cfg_scale
    cond = mx.array(np.repeat(conditions_for(ck, prompts), n, axis=0))
    shape = (cond.shape[0], *fam.network_shape(ck.model_config))
    noise = ck.train_config.noise_scale * mx.random.normal(shape, key=mx.random.key(seed))
    ref_index = reference_images = None
    if data_dir is not None:
        from .data.dataset import ImageTextDataset

        dataset = ImageTextDataset.load(data_dir)
        ref_index = np.repeat(dataset.caption_index(prompts), n)
        reference_images = resize_images(dataset.images, ck.model_config.image_size)

    def solve(solver, steps, shift):
        *_, (_, _, x) = sample_steps(model, cond, steps=steps, solver=solver, cfg_scale=cfg_scale, noise=noise,
                                     interval=d["cfg_interval"], shift=shift)
        return to_uint8(fam.get_codec().decode(np.asarray(x), ck.model_config)).astype(np.float32) / 255.0

    target = solve(*reference)
    rows = []
    for solver, steps, shift in schedules:
        images = solve(solver, steps, shift)
        row = {"solver": solver, "steps": steps, "shift": shift, "nfe": model_evals(steps, solver, cfg_scale),
               "rmse": float(np.sqrt(np.mean((images - target) ** 2)))}
        if ref_index is not None:
            row["fidelity"] = float(fidelity((images * 255).round().astype(np.uint8), ref_index, reference_images))
        rows.append(row)
        if on_done:
            on_done(row)
    return rows


# Dense bf16 tensor-core peaks (FLOP/s) by GPU name, for MFU. MFU always divides by the
# bf16 peak (the standard convention), also for fp32 runs, so numbers compare across settings.
BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                   "RTX 4090": 165e12, "RTX 5090": 209e12}


def peak_flops(device_name: str) -> tuple[float | None, str]:
    """(bf16 dense peak FLOP/s, its label) for a CUDA device name; (None, reason) when unknown."""
    for key, peak in BF16_PEAK_FLOPS.items():
        if key.lower() in device_name.lower():
            return peak, f"{key} bf16 dense {peak / 1e12:.0f} TFLOP/s"
    return None, f"no peak known for '{device_name}'"


def _out_of_memory(e: BaseException) -> bool:
    """An allocation failure (torch's CUDA OOM, MLX's Metal/CPU malloc errors), not a bug."""
    if type(e).__name__ == "OutOfMemoryError":
        return True
    msg = str(e).lower()
    return isinstance(e, (RuntimeError, MemoryError)) and ("out of memory" in msg or "allocate" in msg
                                                           or "malloc" in msg or isinstance(e, MemoryError))


def counted_flops_per_image(fam, model_config) -> float | None:
    """Forward FLOPs of one image counted by torch's FlopCounterMode on the torch twin (matmuls
    and convolutions, 2 x multiply-adds), for families without a closed form; None without torch."""
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    from .conditioning import kind_of, network_input, random_table

    model = fam.build(model_config, "torch").eval()
    h, w, c = fam.network_shape(model_config)
    kind = kind_of(fam, model_config)
    cond = network_input(kind, torch.from_numpy(random_table(kind, 1, model_config, np.random.default_rng(0))))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, c, h, w), torch.full((1,), 0.5), cond)
    return float(counter.get_total_flops())


def bench_largest_batch(family: str, preset: str | None = None, *, framework: str = "mlx", start: int = 8,
                        limit: int = 1024, on_try: Callable[[int, dict | None], None] | None = None,
                        **kw) -> dict:
    """The largest power-of-two batch (from `start`, at most `limit`) whose training step
    runs out of neither memory nor limit, timed: `bench`'s row at that batch, with
    "tried" = [(batch, img/s or None for out of memory), ...]."""
    best, tried, batch = None, [], start
    while batch <= limit:
        try:
            row = bench(family, preset, batch, framework=framework, **kw)
        except Exception as e:  # noqa: BLE001 - only allocation failures end the search
            if not _out_of_memory(e):
                raise
            tried.append((batch, None))
            if on_try:
                on_try(batch, None)
            _free_memory(framework)
            break
        tried.append((batch, row["img_per_s"]))
        if on_try:
            on_try(batch, row)
        best = row
        batch *= 2
    if best is None:
        raise MlxflowError(f"not even a batch of {start} fits in memory for {family}/{preset or 'default'}")
    best["tried"] = tried
    return best


def bench_trainer(family: str, preset: str | None = None, batch_size: int = 32, steps: int = 10, *,
                  framework: str = "mlx", device: str | None = None, warmup: int = 3, bf16: bool = False,
                  data=None, device_data: bool | None = None) -> dict:
    """The whole trainer's throughput (data pipeline, condition lookup, step, EMA, read-backs,
    logging) on `data` (a dataset folder or latent cache) or, for pixel families, random
    images: img/s as the trainer reports it over the last `steps` steps (its log interval),
    after at least `warmup` steps (whole windows) of warm-up.
    device_data: TrainConfig.device_data (None: the trainer's choice)."""
    import tempfile

    from .conditioning import kind_of, random_table
    from .data.dataset import ImageTextDataset
    from .families import get_family

    fam = get_family(family)
    mcfg = fam.model_config(preset)
    windows = 1 + -(-max(warmup, 1) // steps)  # warm-up windows, then the timed one
    tcfg = fam.train_config(preset, steps=windows * steps, batch_size=batch_size, grad_accum=1, ckpt_every=0,
                            sample_every=0, eval_every=0, bf16=bf16, max_samples=0, log_every=steps,
                            device_data=device_data)
    embeddings = None
    if data is None:
        if fam.get_codec().needs_cache:
            raise MlxflowError(f"the {family} trainer reads a latent cache: pass --data CACHE to time it")
        rng = np.random.default_rng(0)
        n = batch_size * 4
        h, w, c = fam.network_shape(mcfg)
        images = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
        data = ImageTextDataset(Path("random"), images, ["x"] * n, {"kind": "emoji"})
        embeddings = random_table(kind_of(fam, mcfg), n, mcfg, rng)
    speeds: list[tuple[int, float]] = []  # (step, img/s of the read-back window holding it)
    with tempfile.TemporaryDirectory() as run:
        kw = dict(family=family, embeddings=embeddings, on_step=lambda info: speeds.append((info.step, info.img_per_s)),
                  on_message=lambda msg: None)
        if framework == "mlx":
            from .train import train

            train(run, data, mcfg, tcfg, **kw)
        else:
            from .train_torch import train_torch

            train_torch(run, data, mcfg, tcfg, device=device, **kw)
    # Every step reports the rate of its read-back window (log_every steps, or fewer on a slow
    # device); the warm-up ends on a window boundary, so the timed steps' total time is the
    # sum of their per-step times.
    timed = [rate for step, rate in speeds if step > (windows - 1) * steps]
    return {"trainer_img_per_s": len(timed) / sum(1.0 / r for r in timed) if timed else float("nan")}


def _free_memory(framework: str) -> None:
    import gc

    gc.collect()
    if framework == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    else:
        mx.clear_cache()


def bench(family: str, preset: str | None = None, batch_size: int = 32, steps: int = 10, *,
          framework: str = "mlx", device: str | None = None, warmup: int = 3, text_dim: int | None = None,
          bf16: bool = False) -> dict:
    """Train-step throughput on random data for one framework: img/s, peak memory, params,
    model FLOPs per image (training = 3 x forward) and, on CUDA, MFU against the GPU's bf16 peak.
    text_dim: the text embedding width to build for (default: the preset's)."""
    from .families import get_family

    fam = get_family(family)
    mcfg = fam.model_config(preset, **({"text_dim": text_dim} if text_dim else {}))
    if framework == "mlx":
        row = bench_mlx(family, preset, batch_size, steps, warmup=warmup, text_dim=text_dim)
    elif framework == "torch":
        from .train_torch import benchmark_torch

        row = benchmark_torch(mcfg, batch_size, family=family, steps=steps, warmup=warmup, device=device, bf16=bf16)
    else:
        raise MlxflowError(f"unknown framework '{framework}' (known: mlx, torch)")
    row.setdefault("batch_size", batch_size)
    row["fwd_flops_per_image"] = fam.flops_per_image(mcfg) if fam.flops_per_image else counted_flops_per_image(fam, mcfg)
    row["mfu"], row["mfu_peak"] = None, "MFU only on CUDA"
    if row["fwd_flops_per_image"] and str(row["device"]).startswith("cuda"):
        import torch

        peak, label = peak_flops(torch.cuda.get_device_name())
        row["mfu_peak"] = label
        if peak:
            row["mfu"] = row["img_per_s"] * 3 * row["fwd_flops_per_image"] / peak
    return row


def bench_mlx(family: str, preset: str | None, batch_size: int = 32, steps: int = 10, warmup: int = 3,
              text_dim: int | None = None) -> dict:
    """Train-step throughput of the compiled MLX step on random data: img/s and peak memory."""
    import time

    from mlx.utils import tree_flatten

    from .blas import blas_status
    from .conditioning import kind_of, random_table
    from .config import TrainConfig
    from .families import get_family
    from .train import make_optimizer, make_train_step, step_key

    fam = get_family(family)
    mcfg = fam.model_config(preset, **({"text_dim": text_dim} if text_dim else {}))
    tcfg = TrainConfig(batch_size=batch_size, steps=warmup + steps)
    mx.random.seed(0)
    model, ema = fam.build(mcfg, "mlx"), fam.build(mcfg, "mlx")
    opt = make_optimizer(tcfg)
    opt.init(model.trainable_parameters())
    step = make_train_step(model, ema, opt, tcfg, fam)
    images = mx.random.uniform(-1, 1, (1, batch_size, *fam.network_shape(mcfg)))
    text = mx.array(random_table(kind_of(fam, mcfg), batch_size, mcfg, np.random.default_rng(0))[None])
    mx.eval(images, text, model.parameters(), ema.parameters(), opt.state)
    for i in range(warmup):
        mx.eval(step(images, text, step_key(0, i)), model.state, opt.state, ema.state)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    for i in range(steps):
        mx.eval(step(images, text, step_key(0, warmup + i)), model.state, opt.state, ema.state)
    elapsed = time.perf_counter() - tic
    return {"framework": "mlx", "device": str(mx.default_device()), "img_per_s": batch_size * steps / elapsed,
            "peak_mem_mb": mx.get_peak_memory() / 2**20, "params": sum(v.size for _, v in tree_flatten(model.parameters())),
            "blas": blas_status(), "batch_size": batch_size, "preset": preset or fam.default_preset}


def checkpoint_info(ckpt, *, examples: int = 8) -> dict:
    """What a front end shows beside a checkpoint, read without building the model.

    {"path", "family", "preset", "step", "framework", "text_encoder", "conditioning"
    ("text" | "class" | "none"), "classes" (class names, class-conditional only),
    "image_size", "examples" (up to `examples` training captions, spread over the set;
    empty when the training data is not on this machine)}.
    """
    from .checkpoint import resolve_checkpoint
    from .families import get_family

    path = resolve_checkpoint(ckpt)
    try:
        config = json.loads((path / "config.json").read_text())
        state = json.loads((path / "state.json").read_text())
        fam = get_family(config["family"])
    except (OSError, ValueError, KeyError) as e:
        raise MlxflowError(f"{path} is not a readable mlxflow checkpoint ({e})") from None
    model = config.get("model", {})
    kind = model.get("conditioning", fam.conditioning)
    names: list[str] = []
    data = state.get("dataset")
    if data and (Path(data) / "cache.json").is_file():  # a latent cache: captions live in its shards
        try:
            from .data.latent_cache import LatentCache

            cache = LatentCache.load(data)
            picks = np.linspace(0, len(cache) - 1, min(examples, len(cache))).astype(int) if len(cache) else []
            names = [cache.caption(int(i)) for i in picks]
        except Exception:  # noqa: BLE001 - examples are a nicety; an unreadable cache just has none
            names = []
    elif data and (Path(data) / "captions.json").is_file():
        try:
            names = [c["text"] if isinstance(c, dict) else str(c)
                     for c in json.loads((Path(data) / "captions.json").read_text(encoding="utf-8"))]
        except (OSError, ValueError, KeyError, TypeError):
            names = []
    classes = list(dict.fromkeys(names)) if kind == "class" else []
    picks = np.linspace(0, len(names) - 1, min(examples, len(names))).astype(int) if names else []
    return {"path": str(path), "family": fam.name, "preset": config.get("train", {}).get("preset", ""),
            "step": int(state.get("step", 0)), "framework": config.get("framework", "mlx"),
            "text_encoder": config.get("text_encoder", ""), "conditioning": kind, "classes": classes,
            "image_size": int(model.get("image_size", 0)),
            "examples": list(dict.fromkeys(names[i] for i in picks)) if kind == "text" else []}


def random_encoders(ckpt) -> list[str]:
    """The frozen encoders of a checkpoint that are tiny RANDOM ones (`--random-encoders`):
    specs whose folder's config.json says "mlxflow_random" (empty for real weights)."""
    from .checkpoint import resolve_checkpoint

    path = resolve_checkpoint(ckpt)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return []
    model = config.get("model", {})
    found = []
    for spec in (model.get("vae"), config.get("text_encoder") or model.get("text_encoder")):
        folder = spec.partition(":")[2] if isinstance(spec, str) else ""
        try:
            if folder and json.loads((Path(folder) / "config.json").read_text()).get("mlxflow_random"):
                found.append(spec)
        except (OSError, ValueError):
            pass
    return found


def default_shift(defaults: dict, solver: str) -> float:
    """The time-grid shift of a family's default schedule, when sampling with its solver."""
    return float(defaults.get("shift", 1.0)) if solver == defaults.get("solver") else 1.0


def sampling_defaults(ckpt) -> dict:
    """The family's sampling defaults for a checkpoint: {"steps", "solver", "cfg", "cfg_interval"}."""
    from .families import get_family

    return dict(get_family(checkpoint_info(ckpt, examples=0)["family"]).sample_defaults)
