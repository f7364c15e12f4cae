"""Core ML export of the emoji denoiser, its verification, and the text-side label table.

The exported ML Program has three inputs and one output (Float32 arrays; with
``precision="fp16"`` the program casts to fp16 inside):

    x_t      (B, C, H, W)  the noisy image, ~[-1, 1], NCHW
    t        (B,)          flow time, t=0 noise, t=1 data
    text     (B, L, D)     frozen text embedding (zeros = unconditional)
    velocity (B, C, H, W)  dx/dt

A token-level model (``text_mask`` configs) takes per-token states whose padding rows are
exactly zero; it derives its key-padding mask from ``text`` inside the program, so the
app pads with zero rows to L and passes one array (all zeros = unconditional).

The batch sizes are those given at export (default 1 and 2: batch 2 runs CFG's
conditional and unconditional halves in one call). coremltools only allows several
*enumerated* inputs from iOS 18 / macOS 15 on, so for an iOS 17 / macOS 14 target the batch
dimension is a bounded range ``[min(batch_sizes), max(batch_sizes)]`` instead.

On Linux the package is checked by evaluating its serialized program in numpy
(:mod:`convert.mil_eval`); on macOS by ``MLModel.predict``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mlxflow.errors import MlxflowError
from mlxflow.families import get_family
from mlxflow.flow import to_velocity

__all__ = [
    "TIME_CONVENTION",
    "PSNR_GATE_DB",
    "export_denoiser",
    "verify_denoiser",
    "export_and_verify",
    "export_label_table",
    "load_label_table",
    "open_denoiser",
    "psnr",
]

TIME_CONVENTION = "t=0 noise, t=1 data, x_t=(1-t)*noise+t*data, output=velocity dx/dt"
PSNR_GATE_DB = 35.0

_PRECISIONS = ("fp16", "fp32")
_COMPRESSIONS = (None, "palettize6", "palettize8", "int8")
_TARGETS = ("iOS17", "iOS18", "macOS14", "macOS15")


def _require_coremltools():
    try:
        import coremltools as ct  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MlxflowError("Core ML export needs coremltools: pip install 'coremltools>=8' 'numpy<2.4'") from e
    return ct


# ----------------------------------------------------------------------------- converter patch

_GROUP_NORM_PATCHED = False


def _patch_group_norm() -> None:
    """Make torch GroupNorm convert with a flexible (symbolic) batch dimension.

    coremltools 9.0 builds GroupNorm's reshape target as a constant list containing the
    batch *symbol* and fails ("cannot have symbolic values") whenever the batch is
    enumerated or ranged. With only the batch symbolic, reshape to ``[-1, G, C/G, *rest]``
    and back to ``[-1, C, *rest]`` instead; every other case goes to the stock converter.
    """
    global _GROUP_NORM_PATCHED
    if _GROUP_NORM_PATCHED:
        return
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops as torch_ops
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op
    from coremltools.converters.mil.mil.types.symbolic import any_symbolic

    stock = torch_ops.group_norm

    def group_norm(context, node):
        inputs = torch_ops._get_inputs(context, node)
        x = inputs[0]
        if len(inputs) != 6 or x.rank < 3 or any_symbolic(x.shape[1:]) or not any_symbolic(x.shape[:1]):
            return stock(context, node)
        groups, weight, bias, eps = int(inputs[1].val), inputs[2], inputs[3], float(inputs[4].val)
        c, rest = int(x.shape[1]), [int(s) for s in x.shape[2:]]
        h = mb.reshape(x=x, shape=[-1, groups, c // groups] + rest)
        axes = list(range(2, 3 + len(rest)))
        d = mb.sub(x=h, y=mb.reduce_mean(x=h, axes=axes, keep_dims=True))
        var = mb.reduce_mean(x=mb.mul(x=d, y=d), axes=axes, keep_dims=True)
        h = mb.mul(x=d, y=mb.rsqrt(x=var, epsilon=eps))
        h = mb.reshape(x=h, shape=[-1, c] + rest)
        bshape = [1, c] + [1] * len(rest)
        if weight is not None:
            h = mb.mul(x=h, y=mb.reshape(x=weight, shape=bshape))
        if bias is not None:
            h = mb.add(x=h, y=mb.reshape(x=bias, shape=bshape))
        context.add(h, node.name)

    register_torch_op(group_norm, override=True)
    _GROUP_NORM_PATCHED = True


# ----------------------------------------------------------------------------- helpers


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR in dB with the reference's peak-to-peak range as the peak.

    ``10 * log10((max(ref) - min(ref))**2 / mean((ref - test)**2))``; inf when identical.
    """
    ref = np.asarray(reference, np.float64)
    err = np.mean((ref - np.asarray(test, np.float64)) ** 2)
    peak = float(ref.max() - ref.min()) or 1.0
    if err == 0:
        return float("inf")
    return float(10 * np.log10(peak**2 / err))


def _dir_size_mb(path: Path) -> float:
    total = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return total / 2**20


def _replace_dir(src: Path, dst: Path) -> None:
    """Move `src` to `dst`, replacing an existing `dst` only once `src` is complete."""
    dst = Path(dst)
    backup = None
    if dst.exists():
        backup = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, backup)
    try:
        os.replace(src, dst)
    except BaseException:
        if backup is not None:
            os.replace(backup, dst)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _target(ct, name: str):
    if name not in _TARGETS:
        raise MlxflowError(f"unknown deployment target {name!r}; choose one of {', '.join(_TARGETS)}")
    return getattr(ct.target, name)


# ----------------------------------------------------------------------------- export


def velocity_model(torch_model, prediction: str):
    """The exported program always outputs a velocity, whatever the family predicts.

    A velocity network is returned as is; any other is wrapped so its output goes through
    mlxflow.flow.to_velocity (the same conversion training and sampling use) before tracing.
    """
    if prediction == "velocity":
        return torch_model
    import torch

    class VelocityOutput(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x_t, t, text):
            return to_velocity(prediction, self.net(x_t, t, text), x_t, t)

    return VelocityOutput(torch_model).eval()


def _convert(torch_model, *, image_size: int, channels: int, text_tokens: int, text_dim: int,
             precision: str, compress: str | None, batch_sizes: Sequence[int], deployment_target: str,
             compress_weight_threshold: int):
    """Trace + convert (+ compress) in memory; returns the MLModel."""
    ct = _require_coremltools()
    import torch

    if precision not in _PRECISIONS:
        raise MlxflowError(f"unknown precision {precision!r}; choose fp16 or fp32")
    if compress not in _COMPRESSIONS:
        raise MlxflowError(f"unknown compression {compress!r}; choose none, palettize6, palettize8 or int8")
    batch_sizes = sorted({int(b) for b in batch_sizes})
    if not batch_sizes or batch_sizes[0] < 1:
        raise MlxflowError(f"batch_sizes must be positive integers, got {batch_sizes}")
    target = _target(ct, deployment_target)
    _patch_group_norm()

    model = torch_model.eval().float()
    b0 = batch_sizes[0]
    example = (
        torch.zeros(b0, channels, image_size, image_size),
        torch.full((b0,), 0.5),
        torch.zeros(b0, text_tokens, text_dim),
    )
    with torch.no_grad():
        try:
            traced = torch.jit.trace(model, example, check_trace=False)
        except Exception as e:
            raise MlxflowError(f"could not trace the denoiser with inputs x_t{tuple(example[0].shape)}, "
                               f"t{tuple(example[1].shape)}, text{tuple(example[2].shape)}: {e}") from e

    tails = {"x_t": (channels, image_size, image_size), "t": (), "text": (text_tokens, text_dim)}
    if len(batch_sizes) == 1:
        shapes = {k: (b0,) + v for k, v in tails.items()}
    elif deployment_target in ("iOS18", "macOS15"):
        shapes = {k: ct.EnumeratedShapes(shapes=[(b,) + v for b in batch_sizes], default=(b0,) + v)
                  for k, v in tails.items()}
    else:  # several enumerated inputs need iOS18+: use a bounded batch range instead
        shapes = {k: ct.Shape(shape=(ct.RangeDim(lower_bound=b0, upper_bound=batch_sizes[-1], default=b0),) + v)
                  for k, v in tails.items()}
    inputs = [ct.TensorType(name=k, shape=shapes[k], dtype=np.float32) for k in ("x_t", "t", "text")]
    try:
        mlmodel = ct.convert(
            traced,
            inputs=inputs,
            outputs=[ct.TensorType(name="velocity", dtype=np.float32)],
            convert_to="mlprogram",
            minimum_deployment_target=target,
            compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
            skip_model_load=sys.platform != "darwin",
        )
    except MlxflowError:
        raise
    except Exception as e:
        raise MlxflowError(f"coremltools could not convert the denoiser: {type(e).__name__}: {e}") from e

    if compress is not None:
        import coremltools.optimize.coreml as cto

        if compress.startswith("palettize"):
            try:
                import sklearn  # noqa: F401  (coremltools' k-means)
            except ImportError as e:
                raise MlxflowError("palettization needs scikit-learn: pip install scikit-learn") from e
            op_cfg = cto.OpPalettizerConfig(mode="kmeans", nbits=int(compress[len("palettize"):]),
                                            granularity="per_tensor", weight_threshold=compress_weight_threshold)
            mlmodel = cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=op_cfg))
        else:
            op_cfg = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                                 weight_threshold=compress_weight_threshold)
            mlmodel = cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op_cfg))
    return mlmodel


def solver_advice(family: str) -> str:
    """How to sample the exported denoiser: the family's own defaults (what `mlxflow sample` uses)."""
    d = get_family(family).sample_defaults
    return f"{d['solver']} {d['steps']} steps, cfg {d['cfg']:g} via batch 2 (cond+uncond) or in app; " \
           "uncond = zero text embedding"


def _describe(mlmodel, *, image_size, channels, text_tokens, text_dim, precision, compress, batch_sizes,
              deployment_target, metadata: dict | None) -> None:
    import coremltools as ct

    md = dict(metadata or {})
    meta = mlmodel.user_defined_metadata
    meta["mlxflow.time_convention"] = TIME_CONVENTION
    advice = md.pop("solver_advice", None) or solver_advice(md.get("family", "emoji"))
    meta["mlxflow.solver"] = advice
    meta["mlxflow.image_size"] = str(image_size)
    meta["mlxflow.channels"] = str(channels)
    meta["mlxflow.text_shape"] = json.dumps([text_tokens, text_dim])
    meta["mlxflow.batch_sizes"] = json.dumps(sorted(set(int(b) for b in batch_sizes)))
    meta["mlxflow.precision"] = precision
    meta["mlxflow.compression"] = compress or "none"
    meta["mlxflow.deployment_target"] = deployment_target
    meta["mlxflow.coremltools"] = ct.__version__
    for key in ("author", "license", "version"):
        if key in md:
            setattr(mlmodel, key, str(md.pop(key)))
    for k, v in md.items():
        meta[k if "." in k else f"mlxflow.{k}"] = v if isinstance(v, str) else json.dumps(v)
    family = md.get("family", "emoji")
    mlmodel.short_description = (
        f"mlxflow {family} flow-matching denoiser ({image_size}x{image_size}, {precision}"
        f"{', ' + compress if compress else ''}): predicts velocity dx/dt. {TIME_CONVENTION}. Sampling: {advice}."
    )
    mlmodel.input_description["x_t"] = f"noisy image (B,{channels},{image_size},{image_size}) float32 in ~[-1,1], NCHW"
    mlmodel.input_description["t"] = "flow time (B,) float32 in [0,1]: t=0 noise, t=1 data"
    mlmodel.input_description["text"] = (f"text embedding (B,{text_tokens},{text_dim}) float32; zeros = unconditional"
                                         + ("; padding rows exactly 0" if text_tokens > 1 else ""))
    mlmodel.output_description["velocity"] = f"velocity dx/dt (B,{channels},{image_size},{image_size}) float32"


def export_denoiser(torch_model, *, image_size: int, channels: int = 3, text_tokens: int, text_dim: int,
                    out_path, precision: str = "fp16", compress: str | None = None,
                    batch_sizes: Sequence[int] = (1, 2), metadata: dict | None = None,
                    deployment_target: str = "iOS17", compress_weight_threshold: int = 2048) -> Path:
    """Trace ``torch_model.forward(x, t, text) -> v`` and save it as an ML Program ``.mlpackage``.

    torch_model: any ``torch.nn.Module`` with forward(x (B,C,H,W), t (B,), text (B,L,D)) -> (B,C,H,W).
    precision: "fp16" (compute precision fp16, fp32 I/O) or "fp32".
    compress: None, "palettize6" / "palettize8" (k-means LUT, per tensor) or "int8"
        (symmetric per-channel); only weights with >= compress_weight_threshold elements.
    batch_sizes: batch sizes the model accepts (see module docstring for iOS17 vs iOS18).
    metadata: extra ``user_defined_metadata`` (family, preset, train_steps, text_encoder...);
        non-string values are stored as JSON; "author"/"license"/"version" go to the
        model's own fields.
    Writes atomically: the package is built in a temporary folder next to ``out_path`` and
    renamed into place only when complete; a failure leaves an existing export untouched.
    Returns the path of the package.
    """
    out_path = Path(out_path)
    if out_path.suffix != ".mlpackage":
        raise MlxflowError(f"Core ML output must end in .mlpackage, got {out_path}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    mlmodel = _convert(torch_model, image_size=image_size, channels=channels, text_tokens=text_tokens,
                       text_dim=text_dim, precision=precision, compress=compress, batch_sizes=batch_sizes,
                       deployment_target=deployment_target, compress_weight_threshold=compress_weight_threshold)
    _describe(mlmodel, image_size=image_size, channels=channels, text_tokens=text_tokens, text_dim=text_dim,
              precision=precision, compress=compress, batch_sizes=batch_sizes,
              deployment_target=deployment_target, metadata=metadata)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        staged = tmp / out_path.name
        mlmodel.save(str(staged))
        _replace_dir(staged, out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_path


# ----------------------------------------------------------------------------- running


def _input_shapes(mlmodel) -> dict[str, tuple[int, ...]]:
    """Default input shapes from the model description (batch = the default batch)."""
    shapes = {}
    for inp in mlmodel.get_spec().description.input:
        shapes[inp.name] = tuple(int(s) for s in inp.type.multiArrayType.shape)
    return shapes


def open_denoiser(model, *, backend: str | None = None) -> tuple[Callable, dict]:
    """Return ``(fn, info)``: ``fn(x, t, text) -> velocity`` (numpy float32) for an exported model.

    model: path to a ``.mlpackage`` or an ``MLModel``. backend: "coreml-predict" (macOS
    only), "mil-numpy", or None for the platform default. ``info`` holds "backend",
    "shapes" (default input shapes) and "metadata" (user_defined_metadata).
    """
    ct = _require_coremltools()
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.exists():
            raise MlxflowError(f"no Core ML model at {path}")
        on_mac = sys.platform == "darwin" and backend != "mil-numpy"
        mlmodel = ct.models.MLModel(str(path), skip_model_load=not on_mac)
    else:
        mlmodel = model
    backend = backend or ("coreml-predict" if sys.platform == "darwin" else "mil-numpy")
    info = {"backend": backend, "shapes": _input_shapes(mlmodel), "metadata": dict(mlmodel.user_defined_metadata)}
    if backend == "coreml-predict":
        if sys.platform != "darwin":
            raise MlxflowError("Core ML predict runs only on macOS; use backend='mil-numpy'")

        def fn(x, t, text):
            out = mlmodel.predict({"x_t": np.asarray(x, np.float32), "t": np.asarray(t, np.float32),
                                   "text": np.asarray(text, np.float32)})
            return np.asarray(out["velocity"], np.float32)
    elif backend == "mil-numpy":
        from .mil_eval import evaluate_program, load_program

        prog = load_program(mlmodel)

        def fn(x, t, text):
            out = evaluate_program(prog, {"x_t": np.asarray(x, np.float32), "t": np.asarray(t, np.float32),
                                          "text": np.asarray(text, np.float32)})
            return np.asarray(out["velocity"], np.float32)
    else:
        raise MlxflowError(f"unknown backend {backend!r}; choose coreml-predict or mil-numpy")
    return fn, info


def verify_denoiser(mlmodel_or_path, torch_model, *, n_steps: int = 8, seed: int = 0, batch: int = 1,
                    t_values: Sequence[float] = (0.0, 0.3, 0.7, 1.0), backend: str | None = None) -> dict:
    """Compare an exported denoiser with the torch model it came from.

    (a) denoiser: one call at each t in ``t_values`` on random x_t ~ N(0,1) and text ~ N(0,1)
        (``batch`` samples each), plus one call with an all-zero text (the unconditional
        input); the outputs of all calls are stacked, then compared. With L > 1 text
        tokens, sample i keeps only its first max(1, L - 1 - i) rows and the rest are zero
        rows, i.e. padding, so a key-padding mask derived in the program is exercised.
    (b) trajectory: ``n_steps`` Euler steps from the same noise and text, t: 0 -> 1,
        one trajectory driven by the exported model, one by torch; final images compared.
    PSNR (dB) = 10*log10(P**2 / MSE) where P = max - min of the *torch* reference output
    (peak-to-peak range) and MSE is over all elements; inf when identical.
    Returns {"denoiser_psnr", "trajectory_psnr", "backend", "max_abs_err"} (max_abs_err of (a)).
    Shapes come from the model's description.
    """
    import torch

    fn, info = open_denoiser(mlmodel_or_path, backend=backend)
    shapes = info["shapes"]
    xs, txs = shapes["x_t"], shapes["text"]
    rng = np.random.default_rng(seed)
    model = torch_model.eval().float()

    def ref(x, t, text):
        with torch.no_grad():
            return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(text)).numpy()

    text = rng.standard_normal((batch,) + tuple(txs[1:])).astype(np.float32)
    n_tokens = text.shape[1]
    if n_tokens > 1:
        for i in range(batch):
            text[i, max(1, n_tokens - 1 - i):] = 0.0
    refs, outs = [], []
    for tv, tx in [(tv, text) for tv in t_values] + [(0.5, np.zeros_like(text))]:
        x = rng.standard_normal((batch,) + tuple(xs[1:])).astype(np.float32)
        t = np.full((batch,), tv, np.float32)
        refs.append(ref(x, t, tx))
        outs.append(fn(x, t, tx))
    refs, outs = np.stack(refs), np.stack(outs)

    noise = rng.standard_normal((batch,) + tuple(xs[1:])).astype(np.float32)
    x_ref, x_ex = noise.copy(), noise.copy()
    dt = 1.0 / n_steps
    for i in range(n_steps):
        t = np.full((batch,), i * dt, np.float32)
        x_ref = (x_ref + dt * ref(x_ref, t, text)).astype(np.float32)
        x_ex = (x_ex + dt * fn(x_ex, t, text)).astype(np.float32)
    return {
        "denoiser_psnr": psnr(refs, outs),
        "trajectory_psnr": psnr(x_ref, x_ex),
        "max_abs_err": float(np.max(np.abs(refs - outs))),
        "backend": info["backend"],
    }


def export_and_verify(torch_model, *, out_path, image_size: int, channels: int = 3, text_tokens: int,
                      text_dim: int, precision: str = "fp16", compress: str | None = None,
                      batch_sizes: Sequence[int] = (1, 2), metadata: dict | None = None,
                      deployment_target: str = "iOS17", compress_weight_threshold: int = 2048,
                      psnr_gate: float = PSNR_GATE_DB, n_steps: int = 8, seed: int = 0,
                      verify_model=None, backend: str | None = None) -> dict:
    """Export to a staging folder, verify against torch, and only then move into ``out_path``.

    verify_model: the torch model to compare with (default: ``torch_model``).
    Raises MlxflowError, writing nothing, when either PSNR is below ``psnr_gate`` dB.
    Returns verify_denoiser's report plus "path", "size_mb" (package on disk), "precision",
    "compress" and "psnr_gate".
    """
    out_path = Path(out_path)
    if out_path.suffix != ".mlpackage":
        raise MlxflowError(f"Core ML output must end in .mlpackage, got {out_path}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        staged = export_denoiser(torch_model, image_size=image_size, channels=channels, text_tokens=text_tokens,
                                 text_dim=text_dim, out_path=tmp / out_path.name, precision=precision,
                                 compress=compress, batch_sizes=batch_sizes, metadata=metadata,
                                 deployment_target=deployment_target,
                                 compress_weight_threshold=compress_weight_threshold)
        report = verify_denoiser(staged, verify_model if verify_model is not None else torch_model,
                                 n_steps=n_steps, seed=seed, batch=min(batch_sizes), backend=backend)
        worst = min(report["denoiser_psnr"], report["trajectory_psnr"])
        if not worst >= psnr_gate:  # also catches NaN
            raise MlxflowError(
                f"Core ML export rejected: denoiser PSNR {report['denoiser_psnr']:.1f} dB, "
                f"trajectory PSNR {report['trajectory_psnr']:.1f} dB, gate {psnr_gate:.0f} dB "
                f"({precision}{', ' + compress if compress else ''}); nothing written to {out_path}"
            )
        report["size_mb"] = _dir_size_mb(staged)
        _replace_dir(staged, out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.update(path=out_path, precision=precision, compress=compress, psnr_gate=psnr_gate)
    return report


# ----------------------------------------------------------------------------- text side


def export_label_table(embeddings: np.ndarray, prompts: Sequence[str], out_dir, *,
                       metadata: dict | None = None) -> Path:
    """Write ``labels.json`` + ``label_embeddings.bin`` so an app needs no text encoder.

    embeddings: (N, L, D) float32, row i the embedding of prompts[i].
    The .bin is raw little-endian float32 in C order, N*L*D values; labels.json holds
    {"format", "file", "shape": [N, L, D], "dtype": "float32", "byte_order": "little",
    "prompts": [...], "unconditional": "zeros"} (+ metadata). Files are written under temp
    names and renamed. Returns out_dir.
    """
    emb = np.asarray(embeddings)
    if emb.ndim != 3:
        raise MlxflowError(f"label embeddings must be (N, L, D), got shape {emb.shape}")
    if len(prompts) != emb.shape[0]:
        raise MlxflowError(f"{len(prompts)} prompts for {emb.shape[0]} embeddings")
    if not np.all(np.isfinite(emb)):
        raise MlxflowError("label embeddings contain NaN or inf")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": "mlxflow-label-table-1",
        "file": "label_embeddings.bin",
        "shape": [int(s) for s in emb.shape],
        "dtype": "float32",
        "byte_order": "little",
        "prompts": [str(p) for p in prompts],
        "unconditional": "zeros",
        **(metadata or {}),
    }
    payload = np.ascontiguousarray(emb, dtype="<f4").tobytes()
    for name, data in (("label_embeddings.bin", payload), ("labels.json", json.dumps(doc, indent=1, default=str).encode())):
        tmp = out_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_bytes(data)
        os.replace(tmp, out_dir / name)
    return out_dir


def load_label_table(out_dir) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Read a label table: returns (embeddings (N,L,D) float32, prompts, labels.json dict)."""
    out_dir = Path(out_dir)
    try:
        doc = json.loads((out_dir / "labels.json").read_text())
        raw = (out_dir / doc.get("file", "label_embeddings.bin")).read_bytes()
    except (OSError, ValueError) as e:
        raise MlxflowError(f"cannot read label table in {out_dir}: {e}") from e
    shape = tuple(doc["shape"])
    if len(raw) != 4 * int(np.prod(shape)):
        raise MlxflowError(f"label_embeddings.bin in {out_dir} has {len(raw)} bytes, expected {4 * int(np.prod(shape))}")
    return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32), list(doc["prompts"]), doc
