"""`mlxflow bench`: how fast a family trains, as numbers.

Two measurements per framework, on random data unless a dataset is given:
- the bare step (compiled forward + backward + AdamW + EMA on a batch already on the device):
  img/s, peak memory, parameters, forward FLOPs per image and, on CUDA, MFU;
- the whole trainer (data pipeline, condition lookup, step, EMA, read-backs, logging) through
  the real training loop, timed over whole read-back windows.
`bench_rows` adds what a table wants (trainer MFU, MLX/torch ratio, notes); the CLI prints it.
Under mlx.launch (`mlx.launch -n 2 --backend ring -- python -m mlxflow bench emoji --framework mlx`)
it times the data-parallel step instead (bench_mlx_distributed) and rank 0 prints.
"""

from __future__ import annotations

import gc
import importlib.util
import tempfile
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .blas import HOW_TO, blas_status
from .conditioning import kind_of, network_input, random_table
from .config import TrainConfig
from .data.dataset import ImageTextDataset
from .errors import MlxflowError
from .families import get_family
from .train.mlx_session import make_optimizer, make_train_step, step_key
from .train.mlx_session import train as train_mlx
from .train.mlx_dist import init_group


def _torch_session():
    from .train import torch_session  # torch is optional: imported only to time it

    return torch_session


def _torch_trainer():
    return _torch_session().train_torch


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
        import torch  # optional: without torch there is no counter
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None

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
            train_mlx(run, data, mcfg, tcfg, **kw)
        else:
            train_torch = _torch_trainer()
            train_torch(run, data, mcfg, tcfg, device=device, **kw)
    # Every step reports the rate of its read-back window (log_every steps, or fewer on a slow
    # device); the warm-up ends on a window boundary, so the timed steps' total time is the
    # sum of their per-step times.
    timed = [rate for step, rate in speeds if step > (windows - 1) * steps]
    return {"trainer_img_per_s": len(timed) / sum(1.0 / r for r in timed) if timed else float("nan")}


def _free_memory(framework: str) -> None:
    gc.collect()
    if framework == "torch":
        import torch  # only ever asked for with torch present

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
    fam = get_family(family)
    mcfg = fam.model_config(preset, **({"text_dim": text_dim} if text_dim else {}))
    if framework == "mlx":
        row = bench_mlx(family, preset, batch_size, steps, warmup=warmup, text_dim=text_dim)
    elif framework == "torch":
        row = _torch_session().benchmark_torch(mcfg, batch_size, family=family, steps=steps, warmup=warmup, device=device, bf16=bf16)
    else:
        raise MlxflowError(f"unknown framework '{framework}' (known: mlx, torch)")
    row.setdefault("batch_size", batch_size)
    row["fwd_flops_per_image"] = fam.flops_per_image(mcfg) if fam.flops_per_image else counted_flops_per_image(fam, mcfg)
    row["mfu"], row["mfu_peak"] = None, "MFU only on CUDA"
    if row["fwd_flops_per_image"] and str(row["device"]).startswith("cuda"):
        import torch  # a CUDA row came from torch

        peak, label = peak_flops(torch.cuda.get_device_name())
        row["mfu_peak"] = label
        if peak:
            row["mfu"] = row["img_per_s"] * 3 * row["fwd_flops_per_image"] / peak
    return row


def bench_mlx(family: str, preset: str | None, batch_size: int = 32, steps: int = 10, warmup: int = 3,
              text_dim: int | None = None) -> dict:
    """Train-step throughput of the compiled MLX step on random data: img/s and peak memory."""
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


def bench_mlx_distributed(family: str, preset: str | None, group, batch_size: int = 32, steps: int = 10,
                          warmup: int = 3) -> dict:
    """Data-parallel MLX under mlx.launch: the global batch split over the group's ranks.

    Times, on every rank, the distributed step (its rows + the gradient all-reduce), and the
    all-reduce alone (mlx.nn.average_gradients on the model's gradient-sized tree, as the step
    does it); rank 0 then times one process stepping the whole global batch while the other
    ranks wait. Scaling efficiency = (1-rank step time / N-rank step time) / N.
    Every rank returns the row; the CLI prints rank 0's."""
    import mlx.nn as nn

    world, rank = group.size(), group.rank()
    if batch_size % world:
        raise MlxflowError(f"batch_size {batch_size} must be divisible by the number of processes ({world})")
    fam = get_family(family)
    mcfg = fam.model_config(preset)
    local = batch_size // world
    kind = kind_of(fam, mcfg)

    def build(grp, rows):
        tcfg = TrainConfig(batch_size=batch_size, steps=warmup + steps)
        mx.random.seed(0)
        model, ema = fam.build(mcfg, "mlx"), fam.build(mcfg, "mlx")
        opt = make_optimizer(tcfg)
        opt.init(model.trainable_parameters())
        step = make_train_step(model, ema, opt, tcfg, fam, group=grp)
        images = mx.random.uniform(-1, 1, (1, rows, *fam.network_shape(mcfg)))
        text = mx.array(random_table(kind, rows, mcfg, np.random.default_rng(0))[None])
        mx.eval(images, text, model.parameters(), ema.parameters(), opt.state)
        return model, lambda i: mx.eval(step(images, text, step_key(0, i)), model.state, opt.state, ema.state)

    def timed(run) -> float:
        for i in range(warmup):
            run(i)
        tic = time.perf_counter()
        for i in range(steps):
            run(warmup + i)
        return (time.perf_counter() - tic) / steps

    def barrier():
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))

    model, run = build(group, local)
    barrier()
    t_step = timed(run)
    grads = tree_map(mx.zeros_like, model.trainable_parameters())
    mx.eval(grads)
    barrier()
    t_reduce = timed(lambda i: mx.eval(nn.average_gradients(grads, group=group)))
    per_rank = np.array(mx.distributed.all_sum(
        mx.array(np.eye(world, dtype=np.float32)[rank] * np.float32(t_step)), group=group))
    reduce_rank = np.array(mx.distributed.all_sum(
        mx.array(np.eye(world, dtype=np.float32)[rank] * np.float32(t_reduce)), group=group))
    barrier()
    t_one = float("nan")
    if rank == 0:
        _, run_one = build(None, batch_size)
        t_one = timed(run_one)
    barrier()
    t_n = float(per_rank.max())  # the step ends when the slowest rank's all-reduce does
    return {"framework": f"mlx x{world} ranks", "device": str(mx.default_device()), "batch_size": batch_size,
            "img_per_s": batch_size / t_n, "step_ms_per_rank": [round(1000 * t, 2) for t in per_rank],
            "allreduce_ms_per_rank": [round(1000 * t, 2) for t in reduce_rank],
            "one_rank_img_per_s": batch_size / t_one, "scaling_efficiency": t_one / t_n / world,
            "params": sum(v.size for _, v in tree_flatten(model.parameters())), "blas": blas_status(),
            "world_size": world, "rank": rank, "preset": preset or fam.default_preset}


def bench_rows(family: str, preset: str | None = None, *, batch_size: int | str = 32, frameworks=("mlx", "torch"),
               steps: int = 10, max_batch: int = 1024, trainer: bool = True, data=None, device_data=None,
               torch_device: str | None = None, bf16: bool = False,
               on_status: Callable[[str], None] | None = None) -> dict:
    """Everything `mlxflow bench` prints: {"rows": [one dict per framework], "notes": [...], "title"}.

    batch_size: a number or "auto" (the largest power of two up to `max_batch` that fits).
    "both" frameworks fall back to MLX alone, with a note, when torch is not installed.
    Each row has img_per_s, trainer_img_per_s, trainer_mfu (MFU scaled by trainer/bare step),
    peak_mem_mb, params, fwd_flops_per_image, mfu, blas. Errors: MlxflowError for a bad batch.
    """
    notes = []
    frameworks = list(frameworks)
    if "torch" in frameworks and len(frameworks) > 1 and importlib.util.find_spec("torch") is None:
        notes.append("torch is not installed: timing MLX only (pip install 'mlxflow[torch]' to compare)")
        frameworks = ["mlx"]
    auto = batch_size == "auto"
    if not auto:
        try:
            batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise MlxflowError(f"--batch-size must be a number or 'auto', got '{batch_size}'") from None
        if batch_size < 1:
            raise MlxflowError(f"--batch-size must be >= 1, got {batch_size}")
    if steps < 1:
        raise MlxflowError(f"--steps must be >= 1, got {steps}")
    say = on_status or (lambda msg: None)
    group = init_group() if "mlx" in frameworks else None
    if group is not None:  # under mlx.launch: the data-parallel numbers, MLX only
        if auto:
            raise MlxflowError("--batch-size auto is for one process; give the global batch under mlx.launch")
        say(f"timing mlx on {group.size()} ranks...")
        row = bench_mlx_distributed(family, preset, group, batch_size, steps)
        if trainer:  # the whole data-parallel trainer (every rank runs it; rank 0 reports global img/s)
            say("timing the data-parallel trainer...")
            row.update(bench_trainer(family, preset, batch_size, steps, data=data, device_data=device_data))
        n = row["world_size"]
        ms = lambda values: " / ".join(f"{v:.1f}" for v in values)  # noqa: E731
        notes.append(f"{n} ranks, global batch {batch_size} ({batch_size // n} per rank): step ms per rank "
                     f"{ms(row['step_ms_per_rank'])}, gradient all-reduce alone ms per rank "
                     f"{ms(row['allreduce_ms_per_rank'])}; 1 rank on the whole batch "
                     f"{row['one_rank_img_per_s']:.1f} img/s; scaling efficiency {100 * row['scaling_efficiency']:.0f}%")
        return {"rows": [row], "notes": notes, "title": f"{family}/{preset or 'default'} data-parallel train step, "
                                                        f"global batch {batch_size}", "rank": row["rank"]}
    rows = []
    for fw in frameworks:
        kw = dict(framework=fw, device=torch_device if fw == "torch" else None, bf16=bf16)
        say(f"timing {fw} train steps...")
        if auto:
            def tried(batch, row, fw=fw):
                say(f"{fw}: batch {batch} " + (f"{row['img_per_s']:.1f} img/s" if row else "out of memory"))
            row = bench_largest_batch(family, preset, limit=max_batch, on_try=tried, steps=steps, **kw)
        else:
            row = bench(family, preset, batch_size, steps, **kw)
        if trainer:
            say(f"timing the {fw} trainer...")
            row.update(bench_trainer(family, preset, row["batch_size"], steps, data=data, device_data=device_data,
                                     **kw))
        t = row.get("trainer_img_per_s")
        row["trainer_mfu"] = row["mfu"] * t / row["img_per_s"] if row.get("mfu") is not None and t else None
        rows.append(row)
    if any(r.get("fwd_flops_per_image") for r in rows):
        notes.append("FLOPs: 2 x multiply-adds of the matmuls; a training image costs 3 x forward. "
                     f"MFU: {rows[-1]['mfu_peak']}.")
    if len(rows) == 2:
        notes.append(f"MLX/torch throughput ratio: {rows[0]['img_per_s'] / rows[1]['img_per_s']:.2f}")
    if any(r.get("blas") == "reference" for r in rows):
        notes.append(f"note: MLX is using the slow reference BLAS; {HOW_TO}")
    what = "largest batch that fits (up to --max-batch)" if auto else f"batch {batch_size}"
    return {"rows": rows, "notes": notes, "title": f"{family}/{preset or 'default'} train step, {what}"}
