"""Numerical cross-check of an MLX model against its PyTorch twin.

Both frameworks get the SAME weights (fp32) and the SAME inputs (drawn once with numpy,
transposed NHWC <-> NCHW at the boundary). We compare:

  * every block's output (stem, each down stage, mid, each up stage) and the final output
    of one forward pass, to localise where two implementations part ways;
  * the final image of a guided N-step sampling trajectory (mlxflow.solvers on both sides);
  * one AdamW training step: loss, gradients, gradient norm and the updated weights.

Errors are max |mlx - torch|; rel_err = max_abs / max |torch| (torch is the reference).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from convert.torch_mlx import load_mlx_model, load_torch_model, torch_to_mlx

from .conditioning import kind_of, network_input, random_table, unconditional
from .config import TrainConfig
from .errors import MlxflowError
from .families import family_of, get_family
from .sample import sample_steps, sample_steps_torch
from .train.mlx_session import flow_matching_loss as mlx_loss
from .train.mlx_session import make_optimizer as mlx_optimizer

# Why the looser tolerances:
# - a trajectory runs 2 * steps network evaluations (Heun) with CFG, which multiplies the
#   per-evaluation difference (v_c - v_u) by the guidance scale, and each step feeds the
#   next; fp32 round-off therefore grows roughly with steps * cfg_scale, so the final
#   image is held to TRAJ_FACTOR * tol.
# - the updated weights after one AdamW step: Adam's first step is lr * g / (|g| + eps),
#   a soft sign of g with slope lr / eps at g = 0. Gradient entries that are ~0 (some are 0
#   in exact arithmetic: q/k projections of a cross-attention over one real text token (a
#   pooled-embedding model), where softmax over one key is constant; the DiT's last-block
#   text stream, which no output reads; others are tiny by chance among millions) carry
#   fp32 noise of 1e-10..1e-8 that can flip their sign, so their updates may differ by up
#   to 2 lr. Entries whose gradient is GRAD_WELL times the largest gradient disagreement
#   in their tensor are well determined: there the soft sign moves by <= eps*dg/(|g|+eps)^2 <=
#   1/(4 GRAD_WELL), so their updated weights are held to UPDATE_REL * lr. The optimizer
#   itself is checked exactly by feeding both AdamWs the same gradients (OPTIM_REL * lr).
TRAJ_FACTOR = 10.0
GRAD_WELL = 100.0  # |grad| / (largest |grad_mlx - grad_torch| in its tensor) above which an entry is well determined
UPDATE_REL = 1e-2  # updated weights of well-determined entries, as a fraction of lr
OPTIM_REL = 1e-3  # same gradients in, updated weights out: a fraction of lr


@dataclass
class Row:
    """One comparison: max |a - b|, that over max |reference|, and the limit it is held to.

    `metric` says which of max_abs / rel_err is held to `limit` ("abs" or "rel").
    """

    name: str
    max_abs: float
    rel_err: float
    limit: float
    metric: str = "abs"

    @property
    def passed(self) -> bool:
        value = self.max_abs if self.metric == "abs" else self.rel_err
        return bool(np.isfinite(value)) and value <= self.limit


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)


def compare(name: str, mine, reference, limit: float, metric: str = "abs") -> Row:
    """A Row for two numpy arrays of the same shape (`reference` from torch)."""
    a, b = np.asarray(mine, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"{name}: shapes differ, {a.shape} vs {b.shape}")
    max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return Row(name, max_abs, max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf")), limit, metric)


# --- boundary helpers --------------------------------------------------------------

def _nchw(a: np.ndarray) -> np.ndarray:
    """NHWC -> NCHW for images/feature maps; other ranks unchanged."""
    return np.ascontiguousarray(a.transpose(0, 3, 1, 2)) if a.ndim == 4 else a


def _torch_setup(device: str):
    import torch

    if device.startswith("cuda"):
        # TF32 would make fp32 matmuls/convs ~1e-3 accurate: not a parity test any more.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch


def probe_points(model_config, family=None) -> list[str]:
    """Names of the submodules whose outputs are compared, in execution order (from the family entry)."""

    fam = family_of(model_config) if family is None else get_family(family) if isinstance(family, str) else family
    return list(fam.probe_points(model_config))


def _mlx_submodule(model, name: str):
    obj = model
    for part in name.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else getattr(obj, part)
    return obj


@contextlib.contextmanager
def _mlx_taps(model, names: list[str], store: dict):
    """Record the outputs of MLX submodules by swapping each instance's class for a subclass
    whose __call__ also stores the result (MLX has no forward hooks; the parameter tree and
    the model's code stay untouched). Restored on exit."""
    swapped = []
    try:
        for name in names:
            mod = _mlx_submodule(model, name)
            cls = type(mod)

            def __call__(self, *args, _name=name, _cls=cls, **kwargs):
                out = _cls.__call__(self, *args, **kwargs)
                store[_name] = out
                return out

            mod.__class__ = type(f"Tapped{cls.__name__}", (cls,), {"__call__": __call__})
            swapped.append((mod, cls))
        yield store
    finally:
        for mod, cls in swapped:
            mod.__class__ = cls


@contextlib.contextmanager
def _torch_taps(model, names: list[str], store: dict):
    handles = []
    try:
        for name in names:
            def hook(_module, _inputs, output, _name=name):
                store[_name] = output.detach()

            handles.append(model.get_submodule(name).register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


def _network_shape(model_config) -> tuple[int, int, int]:

    return family_of(model_config).network_shape(model_config)


def _prediction(model_config) -> str:

    return family_of(model_config).prediction


def _kind(model_config) -> str:

    return kind_of(family_of(model_config), model_config)


def _cond(kind: str, a):
    """The network's third argument from a condition array (None for unconditional models)."""

    return network_input(kind, a)


def make_inputs(model_config, batch: int, seed: int) -> dict[str, np.ndarray]:
    """numpy inputs in MLX layout: x (B,H,W,C) noise-like, t (B,) in (0,1), text: the model's
    kind of condition ((B,L,D) embeddings, (B,) labels or placeholders)."""

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *_network_shape(model_config))).astype(np.float32)
    t = rng.uniform(0.02, 0.98, size=batch).astype(np.float32)
    return {"x": x, "t": t, "text": random_table(_kind(model_config), batch, model_config, rng)}


# --- the three comparisons ----------------------------------------------------------

def compare_forward(mlx_model, torch_model, inputs: dict, *, tol: float, device: str = "cpu") -> list[Row]:
    """Per-block rows (held to rel_err <= tol: activations grow through the net) and the final
    output (held to max_abs <= tol)."""
    import mlx.core as mx

    torch = _torch_setup(device)
    names = probe_points(mlx_model.config)
    m_store, t_store = {}, {}
    with _mlx_taps(mlx_model, names, m_store):
        kind = _kind(mlx_model.config)
        out_m = mlx_model(mx.array(inputs["x"]), mx.array(inputs["t"]), _cond(kind, mx.array(inputs["text"])))
        mx.eval(out_m, m_store)
    with _torch_taps(torch_model, names, t_store), torch.no_grad():
        out_t = torch_model(torch.from_numpy(_nchw(inputs["x"])).to(device), torch.from_numpy(inputs["t"]).to(device),
                            _cond(kind, torch.from_numpy(inputs["text"]).to(device)))
    rows = [compare(f"block {n}", _nchw(np.array(m_store[n])), t_store[n].cpu().numpy(), tol, "rel") for n in names]
    rows.append(compare("forward output", _nchw(np.array(out_m)), out_t.cpu().numpy(), tol))
    return rows


def compare_trajectory(mlx_model, torch_model, model_config, *, batch: int, steps: int, solver: str,
                       cfg_scale: float, seed: int, tol: float, device: str = "cpu") -> Row:
    """Final image of a guided `steps`-step solve from the same noise, same conditions on both
    sides, through the samplers users run (sample.sample_steps and its torch twin)."""
    import mlx.core as mx


    _torch_setup(device)
    inp = make_inputs(model_config, batch, seed + 1)
    if _kind(model_config) == "none":
        cfg_scale = 1.0  # the samplers do the same: nothing to guide by
    *_, (_, _, final_m) = sample_steps(mlx_model, mx.array(inp["text"]), steps=steps, solver=solver,
                                       cfg_scale=cfg_scale, noise=mx.array(inp["x"]))
    *_, (_, _, final_t) = sample_steps_torch(torch_model, inp["text"], steps=steps, solver=solver,
                                             cfg_scale=cfg_scale, noise=inp["x"], device=device)
    return compare(f"trajectory ({solver}, {steps} steps, cfg {cfg_scale:g})", np.array(final_m), final_t,
                   TRAJ_FACTOR * tol)


def _mlx_adamw_step(model, grads: dict, cfg: TrainConfig):
    """Clip + one AdamW step on `model` with `grads` (flat MLX-named dict); returns (new flat
    weights as numpy, grad norm) and leaves the model's weights as they were. The optimizer
    is the MLX trainer's own (train.make_optimizer) at the config's peak lr."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_unflatten


    saved = model.parameters()
    tree = tree_unflatten([(k, mx.array(v)) for k, v in grads.items()])
    tree, norm = optim.clip_grad_norm(tree, float(cfg.grad_clip) if cfg.grad_clip > 0 else float("inf"))
    opt = mlx_optimizer(cfg, lr=float(cfg.lr))
    opt.update(model, tree)
    mx.eval(model.parameters(), norm)
    after = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    model.update(saved)
    return after, float(norm)


def _torch_adamw_step(model, grads: dict, cfg: TrainConfig):
    """The torch twin of _mlx_adamw_step (train_torch.make_optimizer); grads are torch-named, torch-layout."""
    import torch

    from .train.torch_session import make_optimizer  # torch is optional

    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    for k, p in params.items():
        p.grad = grads[k].clone()
    norm = torch.nn.utils.clip_grad_norm_(list(params.values()),
                                          float(cfg.grad_clip) if cfg.grad_clip > 0 else float("inf"))
    opt = make_optimizer(list(params.values()), cfg, lr=float(cfg.lr))
    opt.step()
    after = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(saved)
    for p in params.values():
        p.grad = None
    return after, float(norm)


def compare_train_step(mlx_model, torch_model, model_config, train_config: TrainConfig, *, batch: int, seed: int,
                       tol: float, device: str = "cpu") -> list[Row]:
    """One training step (velocity MSE, clip, AdamW) on the same batch from the same weights.

    Rows: loss, gradient norm, gradients, the optimizer alone (both AdamWs fed the SAME
    gradients: isolates decay / bias correction / clipping), and the end-to-end updated
    weights split by how well fp32 determines each gradient entry (see GRAD_WELL above).
    Both models keep their original weights.
    """
    import mlx.core as mx
    import mlx.nn as mnn
    from mlx.utils import tree_flatten


    from .train.torch_session import flow_matching_loss as torch_loss  # torch is optional

    torch = _torch_setup(device)
    rng = np.random.default_rng(seed + 2)
    shape, prediction = (batch, *_network_shape(model_config)), _prediction(model_config)
    x1 = np.tanh(rng.standard_normal(shape)).astype(np.float32)  # image-like, in (-1, 1)
    x0 = rng.standard_normal(shape).astype(np.float32)
    t = rng.uniform(0.0, 1.0, size=batch).astype(np.float32)

    kind = _kind(model_config)
    text = random_table(kind, batch, model_config, rng)
    if batch > 1:  # condition dropout already applied: the last sample is unconditional
        text[-1] = unconditional(kind, text[-1:], model_config)[0]
    lr = float(train_config.lr)

    # Loss and gradients on each side.
    before = {k: np.array(v) for k, v in tree_flatten(mlx_model.parameters())}
    value_and_grad = mnn.value_and_grad(mlx_model, lambda *a: mlx_loss(mlx_model, *a, prediction))
    loss_m, grads_m = value_and_grad(mx.array(x1), mx.array(x0), mx.array(t), _cond(kind, mx.array(text)))
    mx.eval(loss_m, grads_m)
    g_m = {k: np.array(v) for k, v in tree_flatten(grads_m)}

    was_training = torch_model.training
    torch_model.train()
    torch_model.zero_grad(set_to_none=True)

    def tt(a, image=False):
        return torch.from_numpy(_nchw(a) if image else a).to(device)

    loss_t = torch_loss(torch_model, tt(x1, True), tt(x0, True), tt(t), _cond(kind, tt(text)), prediction)
    loss_t.backward()
    grads_t = {k: p.grad.detach().clone() for k, p in torch_model.named_parameters()}
    torch_model.zero_grad(set_to_none=True)
    torch_model.train(was_training)
    g_t = torch_to_mlx(grads_t, model_config)

    # Optimizer steps: each side with its own gradients, and MLX with torch's gradients.
    after_m, norm_m = _mlx_adamw_step(mlx_model, g_m, train_config)
    after_m_tg, _ = _mlx_adamw_step(mlx_model, g_t, train_config)
    after_t, norm_t = _torch_adamw_step(torch_model, grads_t, train_config)
    w_t = torch_to_mlx(after_t, model_config)

    keys = sorted(before)
    flat = lambda d: np.concatenate([d[k].ravel() for k in keys])  # noqa: E731
    gm, gt = flat(g_m), flat(g_t)
    wm, wt = flat(after_m), flat(w_t)
    # An entry is well determined when both sides' gradient dwarfs the largest fp32
    # disagreement within its tensor; there Adam's steps agree to ~1e-2 lr (see GRAD_WELL).
    noise = np.concatenate([np.full(g_m[k].size, np.max(np.abs(g_m[k] - g_t[k]))) for k in keys])
    well = np.minimum(np.abs(gm), np.abs(gt)) > GRAD_WELL * noise
    rows = [
        compare("train loss", np.array(loss_m), loss_t.detach().cpu().numpy(), tol),
        compare("train grad norm", np.array(norm_m), np.array(norm_t), tol, "rel"),
        compare("train gradients (all params)", gm, gt, tol, "rel"),
        compare("AdamW step, same gradients", flat(after_m_tg), wt, OPTIM_REL * lr),
        compare("train updated weights", wm[well], wt[well], UPDATE_REL * lr),
    ]
    if not well.all():
        rows.append(compare(f"train updated weights, {int((~well).sum())} grads ~ fp32 noise",
                            wm[~well], wt[~well], 2.01 * lr))
    return rows


# --- entry points -------------------------------------------------------------------

def crosscheck_models(mlx_model, torch_model, model_config, *, train_config: TrainConfig | None = None,
                      batch: int = 2, steps: int = 8, solver: str = "heun", cfg_scale: float = 3.0, seed: int = 0,
                      tol: float = 1e-4, device: str = "cpu", train_step: bool = True) -> Report:
    """Cross-check two already-loaded models (the function-level entry tests use)."""
    report = Report(info={"device": device, "batch": batch, "steps": steps, "solver": solver,
                          "cfg_scale": cfg_scale, "seed": seed, "tol": tol})
    inputs = make_inputs(model_config, batch, seed)
    report.rows += compare_forward(mlx_model, torch_model, inputs, tol=tol, device=device)
    if steps > 0:
        report.rows.append(compare_trajectory(mlx_model, torch_model, model_config, batch=batch, steps=steps,
                                              solver=solver, cfg_scale=cfg_scale, seed=seed, tol=tol, device=device))
    if train_step:
        report.rows += compare_train_step(mlx_model, torch_model, model_config, train_config or TrainConfig(),
                                          batch=batch, seed=seed, tol=tol, device=device)
    return report


def crosscheck(ckpt_path, *, batch: int = 2, steps: int = 8, solver: str = "heun", cfg_scale: float = 3.0,
               seed: int = 0, tol: float = 1e-4, device: str = "cpu", train_step: bool = True,
               use_ema: bool = True, train_config: TrainConfig | None = None) -> Report:
    """Load the checkpoint's weights (fp32) into the MLX model and its torch twin; compare.

    The train step uses the checkpoint's train config (lr, betas, weight decay, clip) unless
    `train_config` is given.
    """
    if batch < 1:
        raise MlxflowError(f"batch must be >= 1, got {batch}")
    mlx_model, ckpt = load_mlx_model(ckpt_path, use_ema=use_ema)
    torch_model, _ = load_torch_model(ckpt, device=device, use_ema=use_ema)
    report = crosscheck_models(mlx_model, torch_model, ckpt.model_config, train_config=train_config or ckpt.train_config,
                               batch=batch, steps=steps, solver=solver, cfg_scale=cfg_scale, seed=seed, tol=tol,
                               device=device, train_step=train_step)
    report.info["checkpoint"] = str(ckpt.path)
    return report
