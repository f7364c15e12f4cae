"""Run an exported Core ML ML Program in numpy, so Linux can check what ships.

`MLModel.predict` only exists on macOS. Everywhere else we read the program that was
serialized into the ``.mlpackage`` (the proto plus its weight blob, re-loaded with
coremltools' MIL-proto frontend, so fp16 casts, ``constexpr_*`` palettized/quantized
weights and all graph-pass rewrites are exactly what an app would run) and evaluate its
ops one by one in topological order.

Numerics (why the check sees the real fp16 error): every op's result is rounded to the
dtype the program declares for that output, so a program that casts to fp16 carries fp16
activations between ops, with fp16-rounded (or de-palettized) weights. Inside one op,
elementwise math runs in that dtype (numpy computes half-precision ufuncs in float32 and
rounds once), while accumulating ops (conv, linear, matmul, reductions, softmax,
attention, norms) accumulate in float32 and round the result, which is how Core ML's GPU
and Neural Engine kernels behave to first order. Bit-exactness with a device is not the
goal; the per-op rounding is what dominates the error.

Ops without an implementation here fall back to coremltools' own ``value_inference``
(fed with our arrays); an op with neither ends in an error naming its type.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mlxflow.errors import MlxflowError

__all__ = ["evaluate_program", "load_program", "UnsupportedOpError"]


class UnsupportedOpError(MlxflowError):
    """The program uses a MIL op this evaluator cannot compute."""


# ----------------------------------------------------------------------------- loading


def load_program(source):
    """Return the MIL ``Program`` for a Program, an ``MLModel`` or a ``.mlpackage`` path.

    For an MLModel (in memory or on disk) the program is re-read from its serialized spec
    and weight files, i.e. what actually goes into the package, not the converter's
    in-memory object.
    """
    import coremltools as ct
    from coremltools.converters.mil.mil import Program

    if isinstance(source, Program):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise MlxflowError(f"no Core ML model at {path}")
        source = ct.models.MLModel(str(path), skip_model_load=True)
    if not isinstance(source, ct.models.MLModel):
        raise MlxflowError(f"cannot evaluate a {type(source).__name__}: expected a MIL Program, MLModel or .mlpackage path")
    spec = source.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise MlxflowError("only ML Program models (convert_to='mlprogram') can be evaluated in numpy")
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    weights_dir = source.weights_dir or ""
    try:
        return load_milproto(spec, spec.specificationVersion, weights_dir)
    except Exception:  # noqa: BLE001 - fall back to the converter's program if the proto loader balks
        if getattr(source, "_mil_program", None) is not None:
            return source._mil_program
        raise


# ----------------------------------------------------------------------------- dtypes


def _np_dtype(var) -> np.dtype:
    """numpy dtype for a MIL Var (sub-byte ints come back as (u)int8)."""
    from coremltools.converters.mil.mil import types

    dt = var.dtype
    if types.is_tensor(var.sym_type) or types.is_scalar(var.sym_type):
        return np.dtype(types.nptype_from_builtin(dt))
    return np.dtype(np.float32)


_CAST_DTYPES = {
    "fp16": np.float16, "fp32": np.float32, "fp64": np.float64,
    "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16,
    "int32": np.int32, "uint32": np.uint32, "int64": np.int64, "bool": np.bool_,
}


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


# ----------------------------------------------------------------------------- op kernels
# Each kernel takes (op, a) where `a` maps input names to numpy values (None if absent)
# and returns one array or a tuple. The caller rounds to the declared output dtype.

_KERNELS: dict[str, Callable[[Any, dict], Any]] = {}


def _kernel(*names):
    def deco(fn):
        for n in names:
            _KERNELS[n] = fn
        return fn

    return deco


def _binary(fn):
    def k(op, a):
        x, y = np.asarray(a["x"]), np.asarray(a["y"])
        return fn(x, y)

    return k


for _name, _fn in {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.true_divide,
    "floor_div": np.floor_divide, "pow": np.power, "maximum": np.maximum, "minimum": np.minimum,
    "mod": np.mod, "equal": np.equal, "not_equal": np.not_equal, "less": np.less,
    "less_equal": np.less_equal, "greater": np.greater, "greater_equal": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}.items():
    _KERNELS[_name] = _binary(_fn)


def _unary(fn):
    return lambda op, a: fn(np.asarray(a["x"]))


for _name, _fn in {
    "sin": np.sin, "cos": np.cos, "tan": np.tan, "exp": np.exp, "exp2": np.exp2, "tanh": np.tanh,
    "abs": np.abs, "sign": np.sign, "floor": np.floor, "ceil": np.ceil, "round": np.round,
    "square": np.square, "sqrt": np.sqrt, "logical_not": np.logical_not, "identity": lambda x: x,
    "relu": lambda x: np.maximum(x, 0), "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "silu": lambda x: x / (1 + np.exp(-x)), "softplus": lambda x: np.logaddexp(0, x),
    "atan": np.arctan, "asin": np.arcsin, "acos": np.arccos, "sinh": np.sinh, "cosh": np.cosh,
    "erf": np.vectorize(math.erf, otypes=[np.float32]),
}.items():
    _KERNELS[_name] = _unary(_fn)


@_kernel("rsqrt")
def _rsqrt(op, a):
    return 1.0 / np.sqrt(_f32(a["x"]) + np.float32(a.get("epsilon", 1e-12) or 1e-12))


@_kernel("inverse")
def _inverse(op, a):
    return 1.0 / (_f32(a["x"]) + np.float32(a.get("epsilon", 1e-4) or 1e-4))


@_kernel("log")
def _log(op, a):
    return np.log(_f32(a["x"]) + np.float32(a.get("epsilon", 0.0) or 0.0))


@_kernel("clip")
def _clip(op, a):
    return np.clip(a["x"], a["alpha"], a["beta"])


@_kernel("leaky_relu")
def _leaky_relu(op, a):
    x = a["x"]
    return np.where(x >= 0, x, x * a["alpha"])


@_kernel("gelu")
def _gelu(op, a):
    x = _f32(a["x"])
    mode = str(a.get("mode") or "EXACT")
    if mode == "EXACT":
        return 0.5 * x * (1 + np.vectorize(math.erf, otypes=[np.float32])(x / np.sqrt(2.0)))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    return x / (1 + np.exp(-1.702 * x))  # SIGMOID_APPROXIMATION


@_kernel("select")
def _select(op, a):
    return np.where(a["cond"], a["a"], a["b"])


@_kernel("cast")
def _cast(op, a):
    return np.asarray(a["x"]).astype(_CAST_DTYPES[str(a["dtype"])])


def _axes(a, ndim):
    ax = a.get("axes")
    if ax is None:
        return tuple(range(ndim))
    return tuple(int(i) % ndim for i in np.atleast_1d(ax))


def _reduce(fn):
    def k(op, a):
        x = np.asarray(a["x"])
        if x.dtype.kind == "f":
            x = _f32(x)  # accumulate half precision in float32
        keep = bool(a.get("keep_dims", False))
        return fn(x, axis=_axes(a, x.ndim), keepdims=keep)

    return k


for _name, _fn in {
    "reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max, "reduce_min": np.min,
    "reduce_prod": np.prod,
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims)),
    "reduce_sum_square": lambda x, axis, keepdims: np.sum(x * x, axis=axis, keepdims=keepdims),
    "reduce_log_sum_exp": lambda x, axis, keepdims: np.log(np.sum(np.exp(x), axis=axis, keepdims=keepdims)),
}.items():
    _KERNELS[_name] = _reduce(_fn)


@_kernel("reduce_argmax", "reduce_argmin")
def _argreduce(op, a):
    fn = np.argmax if op.op_type == "reduce_argmax" else np.argmin
    x = np.asarray(a["x"])
    axis = int(a.get("axis", -1))
    out = fn(x, axis=axis)
    return np.expand_dims(out, axis) if a.get("keep_dims", False) else out


@_kernel("softmax")
def _softmax(op, a):
    x = _f32(a["x"])
    axis = int(a.get("axis", -1))
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@_kernel("linear")
def _linear(op, a):
    y = _f32(a["x"]) @ _f32(a["weight"]).T
    if a.get("bias") is not None:
        y = y + _f32(a["bias"])
    return y


@_kernel("matmul")
def _matmul(op, a):
    x, y = _f32(a["x"]), _f32(a["y"])
    if a.get("transpose_x", False):
        x = np.swapaxes(x, -1, -2)
    if a.get("transpose_y", False):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@_kernel("scaled_dot_product_attention")
def _sdpa(op, a):
    q, k, v = _f32(a["query"]), _f32(a["key"]), _f32(a["value"])
    s = np.matmul(q, np.swapaxes(k, -1, -2)) / np.float32(np.sqrt(q.shape[-1]))
    mask = a.get("attn_mask")
    if mask is not None:
        mask = np.asarray(mask)
        s = np.where(mask, s, -np.inf) if mask.dtype == np.bool_ else s + _f32(mask)
    s = np.exp(s - s.max(axis=-1, keepdims=True))
    return np.matmul(s / s.sum(axis=-1, keepdims=True), v)


def _conv_pads(a, spatial, kernel, strides, dilations):
    """Return [(before, after), ...] per spatial dim for MIL pad_type."""
    pad_type = str(a.get("pad_type") or "valid")
    n = len(spatial)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        p = [int(v) for v in np.atleast_1d(a.get("pad", [0] * 2 * n))]
        return [(p[2 * i], p[2 * i + 1]) for i in range(n)]
    if pad_type in ("same", "same_lower"):
        out = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            eff = (k - 1) * d + 1
            total = max((math.ceil(size / s) - 1) * s + eff - size, 0)
            small, big = total // 2, total - total // 2
            out.append((small, big) if pad_type == "same" else (big, small))
        return out
    raise UnsupportedOpError(f"conv pad_type {pad_type!r} is not supported by the numpy evaluator")


@_kernel("conv")
def _conv(op, a):
    """N-d grouped, strided, dilated convolution (NC[D]HW, weight O, I/groups, k...)."""
    x, w = _f32(a["x"]), _f32(a["weight"])
    n_sp = x.ndim - 2
    kernel = w.shape[2:]
    strides = [int(v) for v in np.atleast_1d(a.get("strides") if a.get("strides") is not None else [1] * n_sp)]
    dil = [int(v) for v in np.atleast_1d(a.get("dilations") if a.get("dilations") is not None else [1] * n_sp)]
    groups = int(a.get("groups") or 1)
    pads = _conv_pads(a, x.shape[2:], kernel, strides, dil)
    x = np.pad(x, [(0, 0), (0, 0)] + pads)
    # Gather the (dilated) kernel taps: view (N, C, *out, *k) with the strides applied.
    win = np.lib.stride_tricks.sliding_window_view(x, [(k - 1) * d + 1 for k, d in zip(kernel, dil)], axis=tuple(range(2, 2 + n_sp)))
    idx = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + tuple(slice(None, None, d) for d in dil)
    win = win[idx]  # (N, C, *out, *k)
    N, C = x.shape[:2]
    O = w.shape[0]
    cg, og = C // groups, O // groups
    out_sp = win.shape[2:2 + n_sp]
    outs = []
    for g in range(groups):
        wg = w[g * og:(g + 1) * og].reshape(og, -1)  # (og, cg*prod(k))
        pg = win[:, g * cg:(g + 1) * cg]  # (N, cg, *out, *k)
        # move channels next to the taps: (N, *out, cg, *k) -> (N*prod(out), cg*prod(k))
        perm = (0,) + tuple(range(2, 2 + n_sp)) + (1,) + tuple(range(2 + n_sp, 2 + 2 * n_sp))
        cols = np.ascontiguousarray(pg.transpose(perm)).reshape(N * int(np.prod(out_sp)), -1)
        outs.append((cols @ wg.T).reshape((N,) + tuple(out_sp) + (og,)))
    y = np.concatenate(outs, axis=-1) if groups > 1 else outs[0]
    y = np.moveaxis(y, -1, 1)
    if a.get("bias") is not None:
        y = y + _f32(a["bias"]).reshape((1, O) + (1,) * n_sp)
    return y


@_kernel("layer_norm")
def _layer_norm(op, a):
    x = _f32(a["x"])
    ax = _axes(a, x.ndim)
    mu = x.mean(axis=ax, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=ax, keepdims=True)
    y = (x - mu) / np.sqrt(var + np.float32(a.get("epsilon") or 1e-5))
    if a.get("gamma") is not None:
        y = y * _f32(a["gamma"])
    if a.get("beta") is not None:
        y = y + _f32(a["beta"])
    return y


def _channel_affine(y, a, shape):
    """Optional per-channel gamma/beta of the norm ops, reshaped to broadcast as `shape`."""
    if a.get("gamma") is not None:
        y = y * _f32(a["gamma"]).reshape(shape)
    if a.get("beta") is not None:
        y = y + _f32(a["beta"]).reshape(shape)
    return y


@_kernel("instance_norm")
def _instance_norm(op, a):
    x = _f32(a["x"])
    ax = tuple(range(2, x.ndim))
    mu = x.mean(axis=ax, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=ax, keepdims=True)
    y = (x - mu) / np.sqrt(var + np.float32(a.get("epsilon") or 1e-5))
    shp = (1, -1) + (1,) * (x.ndim - 2)
    return _channel_affine(y, a, shp)


@_kernel("batch_norm")
def _batch_norm(op, a):
    x = _f32(a["x"])
    shp = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - _f32(a["mean"]).reshape(shp)) / np.sqrt(_f32(a["variance"]).reshape(shp) + np.float32(a.get("epsilon") or 1e-5))
    return _channel_affine(y, a, shp)


@_kernel("reshape")
def _reshape(op, a):
    x = np.asarray(a["x"])
    shape = [int(s) for s in np.atleast_1d(a["shape"])]
    # MIL reshape: 0 copies the input's dim (iOS15 semantics), -1 is inferred.
    shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@_kernel("transpose")
def _transpose(op, a):
    return np.transpose(a["x"], [int(p) for p in np.atleast_1d(a["perm"])])


@_kernel("expand_dims")
def _expand_dims(op, a):
    x = np.asarray(a["x"])
    out_rank = x.ndim + len(np.atleast_1d(a["axes"]))
    for ax in sorted(int(v) % out_rank for v in np.atleast_1d(a["axes"])):
        x = np.expand_dims(x, ax)
    return x


@_kernel("squeeze")
def _squeeze(op, a):
    x = np.asarray(a["x"])
    if a.get("axes") is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(int(v) % x.ndim for v in np.atleast_1d(a["axes"])))


@_kernel("concat")
def _concat(op, a):
    vals = [np.asarray(v) for v in a["values"]]
    axis = int(a["axis"])
    if a.get("interleave", False):
        ax = axis % vals[0].ndim
        stacked = np.stack(vals, axis=ax + 1)
        shp = list(vals[0].shape)
        shp[ax] *= len(vals)
        return stacked.reshape(shp)
    return np.concatenate([np.atleast_1d(v) for v in vals], axis=axis)


@_kernel("split")
def _split(op, a):
    x = np.asarray(a["x"])
    axis = int(a["axis"]) % x.ndim
    if a.get("split_sizes") is not None:
        cuts = np.cumsum([int(s) for s in np.atleast_1d(a["split_sizes"])])[:-1]
        return tuple(np.split(x, cuts, axis=axis))
    return tuple(np.split(x, int(a["num_splits"]), axis=axis))


@_kernel("stack")
def _stack(op, a):
    return np.stack([np.asarray(v) for v in a["values"]], axis=int(a["axis"]))


@_kernel("tile")
def _tile(op, a):
    return np.tile(a["x"], [int(r) for r in np.atleast_1d(a["reps"])])


@_kernel("shape")
def _shape(op, a):
    return np.array(np.shape(a["x"]), dtype=np.int32)


@_kernel("fill")
def _fill(op, a):
    return np.full([int(s) for s in np.atleast_1d(a["shape"])], a.get("value", 0.0))


@_kernel("range_1d")
def _range_1d(op, a):
    return np.arange(a["start"], a["end"], a["step"])


@_kernel("gather")
def _gather(op, a):
    x, idx = np.asarray(a["x"]), np.asarray(a["indices"]).astype(np.int64)
    axis = int(a.get("axis", 0)) % x.ndim
    if int(a.get("batch_dims", 0) or 0):
        raise UnsupportedOpError("gather with batch_dims > 0 is not supported by the numpy evaluator")
    idx = np.where(idx < 0, idx + x.shape[axis], idx)
    return np.take(x, idx, axis=axis)


@_kernel("slice_by_index")
def _slice_by_index(op, a):
    x = np.asarray(a["x"])
    n = x.ndim
    begin = [int(v) for v in np.atleast_1d(a["begin"])]
    end = [int(v) for v in np.atleast_1d(a["end"])]
    stride = [int(v) for v in np.atleast_1d(a["stride"])] if a.get("stride") is not None else [1] * n
    bm = list(np.atleast_1d(a["begin_mask"])) if a.get("begin_mask") is not None else [False] * n
    em = list(np.atleast_1d(a["end_mask"])) if a.get("end_mask") is not None else [False] * n
    sm = list(np.atleast_1d(a["squeeze_mask"])) if a.get("squeeze_mask") is not None else [False] * n
    sl = []
    for i in range(n):
        if sm[i]:
            sl.append(begin[i])
            continue
        sl.append(slice(None if bm[i] else begin[i], None if em[i] else end[i], stride[i]))
    return x[tuple(sl)]


@_kernel("slice_by_size")
def _slice_by_size(op, a):
    x = np.asarray(a["x"])
    begin = [int(v) for v in np.atleast_1d(a["begin"])]
    size = [int(v) for v in np.atleast_1d(a["size"])]
    return x[tuple(slice(b, None if s == -1 else b + s) for b, s in zip(begin, size))]


@_kernel("upsample_nearest_neighbor")
def _upsample_nn(op, a):
    x = np.asarray(a["x"])
    sh = float(a.get("scale_factor_height", 1))
    sw = float(a.get("scale_factor_width", 1))
    H, W = x.shape[-2:]
    oh, ow = int(math.floor(H * sh)), int(math.floor(W * sw))
    # Source index = floor(dst / scale), as in torch's "nearest".
    ih = np.minimum((np.arange(oh) / sh).astype(np.int64), H - 1)
    iw = np.minimum((np.arange(ow) / sw).astype(np.int64), W - 1)
    return x[..., ih[:, None], iw[None, :]]


# --- compile-time (weight) ops: palettized / quantized / sparse weights -----------------


def _unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Unsigned n-bit elements packed LSB-first into bytes (Core ML's sub-byte layout)."""
    bits = np.unpackbits(np.asarray(packed).astype(np.uint8).ravel(), bitorder="little")[: nbits * count]
    weights = (1 << np.arange(nbits)).astype(np.int64)
    return (bits.reshape(count, nbits).astype(np.int64) * weights).sum(axis=1)


@_kernel("constexpr_lut_to_dense")
def _lut_to_dense(op, a):
    lut = np.asarray(a["lut"])
    if a.get("shape") is not None:
        # iOS16 form: per-tensor LUT of 2^nbits entries, indices packed into uint8 bytes.
        shape = [int(s) for s in np.atleast_1d(a["shape"])]
        nbits = int(round(math.log2(lut.size)))
        idx = np.asarray(a["indices"])
        count = int(np.prod(shape))
        if idx.size != count:  # still packed
            idx = _unpack_bits(idx, nbits, count)
        return lut.reshape(-1)[idx.astype(np.int64)].reshape(shape)
    # iOS18 form: indices (unpacked, output-shaped), lut (*blocks, palettes, vector_size).
    idx = np.asarray(a["indices"]).astype(np.int64)
    if lut.shape[-1] != 1:
        raise UnsupportedOpError("constexpr_lut_to_dense with vector palettization (vector_size > 1) is not supported")
    k = idx.ndim
    table = lut[..., 0]  # (*blocks, palettes)
    blocks = [idx.shape[i] // table.shape[i] for i in range(k)]
    # Map every element to its LUT block, then pick the entry.
    grids = np.meshgrid(*[np.arange(s) // b for s, b in zip(idx.shape, blocks)], indexing="ij")
    return table[tuple(grids) + (idx,)]


@_kernel("constexpr_affine_dequantize")
def _affine_dequantize(op, a):
    q = np.asarray(a["quantized_data"]).astype(np.float32)
    axis = int(a["axis"]) % q.ndim
    shp = [1] * q.ndim
    shp[axis] = -1
    scale = _f32(a["scale"])
    zp = np.asarray(a["zero_point"]).astype(np.float32)
    scale = scale.reshape(shp) if scale.size > 1 else scale.reshape(())
    zp = zp.reshape(shp) if zp.size > 1 else zp.reshape(())
    return (q - zp) * scale


@_kernel("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(op, a):
    data = np.asarray(a["data"]).astype(np.float32)
    scale = _f32(a["scale"])
    offset = a.get("offset")

    def expand(v):
        v = _f32(v)
        for ax, (d, s) in enumerate(zip(data.shape, v.shape)):
            if d != s:
                v = np.repeat(v, d // s, axis=ax)
        return v

    if offset is not None:
        data = data - expand(offset)
    return data * expand(scale)


@_kernel("constexpr_cast")
def _constexpr_cast(op, a):
    return np.asarray(a["source_val"]).astype(_CAST_DTYPES[str(a["output_dtype"])])


@_kernel("constexpr_sparse_to_dense")
def _sparse_to_dense(op, a):
    nz = np.asarray(a["nonzero_data"])
    mask = np.asarray(a["mask"])
    if a.get("shape") is not None:  # iOS16: mask is a packed bitmap
        shape = [int(s) for s in np.atleast_1d(a["shape"])]
        count = int(np.prod(shape))
        mask = mask if mask.size == count else _unpack_bits(mask, 1, count)
        mask = mask.reshape(shape)
    out = np.zeros(mask.shape, dtype=nz.dtype)
    out[mask.astype(bool)] = nz
    return out


# ----------------------------------------------------------------------------- fallback


class _ValueVar:
    """Stand-in for a MIL Var carrying a concrete value, for coremltools' value_inference."""

    def __init__(self, value, var):
        self.val = value
        self.sym_val = value
        self.shape = tuple(np.shape(value))
        self.rank = len(self.shape)
        self.name = getattr(var, "name", "")
        self.op = getattr(var, "op", None)
        self.sym_type = getattr(var, "sym_type", None)
        self.dtype = getattr(var, "dtype", None)


def _value_inference(op, values: dict) -> Any:
    shadow = copy.copy(op)
    shadow._input_vars = dict(op._input_vars)
    for name, var in op.inputs.items():
        if isinstance(var, (list, tuple)):
            fake = tuple(_ValueVar(v, vv) for v, vv in zip(values[name], var))
        else:
            fake = _ValueVar(values[name], var)
        shadow._input_vars[name] = fake
        setattr(shadow, name, fake)
    try:
        return shadow.value_inference()
    except NotImplementedError as e:
        raise UnsupportedOpError(f"MIL op '{op.op_type}' (op {op.name!r}) is not supported by the numpy evaluator") from e
    except Exception as e:  # value_inference written for compile-time shapes may choke on ours
        raise UnsupportedOpError(
            f"MIL op '{op.op_type}' (op {op.name!r}) has no numpy kernel and its value_inference failed: {e}"
        ) from e


# ----------------------------------------------------------------------------- driver


def _as_output(value, var):
    """Round/cast a kernel result to the dtype the program declares for `var`."""
    dt = _np_dtype(var)
    arr = np.asarray(value)
    return arr.astype(dt, copy=False) if arr.dtype != dt else arr


def evaluate_program(prog_or_mlmodel, inputs: dict[str, np.ndarray], *, function: str = "main") -> dict[str, np.ndarray]:
    """Evaluate an ML Program on concrete inputs, op by op, in numpy.

    prog_or_mlmodel: a MIL ``Program``, a ``coremltools.models.MLModel`` (ML Program) or a
        path to a ``.mlpackage``.
    inputs: name -> array with the shapes the model accepts (e.g. ``x_t`` (B,3,H,W),
        ``t`` (B,), ``text`` (B,L,D)); cast to the declared input dtypes.
    Returns: output name -> numpy array (in the program's declared output dtype).
    Raises MlxflowError (UnsupportedOpError) naming an op type it cannot compute.
    """
    prog = load_program(prog_or_mlmodel)
    if function not in prog.functions:
        raise MlxflowError(f"program has no function {function!r} (has {sorted(prog.functions)})")
    func = prog.functions[function]

    env: dict[int, np.ndarray] = {}  # id(Var) -> value
    missing = [n for n in func.inputs if n not in inputs]
    if missing:
        raise MlxflowError(f"missing model input(s) {missing}; the program takes {list(func.inputs)}")
    for name, var in func.inputs.items():
        arr = np.asarray(inputs[name])
        want = len(var.shape)
        if arr.ndim != want:
            raise MlxflowError(f"input {name!r} has rank {arr.ndim}, the program expects rank {want} {tuple(var.shape)}")
        env[id(var)] = arr.astype(_np_dtype(var))

    def value_of(var):
        key = id(var)
        if key in env:
            return env[key]
        if var.val is not None:
            return np.asarray(var.val) if not isinstance(var.val, (str, bool)) else var.val
        raise MlxflowError(f"value of {var.name!r} is not available (program not in topological order?)")

    for op in func.operations:
        if op.blocks:
            raise UnsupportedOpError(f"MIL op '{op.op_type}' with nested blocks (control flow) is not supported by the numpy evaluator")
        if op.op_type == "const":
            continue  # read lazily from var.val
        values = {}
        for name, var in op.inputs.items():
            values[name] = tuple(value_of(v) for v in var) if isinstance(var, (list, tuple)) else value_of(var)
        kernel = _KERNELS.get(op.op_type)
        result = kernel(op, values) if kernel is not None else _value_inference(op, values)
        outs = op.outputs
        results = result if isinstance(result, tuple) else (result,)
        if len(results) != len(outs):
            raise MlxflowError(f"op {op.name!r} ({op.op_type}) produced {len(results)} values for {len(outs)} outputs")
        for var, val in zip(outs, results):
            env[id(var)] = _as_output(val, var)

    return {var.name: value_of(var) for var in func.outputs}
