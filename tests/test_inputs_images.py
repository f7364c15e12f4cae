"""The one image loader (mlxflow.data.inputs.load_square) and every path that uses it.

Families covered: the eight EXIF orientations, every Pillow mode (high bit depth, float,
palette, alpha, CMYK, YCbCr, LAB, HSV) against exact expected values, and the inputs that
are skipped with a reason (too large, truncated, empty, not an image) on every data path.
"""

import colorsys
import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from mlxflow.data.classes import import_class_folder
from mlxflow.data.dataset import ImageTextDataset
from mlxflow.data.folder import import_image_folder
from mlxflow.data.inputs import SkipSample, describe_skipped, load_square, max_pixels, square_rgb
from mlxflow.data.latent_cache import build_latent_cache
from mlxflow.data.shards import ImageFolderReader, TarShardReader, open_samples
from mlxflow.errors import MlxflowError

WHITE = (255, 255, 255)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def png_bytes(array: np.ndarray, colour_type: int, bit_depth: int, chunks=()) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit colour): big-endian samples, filter 0."""
    h, w = array.shape[:2]
    raw = array.astype(">u2" if bit_depth == 16 else np.uint8).reshape(h, -1).tobytes() if bit_depth >= 8 else array
    stride = len(raw) // h

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + raw[i * stride : (i + 1) * stride] for i in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0))
            + b"".join(chunk(k, d) for k, d in chunks) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def huge_bilevel_png(side: int = 13_500) -> bytes:
    """A side x side 1-bit PNG, all black: a few tens of KB on disk, side**2 pixels."""
    row = b"\x00" * (1 + (side + 7) // 8)
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def load(data: bytes, size: int | None = None, background=WHITE) -> np.ndarray:
    if size is None:  # the image's own side: no resampling, so every pixel is checkable
        size = min(Image.open(io.BytesIO(data)).size)
    return load_square(data, size, background).astype(int)


def close(got, want, tol=1):
    got, want = np.asarray(got, int), np.asarray(want, int)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= tol, f"max diff {np.abs(got - want).max()}"


# --------------------------------------------------------------------------- EXIF orientation

RED, GREEN, BLUE, YELLOW = (230, 20, 20), (20, 200, 20), (20, 20, 230), (230, 220, 20)


def displayed_quadrants(w=48, h=64) -> np.ndarray:
    """What a viewer shows: red top-left, green top-right, blue bottom-left, yellow bottom-right."""
    d = np.zeros((h, w, 3), np.uint8)
    d[: h // 2, : w // 2], d[: h // 2, w // 2 :] = RED, GREEN
    d[h // 2 :, : w // 2], d[h // 2 :, w // 2 :] = BLUE, YELLOW
    return d


def stored_for(displayed: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores so that EXIF ``orientation`` displays ``displayed``.

    The EXIF definitions: the stored image is displayed after 1 nothing, 2 a horizontal
    mirror, 3 a half turn, 4 a vertical mirror, 5 a transpose, 6 a quarter turn clockwise,
    7 a transverse (anti-diagonal) mirror, 8 a quarter turn counter-clockwise. Written
    here from those definitions, independently of Pillow's exif_transpose.
    """
    d = displayed
    return {1: d, 2: d[:, ::-1], 3: d[::-1, ::-1], 4: d[::-1], 5: d.transpose(1, 0, 2),
            6: np.rot90(d, 1), 7: d.transpose(1, 0, 2)[::-1, ::-1], 8: np.rot90(d, -1)}[orientation]


def exif_jpeg(stored: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(np.ascontiguousarray(stored)), "JPEG", quality=95, exif=exif)


def quadrant_colours(square: np.ndarray):
    s = square.shape[0]
    q = s // 4
    return [square[r, c].astype(int) for r, c in ((q, q), (q, 3 * q), (3 * q, q), (3 * q, 3 * q))]


def assert_upright(square: np.ndarray, tol=12):
    for got, want in zip(quadrant_colours(square), (RED, GREEN, BLUE, YELLOW)):
        assert np.abs(got - want).max() <= tol, (got, want)


def test_the_issue_example_orientation_6_is_stored_upright():
    stored = np.zeros((48, 64, 3), np.uint8)  # 64 wide, 48 high: red left, blue right
    stored[:, :32], stored[:, 32:] = (255, 0, 0), (0, 0, 255)
    square = load(exif_jpeg(stored, 6), 16)  # displayed 48 x 64: red top, blue bottom
    assert np.abs(square[2, 8] - (255, 0, 0)).max() <= 12 and np.abs(square[13, 8] - (0, 0, 255)).max() <= 12


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied(orientation):
    displayed = displayed_quadrants()
    stored = stored_for(displayed, orientation)
    assert stored.shape[:2] == ((64, 48) if orientation <= 4 else (48, 64))
    data = exif_jpeg(stored, orientation)
    assert_upright(load(data, 16))  # JPEG: the quadrant centres, away from chroma blocks
    # Lossless PNG (eXIf chunk) and WebP give exactly the square of the upright image.
    upright = load_square(encode(Image.fromarray(displayed), "PNG"), 16, WHITE)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored_im = Image.fromarray(np.ascontiguousarray(stored))
    close(load(encode(stored_im, "PNG", exif=exif), 16), upright, tol=0)
    close(load(encode(stored_im, "WEBP", lossless=True, exif=exif), 16), upright, tol=0)


def test_orientation_on_every_data_path(tmp_path):
    """folder import, class import, tar shards and captioned folders all store it upright."""
    data = exif_jpeg(stored_for(displayed_quadrants(), 6), 6)
    plain = encode(Image.fromarray(displayed_quadrants()), "JPEG", quality=95)
    src = tmp_path / "imgs"
    src.mkdir()
    (src / "rot.jpg").write_bytes(data)
    (src / "ref.jpg").write_bytes(plain)
    (src / "captions.tsv").write_text("rot.jpg\tquadrants\nref.jpg\treference\n")
    import_image_folder(src, tmp_path / "ds", size=16)
    ds = ImageTextDataset.load(tmp_path / "ds")
    rot = ds.images[ds.captions.index("quadrants")]
    assert_upright(rot)
    got = {k: im for k, im, _ in ImageFolderReader(src, size=16)}
    assert np.array_equal(got["rot.jpg"], rot)
    classes = tmp_path / "classes"
    for name in ("a", "b"):
        (classes / name).mkdir(parents=True)
        (classes / name / "x.jpg").write_bytes(data)
    import_class_folder(classes, tmp_path / "cls", size=16)
    assert all(np.array_equal(im, rot) for im in ImageTextDataset.load(tmp_path / "cls").images)
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name, body in (("k.jpg", data), ("k.txt", b"quadrants")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    ((key, im, caption),) = list(TarShardReader(tmp_path / "s.tar", size=16))
    assert np.array_equal(im, rot)


def test_a_broken_exif_block_keeps_the_pixels():
    im = Image.fromarray(displayed_quadrants())
    data = encode(im, "JPEG", quality=95, exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f garbage")
    assert_upright(load(data, 16))


# --------------------------------------------------------------------------- modes

RAMP16 = np.round(np.linspace(0, 65535, 64 * 64)).reshape(64, 64)


def want_grey(values, white):
    g = np.clip(np.round(np.asarray(values, float) * 255.0 / white), 0, 255)
    return np.repeat(g[..., None], 3, -1)


def test_the_issue_example_16_bit_ramp_is_not_white():
    data = encode(Image.fromarray(RAMP16.astype(np.uint16)), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    got = load(data)
    assert tuple(got[0, :3, 0]) == (0, 0, 0) and tuple(got[-1, -1]) == (255, 255, 255)
    close(got, want_grey(RAMP16, 65535))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16_bit_grey_every_byte_order(mode):
    raw = RAMP16.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
    im = Image.frombytes(mode, (64, 64), raw)
    want = want_grey(RAMP16, 65535)
    close(square_rgb(im, 64), want)  # in memory
    close(load(encode(im, "TIFF")), want)  # through a file (TIFF keeps I;16B)
    if mode != "I;16L":
        close(load(encode(im, "PNG")), want)


def test_16_bit_grey_with_transparent_level_uses_the_background():
    grey = RAMP16.astype(np.uint16)
    data = png_bytes(grey, 0, 16, chunks=[(b"tRNS", struct.pack(">H", int(grey[0, 5])))])
    got = load(data, background=(0, 0, 255))
    want = want_grey(RAMP16, 65535)
    want[0, 5] = (0, 0, 255)
    close(got, want)


def test_32_bit_int_white_is_the_stored_type_maximum():
    values = np.round(np.linspace(0, 2**31 - 1, 64 * 64)).reshape(64, 64).astype(np.int32)
    data = encode(Image.fromarray(values), "TIFF")  # signed 32-bit samples
    im = Image.open(io.BytesIO(data))
    assert im.mode == "I"
    close(load(data), want_grey(values, 2**31 - 1))
    negative = values.copy()
    negative[0, :8] = -5
    got = load(encode(Image.fromarray(negative), "TIFF"))
    assert (got[0, :8] == 0).all()
    # in memory there is no stored type: 16-bit when every value fits, else signed 32-bit
    small = RAMP16.astype(np.int32)
    close(square_rgb(Image.fromarray(small, "I"), 64), want_grey(small, 65535))
    close(square_rgb(Image.fromarray(values, "I"), 64), want_grey(values, 2**31 - 1))


def test_float_images_unit_range_or_byte_range():
    unit = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    close(load(encode(Image.fromarray(unit, "F"), "TIFF")), want_grey(unit, 1.0))
    byte = unit * 255
    close(load(encode(Image.fromarray(byte, "F"), "TIFF")), want_grey(byte, 255.0))
    wild = byte.copy()
    wild[0, :4] = (np.nan, -3.0, 400.0, np.inf)
    got = load(encode(Image.fromarray(wild, "F"), "TIFF"))
    assert tuple(got[0, :4, 0]) == (0, 0, 255, 255)
    # the rule reads the whole image, not just the centre crop: a bright margin decides
    wide = np.zeros((16, 48), np.float32)
    wide[:, 16:32] = 0.5
    wide[0, 0] = 200.0  # outside the crop: the range is 0..255, so 0.5 is black
    assert square_rgb(Image.fromarray(wide, "F"), 16).max() <= 1


def _rgb16_ramp():
    r = RAMP16
    return np.stack([r, r[::-1], np.full_like(r, 40000)], -1)


def test_16_bit_rgb_and_rgba_png():
    rgb = _rgb16_ramp()
    close(load(png_bytes(rgb, 2, 16)), np.round(rgb * 255 / 65535))
    alpha = np.round(np.linspace(0, 65535, 64))[None, :].repeat(64, 0)
    rgba = np.concatenate([rgb, alpha[..., None]], -1)
    bg = np.array([10, 200, 30])
    a = alpha[..., None] / 65535
    # Pillow keeps the high byte of colour and alpha (each within a level), so two levels
    # after compositing; opaque 16-bit colour above stays within one.
    close(load(png_bytes(rgba, 6, 16), background=tuple(bg)), np.round(rgb * 255 / 65535 * a + bg * (1 - a)), tol=2)
    # 16-bit grey + alpha
    la = np.stack([RAMP16, alpha], -1)
    want = np.round(RAMP16 * 255 / 65535 * (alpha / 65535) + 255 * (1 - alpha / 65535))
    close(load(png_bytes(la, 4, 16)), np.repeat(want[..., None], 3, -1), tol=2)
    # 16-bit RGB with a tRNS colour: that colour takes the background
    key = rgb[3, 7].astype(int)
    got = load(png_bytes(rgb, 2, 16, chunks=[(b"tRNS", struct.pack(">HHH", *key))]), background=(1, 2, 3))
    assert tuple(got[3, 7]) == (1, 2, 3) and tuple(got[0, 0]) != (1, 2, 3)


def test_8_bit_modes_exact():
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    grey3 = np.repeat(ramp[..., None], 3, -1)
    close(load(encode(Image.fromarray(ramp, "L"), "PNG")), grey3, tol=0)
    bits = (np.indices((16, 16)).sum(0) % 2).astype(bool)
    one = Image.fromarray(bits).convert("1")
    assert one.mode == "1"
    close(load(encode(one, "PNG")), np.repeat((bits * 255)[..., None], 3, -1), tol=0)
    colours = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    close(load(encode(Image.fromarray(colours), "PNG")), colours, tol=0)
    close(load(encode(Image.fromarray(colours).convert("RGBX"), "TIFF")), colours, tol=0)


def test_alpha_modes_composite_on_the_given_background():
    bg = (0, 0, 255)
    alpha = np.arange(256, dtype=np.uint8).reshape(16, 16)
    grey = np.full((16, 16), 200, np.uint8)
    a = alpha / 255.0
    want_la = np.stack([200 * a + bg[c] * (1 - a) for c in range(3)], -1)
    close(load(encode(Image.fromarray(np.stack([grey, alpha], -1), "LA"), "PNG"), background=bg), want_la)
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[...] = (250, 100, 0)
    want_rgba = np.stack([rgb[..., c] * a + bg[c] * (1 - a) for c in range(3)], -1)
    close(load(encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"), background=bg), want_rgba)
    premultiplied = Image.fromarray(np.dstack([rgb, alpha]), "RGBA").convert("RGBa")
    close(square_rgb(premultiplied, 16, bg), want_rgba, tol=2)
    la_pre = Image.fromarray(np.stack([grey, alpha], -1), "LA").convert("La")
    close(square_rgb(la_pre, 16, bg), want_la, tol=2)
    # 8-bit RGB and L with a tRNS colour / grey level
    key_rgb = Image.fromarray(np.where(alpha[..., None] < 128, (250, 100, 0), (0, 50, 60)).astype(np.uint8))
    got = load(encode(key_rgb, "PNG", transparency=(250, 100, 0)), background=bg)
    close(got, np.where(alpha[..., None] < 128, bg, (0, 50, 60)), tol=0)
    got = load(encode(Image.fromarray(alpha, "L"), "PNG", transparency=77), background=bg)
    want_l = np.repeat(alpha[..., None].astype(int), 3, -1)
    want_l[alpha == 77] = bg
    close(got, want_l, tol=0)
    # fully transparent is exactly the background, whatever its hidden colour
    assert tuple(load(encode(Image.new("RGBA", (8, 8), (9, 9, 9, 0)), "PNG"), background=bg)[0, 0]) == bg


def _palette_image():
    p = Image.new("P", (16, 16))
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30] + [0] * (256 * 3 - 12))
    idx = (np.arange(256) % 4).astype(np.uint8).reshape(16, 16)
    p.putdata(idx.ravel().tolist())
    want = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30)])[idx]
    return p, idx, want


def test_palette_with_and_without_transparency():
    p, idx, want = _palette_image()
    close(load(encode(p, "PNG")), want, tol=0)
    close(load(encode(p, "GIF")), want, tol=0)
    bg = (7, 8, 9)
    trans = want.copy()
    trans[idx == 3] = bg
    close(load(encode(p, "PNG", transparency=3), background=bg), trans, tol=0)
    close(load(encode(p, "GIF", transparency=3), background=bg), trans, tol=0)
    # a palette with per-entry alpha (tRNS with several values)
    half = want.copy().astype(float)
    half[idx == 1] = np.array([0, 255, 0]) * 0.5 + np.array(bg) * 0.5
    half[idx == 3] = bg
    close(load(encode(p, "PNG", transparency=bytes([255, 128, 255, 0])), background=bg), half)
    # PA: palette + alpha plane
    pa = Image.merge("PA", (p, Image.fromarray(np.where(idx == 0, 0, 255).astype(np.uint8), "L")))
    pa.putpalette(p.getpalette())
    pa_want = want.copy()
    pa_want[idx == 0] = bg
    close(square_rgb(pa, 16, bg), pa_want, tol=0)
    close(load(encode(pa, "TIFF"), background=bg), pa_want, tol=0)


def test_cmyk_ycbcr_lab_hsv():
    rng = np.random.default_rng(2)
    cmyk = rng.integers(0, 256, (4, 4, 4), dtype=np.uint8)
    cmyk[0, :4] = [(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255)]
    c, k = cmyk[..., :3].astype(float), cmyk[..., 3:].astype(float)
    want = np.round((255 - c) * (255 - k) / 255)  # Pillow's conversion, no ICC profile
    assert want[0, 0].tolist() == [0, 255, 255] and want[0, 3].tolist() == [0, 0, 0]
    close(square_rgb(Image.fromarray(cmyk, "CMYK"), 4), want)
    close(load(encode(Image.fromarray(cmyk, "CMYK"), "TIFF")), want)
    # YCbCr (JFIF full range): R = Y + 1.402 (Cr - 128), G = Y - 0.344136 (Cb - 128) - 0.714136 (Cr - 128),
    # B = Y + 1.772 (Cb - 128)
    ycc = np.array([[(76, 85, 255), (150, 44, 21), (29, 255, 107), (128, 128, 128)]], np.uint8)
    y, cb, cr = (ycc[..., i].astype(float) for i in range(3))
    want = np.clip(np.round(np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                                      y + 1.772 * (cb - 128)], -1)), 0, 255)
    for j in range(4):
        close(square_rgb(Image.fromarray(np.tile(ycc[:, j : j + 1], (4, 4, 1)), "YCbCr"), 4)[0, 0], want[0, j])
    # HSV: pure hues and a grey
    hsv = [((0, 255, 255), (255, 0, 0)), ((85, 255, 255), (0, 255, 0)), ((170, 255, 255), (0, 0, 255)),
           ((0, 0, 128), (128, 128, 128))]
    hsv += [(c, np.round(np.array(colorsys.hsv_to_rgb(*(np.array(c) / 255))) * 255))
            for c in ((43, 255, 255), (200, 100, 180), (20, 230, 90))]
    for colour, rgb in hsv:
        close(square_rgb(Image.new("HSV", (4, 4), colour), 4)[0, 0], rgb)
    # LAB (CIE L*a*b*, D50 as ICC profiles use) -> sRGB: white, black, greys, colours. Pillow's
    # LAB pixels are (L* * 255 / 100, a* and b* as signed bytes), as TIFF stores them.
    for L, a, b in [(100, 0, 0), (0, 0, 0), (50, 0, 0), (23.5, 0, 0), (53.3, 80, 67), (78.4, -38, 72),
                    (32.9, 79, -108), (60, -20, -30)]:
        pixel = (round(L * 255 / 100), a & 0xFF, b & 0xFF)
        want = lab_to_srgb(round(L * 255 / 100) * 100 / 255, a, b)
        close(square_rgb(Image.new("LAB", (4, 4), pixel), 4)[0, 0], want)
        close(load(encode(Image.new("LAB", (4, 4), pixel), "TIFF"))[0, 0], want)
    assert lab_to_srgb(100, 0, 0).tolist() == [255, 255, 255] and lab_to_srgb(0, 0, 0).tolist() == [0, 0, 0]
    close(lab_to_srgb(54.29, 80.80, 69.89), (255, 0, 0), tol=2)  # sRGB red, D50 (Lindbloom, Bradford)


def lab_to_srgb(L, a, b):
    """CIE L*a*b* (D50) -> sRGB uint8 (D65, Bradford), from the CIE and sRGB definitions."""
    fy = (L + 16) / 116
    fx, fz = fy + a / 500, fy - b / 200
    d = 6 / 29

    def finv(t):
        return t**3 if t > d else 3 * d * d * (t - 4 / 29)

    xyz50 = np.array([0.9642 * finv(fx), 1.0 * finv(fy), 0.8249 * finv(fz)])
    bradford = np.array([[0.9555766, -0.0230393, 0.0631636], [-0.0282895, 1.0099416, 0.0210077],
                         [0.0122982, -0.0204830, 1.3299098]])
    xyz65 = bradford @ xyz50
    m = np.array([[3.2404542, -1.5371385, -0.4985314], [-0.9692660, 1.8760108, 0.0415560],
                  [0.0556434, -0.2040259, 1.0572252]])
    lin = np.clip(m @ xyz65, 0, 1)
    srgb = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
    return np.round(srgb * 255)


def test_first_frame_of_animations():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:])
    close(load(b.getvalue())[0, 0], (255, 0, 0), tol=0)
    b = io.BytesIO()
    frames[0].save(b, "PNG", save_all=True, append_images=frames[1:])
    close(load(b.getvalue())[0, 0], (255, 0, 0), tol=0)


# --------------------------------------------------------------------------- skipped inputs


def bad_inputs() -> dict:
    """file name -> (bytes, expected reason)."""
    jpeg = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    png = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    broken = bytearray(png)
    broken[len(png) // 2 : len(png) // 2 + 64] = bytes(64)
    return {
        "huge.png": (huge_bilevel_png(), "too large: 182,250,000 pixels"),
        "cut.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "cut.png": (png[: len(png) // 2], "truncated"),
        "empty.jpg": (b"", "empty file"),
        "notes.png": (b"these are my notes, not a picture\n", "not an image"),
        "broken.png": (bytes(broken), "corrupt"),
    }


def test_the_issue_example_huge_png_is_small_on_disk_and_refused_without_decoding():
    data = huge_bilevel_png()
    assert len(data) < 60_000 and 13_500 * 13_500 > max_pixels()
    with pytest.raises(SkipSample) as e:
        load_square(data, 16, WHITE, name="a.png")
    assert e.value.reason == "too large: 182,250,000 pixels" and isinstance(e.value, MlxflowError)
    assert str(e.value) == "a.png: too large: 182,250,000 pixels"


@pytest.mark.parametrize("name", sorted(bad_inputs()))
def test_each_bad_input_has_its_reason(name):
    data, reason = bad_inputs()[name]
    with pytest.raises(SkipSample) as e:
        load_square(data, 16, WHITE, name=name)
    assert e.value.reason == reason
    assert "\n" not in str(e.value)


def test_a_missing_file_cannot_be_opened(tmp_path):
    with pytest.raises(SkipSample) as e:
        load_square(tmp_path / "gone.png", 16)
    assert e.value.reason == "cannot open"


def _write_bad_and_good(folder, good=("ok1.png", "ok2.png")):
    folder.mkdir(parents=True, exist_ok=True)
    bad = bad_inputs()
    for name, (data, _) in bad.items():
        (folder / name).write_bytes(data)
    for name in good:
        (folder / name).write_bytes(encode(Image.new("RGB", (8, 8), (0, 128, 0)), "PNG"))
    return {n: r for n, (_, r) in bad.items()}


def test_folder_import_skips_names_and_reasons(tmp_path):
    src = tmp_path / "imgs"
    reasons = _write_bad_and_good(src)
    names = sorted([*reasons, "ok1.png", "ok2.png"])
    (src / "captions.tsv").write_text("".join(f"{n}\tcaption {n}\n" for n in names))
    info = import_image_folder(src, tmp_path / "ds", size=16)
    assert info["count"] == 2 and info["skipped"] == len(reasons)
    assert info["skipped_details"] == [{"name": n, "reason": reasons[n]} for n in sorted(reasons)]
    assert sorted(p.split("/")[-1] for p in info["skipped_files"]) == sorted(reasons)
    assert ImageTextDataset.load(tmp_path / "ds").captions == ["caption ok1.png", "caption ok2.png"]
    text = describe_skipped(info)
    assert text == ("skipped 6: broken.png (corrupt), cut.jpg (truncated), cut.png (truncated) and 3 more")
    assert describe_skipped(info, limit=10).count("(") == 6
    assert "huge.png (too large: 182,250,000 pixels)" in describe_skipped(info, limit=10)
    json.dumps(info)  # the info dict stays JSON-able
    # unconditional import: the same skips
    info = import_image_folder(src, tmp_path / "u", size=16, unconditional=True)
    assert info["count"] == 2 and [d["name"] for d in info["skipped_details"]] == sorted(reasons)


def test_only_bad_images_is_one_clear_error(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    (src / "huge.png").write_bytes(huge_bilevel_png())
    (src / "captions.tsv").write_text("huge.png\tbig\n")
    with pytest.raises(MlxflowError, match=r"could be read \(first: huge.png: too large: 182,250,000 pixels\)"):
        import_image_folder(src, tmp_path / "ds", size=16)
    assert not (tmp_path / "ds").exists()


def test_class_import_skips_names_and_reasons(tmp_path):
    src = tmp_path / "classes"
    reasons = _write_bad_and_good(src / "cat")
    (src / "dog").mkdir()
    (src / "dog" / "d.png").write_bytes(encode(Image.new("RGB", (8, 8)), "PNG"))
    info = import_class_folder(src, tmp_path / "ds", size=16)
    assert info["count"] == 3 and info["skipped"] == len(reasons)
    assert info["skipped_details"] == [{"name": f"cat/{n}", "reason": reasons[n]} for n in sorted(reasons)]
    assert describe_skipped(info).startswith("skipped 6: cat/broken.png (corrupt), ")


def test_latent_readers_and_cache_skip_names_and_reasons(tmp_path):
    src = tmp_path / "imgs"
    reasons = _write_bad_and_good(src)
    names = sorted([*reasons, "ok1.png", "ok2.png"])
    (src / "captions.tsv").write_text("".join(f"{n}\tcaption {n}\n" for n in names))
    r = open_samples(src, size=16)
    assert [k for k, _, _ in r] == ["ok1.png", "ok2.png"]
    assert dict(r.skipped) == {"bad_image": 6}
    assert r.skipped_details == [{"name": n, "reason": reasons[n]} for n in sorted(reasons)]
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for n in names:
            stem = n.replace(".", "_")
            for member, body in ((f"{stem}.{n.rsplit('.', 1)[1]}", (src / n).read_bytes()),
                                 (f"{stem}.txt", f"caption {n}".encode())):
                info = tarfile.TarInfo(member)
                info.size = len(body)
                tf.addfile(info, io.BytesIO(body))
    t = TarShardReader(tmp_path / "s.tar", size=16)
    assert len(list(t)) == 2 and dict(t.skipped) == {"bad_image": 6}
    assert t.skipped_details == [{"name": n.replace(".", "_"), "reason": reasons[n]} for n in sorted(reasons)]

    def encode_images(images):
        return images[:, ::4, ::4].astype(np.float32) / 255

    def tokenize(captions):
        return np.ones((len(captions), 2), np.int32), np.ones((len(captions), 2), np.int32)

    cache = build_latent_cache(TarShardReader(tmp_path / "s.tar", size=16), tmp_path / "c",
                               encode_images=encode_images, tokenize=tokenize, shard_size=1, batch_size=1,
                               meta={"test": 1})
    assert len(cache) == 2 and cache.skipped == {"bad_image": 6}
    assert cache.skipped_details == t.skipped_details
    assert describe_skipped(cache).startswith("skipped 6: broken_png (corrupt), cut_jpg (truncated)")
    index = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert index["skipped_samples"] == t.skipped_details


def test_describe_skipped_formats():
    assert describe_skipped({"skipped": 0, "skipped_details": []}) == ""
    recs = [{"name": "a.png", "reason": "too large: 182,250,000 pixels"}, {"name": "b.jpg", "reason": "corrupt"},
            {"name": "c.png", "reason": "truncated"}]
    assert describe_skipped({"skipped": 3, "skipped_details": recs}) == (
        "skipped 3: a.png (too large: 182,250,000 pixels), b.jpg (corrupt), c.png (truncated)")
    assert describe_skipped({"skipped": 4, "skipped_details": recs}, limit=2) == (
        "skipped 4: a.png (too large: 182,250,000 pixels), b.jpg (corrupt) and 2 more")
    assert describe_skipped(recs[:1]) == "skipped 1: a.png (too large: 182,250,000 pixels)"
    # a count without names (e.g. an old cache): the count alone
    assert describe_skipped({"skipped": 2}) == "skipped 2"
