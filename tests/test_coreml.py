"""Core ML export: convert a tiny stand-in denoiser, evaluate the saved ML Program in numpy
(macOS: MLModel.predict), and check the PSNR gate, batch sizes, compression and metadata."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="Core ML export tests need torch")
pytest.importorskip("coremltools", reason="Core ML export tests need coremltools (pip install coremltools)")

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from convert import coreml  # noqa: E402
from convert.mil_eval import evaluate_program  # noqa: E402
from mlxflow.errors import MlxflowError  # noqa: E402

SIZE, TEXT_L, TEXT_D = 16, 1, 24

# torch.jit.trace is deprecated in torch 2.9+ but is still what coremltools converts best.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")]


# ----------------------------------------------------------------------------- stand-in model
# The op mix of the emoji denoiser (conv 3x3 incl. stride 2, GroupNorm, SiLU, Linear,
# sinusoidal t embedding, FiLM, SDPA self-attention, explicit matmul-softmax cross-attention,
# nearest 2x upsampling, residual adds, reshape/permute), as small as possible so the
# converter (whose cost grows with the op count) stays fast.


class _Attention(nn.Module):
    def __init__(self, ch: int, ctx_dim: int | None = None, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(4, ch)
        self.q = nn.Linear(ch, ch)
        self.k = nn.Linear(ctx_dim or ch, ch)
        self.v = nn.Linear(ctx_dim or ch, ch)
        self.out = nn.Linear(ch, ch)

    def forward(self, x, ctx=None):
        B, C, H, W = x.shape
        h = self.norm(x).reshape(B, C, H * W).permute(0, 2, 1)
        src = h if ctx is None else ctx
        split = lambda z: z.reshape(B, -1, self.heads, C // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(h)), split(self.k(src)), split(self.v(src))
        if ctx is None:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = torch.softmax(q @ k.transpose(-1, -2) * (C // self.heads) ** -0.5, dim=-1) @ v
        o = o.transpose(1, 2).reshape(B, H * W, C)
        return x + self.out(o).permute(0, 2, 1).reshape(B, C, H, W)


class StandIn(nn.Module):
    def __init__(self, ch: int = 16, text_dim: int = TEXT_D, emb: int = 32):
        super().__init__()
        self.emb = emb
        self.t_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.text_proj = nn.Linear(text_dim, emb)
        self.inc = nn.Conv2d(3, ch, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.film = nn.Linear(emb, 2 * ch)
        self.down = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
        self.self_attn = _Attention(2 * ch)
        self.cross_attn = _Attention(2 * ch, text_dim)
        self.up = nn.Conv2d(2 * ch, ch, 3, padding=1)
        self.out_norm = nn.GroupNorm(4, ch)
        self.outc = nn.Conv2d(ch, 3, 3, padding=1)
        with torch.no_grad():  # non-trivial affine norms so the converter keeps them
            for n in (self.norm1, self.out_norm, self.self_attn.norm, self.cross_attn.norm):
                n.weight.uniform_(0.5, 1.5)
                n.bias.uniform_(-0.2, 0.2)

    def time_embedding(self, t):
        half = self.emb // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        a = t[:, None] * 1000.0 * freqs[None]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)

    def forward(self, x, t, text):
        e = self.t_mlp(self.time_embedding(t)) + self.text_proj(text.mean(dim=1))
        h0 = self.inc(x)
        scale, shift = self.film(e).chunk(2, dim=1)
        h = self.norm1(h0) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        h = h0 + self.conv1(F.silu(h))
        h = self.down(h)
        h = self.cross_attn(self.self_attn(h), text)
        h = self.up(F.interpolate(h, scale_factor=2, mode="nearest")) + h0
        return self.outc(F.silu(self.out_norm(h)))


def _model(seed: int = 0) -> StandIn:
    torch.manual_seed(seed)
    return StandIn().eval()


def _inputs(batch: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32),
            rng.uniform(0, 1, (batch,)).astype(np.float32),
            rng.standard_normal((batch, TEXT_L, TEXT_D)).astype(np.float32))


def _torch_out(model, x, t, text):
    with torch.no_grad():
        return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(text)).numpy()


META = {"family": "emoji", "preset": "standin", "train_steps": 0,
        "text_encoder": {"name": "sentence-transformers/all-MiniLM-L6-v2", "pooling": "mean", "normalize": True}}
COMMON = dict(image_size=SIZE, text_tokens=TEXT_L, text_dim=TEXT_D, batch_sizes=(1, 2), metadata=META)


@pytest.fixture(scope="module")
def model():
    return _model(0)


@pytest.fixture(scope="module")
def fp32_package(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml") / "fp32.mlpackage"
    return coreml.export_denoiser(model, out_path=out, precision="fp32", **COMMON)


@pytest.fixture(scope="module")
def fp32_program(fp32_package):
    """The saved package's program, loaded once (loading costs about a second)."""
    from convert.mil_eval import load_program

    return load_program(fp32_package)


@pytest.fixture(scope="module")
def fp16_report(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml") / "fp16.mlpackage"
    return coreml.export_and_verify(model, out_path=out, precision="fp16", **COMMON)


# ----------------------------------------------------------------------------- tests


def test_fp32_matches_torch(model, fp32_package):
    x, t, text = _inputs(1)
    got = evaluate_program(fp32_package, {"x_t": x, "t": t, "text": text})["velocity"]
    ref = _torch_out(model, x, t, text)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.max(np.abs(got - ref)) < 1e-3
    report = coreml.verify_denoiser(fp32_package, model, n_steps=8)
    assert report["backend"] == ("coreml-predict" if sys.platform == "darwin" else "mil-numpy")
    assert report["denoiser_psnr"] >= 35 and report["trajectory_psnr"] >= 35, report


@pytest.mark.parametrize("batch", [1, 2])
def test_enumerated_batch_sizes(model, fp32_program, batch):
    x, t, text = _inputs(batch, seed=batch)
    got = evaluate_program(fp32_program, {"x_t": x, "t": t, "text": text})["velocity"]
    assert got.shape == (batch, 3, SIZE, SIZE)
    assert np.max(np.abs(got - _torch_out(model, x, t, text))) < 1e-3


def test_fp16_export_passes_gate(fp16_report):
    r = fp16_report
    assert r["path"].exists() and r["size_mb"] > 0
    assert r["denoiser_psnr"] >= 35 and r["trajectory_psnr"] >= 35, r
    # the fp16 check must actually see fp16 rounding, not an fp32 evaluation
    assert r["max_abs_err"] > 1e-5, r
    assert not any(p.name.startswith(".fp16") for p in r["path"].parent.iterdir()), "staging folder left behind"


def test_fp16_program_runs_in_half_precision(fp16_report):
    prog = __import__("convert.mil_eval", fromlist=["load_program"]).load_program(fp16_report["path"])
    ops = {op.op_type for op in prog.functions["main"].operations}
    assert "cast" in ops  # fp32 I/O, fp16 inside
    assert any(op.outputs[0].dtype.__name__ == "fp16" for op in prog.functions["main"].operations if op.op_type == "conv")


def test_palettized8_evaluates_and_gate_rejects_wrong_model(model, tmp_path):
    out = tmp_path / "pal8.mlpackage"
    r = coreml.export_and_verify(model, out_path=out, precision="fp16", compress="palettize8",
                                 compress_weight_threshold=512, **COMMON)
    prog = __import__("convert.mil_eval", fromlist=["load_program"]).load_program(out)
    lut_ops = [op for op in prog.functions["main"].operations if op.op_type == "constexpr_lut_to_dense"]
    assert lut_ops
    # our LUT decoding agrees with coremltools' own decompression of the saved weights
    from convert.mil_eval import _KERNELS

    for op in lut_ops[:5]:
        ours = _KERNELS[op.op_type](op, {k: v.val for k, v in op.inputs.items()})
        np.testing.assert_array_equal(ours, op.materialized_val_inference())
    assert math.isfinite(r["denoiser_psnr"]) and r["denoiser_psnr"] >= 35, r
    # Verification against a different torch model must fail the gate and write nothing
    # (the staging folder is removed too).
    bad = tmp_path / "bad.mlpackage"
    with pytest.raises(MlxflowError, match=r"PSNR .* dB.*gate 35 dB"):
        coreml.export_and_verify(model, out_path=bad, precision="fp32", verify_model=_model(seed=123),
                                 **{**COMMON, "batch_sizes": (1,)})
    assert not bad.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pal8.mlpackage"]


# ----------------------------------------------------------------------------- the real denoiser, padded text


@pytest.fixture(scope="module")
def masked_emoji(tmp_path_factory):
    """The emoji twin with text_mask (one level, so conversion stays quick), exported fp16 and verified."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from conftest import micro_emoji_config

    from mlxflow.torch_ref.emoji import EmojiFlow

    cfg = micro_emoji_config(channels=(16,), image_size=8, self_attn_levels=(), cross_attn_levels=(),
                             text_tokens=4, text_mask=True)
    torch.manual_seed(0)
    model = EmojiFlow(cfg).eval()
    with torch.no_grad():  # non-trivial biases, so a fully masked attention would visibly leak
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("coreml") / "emoji_masked.mlpackage"
    report = coreml.export_and_verify(model, out_path=out, image_size=8, text_tokens=4, text_dim=8,
                                      precision="fp16", batch_sizes=(1, 3), n_steps=4)
    return model, report


def test_masked_denoiser_export_matches_torch_on_padded_text(masked_emoji):
    model, report = masked_emoji
    # verify_denoiser fed padded texts (L=4 > 1) and an all-zero text; the fp16 gate held.
    assert report["denoiser_psnr"] >= 35 and report["trajectory_psnr"] >= 35, report
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    t = np.array([0.2, 0.5, 0.8], np.float32)
    text = rng.standard_normal((3, 4, 8)).astype(np.float32)
    text[0, 2:] = 0.0  # two real tokens
    text[1, 1:] = 0.0  # one
    text[2] = 0.0  # dropped condition
    got = evaluate_program(report["path"], {"x_t": x, "t": t, "text": text})["velocity"]
    ref = _torch_out(model, x, t, text)
    assert np.isfinite(got).all() and np.abs(got - ref).max() < 2e-2 * np.abs(ref).max()
    # The mask is derived inside the program: the 4-row padded input means what 2 rows mean
    # to torch, and the all-zero row what a model without cross-attention computes.
    short = _torch_out(model, x[:1], t[:1], text[:1, :2])
    assert np.abs(got[:1] - short).max() < 2e-2 * np.abs(short).max()
    # Tight enough to catch a lost mask: the same weights reading the zero rows as tokens differ far more.
    import dataclasses

    from mlxflow.torch_ref.emoji import EmojiFlow

    unmasked = EmojiFlow(dataclasses.replace(model.config, text_mask=False)).eval()
    unmasked.load_state_dict(model.state_dict())
    assert np.abs(_torch_out(unmasked, x[:1], t[:1], text[:1]) - short).max() > 10 * np.abs(got[:1] - short).max()


def test_metadata_saved(fp32_package):
    import coremltools as ct

    m = ct.models.MLModel(str(fp32_package), skip_model_load=True)
    meta = m.user_defined_metadata
    assert meta["mlxflow.time_convention"] == coreml.TIME_CONVENTION
    # The family's own sampling defaults, the ones `mlxflow sample` uses (not a second set).
    assert meta["mlxflow.solver"].startswith("ab2 20 steps, cfg 3 ")
    assert meta["mlxflow.family"] == "emoji" and meta["mlxflow.preset"] == "standin"
    assert json.loads(meta["mlxflow.text_encoder"])["name"].endswith("all-MiniLM-L6-v2")
    assert json.loads(meta["mlxflow.batch_sizes"]) == [1, 2]
    spec = m.get_spec()
    assert "velocity" in spec.description.metadata.shortDescription
    names = {i.name: i.shortDescription for i in spec.description.input}
    assert set(names) == {"x_t", "t", "text"} and "t=0 noise" in names["t"]
    assert [o.name for o in spec.description.output] == ["velocity"]


def test_user_mistakes_are_one_line_errors(model, tmp_path):
    class Broken(nn.Module):
        def forward(self, x, t, text):
            return x.reshape(7, -1)  # cannot trace at these shapes

    for kwargs in (dict(precision="fp8"), dict(compress="palettize3"), dict(deployment_target="iOS12")):
        with pytest.raises(MlxflowError):
            coreml.export_denoiser(model, out_path=tmp_path / "m.mlpackage", **{**COMMON, **kwargs})
    with pytest.raises(MlxflowError, match="trace"):
        coreml.export_denoiser(Broken(), out_path=tmp_path / "m.mlpackage", **COMMON)
    with pytest.raises(MlxflowError, match=".mlpackage"):
        coreml.export_denoiser(model, out_path=tmp_path / "m.mlmodel", **COMMON)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_op_names_the_op():
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 6, 6), dtype=types.fp32)])
    def prog(x):
        return mb.crop_resize(x=x, roi=np.zeros((1, 1, 5, 1, 1), np.float32), target_height=2, target_width=2)

    with pytest.raises(MlxflowError, match="crop_resize"):
        evaluate_program(prog, {"x": np.zeros((1, 4, 6, 6), np.float32)})


def test_conv_kernel_matches_torch():
    """Strides, dilations, groups and asymmetric custom pads against torch.conv2d."""
    from convert.mil_eval import _conv

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 9, 8)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    got = _conv(None, {"x": x, "weight": w, "bias": b, "strides": [2, 1], "dilations": [1, 2], "groups": 2,
                       "pad_type": "custom", "pad": [1, 2, 0, 1]})
    ref = F.conv2d(F.pad(torch.from_numpy(x), (0, 1, 1, 2)), torch.from_numpy(w), torch.from_numpy(b),
                   stride=(2, 1), dilation=(1, 2), groups=2).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_label_table_roundtrip(tmp_path):
    emb = np.random.default_rng(0).standard_normal((3, 1, 5)).astype(np.float32)
    coreml.export_label_table(emb, ["grinning face", "red heart", "rocket"], tmp_path / "labels")
    doc = json.loads((tmp_path / "labels" / "labels.json").read_text())
    assert doc["shape"] == [3, 1, 5] and doc["prompts"][2] == "rocket"
    raw = np.fromfile(tmp_path / "labels" / "label_embeddings.bin", dtype="<f4").reshape(3, 1, 5)
    np.testing.assert_array_equal(raw, emb)
    back, prompts, _ = coreml.load_label_table(tmp_path / "labels")
    np.testing.assert_array_equal(back, emb)
    with pytest.raises(MlxflowError):
        coreml.export_label_table(emb, ["only one"], tmp_path / "bad")


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predict runs only on macOS")
def test_coreml_predict_matches_torch(model, fp32_package):
    import coremltools as ct

    m = ct.models.MLModel(str(fp32_package))
    for batch in (1, 2):
        x, t, text = _inputs(batch)
        got = m.predict({"x_t": x, "t": t, "text": text})["velocity"]
        assert coreml.psnr(_torch_out(model, x, t, text), got) >= 35
