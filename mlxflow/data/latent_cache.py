"""A sharded, resumable cache of image latents + caption token ids, and its batch reader.

Layout of a cache folder::

    cache.json                 the index (below), replaced atomically after every shard
    shard-00000/latents.npy    float16 (n, h, w, C) scaled latents
    shard-00000/tokens.npy     int32 (n, L) token ids, 0 where the mask is 0 (pad id 0)
    shard-00000/mask.npy       uint8 (n, L) 1 for real tokens
    shard-00000/captions.jsonl n lines {"key": ..., "caption": ...}
    shard-00001/...

cache.json: ``format``, ``version``, ``meta`` (the caller's encoder specs: VAE, T5,
"random" flags, image size, source...), ``shard_size``, ``latent_shape`` [h, w, C],
``text_tokens`` L, ``image_shape``, ``shards`` [{"name", "count", "consumed", "skipped"}],
``count``, ``consumed``, ``skipped`` {reason: n}, ``skipped_samples`` (the first
SKIPPED_NAMES_KEPT skipped samples in source order, [{"name": key, "reason": text}], from
the reader's ``skipped_details``; absent in caches built before it), ``complete``.

``consumed`` counts SOURCE samples, skipped ones included: a shard's samples are the good
ones among the source samples it consumed, so a resumed build skips exactly
``sum(consumed)`` samples of the (deterministic) source and continues.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import MlxflowError
from .dataset import mlxflow_version

INDEX = "cache.json"
FORMAT = "mlxflow-latent-cache"
VERSION = 1
LATENTS, TOKENS, MASK, CAPTIONS = "latents.npy", "tokens.npy", "mask.npy", "captions.jsonl"

SKIPPED_NAMES_KEPT = 1000  # skipped samples named in cache.json (all are counted)

EncodeImages = Callable[[np.ndarray], np.ndarray]
Tokenize = Callable[[list], tuple]


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def _jsonable(obj):
    """``obj`` as it reads back from JSON (tuples -> lists...), so meta compares stably."""
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as e:
        raise MlxflowError(f"cache meta must be JSON-serialisable ({e})") from None


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_index(path: str | os.PathLike) -> dict:
    """The parsed cache.json of cache folder ``path``; MlxflowError when missing or corrupt."""
    path = Path(path).expanduser()
    index_file = path / INDEX
    if not index_file.is_file():
        if not path.exists():
            raise MlxflowError(f"latent cache not found: {path}")
        raise MlxflowError(f"{path} is not a latent cache (no {INDEX}; build one first)")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} index")
        if int(index.get("version", 0)) > VERSION:
            raise ValueError(f"version {index['version']} is newer than this mlxflow reads ({VERSION})")
        for s in index["shards"]:
            int(s["count"]), int(s["consumed"]), str(s["name"])
        index["meta"], index["skipped"], index["shard_size"]
    except Exception as e:
        raise MlxflowError(f"{index_file} is corrupt ({type(e).__name__}: {e})") from None
    return index


# --------------------------------------------------------------------------- build


class _Source:
    """Uniform view of the samples: position in source samples, skip counts, total."""

    def __init__(self, samples):
        self.samples = samples
        self.reader = hasattr(samples, "iter_from")  # a mlxflow.data.shards reader
        total = getattr(samples, "total", None)
        if total is None and not self.reader and hasattr(samples, "__len__"):
            total = len(samples)
        self.total = None if total is None else int(total)
        self._started = False
        self._plain_consumed = 0

    def iterate(self, start: int) -> Iterator[tuple]:
        self._plain_consumed = start
        if self.reader:
            inner = self.samples.iter_from(start)
        else:
            inner = self._plain(start)
        for item in inner:
            self._started = True  # the reader has reset its counters by now
            yield item
        self._started = True

    def _plain(self, start):
        # A plain iterable skips nothing: every item is a good sample, so the first
        # ``start`` items are the ones already cached.
        it = iter(self.samples)
        end = object()
        for i in range(start):
            if next(it, end) is end:
                self._plain_consumed = i
                return
        for item in it:
            self._plain_consumed += 1
            yield item

    def position(self, start: int) -> tuple[int, Counter]:
        """(source samples consumed since the beginning, samples skipped since ``start``)."""
        if not self._started:
            return start, Counter()
        if self.reader:
            return int(self.samples.consumed), Counter(self.samples.skipped)
        return self._plain_consumed, Counter()

    def details(self) -> list:
        """Records ({"name", "reason"}) of the samples skipped since the iteration's start."""
        if not self._started or not self.reader:
            return []
        return list(getattr(self.samples, "skipped_details", None) or [])


def build_latent_cache(
    samples: Iterable,
    out_dir: str | os.PathLike,
    *,
    encode_images: EncodeImages,
    tokenize: Tokenize,
    shard_size: int = 4096,
    batch_size: int = 64,
    meta: dict | None = None,
    on_progress: Callable[[int, int, int | None], None] | None = None,
) -> "LatentCache":
    """Encode ``samples`` into a sharded cache at ``out_dir``; resume it if one is there.

    samples: ``(key, uint8 (S, S, 3), caption)`` items, in a deterministic order: a reader
    from ``mlxflow.data.shards`` (resumes by seeking, counts skipped samples) or any
    iterable (resumes by skipping the first items).
    encode_images: uint8 (B, S, S, 3) -> float32 (B, h, w, C) scaled latents.
    tokenize: list of B captions -> (ids int32 (B, L), mask int32 (B, L)).
    meta: JSON-able encoder specs; a cache built with other meta is refused, not mixed.
    on_progress(done, skipped, total): samples cached, samples skipped, source samples
    (None when unknown); done + skipped = source samples consumed. Called after each batch.

    Each shard is written to a temporary folder and renamed, then cache.json is replaced,
    so an interrupted build (Ctrl-C, kill) loses at most the shard in progress; running the
    same call again continues after the last complete shard, re-encoding nothing. On a
    complete cache it does nothing (``cache.build_status`` says so).
    """
    if shard_size < 1 or batch_size < 1:
        raise MlxflowError(f"shard size and batch size must be positive, got {shard_size}, {batch_size}")
    from ..runlock import RunLock

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise MlxflowError(f"{out} exists and is not a folder")
    meta = _jsonable(meta or {})
    _refuse_foreign(out)  # before the lock, which would leave its file in someone else's folder
    with RunLock(out):  # a second builder on the same folder fails at once
        index = _open_or_start(out, meta, shard_size)
        if index["complete"]:
            cache = LatentCache.load(out)
            cache.build_status = (f"cache already complete: {len(cache):,} samples in "
                                  f"{len(cache.shards)} shards, nothing to do")
            if on_progress is not None:
                on_progress(len(cache), sum(index["skipped"].values()), index["consumed"])
            return cache
        resumed = bool(index["shards"])
        _Builder(out, index, encode_images, tokenize, shard_size, batch_size, on_progress).run(_Source(samples))
    cache = LatentCache.load(out)
    n_resumed = sum(s["count"] for s in index["shards"][: index.get("_resumed_shards", 0)])
    cache.build_status = (f"resumed after {n_resumed:,} cached samples; " if resumed else "") + (
        f"built {len(cache):,} samples in {len(cache.shards)} shards"
        + (f", skipped {sum(cache.skipped.values()):,}" if cache.skipped else ""))
    return cache


def _open_or_start(out: Path, meta: dict, shard_size: int) -> dict:
    """The index to continue from: a fresh one, or the existing cache's after checks."""
    if (out / INDEX).is_file():
        index = read_index(out)
        if index["meta"] != meta:
            keys = sorted(k for k in set(index["meta"]) | set(meta) if index["meta"].get(k) != meta.get(k))
            raise MlxflowError(
                f"{out} holds a cache built with other settings ({', '.join(keys)} differ); "
                "use another folder, or delete it to rebuild")
        if int(index["shard_size"]) != shard_size:
            raise MlxflowError(f"{out} was built with shard size {index['shard_size']}, not {shard_size}")
        for s in index["shards"]:
            if not (out / s["name"]).is_dir():
                raise MlxflowError(f"{out} is missing {s['name']}; delete the folder to rebuild the cache")
        index["_resumed_shards"] = len(index["shards"])
        return index
    _refuse_foreign(out)
    index = {
        "format": FORMAT, "version": VERSION, "meta": meta, "shard_size": shard_size,
        "latent_shape": None, "text_tokens": None, "image_shape": None,
        "shards": [], "count": 0, "consumed": 0, "skipped": {}, "skipped_samples": [], "complete": False,
        "mlxflow_version": mlxflow_version(),
    }
    _save_index(out, index)
    return index


def _refuse_foreign(out: Path) -> None:
    """A folder with files but no cache.json is someone else's: never write into it."""
    if out.is_dir() and not (out / INDEX).is_file():
        others = sorted(p.name for p in out.iterdir() if p.name != ".lock")
        if others:
            raise MlxflowError(f"{out} is not empty and is not a latent cache (found {others[0]})")


def _save_index(out: Path, index: dict) -> None:
    _write_json_atomic(out / INDEX, {k: v for k, v in index.items() if not k.startswith("_")})


class _Builder:
    def __init__(self, out, index, encode_images, tokenize, shard_size, batch_size, on_progress):
        self.out, self.index = out, index
        self.encode_images, self.tokenize = encode_images, tokenize
        self.shard_size, self.batch_size = shard_size, batch_size
        self.on_progress = on_progress
        for tmp in out.glob("shard-*.tmp-*"):  # left by a killed build: never complete
            shutil.rmtree(tmp, ignore_errors=True)
        for tmp in out.glob(f"{INDEX}.tmp-*"):
            tmp.unlink(missing_ok=True)

    def run(self, source: _Source) -> None:
        index = self.index
        start = sum(int(s["consumed"]) for s in index["shards"])
        done_before = sum(int(s["count"]) for s in index["shards"])
        skipped_before = Counter({k: int(v) for k, v in index["skipped"].items()})
        names_before = list(index.get("skipped_samples") or [])

        def name_skips():
            if "skipped_samples" in index:  # a cache from before names were kept stays as it was
                index["skipped_samples"] = (names_before + source.details())[:SKIPPED_NAMES_KEPT]
        shard_start = start  # source position where the shard being filled began
        skipped_at_shard = Counter()  # skips (since ``start``) when that shard began
        rows: list[tuple] = []  # (key, image, caption) waiting for the encoder
        shard = self._empty_shard()
        total = source.total

        def progress():
            if self.on_progress is not None:
                _, sk = source.position(start)
                done = done_before + self._written + len(shard["keys"])
                self.on_progress(done, sum((skipped_before + sk).values()), total)

        self._written = 0  # samples in shards written by this run
        progress()
        for key, image, caption in source.iterate(start):
            rows.append((str(key), image, str(caption)))
            room = self.shard_size - len(shard["keys"])
            if len(rows) == min(self.batch_size, room):
                self._encode(rows, shard)
                rows = []
                if len(shard["keys"]) == self.shard_size:
                    consumed, sk = source.position(start)
                    name_skips()
                    self._write_shard(shard, consumed - shard_start, sk - skipped_at_shard, complete=False)
                    shard_start, skipped_at_shard = consumed, sk
                    shard = self._empty_shard()
                progress()
        if rows:
            self._encode(rows, shard)
        consumed, sk = source.position(start)
        name_skips()
        if consumed < start:
            raise MlxflowError(
                f"the source ended after {consumed:,} samples but {self.out} already covers {start:,}: "
                "is it the same source? (delete the folder to rebuild)")
        if shard["keys"]:
            self._write_shard(shard, consumed - shard_start, sk - skipped_at_shard, complete=True)
            shard = self._empty_shard()  # its samples now count in self._written
        elif not index["shards"]:  # nothing cached: leave the index unfinished, so a re-run retries
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(sk.items())) or "the source is empty"
            from .inputs import describe_skipped

            names = describe_skipped(source.details())
            raise MlxflowError(f"no readable samples to cache ({reasons})"
                               + (f"; {names}" if names else ""))
        else:  # the source ended on a shard boundary (or after skips only): only the tail's counts
            index["consumed"] = consumed
            index["skipped"] = dict(sorted((skipped_before + sk).items()))
            index["complete"] = True
            _save_index(self.out, index)
        progress()

    def _empty_shard(self) -> dict:
        return {"keys": [], "captions": [], "latents": [], "tokens": [], "mask": []}

    def _encode(self, rows: list[tuple], shard: dict) -> None:
        keys, images, captions = zip(*rows)
        try:
            batch = np.stack([np.asarray(im) for im in images])
        except ValueError:
            shapes = sorted({np.asarray(im).shape for im in images})
            raise MlxflowError(f"samples have different image shapes {shapes[:3]}") from None
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise MlxflowError(f"sample images must be uint8 (S, S, 3), got {batch.dtype} {batch.shape[1:]}")
        latents = np.asarray(self.encode_images(batch), np.float32)
        ids, mask = self.tokenize(list(captions))
        ids, mask = np.asarray(ids), np.asarray(mask)
        b = len(rows)
        if latents.ndim != 4 or len(latents) != b:
            raise MlxflowError(f"encode_images returned {latents.shape} for {b} images, expected (B, h, w, C)")
        if ids.shape != mask.shape or ids.ndim != 2 or len(ids) != b:
            raise MlxflowError(f"tokenize returned ids {ids.shape} and mask {mask.shape} for {b} captions")
        if not np.isfinite(latents).all() or np.abs(latents).max() > np.finfo(np.float16).max:
            raise MlxflowError("encode_images returned non-finite or float16-overflowing latents")
        index = self.index
        for name, got in (("latent_shape", list(latents.shape[1:])), ("text_tokens", int(ids.shape[1])),
                          ("image_shape", list(batch.shape[1:]))):
            if index[name] is None:
                index[name] = got
            elif index[name] != got:
                raise MlxflowError(f"{name} changed from {index[name]} to {got} while building the cache")
        mask = (mask != 0).astype(np.uint8)
        shard["keys"].extend(keys)
        shard["captions"].extend(captions)
        shard["latents"].append(latents.astype(np.float16))
        shard["tokens"].append(np.where(mask == 1, ids, 0).astype(np.int32))  # pad id 0
        shard["mask"].append(mask)

    def _write_shard(self, shard: dict, consumed: int, skipped: Counter, complete: bool) -> None:
        index = self.index
        name = shard_name(len(index["shards"]))
        final = self.out / name
        tmp = self.out / f"{name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            np.save(tmp / LATENTS, np.concatenate(shard["latents"]))
            np.save(tmp / TOKENS, np.concatenate(shard["tokens"]))
            np.save(tmp / MASK, np.concatenate(shard["mask"]))
            with open(tmp / CAPTIONS, "w", encoding="utf-8") as f:
                for key, caption in zip(shard["keys"], shard["captions"]):
                    f.write(json.dumps({"key": key, "caption": caption}, ensure_ascii=False) + "\n")
            if final.exists():  # renamed by a build killed before it updated cache.json
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        count = len(shard["keys"])
        skipped = {k: v for k, v in sorted(skipped.items()) if v}
        index["shards"].append({"name": name, "count": count, "consumed": int(consumed), "skipped": skipped})
        index["count"] = sum(s["count"] for s in index["shards"])
        index["consumed"] = sum(s["consumed"] for s in index["shards"])
        total = Counter()
        for s in index["shards"]:
            total.update(s["skipped"])
        index["skipped"] = dict(sorted(total.items()))
        index["complete"] = complete
        _save_index(self.out, index)
        self._written += count


# --------------------------------------------------------------------------- read


class _Shard:
    __slots__ = ("name", "path", "latents", "tokens", "mask", "count")

    def __init__(self, root: Path, entry: dict, latent_shape: tuple, text_tokens: int):
        self.name = str(entry["name"])
        self.path = root / self.name
        self.count = int(entry["count"])
        if not self.path.is_dir():
            raise MlxflowError(f"{root} is missing {self.name}; rebuild the cache")
        want = {LATENTS: ((self.count, *latent_shape), np.float16), TOKENS: ((self.count, text_tokens), np.int32),
                MASK: ((self.count, text_tokens), np.uint8)}
        arrays = {}
        for file, (shape, dtype) in want.items():
            try:
                a = np.load(self.path / file, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                raise MlxflowError(f"{self.path / file} is missing; rebuild the cache") from None
            except Exception as e:
                raise MlxflowError(f"{self.path / file} is corrupt ({type(e).__name__}: {e})") from None
            if a.shape != tuple(shape) or a.dtype != dtype:
                raise MlxflowError(f"{self.path / file} is {a.dtype} {a.shape}, cache.json says "
                                   f"{np.dtype(dtype)} {tuple(shape)}")
            arrays[file] = a
        self.latents, self.tokens, self.mask = arrays[LATENTS], arrays[TOKENS], arrays[MASK]


class LatentCache:
    """A built cache, memory-mapped shard by shard (nothing is read until a batch needs it).

    Attributes: ``path``, ``meta`` (the build's meta), ``latent_shape`` (h, w, C),
    ``text_tokens`` L, ``skipped`` {reason: n}, ``skipped_details`` (the first skipped
    samples by name, [{"name", "reason"}]: ``inputs.describe_skipped(cache)`` prints them),
    ``index`` (cache.json), ``shards``.
    ``len()`` is the sample count (of the subset, for ``subset``/``limit``).
    """

    def __init__(self, path: Path, index: dict, shards: list[_Shard], n: int):
        self.path = Path(path)
        self.index = index
        self.meta = index["meta"]
        self.latent_shape = tuple(int(d) for d in index["latent_shape"])
        self.text_tokens = int(index["text_tokens"])
        self.skipped = {k: int(v) for k, v in index["skipped"].items()}
        self.skipped_details = [dict(d) for d in index.get("skipped_samples") or []]
        self.shards = shards
        self._n = int(n)
        # offsets[i] = global index of shard i's first sample
        self._offsets = np.cumsum([0] + [s.count for s in shards])[:-1]
        self.build_status = ""
        self._caption_cache: dict[int, list[dict]] = {}

    @classmethod
    def load(cls, path: str | os.PathLike, limit: int | None = None, allow_incomplete: bool = False) -> "LatentCache":
        """Open a cache folder; ``limit`` keeps its first n samples (the ``overfit`` runs)."""
        path = Path(path).expanduser()
        index = read_index(path)
        if not index["complete"] and not allow_incomplete:
            raise MlxflowError(f"{path} is an unfinished latent cache ({index['count']:,} samples so far); "
                               "run the build again to finish it")
        if not index["shards"]:
            raise MlxflowError(f"{path} holds no samples")
        shape, tokens = tuple(index["latent_shape"]), int(index["text_tokens"])
        n = sum(int(s["count"]) for s in index["shards"])
        if limit is not None:
            if limit < 1:
                raise MlxflowError(f"limit must be positive, got {limit}")
            n = min(n, int(limit))
        shards, covered = [], 0
        for entry in index["shards"]:
            if covered >= n:
                break  # a subset never opens the shards it does not use
            shards.append(_Shard(path, entry, shape, tokens))
            covered += shards[-1].count
        return cls(path, index, shards, n)

    def subset(self, n: int) -> "LatentCache":
        """The first ``n`` samples as a cache of their own (same files, same meta)."""
        if n < 1:
            raise MlxflowError(f"subset size must be positive, got {n}")
        n = min(int(n), self._n)
        shards = self.shards[: int(np.searchsorted(np.cumsum([s.count for s in self.shards]), n)) + 1]
        return LatentCache(self.path, self.index, shards, n)

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return (f"LatentCache({str(self.path)!r}, n={len(self)}, latent_shape={self.latent_shape}, "
                f"text_tokens={self.text_tokens})")

    # ------------------------------------------------------------------ per sample

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self._n:
            raise IndexError(f"sample {i} out of range for {self._n} samples")
        s = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return s, i - int(self._offsets[s])

    def caption(self, i: int) -> str:
        """Caption of sample ``i`` (read from its shard's captions.jsonl, a few shards cached)."""
        s, j = self._locate(int(i))
        return self._captions(s)[j]["caption"]

    def key(self, i: int) -> str:
        """Source key of sample ``i`` (tar key, file name, or dataset index)."""
        s, j = self._locate(int(i))
        return self._captions(s)[j]["key"]

    def _captions(self, s: int) -> list[dict]:
        if s in self._caption_cache:
            return self._caption_cache[s]
        shard = self.shards[s]
        try:
            with open(shard.path / CAPTIONS, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            raise MlxflowError(f"{shard.path / CAPTIONS} is missing; rebuild the cache") from None
        except Exception as e:
            raise MlxflowError(f"{shard.path / CAPTIONS} is corrupt ({e})") from None
        if len(rows) != shard.count:
            raise MlxflowError(f"{shard.path / CAPTIONS} has {len(rows)} lines, expected {shard.count}")
        if len(self._caption_cache) >= 4:  # a few shards' captions, never all of them
            self._caption_cache.pop(next(iter(self._caption_cache)))
        self._caption_cache[s] = rows
        return rows

    def gather(self, index: np.ndarray) -> dict:
        """Samples ``index`` int (B,) -> {"image": float32 (B, h, w, C), "text": int32 (B, L),
        "mask": uint8 (B, L), "index": int64 (B,)}, in the given order.

        Indices are sorted and read shard by shard (ascending reads suit a memory map),
        then put back in the caller's order.
        """
        index = np.asarray(index, np.int64)
        if index.size and (index.min() < 0 or index.max() >= self._n):
            raise IndexError(f"sample indices out of range for {self._n} samples")
        order = np.argsort(index, kind="stable")
        sorted_idx = index[order]
        b = len(index)
        image = np.empty((b, *self.latent_shape), np.float32)
        text = np.empty((b, self.text_tokens), np.int32)
        mask = np.empty((b, self.text_tokens), np.uint8)
        which = np.searchsorted(self._offsets, sorted_idx, side="right") - 1
        for s in np.unique(which):
            sel = np.nonzero(which == s)[0]
            local = sorted_idx[sel] - self._offsets[s]
            shard = self.shards[s]
            dest = order[sel]
            image[dest] = shard.latents[local]
            text[dest] = shard.tokens[local]
            mask[dest] = shard.mask[local]
        return {"image": image, "text": text, "mask": mask, "index": index}

    # ------------------------------------------------------------------ batches (ImageTextDataset contract)

    def batches_per_epoch(self, batch_size: int) -> int:
        if batch_size < 1:
            raise MlxflowError(f"batch size must be positive, got {batch_size}")
        if len(self) < batch_size:
            raise MlxflowError(f"batch size {batch_size} is larger than the cache ({len(self)} samples)")
        return len(self) // batch_size

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """int (N,) sample order of ``epoch``: a pure function of (seed, epoch), as ImageTextDataset's."""
        from .dataset import epoch_order

        return epoch_order(len(self), seed, epoch)

    def batches(
        self,
        batch_size: int,
        seed: int,
        start: int = 0,
        flip: bool = False,
        embeddings: np.ndarray | None = None,
        prefetch: int = 4,
    ) -> Iterator[dict]:
        """Infinite, deterministic, resumable stream of batches (``ImageTextDataset.batches``'s contract).

        Yields ``{"image": float32 (B, h, w, C) latents, "text": int32 (B, L) token ids,
        "mask": uint8 (B, L), "index": int64 (B,)}``; with ``embeddings`` (a per-sample
        table of length N) "text" is ``embeddings[index]`` instead. ``start`` = batches
        already consumed. Each epoch drops its last partial batch. ``prefetch`` is ignored
        (kept for the same signature): batches are gathered on the caller's thread.
        """
        if flip:
            # A mirrored image's latent is not the mirrored latent (the VAE is not equivariant).
            raise MlxflowError("flip is not supported on a latent cache (flipping latents is not flipping images)")
        self.batches_per_epoch(batch_size)  # one line for a batch the cache cannot fill
        if start < 0:
            raise MlxflowError(f"start must be >= 0, got {start}")
        if embeddings is not None:
            embeddings = np.asarray(embeddings)
            if embeddings.ndim == 0 or len(embeddings) != len(self):
                raise MlxflowError(f"conditions {embeddings.shape} do not match {len(self)} cached samples")
        return self._iterate(int(batch_size), int(seed), int(start), embeddings)

    def _iterate(self, batch_size, seed, start, embeddings):
        from .dataset import index_batches

        for rows in index_batches(len(self), batch_size, seed, start):
            batch = self.gather(rows["index"])
            if embeddings is not None:
                batch["text"] = embeddings[batch["index"]]
            yield batch
