"""Dataset folders (the shared on-disk contract) and the deterministic mlx-data batch pipeline.

A dataset folder holds:

- ``images.npy``      uint8 (N, H, W, 3), RGB, already composited on an opaque background
- ``captions.json``   N objects ``{"text": ..., "emoji": ...}`` or ``{"text": ..., "file": ...}``
- ``dataset.json``    ``{"kind", "size", "count", "skipped", "font", "background", "mlxflow_version"}``
- ``text-<id>.npy``   float32 (N, L, D) cached embeddings of the captions for encoder ``<id>``
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mlxflow.errors import MlxflowError

IMAGES = "images.npy"
CAPTIONS = "captions.json"
META = "dataset.json"


def mlxflow_version() -> str:
    """The installed mlxflow version, recorded in every dataset.json."""
    try:
        from importlib.metadata import version

        return version("mlxflow")
    except Exception:  # running from a source tree that is not pip-installed
        try:
            import mlxflow

            return str(getattr(mlxflow, "__version__", "unknown"))
        except Exception:
            return "unknown"


def write_dataset_folder(
    out_dir: str | os.PathLike,
    images: np.ndarray,
    captions: list[dict],
    meta: dict,
    overwrite: bool = False,
) -> Path:
    """Write the folder format atomically: build ``<out_dir>.tmp-<pid>``, then rename.

    images: uint8 (N, H, W, 3); captions: N dicts with a "text" key. An existing
    non-empty ``out_dir`` is replaced only when ``overwrite`` is set, and only after the
    new folder is complete, so a crash never leaves a half-written dataset behind.
    """
    out_dir = Path(out_dir)
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(captions):
        raise ValueError(f"images {images.shape} do not match {len(captions)} captions")
    if out_dir.exists() and not out_dir.is_dir():
        raise MlxflowError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise MlxflowError(f"{out_dir} exists and is not empty (pass --overwrite to replace it)")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        np.save(tmp / IMAGES, images)
        (tmp / CAPTIONS).write_text(json.dumps(captions, ensure_ascii=False, indent=0) + "\n")
        (tmp / META).write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n")
        old = None
        if out_dir.exists():
            # Move the old folder aside first: a rename cannot replace a non-empty folder.
            old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """int (n,) sample order of ``epoch``: a pure function of (seed, epoch), the one every
    dataset kind (image folders, latent caches) shuffles by, so resumed positions agree."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def epoch_flips(n: int, seed: int, epoch: int) -> np.ndarray:
    """bool (n,) indexed by sample index: flip that sample in ``epoch``?"""
    # The trailing 1 keeps this stream independent of the permutation's.
    return np.random.default_rng([int(seed), int(epoch), 1]).random(n) < 0.5


def index_batches(n: int, batch_size: int, seed: int, start: int = 0, flip: bool = False) -> Iterator[dict]:
    """The sample indices of the batches ``ImageTextDataset.batches`` yields, without the data:
    ``{"index": int64 (B,)}`` plus ``"flip": bool (B,)`` when ``flip``. A trainer that keeps
    the whole set on its device gathers these rows there, in the same order a host stream
    would deliver them, so both feed a run identical batches and resume at the same place."""
    nb = n // batch_size
    if batch_size < 1 or nb < 1:
        raise MlxflowError(f"batch size {batch_size} does not fit a dataset of {n} samples")
    epoch, skip = divmod(int(start), nb)
    while True:
        order = epoch_order(n, seed, epoch)[skip * batch_size: nb * batch_size]
        flips = epoch_flips(n, seed, epoch) if flip else None
        skip = 0
        for rows in order.reshape(-1, batch_size):
            rows = rows.astype(np.int64)
            yield {"index": rows} if flips is None else {"index": rows, "flip": flips[rows]}
        epoch += 1


def subset_dataset_folder(src_dir, out_dir, captions: list[str], overwrite: bool = False) -> Path:
    """A dataset folder holding only the samples of `src_dir` with these captions (in this
    order; the first sample of each caption): e.g. the dozen emoji a demo shows."""
    src = ImageTextDataset.load(src_dir)
    rows = src.caption_index(captions).tolist()
    raw = json.loads((src.path / CAPTIONS).read_text(encoding="utf-8"))
    meta = {**src.meta, "count": len(rows), "subset_of": str(src.path), "mlxflow_version": mlxflow_version()}
    return write_dataset_folder(out_dir, src.images[rows], [raw[i] for i in rows], meta, overwrite=overwrite)


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


class ImageTextDataset:
    """A loaded dataset folder.

    Attributes: ``path``, ``images`` uint8 (N, H, W, 3), ``captions`` list[str] (N),
    ``meta`` dict (dataset.json), ``size`` (H == W).
    """

    def __init__(self, path: Path, images: np.ndarray, captions: list[str], meta: dict):
        self.path = Path(path)
        self.images = images
        self.captions = captions
        self.meta = meta
        self.size = int(images.shape[1])

    def __len__(self) -> int:
        return len(self.images)

    def caption_index(self, captions: list[str]) -> np.ndarray:
        """int (K,) index of the first sample of each caption; one line naming any that is not here."""
        first = {c: i for i, c in reversed(list(enumerate(self.captions)))}
        missing = [c for c in captions if c not in first]
        if missing:
            raise MlxflowError(f"not training captions of {self.path}: {', '.join(missing)}")
        return np.array([first[c] for c in captions], np.int64)

    def __repr__(self) -> str:
        return f"ImageTextDataset({str(self.path)!r}, n={len(self)}, size={self.size})"

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ImageTextDataset":
        path = Path(path).expanduser()
        if not path.exists():
            raise MlxflowError(f"dataset folder not found: {path}")
        if not path.is_dir() or not (path / IMAGES).is_file() or not (path / CAPTIONS).is_file():
            raise MlxflowError(
                f"{path} is not a dataset folder (it needs {IMAGES} and {CAPTIONS}; "
                "build one from the emoji font or import an image folder)"
            )
        try:
            images = np.load(path / IMAGES, allow_pickle=False)
        except Exception as e:  # truncated file, bad header, pickled object...
            raise MlxflowError(f"{path / IMAGES} is corrupt ({type(e).__name__}: {e})") from None
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise MlxflowError(
                f"{path / IMAGES} must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        if images.shape[1] != images.shape[2]:
            raise MlxflowError(f"{path / IMAGES} images must be square, got {images.shape[1:3]}")
        try:
            raw = json.loads((path / CAPTIONS).read_text(encoding="utf-8"))
            captions = [c["text"] if isinstance(c, dict) else c for c in raw]
            if not all(isinstance(c, str) for c in captions):
                raise TypeError("captions must be strings")
        except Exception as e:
            raise MlxflowError(f"{path / CAPTIONS} is corrupt ({type(e).__name__}: {e})") from None
        if len(captions) != len(images):
            raise MlxflowError(
                f"{path} has {len(images)} images but {len(captions)} captions"
            )
        meta = {}
        if (path / META).is_file():
            try:
                meta = json.loads((path / META).read_text(encoding="utf-8"))
            except Exception as e:
                raise MlxflowError(f"{path / META} is corrupt ({e})") from None
        return cls(path, images, captions, meta)

    # ------------------------------------------------------------------ text embeddings

    def text_embeddings(
        self,
        encoder,
        chunk: int = 256,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """float32 (N, L, D) embeddings of the captions, cached as ``text-<encoder.id>.npy``."""
        n = len(self)
        want = (n, int(encoder.tokens), int(encoder.dim))
        cache = self.path / f"text-{encoder.id}.npy"
        if cache.is_file():
            try:
                cached = np.load(cache, allow_pickle=False)
                if cached.shape == want and cached.dtype == np.float32:
                    return cached
            except Exception:
                pass  # a broken cache is recomputed, never trusted
        parts = []
        for lo in range(0, n, chunk):
            parts.append(np.asarray(encoder.encode(self.captions[lo : lo + chunk]), np.float32))
            if on_progress is not None:
                on_progress(min(lo + chunk, n), n)
        emb = np.concatenate(parts) if parts else np.zeros(want, np.float32)
        if emb.shape != want:
            raise ValueError(f"encoder {encoder.id} returned {emb.shape}, expected {want}")
        _save_npy_atomic(cache, emb)
        return emb

    # ------------------------------------------------------------------ batches

    def batches_per_epoch(self, batch_size: int) -> int:
        if batch_size < 1:
            raise MlxflowError(f"batch size must be positive, got {batch_size}")
        if len(self) < batch_size:
            raise MlxflowError(
                f"batch size {batch_size} is larger than the dataset ({len(self)} images)"
            )
        return len(self) // batch_size

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """int (N,) sample order of ``epoch``: a pure function of (seed, epoch)."""
        return epoch_order(len(self), seed, epoch)

    def epoch_flips(self, seed: int, epoch: int) -> np.ndarray:
        """bool (N,) indexed by sample index: flip that sample in ``epoch``?"""
        return epoch_flips(len(self), seed, epoch)

    def batches(
        self,
        batch_size: int,
        seed: int,
        start: int = 0,
        flip: bool = False,
        embeddings: np.ndarray | None = None,
        prefetch: int = 4,
    ) -> Iterator[dict]:
        """Infinite, deterministic, resumable stream of batches.

        Yields ``{"image": float32 (B, H, W, 3) in [-1, 1], "text": float32 (B, L, D),
        "index": int64 (B,)}`` ("text" only when ``embeddings`` (N, L, D) is given).
        ``start`` = batches already consumed: the stream continues exactly where a fresh
        stream would be after ``start`` batches. Each epoch drops its last partial batch.
        ``prefetch`` is ignored (kept for compatibility): batches are gathered on the
        caller's thread, with no prefetch threads (see ``_iterate``).
        """
        self.batches_per_epoch(batch_size)  # one line for a batch the set cannot fill
        if start < 0:
            raise MlxflowError(f"start must be >= 0, got {start}")
        if embeddings is not None:
            # Any per-sample table: text embeddings (N, L, D), class labels (N,), ...
            embeddings = np.asarray(embeddings)
            if embeddings.ndim == 0 or len(embeddings) != len(self):
                raise MlxflowError(
                    f"conditions {embeddings.shape} do not match {len(self)} captions"
                )
        return self._iterate(batch_size, int(seed), int(start), flip, embeddings, prefetch)

    def _iterate(self, batch_size, seed, start, flip, embeddings, prefetch):
        import mlx.data as dx

        # Cause of the old epoch-boundary hang (read in mlx-data's source, tag v0.1.0, same on
        # main: mlx/data/core/ThreadPool.cpp, stream/Prefetch.cpp): ~ThreadPool sets its stop
        # flag without the workers' queue mutex, then notifies and joins, so a worker between
        # its wait-predicate check and its sleep misses the wakeup and the join under ~Prefetch
        # never returns (a busy machine widens the window; mlx-data PR #112 reports the race).
        # Each worker task also resets the process-wide OpenBLAS thread count (ThreadController).
        # Fix: own no threads. The images are in memory, so mlx-data's random-access Buffer ops
        # (perm + batch, indexed with [i]) gather each batch on the caller's thread; with no
        # pool there is nothing to join, so an epoch change or an abandoned generator cannot
        # deadlock by construction; a prefetch thread would only overlap an in-memory copy.
        # ``prefetch`` is accepted for compatibility and ignored.
        del prefetch
        # Only images and indices go through mlx-data; embeddings are gathered by index
        # afterwards so a large (N, L, D) table is never copied into the buffer.
        buffer = dx.buffer_from_vector(
            [{"image": img, "index": np.array(i, np.int64)} for i, img in enumerate(self.images)]
        )
        # The order (epochs, resume position, flips) is index_batches', the one a trainer that
        # holds the set on its device follows; mlx-data gathers each batch's rows.
        for rows in index_batches(len(self), batch_size, seed, start, flip):
            item = buffer.perm(rows["index"].tolist()).batch(batch_size)[0]
            index = np.asarray(item["index"], np.int64)
            image = np.asarray(item["image"], np.float32) / 127.5 - 1.0
            if flip:
                image[rows["flip"]] = image[rows["flip"], :, ::-1]
            batch = {"image": image, "index": index}
            if embeddings is not None:
                batch["text"] = embeddings[index]
            yield batch
