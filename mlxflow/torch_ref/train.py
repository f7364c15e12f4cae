"""PyTorch reference trainer: the twin of mlxflow/train.py for CUDA and multi-GPU (DDP) runs.

Same recipe as the MLX trainer: AdamW with the shared warmup + cosine schedule, global-norm
gradient clipping, gradient accumulation, an EMA of the weights, condition dropout and the
TrainConfig time sampler. Checkpoints are the shared folder format with weights in the
canonical MLX names and layouts, so an MLX process can sample from (or fine-tune) what
this trainer wrote.

Determinism: every random draw of optimizer step `s`, micro-batch `m` (noise, t,
condition-dropout mask) comes from a fresh CPU generator seeded by (seed, s, m) and is
drawn for the GLOBAL batch; a DDP rank then takes its slice. Two consequences:
  * resume is exact: nothing random has to be carried in state.json;
  * N ranks x B/N rows see exactly the noise one process with B rows would.

Run data-parallel with
    torchrun --nproc_per_node 2 -m mlxflow.torch_ref.train --data DIR --preset tiny --steps N --out RUN
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..checkpoint import checkpoint_to_resume, list_checkpoints, save_checkpoint
from ..config import TrainConfig
from ..errors import MlxflowError
from ..flow import interpolate, sample_time, velocity_target, x_to_velocity
from ..schedule import lr_at
from . import default_device


# ----------------------------------------------------------------------------- loss

def flow_matching_loss(model, x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Mean squared velocity error.  x1, x0: (B,3,H,W) NCHW; t: (B,); text: (B,L,D).

    Condition dropout is the caller's business (it zeroes `text` rows before this call).
    An x-predicting network is scored in velocity space (JiT): the loss weights
    all t like a velocity model's would.
    """
    x_t = interpolate(x0, x1, t)
    pred = model(x_t, t, text)
    cfg = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
    if cfg is not None and getattr(cfg, "prediction", "velocity") == "x":
        pred = x_to_velocity(pred, x_t, t)
    return F.mse_loss(pred.float(), velocity_target(x0, x1).float())


# ----------------------------------------------------------------------------- helpers

def _step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, step, micro).

    SeedSequence mixes the three numbers so neighbouring (step, micro) pairs get unrelated
    streams; drawing on the CPU keeps the draws identical on CPU and CUDA.
    """
    key = int(np.random.SeedSequence([int(seed), int(step), int(micro)]).generate_state(1, np.uint64)[0])
    return torch.Generator(device="cpu").manual_seed(key & ((1 << 63) - 1))


def draw_step_noise(cfg: TrainConfig, step: int, micro: int, batch: int, image_shape: tuple[int, int, int]):
    """(x0 (B,C,H,W), t (B,), keep (B,) float 0/1) for the GLOBAL batch of one micro-step."""
    g = _step_generator(cfg.seed, step, micro)
    x0 = torch.randn((batch, *image_shape), generator=g)
    t = sample_time(cfg.time_sampler,
                    lambda n: torch.rand(n, generator=g),
                    lambda n: torch.randn(n, generator=g),
                    batch, cfg.t_mean, cfg.t_std, cfg.t_shift)
    keep = (torch.rand(batch, generator=g) >= cfg.cond_dropout).float()
    return x0, t, keep


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _to_mlx(tensors: dict[str, torch.Tensor], model_config, family: str) -> dict[str, np.ndarray]:
    """torch-named, torch-layout tensors -> canonical MLX names and layouts (numpy, on the CPU)."""
    from convert.torch_mlx import torch_to_mlx

    return torch_to_mlx({k: v.detach().float() for k, v in tensors.items()}, model_config, family)


def _from_mlx(weights: dict[str, np.ndarray], model_config, family: str, where: str) -> dict[str, torch.Tensor]:
    """Checkpoint arrays -> torch state_dict tensors (MlxflowError naming the first bad key)."""
    from convert.torch_mlx import mlx_to_torch

    return mlx_to_torch(weights, model_config, family, where=where)


def weights_digest(model) -> str:
    """sha256 over all parameters in state_dict order: equal digests = bitwise-equal weights."""
    h = hashlib.sha256()
    for k, v in _unwrap(model).state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def build_model(family: str, model_config):
    from ..models import model_class

    return model_class(family, "torch")(model_config)


def _text_embeddings(dataset, text_encoder_spec):
    """float32 (N, L, D) caption embeddings from the dataset's cache or the named encoder."""
    try:
        from ..models.text import load_text_encoder
    except ImportError as e:
        raise MlxflowError(f"no text encoder available ({e}); pass precomputed embeddings") from None
    return dataset.text_embeddings(load_text_encoder(text_encoder_spec))


# Optimizer state is stored exactly as tree_flatten(MLX AdamW.state) is: per parameter
# (canonical MLX key and layout) "<key>.m" (exp_avg) and "<key>.v" (exp_avg_sq), plus
# "step" and "learning_rate". Both trainers use bias-corrected AdamW with eps 1e-8, so
# either one can resume the other's run.
def optimizer_state_to_numpy(opt: torch.optim.Optimizer, model, model_config, family: str,
                             lr: float) -> dict[str, np.ndarray]:
    names = {p: k for k, p in _unwrap(model).named_parameters()}
    m, v, step = {}, {}, 0
    for p, st in opt.state.items():
        if st:
            m[names[p]], v[names[p]] = st["exp_avg"], st["exp_avg_sq"]
            step = int(st["step"])
    out = {f"{k}.m": a for k, a in _to_mlx(m, model_config, family).items()} if m else {}
    out.update({f"{k}.v": a for k, a in _to_mlx(v, model_config, family).items()} if v else {})
    # The same scalar entries (and dtypes) as tree_flatten(mlx AdamW.state).
    out["step"] = np.array(step, np.uint64)
    out["learning_rate"] = np.array(lr, np.float32)
    return out


def optimizer_state_from_numpy(opt: torch.optim.Optimizer, model, model_config, family: str,
                               flat: dict[str, np.ndarray], where: str):
    # safetensors may hand a scalar back as shape (1,): take the element either way.
    step = int(np.asarray(flat.get("step", 0)).reshape(-1)[0])
    if step == 0:
        return
    m = {k[:-2]: a for k, a in flat.items() if k.endswith(".m")}
    v = {k[:-2]: a for k, a in flat.items() if k.endswith(".v")}
    m = _from_mlx(m, model_config, family, f"{where} (optimizer exp_avg)")
    v = _from_mlx(v, model_config, family, f"{where} (optimizer exp_avg_sq)")
    for k, p in _unwrap(model).named_parameters():
        # torch keeps `step` as a float32 scalar tensor on the CPU (non-capturable AdamW).
        opt.state[p] = {"step": torch.tensor(float(step), dtype=torch.float32),
                        "exp_avg": m[k].to(p.device, p.dtype), "exp_avg_sq": v[k].to(p.device, p.dtype)}


def _setup_distributed(device):
    """(rank, world, device, created_group) from torchrun's environment; (0, 1, device, False) alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, torch.device(device or default_device()), False
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local)
    created = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        created = True
    return rank, world, torch.device(f"cuda:{local}" if use_cuda else "cpu"), created


# ----------------------------------------------------------------------------- training

def train_torch(run_dir, dataset_or_path, model_config, train_config: TrainConfig, text_encoder_spec: str = "minilm",
                *, family: str = "emoji", resume=None, device=None, on_step=None, embeddings=None) -> dict:
    """Train `family` on a dataset folder; returns {"step", "loss", "checkpoint", "digest", ...}.

    resume: None (fresh run), "latest" (newest checkpoint in run_dir) or a checkpoint path.
    on_step(step, {"loss", "lr", "img_per_s", "grad_norm"}) runs on rank 0 after every step.
    embeddings: float32 (N, L, D) caption embeddings; otherwise computed/cached with the encoder.
    """
    from ..data.dataset import ImageTextDataset
    from ..train import resize_images

    run_dir = Path(run_dir)
    rank, world, device, created_group = _setup_distributed(device)
    try:
        # ---- resume: the same rules as the MLX trainer (checkpoint.checkpoint_to_resume)
        ckpt, start_step = None, 0
        if resume is not None:
            ckpt, train_config = checkpoint_to_resume(run_dir, resume, family, train_config)
            model_config, start_step = ckpt.model_config, ckpt.step
            text_encoder_spec = ckpt.text_encoder or text_encoder_spec
        cfg = train_config

        # ---- data
        dataset = dataset_or_path if hasattr(dataset_or_path, "batches") else ImageTextDataset.load(dataset_or_path)
        if embeddings is None:
            embeddings = _text_embeddings(dataset, text_encoder_spec)
        embeddings = np.asarray(embeddings, np.float32)
        if ckpt is None:
            # A fresh model takes its text width from the encoder actually used.
            model_config = replace(model_config, text_dim=embeddings.shape[2], text_tokens=embeddings.shape[1])
        elif (model_config.text_tokens, model_config.text_dim) != embeddings.shape[1:]:
            raise MlxflowError(f"text embeddings are {embeddings.shape[1:]} but the checkpoint expects "
                               f"{(model_config.text_tokens, model_config.text_dim)} (a different text encoder?)")
        model_config.validate()
        dataset.images = resize_images(dataset.images, model_config.image_size)
        if len(dataset) < cfg.batch_size:
            raise MlxflowError(f"dataset has {len(dataset)} images, fewer than the batch size {cfg.batch_size}")
        if cfg.batch_size % world:
            raise MlxflowError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({world})")
        local = cfg.batch_size // world
        rows = slice(rank * local, (rank + 1) * local)  # this rank's contiguous slice of the global batch

        # ---- model, EMA, optimizer. Same seed on every rank, built on the CPU before moving,
        # so all ranks (and a single-process run) start from identical weights.
        torch.manual_seed(cfg.seed)
        model = build_model(family, model_config)
        data_pos, last_loss = 0, None
        if ckpt is not None:
            model.load_state_dict(_from_mlx(ckpt.weights, model_config, family, f"checkpoint {ckpt.path}"))
            data_pos = int(ckpt.state.get("batches_consumed", start_step * cfg.grad_accum))
            last_loss = ckpt.state.get("loss")
        model.to(device)
        ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        if ckpt is not None and ckpt.ema is not None:
            ema_sd = _from_mlx(ckpt.ema, model_config, family, f"checkpoint {ckpt.path} (EMA)")
            ema = {k: v.to(device) for k, v in ema_sd.items()}

        opt = torch.optim.AdamW(model.parameters(), lr=lr_at(start_step, cfg), betas=tuple(cfg.betas), eps=1e-8,
                                weight_decay=cfg.weight_decay)
        if ckpt is not None:
            optimizer_state_from_numpy(opt, model, model_config, family, ckpt.optimizer, f"checkpoint {ckpt.path}")

        ddp_model = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

        # bf16 autocast: matmuls/convs in bf16, fp32 master weights and optimizer state, loss in fp32.
        amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
        batches = dataset.batches(cfg.batch_size, cfg.seed, start=data_pos, flip=cfg.flip, embeddings=embeddings)
        image_shape = (model_config.in_channels, model_config.image_size, model_config.image_size)
        params = [p for p in model.parameters() if p.requires_grad]
        clip = cfg.grad_clip if cfg.grad_clip and cfg.grad_clip > 0 else float("inf")

        def save(step, loss):
            if rank == 0:
                save_checkpoint(
                    run_dir, step, family=family, model_config=model_config, train_config=cfg,
                    text_encoder=text_encoder_spec, weights=_to_mlx(model.state_dict(), model_config, family),
                    ema=_to_mlx(ema, model_config, family),
                    optimizer=optimizer_state_to_numpy(opt, model, model_config, family, lr_at(step - 1, cfg)),
                    state={"batches_consumed": data_pos, "loss": loss, "world_size": world,
                           "rng": f"torch generator per (seed={cfg.seed}, step, micro)"},
                    keep=cfg.keep_checkpoints, framework="torch")
            if world > 1:
                dist.barrier()  # nobody races ahead (or exits) while rank 0 is still writing
            return run_dir / f"step-{step:07d}"

        model.train()
        last_good = list_checkpoints(run_dir)[-1] if list_checkpoints(run_dir) else None
        losses: list[float] = []
        step = start_step
        t_last = time.perf_counter()
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                batch = next(batches)
                data_pos += 1
                x0, t, keep = draw_step_noise(cfg, step, micro, cfg.batch_size, image_shape)
                # NHWC -> NCHW (the torch twin's layout), then this rank's rows.
                x1 = torch.from_numpy(batch["image"][rows]).permute(0, 3, 1, 2).contiguous().to(device)
                text = torch.from_numpy(batch["text"][rows]).to(device) * keep[rows, None, None].to(device)
                x0, t = x0[rows].to(device), t[rows].to(device)
                # DDP all-reduces gradients only on the last micro-batch (no_sync on the others).
                sync = world == 1 or micro == cfg.grad_accum - 1
                with (nullcontext() if sync else ddp_model.no_sync()), amp:
                    loss = flow_matching_loss(ddp_model, x1, x0, t, text) / cfg.grad_accum
                loss.backward()
                loss_sum += loss.detach()
            if world > 1:
                dist.all_reduce(loss_sum)  # the logged loss is the global batch's, on every rank
                loss_sum /= world
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            loss_val = float(loss_sum)
            if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
                # Stop before the optimizer touches the weights: nothing bad is ever saved.
                what = f"loss became {loss_val}" if not math.isfinite(loss_val) else f"gradient norm became {grad_norm}"
                where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written"
                raise MlxflowError(f"{what} at step {step + 1}; training stopped ({where})")
            opt.step()
            with torch.no_grad():
                # EMA after every optimizer step: ema += (1 - decay) * (w - ema).
                for k, w in model.state_dict().items():
                    if w.is_floating_point():
                        ema[k].lerp_(w.float(), 1.0 - cfg.ema_decay)
                    else:
                        ema[k].copy_(w)
            step += 1
            losses.append(loss_val)
            last_loss = loss_val
            now = time.perf_counter()
            metrics = {"loss": loss_val, "lr": lr, "grad_norm": grad_norm,
                       "img_per_s": cfg.batch_size * cfg.grad_accum / max(now - t_last, 1e-9)}
            t_last = now
            if rank == 0 and on_step is not None:
                on_step(step, metrics)
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
                last_good = save(step, loss_val)
        final = save(step, last_loss)
        return {"checkpoint": final, "losses": losses, "steps": step, "start_step": start_step,
                "model_config": model_config, "loss": last_loss, "world_size": world, "rank": rank,
                "device": str(device), "digest": weights_digest(model)}
    finally:
        if created_group and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- benchmark

def benchmark_torch(model_config, batch_size: int, steps: int = 10, warmup: int = 3, device=None,
                    family: str = "emoji", bf16: bool = False) -> dict:
    """Timed training steps (forward + backward + AdamW) on random data.

    Returns {"img_per_s", "device", "peak_mem_mb", "peak_mem_kind", "params", "step_ms"}.
    peak_mem_kind is "cuda_max_allocated" on CUDA, else "process_max_rss" (whole process,
    including torch itself, so it overstates the model's share).
    """
    dev = torch.device(device or default_device())
    torch.manual_seed(0)
    model = build_model(family, model_config).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    c, s = model_config.in_channels, model_config.image_size
    x1 = torch.randn(batch_size, c, s, s, device=dev)
    x0 = torch.randn(batch_size, c, s, s, device=dev)
    t = torch.rand(batch_size, device=dev)
    text = torch.randn(batch_size, model_config.text_tokens, model_config.text_dim, device=dev)
    amp = torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    # Kernels run asynchronously on GPUs: wait for them before reading the clock.
    sync = {"cuda": torch.cuda.synchronize, "mps": lambda: torch.mps.synchronize()}.get(dev.type, lambda: None)

    def one_step():
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = flow_matching_loss(model, x1, x0, t, text)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(warmup):
        one_step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    sync()
    dt = time.perf_counter() - t0
    if dev.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(dev) / 2**20, "cuda_max_allocated"
    else:
        # ru_maxrss is KiB on Linux, bytes on macOS.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak, kind = (rss / 2**20 if sys.platform == "darwin" else rss / 1024), "process_max_rss"
    return {"img_per_s": batch_size * steps / dt, "step_ms": 1000 * dt / steps, "device": str(dev),
            "peak_mem_mb": round(peak, 1), "peak_mem_kind": kind,
            "params": sum(p.numel() for p in model.parameters())}


# ----------------------------------------------------------------------------- torchrun entry

def main(argv=None):
    from ..config import model_config as make_model_config, train_config as make_train_config

    p = argparse.ArgumentParser(prog="python -m mlxflow.torch_ref.train",
                                description="Train with the PyTorch twin (single process or under torchrun).")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--out", required=True, help="run folder for checkpoints")
    p.add_argument("--family", default="emoji")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--bf16", action="store_true", default=None)
    p.add_argument("--text-encoder", default="minilm")
    p.add_argument("--embeddings", help="precomputed float32 (N, L, D) caption embeddings (.npy)")
    p.add_argument("--resume", help="'latest' or a checkpoint folder")
    p.add_argument("--device")
    a = p.parse_args(argv)

    rank = int(os.environ.get("RANK", "0"))
    try:
        emb = np.load(a.embeddings) if a.embeddings else None
        mcfg = make_model_config(a.family, a.preset)  # text_dim/text_tokens follow the embeddings
        tcfg = make_train_config(a.family, a.preset, steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum,
                                 lr=a.lr, ckpt_every=a.ckpt_every, seed=a.seed, bf16=a.bf16)

        def log(step, m):
            if step % max(tcfg.log_every, 1) == 0 or step == tcfg.steps:
                print(f"step {step:6d}  loss {m['loss']:.4f}  lr {m['lr']:.2e}  {m['img_per_s']:.1f} img/s", flush=True)

        summary = train_torch(a.out, a.data, mcfg, tcfg, a.text_encoder, family=a.family, resume=a.resume,
                              device=a.device, on_step=log, embeddings=emb)
    except MlxflowError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    if rank == 0:
        print(f"done: step {summary['steps']}, loss {summary['loss']:.4f}, checkpoint {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
