"""Import a user's folder of images + captions into the dataset folder format.

Captions come from `captions.tsv` / `captions.txt` (`filename<TAB>caption` per line) or
`captions.json` (`{"filename": "caption"}`) inside the folder, or a file given explicitly.
Images are centre-cropped to a square, resized, and alpha is composited on a background.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import MlxflowError
from .dataset import mlxflow_version, write_dataset_folder

CAPTION_FILES = ("captions.tsv", "captions.txt", "captions.json")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def read_captions(path: Path) -> dict[str, str]:
    """filename -> caption from a TSV/TXT (`name<TAB>caption`) or JSON mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MlxflowError(f"cannot read captions file {path}: {e}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MlxflowError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise MlxflowError(f"{path} must map file names to caption strings")
        return {str(k): v.strip() for k, v in data.items()}
    captions = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, caption = line.partition("\t")
        if not sep or not caption.strip():
            raise MlxflowError(f"{path}:{lineno}: expected 'filename<TAB>caption'")
        captions[name.strip()] = caption.strip()
    return captions


def load_square(path: Path, size: int, background: Sequence[int]) -> np.ndarray:
    """One image -> (size, size, 3) uint8: centre square crop, LANCZOS resize, alpha over background."""
    try:
        with Image.open(path) as im:
            im.load()
            rgba = im.convert("RGBA")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MlxflowError(f"cannot read image {path}: {e}") from None
    w, h = rgba.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    rgba = rgba.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
    canvas = Image.new("RGBA", (size, size), tuple(background) + (255,))
    canvas.alpha_composite(rgba)
    return np.asarray(canvas.convert("RGB"), dtype=np.uint8)


def load_images(files: list[Path], size: int, background, on_progress=None):
    """Read and square every file: (uint8 (K, size, size, 3), indices kept, paths skipped).

    An unreadable or corrupt file is skipped and reported, never fatal: one bad JPEG in a
    folder of 200k faces should not stop an import.
    """
    images, kept, skipped = [], [], []
    for i, path in enumerate(files):
        try:
            images.append(load_square(path, size, background))
            kept.append(i)
        except MlxflowError:
            skipped.append(path)
        if on_progress:
            on_progress(i + 1, len(files))
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return stacked, kept, skipped


def import_image_folder(src_dir, out_dir, size: int = 64, captions=None, background=(255, 255, 255),
                        on_progress: Callable[[int, int], None] | None = None, overwrite: bool = False,
                        unconditional: bool = False) -> dict:
    """Images (with the captions file, or all of them when `unconditional`) -> dataset folder.

    Returns the dataset.json dict plus "skipped_files" (unreadable images, skipped).
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise MlxflowError(f"image folder not found: {src}")
    if unconditional:
        files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise MlxflowError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {src}")
        return _write(src, out_dir, files, {p.name: "" for p in files}, "images", size, background, on_progress,
                      overwrite)
    if captions is None:
        found = [src / n for n in CAPTION_FILES if (src / n).is_file()]
        if not found:
            raise MlxflowError(f"no captions file in {src}: add one of {', '.join(CAPTION_FILES)} "
                               "(filename<TAB>caption per line, or a JSON mapping) or pass --captions FILE")
        captions = found[0]
    mapping = read_captions(Path(captions))
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
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


def _write(src: Path, out_dir, files: list[Path], mapping: dict, kind: str, size: int, background, on_progress,
           overwrite: bool) -> dict:
    images, kept, skipped = load_images(files, size, background, on_progress)
    if not kept:
        raise MlxflowError(f"none of the {len(files)} images in {src} could be read (first: {skipped[0].name})")
    meta = {"kind": kind, "size": size, "count": len(kept), "skipped": len(skipped), "source": str(src.resolve()),
            "background": list(background), "mlxflow_version": mlxflow_version()}
    write_dataset_folder(out_dir, images, [{"text": mapping[files[i].name], "file": files[i].name} for i in kept],
                         meta, overwrite=overwrite)
    return {**meta, "skipped_files": [str(p) for p in skipped]}
