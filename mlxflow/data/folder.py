"""Import a user's folder of images + captions into the dataset folder format.

Captions come from a captions file inside the folder (`captions.tsv` / `captions.txt`:
`filename<TAB>caption` per line, `captions.csv`, `captions.json`: `{"filename": "caption"}`,
`captions.jsonl`; see `read_captions`), a file given explicitly, or per-image sidecars
(`a.png` + `a.txt`). Caption bytes follow `inputs.decode_caption`; images are read by
`inputs.load_square` (EXIF orientation, every Pillow mode, transparency on a background).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
from ..errors import MlxflowError
from .dataset import mlxflow_version, write_dataset_folder
from .inputs import CAPTION_HELP, CaptionDecodeError, SkipSample, decode_caption, load_square, skip_record

CAPTION_FILES = ("captions.tsv", "captions.txt", "captions.csv", "captions.json", "captions.jsonl")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Fields naming the image and holding the caption in .jsonl lines and .csv headers.
NAME_FIELDS = ("file", "file_name", "filename", "image", "name", "path")
CAPTION_FIELDS = ("caption", "text", "prompt")


def read_captions(path: Path) -> dict[str, str]:
    """filename -> caption from a captions file; MlxflowError (one line) when it cannot be used.

    Formats, by suffix: .json (a mapping ``{"filename": "caption"}``), .jsonl (one object
    per line with a name field file/file_name/filename/image/name/path and a caption field
    caption/text/prompt), .csv (``filename,caption`` rows, quoted as CSV; an optional
    header row names the columns with those fields), anything else (.tsv, .txt)
    ``filename<TAB>caption`` lines. Blank lines, and in .tsv/.txt lines starting with "#",
    are ignored. The text follows ``inputs.decode_caption`` (UTF-8, BOMs, UTF-16 with a
    BOM, CRLF); a file that breaks it is refused naming the line of the first bad byte.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MlxflowError(f"cannot read captions file {path}: {e.strerror or e}") from None
    try:
        text = decode_caption(data)
    except CaptionDecodeError as e:
        raise MlxflowError(f"{path}:{e.line}: {e.what}; {CAPTION_HELP}") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MlxflowError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise MlxflowError(f"{path} must map file names to caption strings")
        return {str(k).strip(): v.strip() for k, v in data.items()}
    if suffix == ".jsonl":
        return _jsonl_captions(path, text)
    if suffix == ".csv":
        return _csv_captions(path, text)
    captions = {}
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, caption = line.partition("\t")
        if not sep or not caption.strip():
            raise MlxflowError(f"{path}:{lineno}: expected 'filename<TAB>caption'")
        captions[name.strip()] = caption.strip()
    return captions


def _field(obj: dict, names) -> str | None:
    lowered = {str(k).lower(): v for k, v in obj.items()}
    return next((lowered[n] for n in names if isinstance(lowered.get(n), str)), None)


def _jsonl_captions(path: Path, text: str) -> dict[str, str]:
    captions = {}
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MlxflowError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        name = _field(obj, NAME_FIELDS) if isinstance(obj, dict) else None
        caption = _field(obj, CAPTION_FIELDS) if isinstance(obj, dict) else None
        if name is None or caption is None or not caption.strip():
            raise MlxflowError(f"{path}:{lineno}: expected an object with a file name ({'/'.join(NAME_FIELDS)}) "
                               f"and a caption ({'/'.join(CAPTION_FIELDS)})")
        captions[name.strip()] = caption.strip()
    return captions


def _csv_captions(path: Path, text: str) -> dict[str, str]:
    rows = csv.reader(io.StringIO(text, newline=""))
    captions, columns = {}, None
    try:
        for row in rows:
            lineno = rows.line_num
            if not any(cell.strip() for cell in row):
                continue
            if columns is None and not captions:
                header = [cell.strip().lower() for cell in row]
                name_col = next((header.index(n) for n in NAME_FIELDS if n in header), None)
                caption_col = next((header.index(n) for n in CAPTION_FIELDS if n in header), None)
                if name_col is not None and caption_col is not None:
                    columns = (name_col, caption_col)
                    continue
                columns = (0, None)  # no header: filename, then the caption (unquoted commas kept)
            name_col, caption_col = columns
            if caption_col is None:
                name, caption = row[0], ",".join(row[1:])
            else:
                name = row[name_col] if name_col < len(row) else ""
                caption = row[caption_col] if caption_col < len(row) else ""
            if not name.strip() or not caption.strip():
                raise MlxflowError(f"{path}:{lineno}: expected 'filename,caption'")
            captions[name.strip()] = caption.strip()
    except csv.Error as e:
        raise MlxflowError(f"{path}:{rows.line_num}: not valid CSV ({e})") from None
    return captions


def sidecar_caption(image: Path) -> str | None:
    """The caption in ``image``'s sidecar (same name, .txt), stripped; None when there is none.

    Raises ``SkipSample`` ("caption not UTF-8", "cannot read caption") when it cannot be
    decoded under ``inputs.decode_caption``'s rule: that image is skipped, not the import.
    """
    side = image.with_suffix(".txt")
    try:
        data = side.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SkipSample(image.name, "cannot read caption", f"{side.name}: {e.strerror or e}") from None
    try:
        return decode_caption(data).strip() or None
    except CaptionDecodeError as e:
        raise SkipSample(image.name, "caption not UTF-8", f"{side.name}: {e}") from None


def has_sidecars(files: list[Path]) -> bool:
    """Whether any of ``files`` has a sidecar caption (``a.png`` + ``a.txt``)."""
    return any(p.with_suffix(".txt").is_file() for p in files)


def load_images(files: list[Path], size: int, background, on_progress=None, names=None, captions=None):
    """Read and square every file with ``inputs.load_square``:
    (uint8 (K, size, size, 3), indices kept, paths skipped, skip records).

    An unusable file (corrupt, truncated, empty, not an image, too large) is skipped and
    recorded as ``{"name", "reason"}``, never fatal: one bad JPEG in a folder of 200k
    faces should not stop an import. ``names[i]`` is file i's name in the records (its
    file name by default). ``captions`` (optional) is called with each path before it is
    decoded and may raise ``SkipSample`` (a sidecar caption that cannot be decoded).
    """
    images, kept, skipped, records = [], [], [], []
    for i, path in enumerate(files):
        name = names[i] if names is not None else path.name
        try:
            if captions is not None:
                captions(path)
            images.append(load_square(path, size, background, name=name))
            kept.append(i)
        except SkipSample as e:
            skipped.append(path)
            records.append(skip_record(name, e.reason))
        if on_progress:
            on_progress(i + 1, len(files))
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return stacked, kept, skipped, records


def import_image_folder(src_dir, out_dir, size: int = 64, captions=None, background=(255, 255, 255),
                        on_progress: Callable[[int, int], None] | None = None, overwrite: bool = False,
                        unconditional: bool = False) -> dict:
    """Images (with their captions, or all of them when `unconditional`) -> dataset folder.

    Captions: the file ``captions`` if given, else the folder's captions file (the first
    of CAPTION_FILES), else per-image sidecars (``a.png`` + ``a.txt``). Every image needs a
    caption; an image whose sidecar cannot be decoded is skipped like an unreadable one.
    Images are read with ``inputs.load_square``. Returns the dataset.json dict plus
    "skipped_files" (paths) and "skipped_details" ([{"name", "reason"}], in file order,
    for ``inputs.describe_skipped``).
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise MlxflowError(f"image folder not found: {src}")
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if unconditional:
        if not files:
            raise MlxflowError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {src}")
        return _write(src, out_dir, files, {p.name: "" for p in files}, "images", size, background, on_progress,
                      overwrite)
    if captions is None:
        found = [src / n for n in CAPTION_FILES if (src / n).is_file()]
        if not found and has_sidecars(files):
            return _write(src, out_dir, files, None, "folder", size, background, on_progress, overwrite)
        if not found:
            raise MlxflowError(f"no captions file in {src}: add one of {', '.join(CAPTION_FILES)} "
                               "(filename<TAB>caption per line, or a JSON mapping), a caption .txt beside each "
                               "image, or pass --captions FILE")
        captions = found[0]
    mapping = read_captions(Path(captions))
    if not files:
        raise MlxflowError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {src}")
    uncaptioned = [p.name for p in files if p.name not in mapping]
    if uncaptioned:
        raise MlxflowError(f"image {uncaptioned[0]} has no caption in {captions}"
                           + (f" (and {len(uncaptioned) - 1} more)" if len(uncaptioned) > 1 else ""))
    missing = sorted(set(mapping) - {p.name for p in files})
    if missing:
        raise MlxflowError(f"{captions} names {missing[0]}, which is not an image in {src}")
    return _write(src, out_dir, files, mapping, "folder", size, background, on_progress, overwrite)


def _write(src: Path, out_dir, files: list[Path], mapping: dict | None, kind: str, size: int, background,
           on_progress, overwrite: bool) -> dict:
    """Decode and write; ``mapping`` None reads each image's sidecar caption as it goes."""
    read_caption = None
    if mapping is None:  # sidecars: all read first, so a missing one fails before any decoding
        mapping, bad, uncaptioned = {}, {}, []
        for path in files:
            try:
                caption = sidecar_caption(path)
            except SkipSample as e:
                bad[path.name] = e
                continue
            if caption is None:
                uncaptioned.append(path.name)
            else:
                mapping[path.name] = caption
        if uncaptioned:
            raise MlxflowError(f"image {uncaptioned[0]} has no caption (no {Path(uncaptioned[0]).stem}.txt beside it, "
                               "or it is empty)" + (f" (and {len(uncaptioned) - 1} more)" if len(uncaptioned) > 1 else ""))

        def undecodable(path):
            if path.name in bad:
                raise bad[path.name]

        read_caption = undecodable

    images, kept, skipped, records = load_images(files, size, background, on_progress, captions=read_caption)
    if not kept:
        raise MlxflowError(f"none of the {len(files)} images in {src} could be read "
                           f"(first: {records[0]['name']}: {records[0]['reason']})")
    meta = {"kind": kind, "size": size, "count": len(kept), "skipped": len(skipped), "source": str(src.resolve()),
            "background": list(background), "mlxflow_version": mlxflow_version()}
    write_dataset_folder(out_dir, images, [{"text": mapping[files[i].name], "file": files[i].name} for i in kept],
                         meta, overwrite=overwrite)
    return {**meta, "skipped_files": [str(p) for p in skipped], "skipped_details": records}
