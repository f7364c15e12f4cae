"""Render every fully-qualified emoji with a colour emoji font into a dataset folder.

Output (see ``dataset.py`` for the folder format): ``images.npy`` uint8 (N, size, size, 3),
``captions.json`` ``[{"text": "grinning face", "emoji": "😀"}, ...]`` and ``dataset.json``.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from mlxflow.data.dataset import mlxflow_version, write_dataset_folder
from mlxflow.errors import MlxflowError

# Where the common colour emoji fonts live. fc-match is asked as a last resort.
_FONT_CANDIDATES = (
    "/System/Library/Fonts/Apple Color Emoji.ttc",
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",
    "/usr/local/share/fonts/NotoColorEmoji.ttf",
)

# Colour bitmap fonts only accept their fixed strikes (Noto CBDT: 109, Apple sbix: 160, ...);
# Pillow raises OSError for any other size. Larger first: more detail before downsampling.
_PREFERRED_SIZES = (160, 137, 136, 128, 109, 96, 72, 64, 52, 48, 40, 32, 26, 20)

# A codepoint no font assigns (plane 16 private use): renders the font's .notdef/tofu.
_UNASSIGNED = "\U0010FFFD"
# Regional indicators "ZZ": a well-formed flag sequence that names no region.
_UNKNOWN_FLAG = "\U0001F1FF\U0001F1FF"
# Zero-width joiner and emoji presentation selector: glue, not parts of a sequence.
_JOINERS = {"\u200d", "\ufe0f"}


def _fc_match() -> str | None:
    """Ask fontconfig for Noto Color Emoji; None when fontconfig is absent or says nothing."""
    try:
        out = subprocess.run(
            ["fc-match", "-f", "%{file}", "Noto Color Emoji"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    # fc-match always answers with *some* font; only trust it if it is a colour emoji font.
    return out if out and "emoji" in out.lower() and Path(out).is_file() else None


def find_emoji_font(font: str | os.PathLike | None = None) -> Path:
    """Path of a colour emoji font: ``font`` if given (must exist), else the system one."""
    if font is not None:
        path = Path(font).expanduser()
        if not path.is_file():
            raise MlxflowError(f"emoji font not found: {path}")
        return path
    for candidate in _FONT_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    found = _fc_match()
    if found:
        return Path(found)
    raise MlxflowError(
        "no colour emoji font found: on macOS it ships with the OS; on Debian/Ubuntu run "
        "`sudo apt-get install fonts-noto-color-emoji`; or pass --font FILE"
    )


def _layout_engine() -> int:
    # RAQM (HarfBuzz) shapes ZWJ / flag / keycap sequences into one ligature glyph;
    # the basic engine draws them codepoint by codepoint (those then get skipped below).
    return ImageFont.Layout.RAQM if features.check("raqm") else ImageFont.Layout.BASIC


def open_emoji_font(path: Path) -> ImageFont.FreeTypeFont:
    """Open ``path`` at the largest valid pixel size among the usual emoji strikes."""
    engine = _layout_engine()
    errors = []
    for size in _PREFERRED_SIZES:
        try:
            return ImageFont.truetype(str(path), size, layout_engine=engine)
        except OSError as e:  # "invalid pixel size" for bitmap fonts, or not a font at all
            errors.append(str(e))
    raise MlxflowError(f"cannot use {path} as an emoji font ({errors[-1]})")


def emoji_label(cldr_name: str) -> str:
    """``':grinning_face:'`` -> ``'grinning face'``."""
    return cldr_name.strip(":").replace("_", " ").strip()


def list_emoji() -> list[tuple[str, str]]:
    """Every fully-qualified emoji as ``(emoji, label)``, in the ``emoji`` package's order."""
    import emoji as emoji_pkg

    fully = emoji_pkg.STATUS["fully_qualified"]
    return [
        (e, emoji_label(data["en"]))
        for e, data in emoji_pkg.EMOJI_DATA.items()
        if data.get("status") == fully
    ]


class _Renderer:
    """Draws one emoji to a cropped RGBA image, or None when the font cannot draw it whole."""

    def __init__(self, font: ImageFont.FreeTypeFont):
        self.font = font
        self.px = int(font.size)
        # Renders that mean "this font does not know the emoji": the .notdef/tofu glyph and
        # the placeholder fonts draw for an unknown flag (Noto: a white flag with "?").
        self.placeholders = [
            a for a in (self._array(_UNASSIGNED), self._array(_UNKNOWN_FLAG)) if a is not None
        ]
        self._singles: dict[str, np.ndarray | None] = {}
        ref = self._draw("\U0001F600")  # grinning face: the size of one ordinary glyph
        if ref is None:
            raise MlxflowError(f"{font.path} draws no colour emoji (is it an emoji font?)")
        # A sequence the font cannot ligate falls apart into several glyphs side by side.
        self.max_width = 1.5 * max(ref.size)

    def _draw(self, text: str) -> Image.Image | None:
        # Generous canvas: sequences that fall apart must still show their full width.
        canvas = Image.new("RGBA", (self.px * 6, self.px * 2), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text(
            (self.px // 2, self.px // 2), text, font=self.font, embedded_color=True
        )
        bbox = canvas.getchannel("A").getbbox()
        return None if bbox is None else canvas.crop(bbox)

    def _array(self, text: str) -> np.ndarray | None:
        img = self._draw(text)
        return None if img is None else np.asarray(img)

    def _single(self, ch: str) -> np.ndarray | None:
        if ch not in self._singles:
            self._singles[ch] = self._array(ch)
        return self._singles[ch]

    def render(self, text: str) -> Image.Image | None:
        img = self._draw(text)
        if img is None or img.width > self.max_width:
            return None
        arr = np.asarray(img)
        if any(_same(arr, p) for p in self.placeholders):
            return None
        # A sequence the font does not know can collapse onto one of its parts: a missing
        # base leaves only the skin-tone swatch, an unknown subdivision flag only the black
        # flag. Equal to its own base is fine otherwise (Noto's snowboarder hides the skin).
        parts = [ch for ch in text if ch not in _JOINERS]
        suspects = set(parts[1:])
        if any(0xE0020 <= ord(ch) <= 0xE007F for ch in parts):  # tag characters
            suspects.add(parts[0])
        if any(_same(arr, self._single(ch)) for ch in suspects):
            return None
        return img


def _same(a: np.ndarray, b: np.ndarray | None) -> bool:
    return b is not None and a.shape == b.shape and np.array_equal(a, b)


def fit_square(img: Image.Image, size: int, background: Sequence[int]) -> np.ndarray:
    """Cropped RGBA glyph -> uint8 (size, size, 3), centred, aspect kept, on ``background``."""
    side = max(img.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    # Pillow resizes RGBA premultiplied, so edges do not pick up the transparent black.
    small = square.resize((size, size), Image.Resampling.LANCZOS)
    bg = Image.new("RGBA", (size, size), tuple(int(c) for c in background) + (255,))
    return np.asarray(Image.alpha_composite(bg, small).convert("RGB"), dtype=np.uint8)


def build_emoji_dataset(
    out_dir: str | os.PathLike,
    size: int = 64,
    font: str | os.PathLike | None = None,
    background: Sequence[int] = (255, 255, 255),
    limit: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
    skin_tones: bool = True,
) -> dict:
    """Render the emoji set into ``out_dir``; returns the ``dataset.json`` dict.

    Images: uint8 (N, size, size, 3). Glyphs the font cannot draw as one image are
    skipped and counted in ``meta["skipped"]``. ``limit`` keeps only the first K emoji;
    ``skin_tones=False`` leaves out the skin-tone variants.
    """
    if size < 1:
        raise MlxflowError(f"image size must be positive, got {size}")
    background = _check_background(background)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise MlxflowError(f"{out_dir} exists and is not empty (pass --overwrite to replace it)")
    font_path = find_emoji_font(font)
    renderer = _Renderer(open_emoji_font(font_path))

    todo = list_emoji()
    if not skin_tones:
        # The five Fitzpatrick modifiers turn one person emoji into six near-identical images.
        todo = [(e, label) for e, label in todo if not any(0x1F3FB <= ord(ch) <= 0x1F3FF for ch in e)]
    if limit is not None:
        todo = todo[: max(0, int(limit))]
    images, captions, skipped = [], [], []
    start = time.perf_counter()
    for i, (char, label) in enumerate(todo):
        glyph = renderer.render(char)
        if glyph is None:
            skipped.append(char)
        else:
            images.append(fit_square(glyph, size, background))
            captions.append({"text": label, "emoji": char})
        if on_progress is not None:
            on_progress(i + 1, len(todo))
    if not images:
        raise MlxflowError(f"{font_path} rendered none of {len(todo)} emoji")

    meta = {
        "kind": "emoji",
        "size": int(size),
        "count": len(images),
        "skipped": len(skipped),
        "skipped_emoji": "".join(skipped),
        "font": str(font_path),
        "font_size": renderer.px,
        "layout": "raqm" if _layout_engine() == ImageFont.Layout.RAQM else "basic",
        "background": list(background),
        "skin_tones": bool(skin_tones),
        "render_seconds": round(time.perf_counter() - start, 2),
        "mlxflow_version": mlxflow_version(),
    }
    write_dataset_folder(out_dir, np.stack(images), captions, meta, overwrite=overwrite)
    return meta


def _check_background(background: Sequence[int]) -> tuple[int, int, int]:
    bg = tuple(int(c) for c in background)
    if len(bg) != 3 or not all(0 <= c <= 255 for c in bg):
        raise MlxflowError(f"background must be three 0-255 values (R, G, B), got {background}")
    return bg
