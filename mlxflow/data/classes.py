"""Class-labelled image sets: a folder with one subfolder per class, and the labels of a dataset.

    photos/                      mlxflow data classes OUT --images photos/
      cat/  a.jpg b.png ...      -> dataset folder whose captions are the class names,
      dog/  c.jpg ...               each with "label" (its class index), and
                                    dataset.json "classes": ["cat", "dog", ...] (sorted)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import MlxflowError
from .folder import IMAGE_SUFFIXES, load_images


def import_class_folder(src_dir, out_dir, size: int = 64, background=(255, 255, 255),
                        on_progress: Callable[[int, int], None] | None = None, overwrite: bool = False) -> dict:
    """Subfolders = classes -> dataset folder; unreadable images are skipped and counted.

    Images are read with ``inputs.load_square``. Returns the dataset.json dict plus
    "skipped_files" (paths) and "skipped_details" ([{"name": "cat/a.png", "reason"}]).
    """
    from .dataset import mlxflow_version, write_dataset_folder

    src = Path(src_dir)
    if not src.is_dir():
        raise MlxflowError(f"image folder not found: {src}")
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, labels = [], []
    for k, name in enumerate(classes):
        found = sorted(p for p in (src / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [k] * len(found)
    nonempty = sorted(set(labels))
    if len(nonempty) < 2:
        raise MlxflowError(f"{src} needs at least 2 class subfolders with images, found {len(nonempty)} "
                           f"({', '.join(classes) or 'none'}); for one class use `mlxflow data folder --unconditional`")
    names = [p.relative_to(src).as_posix() for p in files]
    images, kept, skipped, records = load_images(files, size, background, on_progress, names=names)
    if not kept:
        raise MlxflowError(f"none of the {len(files)} images in {src} could be read "
                           f"(first: {records[0]['name']}: {records[0]['reason']})")
    meta = {"kind": "classes", "size": size, "count": len(kept), "skipped": len(skipped), "classes": classes,
            "source": str(src.resolve()), "background": list(background), "mlxflow_version": mlxflow_version()}
    captions = [{"text": classes[labels[i]], "label": labels[i], "file": str(files[i].relative_to(src))} for i in kept]
    write_dataset_folder(out_dir, images, captions, meta, overwrite=overwrite)
    return {**meta, "skipped_files": [str(p) for p in skipped], "skipped_details": records}


def class_labels(dataset) -> np.ndarray:
    """int32 (N,) class index of every sample of a class-labelled dataset folder."""
    classes = dataset.meta.get("classes")
    if not classes:
        raise MlxflowError(f"{dataset.path} has no classes (build it with `mlxflow data classes`), "
                           "but the model is class-conditional")
    try:
        raw = json.loads((Path(dataset.path) / "captions.json").read_text(encoding="utf-8"))
        labels = np.array([int(c["label"]) for c in raw], np.int32)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MlxflowError(f"{dataset.path}/captions.json has no class labels ({e})") from None
    if len(labels) != len(dataset) or (len(labels) and (labels.min() < 0 or labels.max() >= len(classes))):
        raise MlxflowError(f"{dataset.path}: class labels do not match its {len(classes)} classes")
    return labels
