"""PyTorch trainer (CUDA, MPS, CPU; data-parallel under torchrun): the short loop around mlxflow.trainer.

Same recipe as the MLX trainer: AdamW with the shared warmup + cosine schedule, global-norm
gradient clipping, gradient accumulation, an EMA of the weights, condition dropout and the
TrainConfig time sampler. Checkpoints are the shared folder format with weights in the
canonical MLX names and layouts, so an MLX process can sample from (or fine-tune) what
this trainer wrote.

Determinism: every random draw of optimizer step `s`, micro-batch `m` (noise, t,
condition-dropout mask) comes from the session's generator re-seeded by (seed, s, m) and
is drawn for the GLOBAL batch; a DDP rank then takes its slice. Two consequences:
  * resume is exact: nothing random has to be carried in state.json;
  * N ranks x B/N rows see exactly the noise one process with B rows would.
The generator lives on the training device, so a CUDA run draws other (equally
distributed) numbers than a CPU run of the same seed.

Speed (small models on big GPUs are bound by per-step overheads, not FLOPs): the image
set and its conditions sit on the device and batches are gathered there by index
(TrainConfig.device_data); noise is drawn there; the loss and gradient norm stay on the
device until the loop reads a window of them back (trainer.run_training); the EMA is one
foreach lerp; AdamW is fused and the model compiled with CUDA.

Run data-parallel with
    torchrun --nproc_per_node 2 -m mlxflow.train_torch --family emoji --data DIR --preset tiny --steps N --out RUN
"""

from __future__ import annotations

import hashlib
import os
import resource
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from convert.torch_mlx import mlx_to_torch, torch_to_mlx

from ..conditioning import drop, kind_of, network_input, random_table
from ..config import TrainConfig
from ..encoders import load_text_encoder_torch
from ..families import get_family
from ..flow import interpolate, sample_time, to_velocity, velocity_target
from ..torch_ref import cpu_threads, default_device, use_cpu_threads
from ..torch_ref.layers import set_fused_attention
from .loop import (RunPlan, TrainResult, eval_times, keeps_data_on_device, prepare_run, rank_rows, run_lock,
                   run_training)


# ----------------------------------------------------------------------------- loss and draws

def flow_matching_loss(model, x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, text,
                       prediction: str = "velocity") -> torch.Tensor:
    """Mean squared velocity error.  x1, x0: (B,C,H,W) NCHW; t: (B,); text: the condition,
    already dropped out ((B,L,D) embeddings, (B,) labels, or None)."""
    x_t = interpolate(x0, x1, t)
    pred = to_velocity(prediction, model(x_t, t, text), x_t, t)
    return F.mse_loss(pred.float(), velocity_target(x0, x1).float())


def step_seed(seed: int, step: int, micro: int) -> int:
    """The generator seed of micro-batch `micro` of optimizer step `step`: a pure function of
    (seed, step, micro). SeedSequence mixes the three so neighbouring pairs get unrelated streams."""
    key = int(np.random.SeedSequence([int(seed), int(step), int(micro)]).generate_state(1, np.uint64)[0])
    return key & ((1 << 63) - 1)


def draw_step_noise(cfg: TrainConfig, step: int, micro: int, batch: int, image_shape: tuple[int, int, int],
                    generator: torch.Generator | None = None):
    """(x0 (B,C,H,W), t (B,), keep (B,) float 0/1) for the GLOBAL batch of one micro-step, drawn
    on the generator's device (default: a fresh CPU generator). Re-seeding is a host-side
    call, so drawing on a GPU needs no synchronisation."""
    g = generator if generator is not None else torch.Generator(device="cpu")
    g.manual_seed(step_seed(cfg.seed, step, micro))
    dev = g.device
    x0 = cfg.noise_scale * torch.randn((batch, *image_shape), generator=g, device=dev)
    t = sample_time(cfg.time_sampler,
                    lambda n: torch.rand(n, generator=g, device=dev),
                    lambda n: torch.randn(n, generator=g, device=dev),
                    batch, cfg.t_mean, cfg.t_std, cfg.t_shift, cfg.t_unshifted)
    keep = (torch.rand(batch, generator=g, device=dev) >= cfg.cond_dropout).float()
    return x0, t, keep


def make_optimizer(params, cfg: TrainConfig, lr: float | None = None, fused: bool = False) -> torch.optim.AdamW:
    """torch's AdamW with the recipe's betas, eps 1e-8 and decoupled decay (the MLX twin: train.make_optimizer).

    fused=True runs the update of every parameter in one kernel (same math, other rounding order).
    """
    return torch.optim.AdamW(params, lr=cfg.lr if lr is None else lr, betas=tuple(cfg.betas), eps=1e-8,
                             weight_decay=cfg.weight_decay, **({"fused": True} if fused else {}))


def cuda_default(flag: bool | None, device: torch.device) -> bool:
    """A speed option left unset (None) is on for CUDA and off elsewhere."""
    return device.type == "cuda" if flag is None else bool(flag)


# ----------------------------------------------------------------------------- weights and state

def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _to_mlx(tensors: dict[str, torch.Tensor], model_config, family: str) -> dict[str, np.ndarray]:
    """torch-named, torch-layout tensors -> canonical MLX names and layouts (numpy, on the CPU)."""

    return torch_to_mlx({k: v.detach().float() for k, v in tensors.items()}, model_config, family)


def _from_mlx(weights: dict[str, np.ndarray], model_config, family: str, where: str) -> dict[str, torch.Tensor]:
    """Checkpoint arrays -> torch state_dict tensors (MlxflowError naming the first bad key)."""

    return mlx_to_torch(weights, model_config, family, where=where)


def weights_digest(model) -> str:
    """sha256 over all parameters in state_dict order: equal digests = bitwise-equal weights."""
    h = hashlib.sha256()
    for k, v in _unwrap(model).state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


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
        dev = torch.device(device or default_device())
        use_cpu_threads(dev)
        return 0, 1, dev, False
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local)
    created = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        created = True
    if not use_cuda:  # ranks share the machine's cores
        torch.set_num_threads(max(1, cpu_threads() // world))
    return rank, world, torch.device(f"cuda:{local}" if use_cuda else "cpu"), created


# ----------------------------------------------------------------------------- the session

class TorchSession:
    """The torch side of a run (see mlxflow.trainer): model (DDP-wrapped when world > 1), EMA, AdamW."""

    def __init__(self, plan: RunPlan, rank: int, world: int, device: torch.device):
        cfg, fam, mcfg = plan.train_config, plan.family, plan.model_config
        self.cfg, self.family, self.mcfg = cfg, fam, mcfg
        self.kind = kind_of(fam, mcfg)
        self.rank, self.world, self.device = rank, world, device
        self.rows = rank_rows(cfg.batch_size, rank, world)
        h, w, c = fam.network_shape(mcfg)
        self.image_shape = (c, h, w)

        # Same seed on every rank, built on the CPU before moving, so all ranks (and a
        # single-process run) start from identical weights.
        torch.manual_seed(cfg.seed)
        model = fam.build(mcfg, "torch")
        ck = plan.checkpoint
        if ck is not None:
            model.load_state_dict(_from_mlx(ck.weights, mcfg, fam.name, f"checkpoint {ck.path}"))
        model.to(device)
        self.model = model
        self.ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        if ck is not None and ck.ema is not None:
            ema_sd = _from_mlx(ck.ema, mcfg, fam.name, f"checkpoint {ck.path} (EMA)")
            self.ema = {k: v.to(device).float() for k, v in ema_sd.items()}
        self.ema2 = None
        if cfg.ema_decay2 > 0:
            self.ema2 = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
            if ck is not None and ck.ema2 is not None:
                ema2_sd = _from_mlx(ck.ema2, mcfg, fam.name, f"checkpoint {ck.path} (second EMA)")
                self.ema2 = {k: v.to(device).float() for k, v in ema2_sd.items()}
        # The tensors each EMA follows, paired once: the update is then one foreach lerp.
        # (state_dict tensors share storage with the parameters, so they track every step.)
        weights = model.state_dict()
        self.ema_floats = [k for k, w in weights.items() if w.is_floating_point()]
        self.ema_others = [k for k, w in weights.items() if not w.is_floating_point()]
        self.ema_weights_of = weights
        self.fused = cuda_default(cfg.fused_adamw, device)
        self.opt = make_optimizer(model.parameters(), cfg, fused=self.fused)
        if ck is not None:
            optimizer_state_from_numpy(self.opt, model, mcfg, fam.name, ck.optimizer, f"checkpoint {ck.path}")
        self.ddp_model = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.fused_attention = cuda_default(cfg.fused_attention, device) and cfg.bf16
        set_fused_attention(model, self.fused_attention)
        self.compiled = cuda_default(cfg.compile, device)
        if self.compiled:
            # Compiles the forward (and so the backward); the weights stay self.model's, so
            # checkpoints, the EMA and the optimizer see the same tensors.
            self.ddp_model = torch.compile(self.ddp_model)
        # bf16 autocast: matmuls/convs in bf16, fp32 master weights and optimizer state, loss in fp32.
        self.amp = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if cfg.bf16 else nullcontext
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.generator = torch.Generator(device=device)
        # The whole set on the device: batches are gathered there by index, not copied per step.
        self.resident = keeps_data_on_device(plan)
        if self.resident:
            self.images = torch.from_numpy(plan.dataset.images).to(device)  # uint8 (N, H, W, C)
            self.table = torch.from_numpy(plan.embeddings).to(device)
        self.clip = cfg.grad_clip if cfg.grad_clip and cfg.grad_clip > 0 else float("inf")
        self.lr = cfg.lr
        model.train()
        # A latent cache carries token ids: the frozen text encoder runs on this device per batch.
        self.text_encoder = None
        if plan.condition_encoder:

            self.text_encoder = load_text_encoder_torch(plan.condition_encoder, device)

    def conditions(self, batch: dict, rows: slice) -> torch.Tensor:
        """This rank's rows of a host batch's conditions, on the device."""
        if self.text_encoder is None:
            return torch.from_numpy(batch["text"][rows]).to(self.device)
        with torch.no_grad():
            return self.text_encoder(torch.from_numpy(batch["text"][rows]).to(self.device),
                                     torch.from_numpy(batch["mask"][rows]).to(self.device))

    def batch_on_device(self, batch: dict, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (b,C,H,W) float32 in [-1, 1], conditions) of this rank's rows, on the device:
        gathered from the resident set for an index batch, copied over for a host batch."""
        if "image" in batch:
            # NHWC -> NCHW (the torch twin's layout).
            image = torch.from_numpy(batch["image"][rows]).permute(0, 3, 1, 2).contiguous().to(self.device)
            return image, self.conditions(batch, rows)
        index = torch.from_numpy(batch["index"][rows]).to(self.device, non_blocking=True)
        # The host stream's arithmetic (float32 x / 127.5 - 1), so both give the same pixels.
        image = self.images[index].float() / 127.5 - 1.0
        if "flip" in batch:
            flip = torch.from_numpy(batch["flip"][rows]).to(self.device, non_blocking=True)
            image = torch.where(flip[:, None, None, None], image.flip(2), image)
        return image.permute(0, 3, 1, 2).contiguous(), self.table[index]

    def step(self, step: int, micro_batches: list[dict], lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (loss, grad_norm) as device scalars, without waiting for them."""
        cfg, rows, dev = self.cfg, self.rows, self.device
        self.lr = lr
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=dev)
        for micro, batch in enumerate(micro_batches):
            x0, t, keep = draw_step_noise(cfg, step, micro, cfg.batch_size, self.image_shape, self.generator)
            x1, cond = self.batch_on_device(batch, rows)
            cond = drop(self.kind, cond, keep[rows] > 0, self.mcfg)
            x0, t = x0[rows], t[rows]
            # DDP all-reduces gradients only on the last micro-batch (no_sync on the others).
            sync = self.world == 1 or micro == len(micro_batches) - 1
            with (nullcontext() if sync else self.ddp_model.no_sync()), self.amp():
                loss = flow_matching_loss(self.ddp_model, x1, x0, t, network_input(self.kind, cond),
                                          self.family.prediction) / len(micro_batches)
            loss.backward()
            loss_sum += loss.detach()
        if self.world > 1:
            dist.all_reduce(loss_sum)  # the logged loss is the global batch's, on every rank
            loss_sum /= self.world
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        # A non-finite step still updates the weights (checking would wait for the GPU); the
        # loop's finite guard stops the run at that step and no checkpoint is written after it.
        self.opt.step()
        with torch.no_grad():
            weights = self.ema_weights_of
            # EMA after every optimizer step: ema += (1 - decay) * (w - ema).
            for average, decay in ((self.ema, cfg.ema_decay), (self.ema2, cfg.ema_decay2)):
                if average is None:
                    continue
                torch._foreach_lerp_([average[k] for k in self.ema_floats],
                                     [weights[k].float() for k in self.ema_floats], 1.0 - decay)
                for k in self.ema_others:
                    average[k].copy_(weights[k])
        return loss_sum, grad_norm.detach()

    def read(self, values: list[torch.Tensor]) -> list[float]:
        """Device scalars -> host floats in one transfer (the loop's only wait for the device)."""
        return torch.stack([v.float() for v in values]).cpu().tolist()

    def evaluate(self, batch: dict) -> dict:
        """Held-out metrics on a fixed batch (the MLX twin: train.MLXSession.evaluate), on this
        rank's unwrapped model, so evaluating needs no collective."""
        cfg, dev = self.cfg, self.device
        x1 = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous().to(dev)
        g = torch.Generator().manual_seed(cfg.seed + 7919)
        x0 = (cfg.noise_scale * torch.randn(x1.shape, generator=g)).to(dev)
        t = torch.from_numpy(eval_times(x1.shape[0])).to(dev)
        cond = self.conditions(batch, slice(None))
        self.model.eval()
        with torch.no_grad(), self.amp():
            x_t = interpolate(x0, x1, t)
            pred = to_velocity(self.family.prediction, self.model(x_t, t, network_input(self.kind, cond)), x_t,
                               t).float()
        self.model.train()
        target = velocity_target(x0, x1).float()
        return {"eval_loss": float(F.mse_loss(pred, target)), "data_mean": float(x1.mean()),
                "data_std": float(x1.std(unbiased=False)), "v_pred_std": float(pred.std(unbiased=False)),
                "v_target_std": float(target.std(unbiased=False))}

    def checkpoint_tensors(self, step: int) -> dict:
        name = self.family.name
        return {"weights": _to_mlx(self.model.state_dict(), self.mcfg, name), "ema": _to_mlx(self.ema, self.mcfg, name),
                "ema2": _to_mlx(self.ema2, self.mcfg, name) if self.ema2 is not None else None,
                "optimizer": optimizer_state_to_numpy(self.opt, self.model, self.mcfg, name, self.lr)}

    def ema_weights(self) -> dict[str, np.ndarray]:
        return _to_mlx(self.ema, self.mcfg, self.family.name)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when any rank saw Ctrl-C, so all stop at the same step."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)


def train_torch(run_dir, dataset, model_config, train_config: TrainConfig, *, family: str,
                text_encoder: str | None = None, resume: str | None = None, device=None, embeddings=None,
                on_step=None, on_checkpoint=None, on_sample=None, on_message=None, on_eval=None) -> TrainResult:
    """Train `family` with torch on a dataset (folder or ImageTextDataset); same contract as train.train.

    Under torchrun (WORLD_SIZE > 1) every rank calls this; rank 0 writes checkpoints.
    The result also carries "world_size", "rank", "device" and "digest" (weights sha256).
    """
    rank, world, dev, created_group = _setup_distributed(device)
    try:
        with run_lock(run_dir, rank):
            plan = prepare_run(run_dir, family, dataset, model_config, train_config, text_encoder=text_encoder,
                               resume=resume, embeddings=embeddings)
            session = TorchSession(plan, rank, world, dev)
            rng = f"torch generator per (seed={plan.train_config.seed}, step, micro)"
            result = run_training(plan, session, framework="torch", on_step=on_step, on_checkpoint=on_checkpoint,
                                  on_sample=on_sample, on_message=on_message, on_eval=on_eval,
                                  extra_state={"rng": rng})
        result.extra.update(world_size=world, rank=rank, device=str(dev), digest=weights_digest(session.model))
        return result
    finally:
        if created_group and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- benchmark

def benchmark_torch(model_config, batch_size: int, *, family: str, steps: int = 10, warmup: int = 3, device=None,
                    bf16: bool = False, compile: bool | None = None, fused_adamw: bool | None = None,
                    fused_attention: bool | None = None) -> dict:
    """Timed training steps (forward + backward + AdamW) on random data, with the trainer's
    speed options (compile and fused AdamW default to on with CUDA, as in training).

    Returns {"img_per_s", "device", "peak_mem_mb", "peak_mem_kind", "params", "step_ms"}.
    peak_mem_kind is "cuda_max_allocated" on CUDA, else "process_max_rss" (whole process,
    including torch itself, so it overstates the model's share).
    """
    fam = get_family(family)
    dev = torch.device(device or default_device())
    use_cpu_threads(dev)
    torch.manual_seed(0)
    model = fam.build(model_config, "torch").to(dev).train()
    fused_attn = cuda_default(fused_attention, dev) and bf16
    set_fused_attention(model, fused_attn)
    opt = make_optimizer(model.parameters(), TrainConfig(lr=1e-4), fused=cuda_default(fused_adamw, dev))
    net = torch.compile(model) if cuda_default(compile, dev) else model
    h, w, c = fam.network_shape(model_config)
    x1 = torch.randn(batch_size, c, h, w, device=dev)
    x0 = torch.randn(batch_size, c, h, w, device=dev)
    t = torch.rand(batch_size, device=dev)
    kind = kind_of(fam, model_config)
    text = network_input(kind, torch.from_numpy(random_table(kind, batch_size, model_config,
                                                             np.random.default_rng(0))).to(dev))
    amp = torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    # Kernels run asynchronously on GPUs: wait for them before reading the clock.
    sync = {"cuda": torch.cuda.synchronize, "mps": lambda: torch.mps.synchronize()}.get(dev.type, lambda: None)

    def one_step():
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = flow_matching_loss(net, x1, x0, t, text, fam.prediction)
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
    return {"framework": "torch", "img_per_s": batch_size * steps / dt, "step_ms": 1000 * dt / steps,
            "compile": net is not model, "fused_adamw": cuda_default(fused_adamw, dev), "bf16": bf16,
            "fused_attention": fused_attn,
            "device": str(dev), "peak_mem_mb": round(peak, 1), "peak_mem_kind": kind,
            "params": sum(p.numel() for p in model.parameters())}
