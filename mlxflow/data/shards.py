"""Sample readers for cache builds: WebDataset tar shards, captioned image folders, dataset folders.

Every reader yields ``(key: str, image: uint8 (size, size, 3), caption: str)`` in a
deterministic order. Images are read by ``inputs.load_square`` (centre square crop, LANCZOS
resize, EXIF orientation, every Pillow mode, alpha composited on ``background``) and
caption bytes by ``inputs.decode_caption`` (UTF-8, BOMs, UTF-16 with a BOM), the same
rules as the image-folder import. A sample that cannot be read is skipped and counted by
code in ``reader.skipped``, never fatal, and recorded by name with a readable reason in
``reader.skipped_details`` ([{"name": key, "reason": "too large: 182,250,000 pixels"}]):

- ``bad_image``        image bytes that cannot be used (corrupt, truncated, empty, not an
  image, too large: the reason says which)
- ``missing_image``    no .jpg/.jpeg/.png/.webp member (tar) or file (folder) for a key
- ``missing_caption``  no caption (.json without "prompt"/"caption"/"text", no .txt, empty)
- ``bad_caption``      caption bytes that are not UTF-8 (nor UTF-16 with a BOM)
- ``bad_json``         a .json member that is not a JSON object
- ``bad_tar``          a tar file that cannot be opened at all (counted as one sample)
- ``truncated_tar``    a tar file that breaks part-way: the sample being read when it broke
  is skipped and the rest of that file is lost (the next file is read as usual)

Source samples are counted in ``reader.consumed`` (good + skipped). ``iter_from(start)``
continues after the first ``start`` source samples without decoding them, which is how an
interrupted latent-cache build resumes without re-reading gigabytes of JPEGs.
"""

from __future__ import annotations

import glob
import io
import json
import os
import posixpath
import tarfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import MlxflowError
from .dataset import CAPTIONS, IMAGES, ImageTextDataset
from .folder import CAPTION_FILES, IMAGE_SUFFIXES, has_sidecars, read_captions, sidecar_caption
from .inputs import CaptionDecodeError, SkipSample, decode_caption, load_square, skip_record
from .transforms import resize_images

# Member extensions that carry the image, in order of preference when a key has several.
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# JSON fields that hold the caption, in order of preference (text-to-image-2M uses "prompt").
CAPTION_KEYS = ("prompt", "caption", "text")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")

Sample = tuple[str, np.ndarray, str]

# The reason recorded for a skip code when the reader has nothing more precise to say.
REASONS = {
    "bad_image": "corrupt",
    "missing_image": "no image",
    "missing_caption": "no caption",
    "bad_caption": "caption not UTF-8",
    "bad_json": "caption .json is not a JSON object",
    "bad_tar": "not a readable tar file",
    "truncated_tar": "tar file breaks here",
}


def split_key(name: str) -> tuple[str, str]:
    """Tar member name -> (key, extension), the WebDataset way.

    The key is the directory plus the basename up to its FIRST dot, the extension is the
    rest, lower-cased: ``"a/0001.seg.png"`` -> ``("a/0001", "seg.png")``.
    """
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext.lower()


def caption_from_json(data: bytes) -> str | None:
    """The caption in a .json member ("prompt", else "caption", else "text"); None when absent.

    The bytes follow ``inputs.decode_caption`` (raises ``CaptionDecodeError``, counted as
    ``bad_caption``); raises ValueError when they are not a JSON object (``bad_json``).
    """
    obj = json.loads(decode_caption(data))
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    for name in CAPTION_KEYS:
        value = obj.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def decode_square(data: bytes, size: int, background: Sequence[int] = (255, 255, 255)) -> np.ndarray:
    """Encoded image bytes -> uint8 (size, size, 3): centre square crop, LANCZOS resize, alpha on background.

    Raises ``inputs.SkipSample`` (an MlxflowError with a ``reason``) for bytes that are not
    a usable image; the rules are ``inputs.load_square``'s.
    """
    return load_square(io.BytesIO(data), size, background, name="image")


class SampleReader:
    """Base of the readers: iteration, skip counting, resume by source position.

    Attributes: ``size`` (output side), ``total`` (source samples, or None when unknown
    without a full scan), ``consumed`` (source samples seen by the current iteration,
    good + skipped), ``skipped`` (Counter reason -> count, for the current iteration;
    fast-forwarded samples are not counted again), ``skipped_details`` (the skipped
    samples of the current iteration in source order, [{"name": key, "reason": text}]).
    """

    kind = "samples"

    def __init__(self, size: int = 64, background: Sequence[int] = (255, 255, 255),
                 limit: int | None = None):
        if size < 1:
            raise MlxflowError(f"image size must be positive, got {size}")
        self.size = int(size)
        self.background = tuple(int(c) for c in background)
        self.limit = None if limit is None else max(0, int(limit))
        self.total: int | None = None
        self.consumed = 0
        self.skipped: Counter = Counter()
        self.skipped_details: list[dict] = []

    def __iter__(self) -> Iterator[Sample]:
        return self.iter_from(0)

    def describe(self) -> dict:
        """JSON-able description of the source, for a cache's meta."""
        return {"kind": self.kind, "size": self.size}

    def iter_from(self, start: int = 0) -> Iterator[Sample]:
        """Samples after the first ``start`` source samples (skipped ones included)."""
        if start < 0:
            raise MlxflowError(f"start must be >= 0, got {start}")
        self.consumed = 0
        self.skipped = Counter()
        self.skipped_details = []
        for item in self._items(int(start)):
            # item: (key, image, caption) for a good sample, (key, None, code[, reason]) for a
            # skipped one, or None for a fast-forwarded one (position only, nothing decoded).
            if self.limit is not None and self.consumed >= self.limit:
                return
            self.consumed += 1
            if item is None or self.consumed <= start:
                continue
            key, image, text = item[:3]
            if image is None:
                self.skipped[text] += 1
                reason = item[3] if len(item) > 3 else REASONS.get(text, text)
                self.skipped_details.append(skip_record(key, reason))
                continue
            yield key, image, text

    def _items(self, start: int) -> Iterator[tuple | None]:
        raise NotImplementedError

    def _decode(self, key: str, data: bytes | None, caption: str | None, reason: str | None = None):
        """(key, image, caption) or (key, None, code, reason)."""
        if reason is not None:
            return key, None, reason
        if data is None:
            return key, None, "missing_image"
        if not caption:
            return key, None, "missing_caption"
        try:
            return key, decode_square(data, self.size, self.background), caption
        except SkipSample as e:
            return key, None, "bad_image", e.reason
        except MlxflowError:
            return key, None, "bad_image"


def resolve_tar_files(source) -> list[Path]:
    """A .tar path, a folder of shards, a glob (``data/*.tar``) or a list of these -> tar paths.

    Folders and globs are sorted by name; a list keeps its order.
    """
    if isinstance(source, (list, tuple)):
        files = [p for s in source for p in resolve_tar_files(s)]
        if not files:
            raise MlxflowError("no tar shards given")
        return files
    text = os.path.expanduser(str(source))
    path = Path(text)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(TAR_SUFFIXES))
        if not files:
            raise MlxflowError(f"no tar shards ({', '.join(TAR_SUFFIXES)}) in {path}")
        return files
    if path.is_file():
        return [path]
    if glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
        if not files:
            raise MlxflowError(f"no tar shards match {text}")
        return files
    raise MlxflowError(f"tar shard not found: {path}")


class TarShardReader(SampleReader):
    """WebDataset tar shards: members grouped by key, ``<key>.jpg`` + ``<key>.json``/``.txt``.

    Like WebDataset, a sample is a run of CONSECUTIVE members sharing a key (writers put a
    sample's files together); a key that reappears later starts a new sample. Files are
    read in the order ``resolve_tar_files`` gives, members in archive order.
    """

    kind = "tar"

    # mlx-data 0.1.0 (checked here) does not fit this reader: files_from_tar lists members in
    # hash order, not archive order, and raises on a truncated archive, losing its good
    # prefix; load_image drops alpha (an RGBA PNG cannot be composited on white) and decodes
    # no WebP. So members are read with Python's tarfile (sequential, any compression) and
    # decoded with Pillow, the same path as the image-folder import.

    def __init__(self, source, size: int = 64, background: Sequence[int] = (255, 255, 255),
                 limit: int | None = None):
        super().__init__(size, background, limit)
        self.files = resolve_tar_files(source)
        self.bad_files: list[str] = []  # tars that could not be opened or broke part-way

    def describe(self) -> dict:
        return {"kind": self.kind, "size": self.size, "files": [str(p) for p in self.files]}

    def _items(self, start: int):
        self.bad_files = []
        seen = 0
        for path in self.files:
            for key, parts, reason in self._groups(path, skip=max(0, start - seen)):
                seen += 1
                if parts is None and reason is None:
                    yield None  # fast-forwarded: counted, not decoded
                elif reason is not None:
                    yield key, None, reason
                else:
                    yield self._sample(key, parts)

    def _groups(self, path: Path, skip: int):
        """Yield (key, parts, reason) per sample in one tar; parts {ext: bytes}.

        The first ``skip`` samples are walked through their headers only (parts None), so
        a resume seeks past their data instead of reading it. A broken archive yields its
        current sample with reason ``truncated_tar`` (or one ``bad_tar`` if it never opens).
        Both modes break at the same sample: without reading data, tarfile notices missing
        bytes when it seeks to the next header.
        """
        try:
            tf = tarfile.open(path, "r:*")
        except (tarfile.TarError, OSError, EOFError, zlib.error):
            self.bad_files.append(str(path))
            yield str(path), None, "bad_tar"
            return
        key, parts, started = None, {}, 0
        with tf:
            try:
                for member in tf:
                    if not member.isfile():
                        continue
                    k, ext = split_key(member.name)
                    if posixpath.basename(k) == "":  # ".hidden" files (e.g. macOS "._x") are not samples
                        continue
                    if k != key:
                        if key is not None:
                            yield key, (parts if started > skip else None), None
                        key, parts, started = k, {}, started + 1
                    if started > skip and ext not in parts:
                        parts[ext] = tf.extractfile(member).read()
            except (tarfile.TarError, OSError, EOFError, zlib.error):
                self.bad_files.append(str(path))
                yield (key if key is not None else str(path)), None, "truncated_tar"
                return
            # Cut exactly between members, a plain tar reads like a complete one, except that
            # writers always end it with zero blocks: no end marker means the last sample may
            # be missing members, so it is skipped too.
            plain = not path.name.lower().endswith((".gz", ".tgz"))
            if plain and key is not None and path.stat().st_size - tf.offset < tarfile.BLOCKSIZE:
                self.bad_files.append(str(path))
                yield key, None, "truncated_tar"
                return
        if key is not None:
            yield key, (parts if started > skip else None), None

    def _sample(self, key: str, parts: dict):
        data = next((parts[e] for e in TAR_IMAGE_EXTS if e in parts), None)
        caption = None
        if "json" in parts:
            try:
                caption = caption_from_json(parts["json"])
            except CaptionDecodeError:
                return key, None, "bad_caption", "caption not UTF-8 (.json)"
            except ValueError:
                return key, None, "bad_json"
        if caption is None and "txt" in parts:
            try:
                caption = decode_caption(parts["txt"]).strip() or None
            except CaptionDecodeError:
                return key, None, "bad_caption", "caption not UTF-8 (.txt)"
        return self._decode(key, data, caption)


class ImageFolderReader(SampleReader):
    """A folder of images with a captions file (``mlxflow.data.folder`` conventions).

    Captions come from ``captions`` (a file), the folder's captions file (CAPTION_FILES,
    read by ``read_captions``) or, when it has none, per-image sidecars (``a.png`` +
    ``a.txt``). Images sorted by name; keys are file names. An image with no caption is
    skipped (``missing_caption``) rather than refused, unlike ``import_image_folder``, and
    one whose sidecar cannot be decoded too (``bad_caption``); captions naming absent
    files are ignored.
    """

    kind = "folder"

    def __init__(self, folder, size: int = 64, background: Sequence[int] = (255, 255, 255),
                 limit: int | None = None, captions=None):
        super().__init__(size, background, limit)
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise MlxflowError(f"image folder not found: {self.folder}")
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        self.captions_file, self.mapping = None, None  # None: sidecar captions
        if captions is None:
            found = [self.folder / n for n in CAPTION_FILES if (self.folder / n).is_file()]
            if not found and not has_sidecars(self.files):
                raise MlxflowError(f"no captions file in {self.folder}: add one of {', '.join(CAPTION_FILES)} "
                                   "or a caption .txt beside each image")
            captions = found[0] if found else None
        if captions is not None:
            self.captions_file = Path(captions)
            self.mapping = read_captions(self.captions_file)
        if not self.files:
            raise MlxflowError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {self.folder}")
        self.total = len(self.files) if limit is None else min(len(self.files), self.limit)

    def describe(self) -> dict:
        return {"kind": self.kind, "size": self.size, "folder": str(self.folder),
                "captions": str(self.captions_file) if self.captions_file is not None else "sidecar .txt"}

    def _items(self, start: int):
        for i, path in enumerate(self.files):
            if i < start:
                yield None
                continue
            if self.mapping is not None:
                caption = self.mapping.get(path.name)
            else:
                try:
                    caption = sidecar_caption(path)
                except SkipSample as e:
                    yield path.name, None, "bad_caption", e.reason
                    continue
            if not caption:
                yield path.name, None, "missing_caption"
                continue
            try:
                yield path.name, load_square(path, self.size, self.background, name=path.name), caption
            except SkipSample as e:
                yield path.name, None, "bad_image", e.reason


class DatasetFolderReader(SampleReader):
    """An existing dataset folder (``images.npy`` + ``captions.json``, e.g. the emoji set).

    Its images are already square RGB; they are resized (area-averaged down, bicubic up,
    ``resize_images``) only when their side differs from ``size``. Keys are the indices.
    """

    kind = "dataset"

    def __init__(self, folder, size: int = 64, background: Sequence[int] = (255, 255, 255),
                 limit: int | None = None):
        super().__init__(size, background, limit)
        self.dataset = ImageTextDataset.load(folder)
        n = len(self.dataset)
        self.total = n if limit is None else min(n, self.limit)

    def describe(self) -> dict:
        return {"kind": self.kind, "size": self.size, "folder": str(self.dataset.path)}

    def _items(self, start: int):
        images = self.dataset.images
        for i in range(len(self.dataset)):
            if i < start:
                yield None
                continue
            caption = self.dataset.captions[i].strip()
            if not caption:
                yield str(i), None, "missing_caption"
                continue
            yield str(i), resize_images(images[i : i + 1], self.size)[0], caption


def open_samples(source, size: int = 64, background: Sequence[int] = (255, 255, 255),
                 limit: int | None = None, captions=None) -> SampleReader:
    """Pick the reader for ``source``.

    - a dataset folder (has images.npy + captions.json)       -> DatasetFolderReader
    - a folder holding .tar shards, a .tar file, a glob, a list -> TarShardReader
    - any other folder (images + captions file)                -> ImageFolderReader
    """
    if isinstance(source, (list, tuple)):
        return TarShardReader(source, size, background, limit)
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        if (path / IMAGES).is_file() and (path / CAPTIONS).is_file():
            return DatasetFolderReader(path, size, background, limit)
        if any(p.name.lower().endswith(TAR_SUFFIXES) for p in path.iterdir()):
            return TarShardReader(path, size, background, limit)
        return ImageFolderReader(path, size, background, limit, captions=captions)
    return TarShardReader(source, size, background, limit)

