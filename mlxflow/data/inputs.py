"""Reading users' inputs: the ONE image loader and the ONE caption-text rule of every data path.

The image-folder import (``folder.py``), the class-folder import (``classes.py``) and the
latent-cache readers (``shards.py``: tar shards, captioned folders) all decode images with
``load_square`` and caption bytes with ``decode_caption``; their rules are documented in
those two docstrings and nowhere else. An input that cannot be used raises ``SkipSample``
(an ``MlxflowError`` carrying a short ``reason``), which the callers count and record by
name; ``describe_skipped`` turns those records into the one line the CLI prints.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import MlxflowError


class SkipSample(MlxflowError):
    """One input (an image, or its caption) cannot be used: skip it, count it, name it.

    ``reason`` is short and stable enough to print after the file name: "corrupt",
    "truncated", "empty file", "not an image", "too large: 182,250,000 pixels",
    "caption not UTF-8", ...
    """

    def __init__(self, name: str, reason: str, detail: str = ""):
        super().__init__(f"{name}: {reason}" + (f" ({detail})" if detail else ""))
        self.name, self.reason, self.detail = name, reason, detail


# --------------------------------------------------------------------------- images


def max_pixels() -> int | None:
    """Largest image (width x height) the loader decodes: Pillow's decompression-bomb error limit
    (2 x ``PIL.Image.MAX_IMAGE_PIXELS``, 178,956,970 by default); None when that is switched off."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


def _name(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return getattr(source, "name", None) or "image"


def _too_large(pixels: int) -> str:
    return f"too large: {pixels:,} pixels"


def open_image(source, name: str | None = None) -> tuple[Image.Image, str | None]:
    """A path, a binary file object or bytes -> (decoded first frame, upright, sample type).

    The sample type is the decoder's raw mode ("I;16B", "I;32S", "F;32BF"...: what the file
    stores; None when unknown), which ``to_rgba`` needs for mode "I". Raises ``SkipSample``
    for anything that is not a usable image (see ``load_square``). The image holds no open file.
    """
    name = name or _name(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as f:
                return _decode(f, name)
        except OSError as e:  # the file itself: missing, a folder, no permission
            raise SkipSample(name, "cannot open", e.strerror or str(e)) from None
    return _decode(source, name)


def _decode(fp, name: str) -> tuple[Image.Image, str | None]:
    start = fp.tell()
    if not fp.read(1):
        raise SkipSample(name, "empty file")
    fp.seek(start)
    with warnings.catch_warnings():
        # Pillow warns between MAX_IMAGE_PIXELS and max_pixels() (such images are read), and
        # about damaged metadata ("Corrupt EXIF data"): nothing a user acts on, per file.
        warnings.simplefilter("ignore")
        try:
            im = Image.open(fp)
        except Image.DecompressionBombError as e:
            m = re.search(r"\((\d+) pixels\)", str(e))
            raise SkipSample(name, _too_large(int(m.group(1))) if m else "too large") from None
        except UnidentifiedImageError:
            raise SkipSample(name, "not an image") from None
        except Exception as e:  # plugins raise SyntaxError, ValueError, struct.error... on bad headers
            raise SkipSample(name, _damage(e), f"{type(e).__name__}: {e}") from None
        w, h = im.size
        limit = max_pixels()
        if limit is not None and w * h > limit:
            raise SkipSample(name, _too_large(w * h))
        rawmode = _rawmode(im)  # the stored sample type; the tile list is gone after load()
        try:
            im.load()
        except Image.DecompressionBombError:
            raise SkipSample(name, _too_large(w * h)) from None
        except MemoryError:
            raise SkipSample(name, _too_large(w * h), "out of memory") from None
        except Exception as e:  # OSError "image file is truncated", "broken data stream"...
            raise SkipSample(name, _damage(e), f"{type(e).__name__}: {e}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data" and friends
            upright = ImageOps.exif_transpose(im)
    except Exception:  # an unreadable EXIF block: the pixels are still good, as stored
        upright = im
    return upright, rawmode


def _damage(e: Exception) -> str:
    """ "truncated" when the decoder ran out of data, else "corrupt"."""
    return "truncated" if isinstance(e, EOFError) or "truncated" in str(e).lower() else "corrupt"


def _rawmode(im: Image.Image) -> str | None:
    """The decoder's raw mode ("I;16B", "I;32S", "F;32BF"...): the sample type stored in the file."""
    try:
        args = im.tile[0][3] if im.tile else None
    except (IndexError, TypeError):
        return None
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return None


def _int_full_scale(rawmode: str | None, values: np.ndarray) -> tuple[float, bool]:
    """(white level, unsigned 32-bit?) of a mode "I" image from its stored sample type."""
    m = re.fullmatch(r"I;(\d+)[BLN]?(S?)(?:;.*)?", rawmode or "")
    if m:
        bits, signed = int(m.group(1)), bool(m.group(2))
        if bits in (8, 16, 32):
            return float(2 ** (bits - 1) - 1 if signed else 2 ** bits - 1), bits == 32 and not signed
    if rawmode == "I":  # native signed 32-bit
        return float(2 ** 31 - 1), False
    # Unknown (an image made in memory): 16-bit when every value fits, else signed 32-bit.
    return (65535.0 if values.size == 0 or (values.min() >= 0 and values.max() <= 65535) else float(2 ** 31 - 1)), False


def _to_uint8(values: np.ndarray, white: float) -> np.ndarray:
    x = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=white, neginf=0.0)
    return np.clip(np.rint(x * (255.0 / white)), 0, 255).astype(np.uint8)


# CIE L*a*b* (D50, the ICC connection space) -> sRGB (D65): Bradford adaptation, then the sRGB matrix.
_BRADFORD_D50_TO_D65 = np.array([[0.9555766, -0.0230393, 0.0631636], [-0.0282895, 1.0099416, 0.0210077],
                                 [0.0122982, -0.0204830, 1.3299098]])
_XYZ_TO_LINEAR_SRGB = np.array([[3.2404542, -1.5371385, -0.4985314], [-0.9692660, 1.8760108, 0.0415560],
                                [0.0556434, -0.2040259, 1.0572252]])
_D50_WHITE = np.array([0.9642, 1.0, 0.8249])


def _lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """Pillow's LAB bytes (L* 0..255 for 0..100; a*, b* offset by 128) -> sRGB uint8, in float64."""
    lab = lab.astype(np.float64)
    fy = (lab[..., 0] * (100.0 / 255.0) + 16.0) / 116.0
    f = np.stack([fy + (lab[..., 1] - 128.0) / 500.0, fy, fy - (lab[..., 2] - 128.0) / 200.0], -1)
    d = 6.0 / 29.0
    xyz = np.where(f > d, f**3, 3 * d * d * (f - 4.0 / 29.0)) * _D50_WHITE
    linear = np.clip(xyz @ (_XYZ_TO_LINEAR_SRGB @ _BRADFORD_D50_TO_D65).T, 0.0, 1.0)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.rint(srgb * 255.0).astype(np.uint8)


def to_rgba(im: Image.Image, rawmode: str | None = None) -> Image.Image:
    """Any Pillow mode -> "RGBA" (or "RGB" when it cannot carry transparency), as a viewer shows it.

    See ``load_square`` for the rules; this is its mode step, on an already decoded image.
    """
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(im)
        if mode == "F":
            finite = values[np.isfinite(values)]
            white = 1.0 if finite.size == 0 or finite.max() <= 1.0 else 255.0
            grey = _to_uint8(values, white)
        elif mode == "I":
            white, unsigned32 = _int_full_scale(rawmode, values)
            grey = _to_uint8(values.view(np.uint32) if unsigned32 else values, white)
        else:
            grey = _to_uint8(values, 65535.0)
        out = Image.fromarray(grey, "L")
        trns = im.info.get("transparency")
        if isinstance(trns, (int, float)) and mode != "F":  # a tRNS grey level (16-bit PNG)
            alpha = np.where(values == trns, 0, 255).astype(np.uint8)
            out = Image.merge("LA", (out, Image.fromarray(alpha, "L")))
            return out.convert("RGBA")
        return out.convert("RGB")
    if mode == "La":  # premultiplied grey + alpha
        la = np.asarray(im).astype(np.float64)
        a = la[..., 1:2]
        grey = np.where(a > 0, np.clip(np.rint(la[..., :1] * 255.0 / np.maximum(a, 1)), 0, 255), 0)
        return Image.fromarray(np.concatenate([grey, grey, grey, a], -1).astype(np.uint8), "RGBA")
    if mode == "LAB":
        return Image.fromarray(_lab_to_srgb(np.asarray(im)), "RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in im.info:
        if mode == "RGB" and isinstance(im.info.get("transparency"), tuple) and \
                max(im.info["transparency"]) > 255:
            # 16-bit RGB PNG with a tRNS colour: Pillow keeps 8 bits of the pixels and 16 of the
            # key, so the pixels matching the key's high bytes are transparent (approximate).
            key = tuple(int(c) >> 8 for c in im.info["transparency"])
            rgb = np.asarray(im)
            alpha = np.where((rgb == key).all(-1), 0, 255).astype(np.uint8)
            return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
        return im.convert("RGBA")
    if mode == "RGB":
        return im
    return im.convert("RGB")  # 1, L, P, CMYK, YCbCr, HSV, RGBX...


def square_rgb(im: Image.Image, size: int, background: Sequence[int] = (255, 255, 255),
               rawmode: str | None = None) -> np.ndarray:
    """A decoded, upright image -> uint8 (size, size, 3) under ``load_square``'s rules
    (``rawmode``: the stored sample type, from ``open_image``)."""
    if im.mode == "F":  # the float rule looks at the whole image, not the crop
        rgba = to_rgba(im, rawmode)
        w, h = rgba.size
    else:
        rgba = None
        w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    box = (left, top, left + side, top + side)
    if rgba is None:
        cropped = im.crop(box)
        cropped.info = dict(im.info)  # the tRNS key
        rgba = to_rgba(cropped, rawmode)
    else:
        rgba = rgba.crop(box)
    rgba = rgba.convert("RGBA").resize((size, size), Image.LANCZOS)
    canvas = Image.new("RGBA", (size, size), tuple(int(c) for c in background) + (255,))
    canvas.alpha_composite(rgba)
    return np.asarray(canvas.convert("RGB"), dtype=np.uint8)


def load_square(source, size: int, background: Sequence[int] = (255, 255, 255), name: str | None = None) -> np.ndarray:
    """One image file (path, binary file object or bytes) -> uint8 (size, size, 3).

    The one image loader of every data path (``data folder``, ``data classes``, ``data
    latents`` from tar shards or folders). Its rules:

    - Decoding: Pillow, first frame of animations and multi-page files, any format Pillow
      reads (the format is sniffed from the bytes, never taken from the extension).
    - Orientation: the EXIF Orientation tag is applied (all eight values: mirrors and
      rotations), so the image is stored upright, as viewers show it. A broken EXIF block
      leaves the pixels as stored.
    - Geometry: centre square crop (the aspect is never squashed), then LANCZOS resize to
      ``size`` (alpha premultiplied while resizing).
    - Colours, by Pillow mode (each scaled to 0..255 by its white level, rounded):
      RGB as is; 1 (black/white), L, P (palette), YCbCr, HSV, CMYK (Pillow's
      naive conversion, R = (255 - C)(255 - K) / 255, no ICC profile) converted to RGB;
      LAB (CIE L*a*b*, D50) to sRGB by the CIE formulas (Bradford D50 -> D65);
      16-bit greyscale I;16 / I;16B / I;16L: 65535 is white (v / 257);
      I (32-bit integer): white is the maximum of the sample type stored in the file
      (16-bit 65535, signed 32-bit 2^31-1, unsigned 32-bit 2^32-1; 2^bits-1, or
      2^(bits-1)-1 when signed); an in-memory image without a file type is 16-bit when all
      its values fit, else signed 32-bit; negative values are black;
      F (32/64-bit float): values in [0, 1] when the image's largest finite value is <= 1,
      else in [0, 255]; out-of-range values are clipped, NaN is black;
      16-bit RGB / RGBA / grey+alpha PNGs: Pillow keeps the high byte of each sample
      (within one level of v / 257; two after compositing a 16-bit alpha).
      Embedded ICC profiles are not applied (a Display P3 photo keeps its numbers).
    - Transparency (RGBA, LA, PA, La, RGBa, P or L/RGB/I;16 with a tRNS colour) is
      composited onto ``background`` (an RGB triple, white by default).
    - Limits: at most ``max_pixels()`` pixels (Pillow's decompression-bomb limit, about
      179 million); larger images are refused without being decoded.

    Raises ``SkipSample`` (an MlxflowError) with ``reason`` "empty file", "not an image"
    (unrecognised bytes, e.g. a text file named .jpg), "truncated", "corrupt",
    "too large: N pixels" or "cannot open"; callers skip and count such files, never abort.
    """
    im, rawmode = open_image(source, name)
    return square_rgb(im, size, background, rawmode)


# --------------------------------------------------------------------------- captions


class CaptionDecodeError(ValueError):
    """Caption bytes that break the caption rule: ``str()`` is "line N: what", ``line`` is
    1-based, ``what`` the problem without its line."""

    def __init__(self, what: str, line: int):
        super().__init__(f"line {line}: {what}")
        self.what, self.line = what, line


_BOMS = (  # longest first: a UTF-32-LE BOM starts with the UTF-16-LE one
    (b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"),
)


def _line_of(data: bytes, codec: str, offset: int) -> tuple[int, int]:
    """(line, column) of byte ``offset`` in ``data`` decoded as ``codec``, both 1-based."""
    prefix = data[:offset].decode(codec, errors="replace")
    lines = re.split(r"\r\n|\r|\n", prefix)
    return len(lines), len(lines[-1]) + 1


def decode_caption(data: bytes) -> str:
    """Caption bytes -> text, the one rule for every caption source.

    Sources: a captions file (.tsv/.txt/.csv/.json/.jsonl), a per-image sidecar ``.txt``,
    a tar shard's ``.json``/``.txt`` member. The rule:

    - Captions are UTF-8. A UTF-8 byte-order mark is dropped. UTF-16 and UTF-32 WITH a
      byte-order mark (what spreadsheet programs save as "Unicode text") are read too.
    - Nothing else is guessed: bytes that are not valid in that encoding (latin-1,
      Windows-1252, Shift-JIS..., or UTF-16 without a BOM, which shows as NUL characters)
      raise ``CaptionDecodeError`` naming the line and column of the first bad byte.
    - Line endings: CRLF and CR become LF (only these three end a line).

    A whole captions file that breaks the rule is refused (one line naming the file and
    line); a per-image caption that breaks it skips that image ("caption not UTF-8").
    """
    data = bytes(data)
    codec, bom = "utf-8", 0
    for mark, name in _BOMS:
        if data.startswith(mark):
            codec, bom = name, len(mark)
            break
    body = data[bom:]
    try:
        text = body.decode(codec)
    except UnicodeDecodeError as e:
        line, col = _line_of(body, codec, e.start)
        bad = body[e.start : e.start + 1].hex().upper()
        what = "UTF-8" if codec == "utf-8" else f"{codec.upper()} (as its byte-order mark says)"
        raise CaptionDecodeError(f"not {what} text (byte 0x{bad} at column {col})", line) from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise CaptionDecodeError("NUL characters (UTF-16 or UTF-32 text without a byte-order mark?)", line)
    return text.replace("\r\n", "\n").replace("\r", "\n")


CAPTION_HELP = "save it as UTF-8 (UTF-16 with a byte-order mark is read too)"


# --------------------------------------------------------------------------- skipped inputs


def skip_record(name: str, reason: str) -> dict:
    """The JSON-able record of one skipped input: {"name": ..., "reason": ...}."""
    return {"name": str(name), "reason": str(reason)}


def describe_skipped(info, limit: int = 3) -> str:
    """'skipped 3: a.png (too large: 182,250,000 pixels), b.jpg (corrupt) and 1 more', or ''.

    ``info``: an import's result dict ("skipped": count, "skipped_details": records), a
    ``LatentCache`` (``.skipped`` {code: n}, ``.skipped_details``), or a list of records.
    Names beyond ``limit`` are counted, not listed; the count is the recorded total even
    when fewer names were kept.
    """
    if isinstance(info, dict):
        count, details = info.get("skipped", 0), info.get("skipped_details") or []
    elif isinstance(info, (list, tuple)):
        count, details = len(info), info
    else:
        count, details = getattr(info, "skipped", 0), getattr(info, "skipped_details", None) or []
    if isinstance(count, dict):
        count = sum(int(v) for v in count.values())
    count = max(int(count or 0), len(details))
    if not count:
        return ""
    shown = [f"{d['name']} ({d['reason']})" for d in details[:limit]]
    if not shown:  # counted, not named (a cache built before names were kept)
        return f"skipped {count:,}"
    more = count - len(shown)
    return f"skipped {count:,}: " + ", ".join(shown) + (f" and {more:,} more" if more else "")
