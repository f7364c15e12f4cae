"""Find a Hugging Face model folder: a path the user gave, the user's hub cache, or the hub.

Frozen encoders (T5, the SD VAE) load from the original Hugging Face / diffusers folders.
`locate_hf_folder` looks, in order, at:

1. the folder the user named (it must hold the files; nothing else is tried),
2. the hub cache (`$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`), every
   snapshot of every repo id given,
3. the hub itself through `huggingface_hub.snapshot_download` when that package is
   installed and the machine is online (`HF_HUB_OFFLINE=1` skips it).

When none has the files, the error says which files are needed and every place looked,
so a user offline knows exactly what to copy where.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlxflow.errors import MlxflowError


def hub_cache_dirs() -> list[Path]:
    """Hub cache roots, most specific first (the order huggingface_hub itself uses)."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    seen, out = set(), []
    for d in dirs:
        d = d.expanduser()
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def has_files(folder: Path, required: list[tuple[str, ...]]) -> bool:
    """Each entry of `required` is a tuple of alternatives; one of each must exist."""
    return all(any((folder / name).is_file() for name in alternatives) for alternatives in required)


def describe(required: list[tuple[str, ...]]) -> str:
    return ", ".join(" or ".join(alternatives) for alternatives in required)


def cached_snapshots(repo_id: str, subfolder: str = "") -> list[Path]:
    """Snapshot folders of `repo_id` in every hub cache root, newest first."""
    found = []
    for root in hub_cache_dirs():
        snaps = root / f"models--{repo_id.replace('/', '--')}" / "snapshots"
        if snaps.is_dir():
            found += sorted((s / subfolder if subfolder else s for s in snaps.iterdir() if s.is_dir()),
                            key=lambda p: p.stat().st_mtime, reverse=True)
    return found


def _download(repo_id: str, subfolder: str, patterns: list[str]) -> Path | None:
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns)
    except Exception:  # offline, unknown repo, gated: the caller's message says what to do
        return None
    return Path(folder) / subfolder if subfolder else Path(folder)


def locate_hf_folder(what: str, repo_ids: list[str], required: list[tuple[str, ...]], path=None,
                     subfolder: str = "") -> Path:
    """The first folder holding `required` files (see the module docstring for the order).

    what: a name for messages ("T5 encoder"); repo_ids: hub repos that hold it, preferred first;
    required: alternatives per needed file, e.g. [("config.json",), ("model.safetensors", "pytorch_model.bin")].
    """
    if path is not None:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise MlxflowError(f"{what} folder not found: {folder}")
        if not has_files(folder, required):
            raise MlxflowError(f"{folder} is not a {what} folder: it needs {describe(required)}")
        return folder
    looked = []
    for repo in repo_ids:
        for snap in cached_snapshots(repo, subfolder):
            if has_files(snap, required):
                return snap
            looked.append(str(snap))
    patterns = sorted({f"{subfolder + '/' if subfolder else ''}{name}" for alts in required for name in alts})
    for repo in repo_ids:
        folder = _download(repo, subfolder, patterns)
        if folder is not None and has_files(folder, required):
            return folder
    roots = [str(r / f"models--{repo_ids[0].replace('/', '--')}") for r in hub_cache_dirs()]
    raise MlxflowError(
        f"the {what} weights are not here: it needs a folder with {describe(required)} "
        f"(Hugging Face repo {repo_ids[0]}{'/' + subfolder if subfolder else ''}); looked in "
        f"{'; '.join(looked + roots)} and the hub was not reachable; download it and pass its path")
