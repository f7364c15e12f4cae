"""The MLX SD VAE against diffusers' AutoencoderKL, the LatentVAE codec, and loading errors.

Every model here is a tiny random AutoencoderKL (4 levels, 8-32 channels) on 16x16 or
32x32 images; diffusers is the reference and is only needed by the parity tests.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert.hf_vae import SAFETENSORS, from_diffusers, to_diffusers, vae_key
from mlxflow.errors import MlxflowError
from mlxflow.configs.encoders import VAEConfig
from mlxflow.encoders import LatentVAE, load_autoencoder, make_tiny_vae
from mlxflow.models.vae import AutoencoderKL

TOL = 1e-4


def _nhwc(t) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _nchw(a: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def _diffusers_vae(folder, **config):
    """A diffusers AutoencoderKL with every parameter perturbed (so GroupNorm affines and
    biases are not the identity/zero of a fresh init), saved with save_pretrained."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    torch.manual_seed(0)
    levels = len(config["block_out_channels"])
    ref = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                                  up_block_types=("UpDecoderBlock2D",) * levels, **config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(folder)
    return ref


def _reference(ref, images: np.ndarray, z: np.ndarray):
    import torch

    with torch.no_grad():
        dist = ref.encode(_nchw(images)).latent_dist
        out = ref.decode(_nchw(z)).sample
    return _nhwc(dist.mean), _nhwc(dist.logvar), _nhwc(out)


def _check_parity(model: AutoencoderKL, ref, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    c = model.config.latent_channels
    f = model.config.downsample
    images = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    z = rng.standard_normal((2, size // f, size // f, c)).astype(np.float32)
    ref_mean, ref_logvar, ref_out = _reference(ref, images, z)
    mean, logvar = model.encode(mx.array(images))
    out = model.decode(mx.array(z))
    assert mean.shape == ref_mean.shape == (2, size // f, size // f, c)
    assert out.shape == ref_out.shape == (2, size, size, 3)
    np.testing.assert_allclose(np.array(mean), ref_mean, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.array(logvar), ref_logvar, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.array(out), ref_out, atol=TOL, rtol=0)


TINY = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
VARIANT = dict(block_out_channels=(8, 16, 24), layers_per_block=2, latent_channels=3, norm_num_groups=4,
               use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)


@pytest.mark.parametrize("config", [TINY, VARIANT], ids=["sd-layout", "no-quant-no-attn"])
def test_parity_with_diffusers(tmp_path, config):
    ref = _diffusers_vae(tmp_path, **config)
    model, raw = load_autoencoder(tmp_path)
    assert raw["_class_name"] == "AutoencoderKL"
    _check_parity(model, ref, size=16)


def test_old_attention_names_and_pickle(tmp_path):
    """query/key/value/proj_attn names, 1x1-conv-shaped projections, and a .bin state dict."""
    import torch

    ref = _diffusers_vae(tmp_path / "new", **TINY)
    old = {}
    for k, v in ref.state_dict().items():
        for new_name, old_name in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".attentions.0.{new_name}.", f".attentions.0.{old_name}.")
        if k.endswith(("query.weight", "proj_attn.weight")):
            v = v[:, :, None, None]  # as the original 1x1-conv attention stored them
        old[k] = v.clone()
    assert any(".query." in k for k in old) and not any(".to_q." in k for k in old)
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    torch.save(old, folder / "diffusion_pytorch_model.bin")
    model, _ = load_autoencoder(folder)
    _check_parity(model, ref, size=16, seed=1)


def test_key_map_round_trip():
    assert vae_key("encoder.mid_block.attentions.0.proj_attn.bias") == "encoder.mid_block.attentions.0.to_out.0.bias"
    assert vae_key("decoder.mid_block.attentions.0.key.weight") == "decoder.mid_block.attentions.0.to_k.weight"
    assert vae_key("encoder.conv_in.weight") == "encoder.conv_in.weight"
    rng = np.random.default_rng(0)
    weights = {"encoder.conv_in.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),  # MLX O,kH,kW,I
               "decoder.mid_block.attentions.0.to_q.weight": rng.standard_normal((5, 5)).astype(np.float32)}
    torch_layout = to_diffusers(weights)
    assert torch_layout["encoder.conv_in.weight"].shape == (8, 3, 3, 3)
    np.testing.assert_array_equal(torch_layout["encoder.conv_in.weight"][2, 1, 0, 2],
                                  weights["encoder.conv_in.weight"][2, 0, 2, 1])
    back = from_diffusers(torch_layout)
    for k in weights:
        np.testing.assert_array_equal(back[k], weights[k])


# --- LatentVAE ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny", seed=3)


@pytest.fixture(scope="module")
def vae(tiny_folder):
    return LatentVAE(tiny_folder)


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def test_latent_vae_attributes(vae, tiny_folder):
    assert vae.spec == f"sd-vae:{tiny_folder}"
    assert vae.id.startswith("sd-vae-") and "/" not in vae.id
    assert vae.scaling_factor == pytest.approx(0.18215)
    assert vae.shift_factor is None
    assert (vae.latent_channels, vae.downsample, vae.random) == (4, 8, True)
    assert vae.encode(_images(1, size=64)).shape == (1, 8, 8, 4)  # the dit family's geometry


def test_make_tiny_vae_loads_in_diffusers(vae, tiny_folder):
    """The written folder is a real diffusers folder, and LatentVAE applies the scaling both
    ways exactly like a diffusers pipeline: latents = mean * s, images = decode(latents / s)."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    ref = diffusers.AutoencoderKL.from_pretrained(tiny_folder).eval()
    x = _images(3)
    latents = vae.encode(x)
    assert latents.shape == (3, 4, 4, 4) and latents.dtype == np.float32
    s = ref.config.scaling_factor
    with torch.no_grad():
        ref_latents = _nhwc(ref.encode(_nchw(x)).latent_dist.mean) * s
        ref_images = _nhwc(ref.decode(_nchw(ref_latents) / s).sample)
    np.testing.assert_allclose(latents, ref_latents, atol=TOL, rtol=0)
    images = vae.decode(latents)
    assert images.shape == x.shape and images.dtype == np.float32
    np.testing.assert_allclose(images, np.clip(ref_images, -1, 1), atol=TOL, rtol=0)


def test_decode_clips(vae):
    latents = 40.0 * np.random.default_rng(1).standard_normal((2, 4, 4, 4)).astype(np.float32)
    raw = np.array(vae.model.decode(mx.array(latents / vae.scaling_factor)))
    assert np.abs(raw).max() > 1.5  # the network itself overshoots here...
    images = vae.decode(latents)
    assert images.min() >= -1.0 and images.max() <= 1.0  # ...the codec does not
    np.testing.assert_allclose(images, np.clip(raw, -1, 1), atol=TOL, rtol=0)


def test_batched_equals_unbatched(tiny_folder, vae):
    x = _images(5, seed=2)
    small = LatentVAE(tiny_folder, batch_size=2)
    np.testing.assert_allclose(small.encode(x), vae.encode(x), atol=1e-5, rtol=0)
    one_by_one = np.concatenate([vae.encode(x[i:i + 1]) for i in range(5)])
    np.testing.assert_allclose(one_by_one, vae.encode(x), atol=1e-5, rtol=0)
    drawn, drawn_small = vae.encode(x, sample=True, seed=7), small.encode(x, sample=True, seed=7)
    np.testing.assert_allclose(drawn, drawn_small, atol=1e-5, rtol=0)
    assert not np.allclose(drawn, vae.encode(x), atol=1e-3)  # a sample is not the mean
    assert not np.allclose(drawn, vae.encode(x, sample=True, seed=8), atol=1e-3)
    latents = vae.encode(x)
    np.testing.assert_allclose(small.decode(latents), vae.decode(latents), atol=1e-5, rtol=0)


def test_shift_factor(tmp_path, vae):
    folder = make_tiny_vae(tmp_path / "shifted", seed=3)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(shift_factor=0.25, scaling_factor=0.5)
    (folder / "config.json").write_text(json.dumps(cfg))
    shifted = LatentVAE(folder)
    x = _images(2, seed=4)
    mean = np.array(vae.model.encode(mx.array(x))[0])  # same seed: same weights as `vae`
    latents = shifted.encode(x)
    np.testing.assert_allclose(latents, (mean - 0.25) * 0.5, atol=TOL, rtol=0)
    raw = np.array(vae.model.decode(mx.array(mean)))
    np.testing.assert_allclose(shifted.decode(latents), np.clip(raw, -1, 1), atol=TOL, rtol=0)


def test_found_in_hub_cache(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--stabilityai--sd-vae-ft-mse" / "snapshots" / "abc123"
    make_tiny_vae(snapshot, block_out_channels=(8, 8, 8, 8), norm_num_groups=4)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = LatentVAE()
    assert (found.spec, found.id, found.random) == ("sd-vae", "sd-vae", True)
    assert found.folder == snapshot


# --- errors: one line each ----------------------------------------------------------------

def _one_line_error(fn, *words):
    with pytest.raises(MlxflowError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.fixture
def edited(tmp_path):
    """A copy of a small random folder whose weights a test may edit: (folder, weights, save)."""
    folder = make_tiny_vae(tmp_path / "vae", block_out_channels=(8, 8, 8, 8), norm_num_groups=4)
    weights = load_file(str(folder / SAFETENSORS))
    return folder, weights, lambda w: save_file(w, str(folder / SAFETENSORS))


def test_unknown_key(edited):
    folder, weights, save = edited
    save({**weights, "encoder.extra.weight": np.zeros(3, np.float32)})
    _one_line_error(lambda: LatentVAE(folder), "unexpected weight", "encoder.extra.weight")


def test_missing_key(edited):
    folder, weights, save = edited
    del weights["decoder.conv_out.bias"]
    save(weights)
    _one_line_error(lambda: LatentVAE(folder), "missing weight", "decoder.conv_out.bias")


def test_wrong_shape(edited):
    folder, weights, save = edited
    weights["encoder.conv_in.weight"] = np.zeros((8, 3, 5, 5), np.float32)
    save(weights)
    _one_line_error(lambda: LatentVAE(folder), "encoder.conv_in.weight", "shape")


def test_corrupt_weights(edited):
    folder, _, _ = edited
    (folder / SAFETENSORS).write_bytes(b"not a safetensors file")
    _one_line_error(lambda: LatentVAE(folder), "cannot read VAE weights")


def test_missing_folder_and_files(tmp_path, monkeypatch):
    _one_line_error(lambda: LatentVAE(tmp_path / "nowhere"), "not found")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    _one_line_error(lambda: LatentVAE(tmp_path / "empty"), "diffusion_pytorch_model.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_line_error(lambda: LatentVAE(), "stabilityai/sd-vae-ft-mse")


def test_bad_inputs(vae):
    _one_line_error(lambda: vae.encode(_images(1, size=20)), "divisible by 8")
    _one_line_error(lambda: vae.decode(np.zeros((1, 2, 2, 3), np.float32)), "latents")
    _one_line_error(lambda: VAEConfig.from_dict({"act_fn": "gelu"}), "act_fn")
    _one_line_error(lambda: VAEConfig(block_out_channels=(12,), norm_num_groups=8), "norm_num_groups")
