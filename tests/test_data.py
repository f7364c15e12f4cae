"""Datasets: emoji rendering, folder import, deterministic resumable batches, clear errors."""

import json

import numpy as np
import pytest
from PIL import Image

from mlxflow.data import emoji as emoji_data
from mlxflow.data.dataset import ImageTextDataset
from mlxflow.data.folder import import_image_folder
from mlxflow.errors import MlxflowError

from conftest import make_shapes_dataset

try:
    emoji_data.find_emoji_font()
    HAVE_FONT = True
except MlxflowError:
    HAVE_FONT = False
needs_font = pytest.mark.skipif(not HAVE_FONT, reason="no colour emoji font installed (fonts-noto-color-emoji)")


@needs_font
def test_render_emoji_subset(tmp_path):
    info = emoji_data.build_emoji_dataset(tmp_path / "e", size=32, limit=24)
    ds = ImageTextDataset.load(tmp_path / "e")
    assert info["count"] + info["skipped"] == 24 and len(ds) == info["count"] >= 20
    assert ds.images.shape[1:] == (32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.captions[0] == "1st place medal"  # the emoji package's order
    # real glyphs: colourful, not blank background, and different from each other
    assert ds.images.std() > 30 and not np.array_equal(ds.images[0], ds.images[1])
    assert (ds.images[:, 0, 0] == 255).all(axis=1).mean() > 0.5  # most corners keep the white background
    with pytest.raises(MlxflowError, match="not empty"):
        emoji_data.build_emoji_dataset(tmp_path / "e", size=32, limit=2)


@needs_font
def test_renderer_skips_what_the_font_cannot_draw():
    r = emoji_data._Renderer(emoji_data.open_emoji_font(emoji_data.find_emoji_font()))
    assert r.render("\U0001F600") is not None  # grinning face
    assert r.render("\U0001F1EB\U0001F1F7") is not None  # flag: France
    assert r.render("\U0001F468\u200d\U0001F469\u200d\U0001F467") is not None  # family ZWJ ligature
    assert r.render("\U0010FFFD") is None  # unassigned: tofu or nothing
    assert r.render("\U0001F1FF\U0001F1FF") is None  # unknown region: placeholder flag
    assert r.render("\U0001F600\U0001F600\U0001F600") is None  # falls apart into three glyphs
    # an unknown subdivision flag collapses onto the plain black flag
    tags = "".join(chr(0xE0000 + ord(c)) for c in "zzzzz") + "\U000E007F"
    assert r.render("\U0001F3F4" + tags) is None
    # a base the font lacks leaves only the skin-tone swatch: U+10FFFD stands in for it
    assert r.render("\U0010FFFD\U0001F3FF") is None


def test_no_font_says_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setattr(emoji_data, "_FONT_CANDIDATES", ())
    monkeypatch.setattr(emoji_data, "_fc_match", lambda: None)
    with pytest.raises(MlxflowError, match="apt-get install fonts-noto-color-emoji"):
        emoji_data.find_emoji_font()
    with pytest.raises(MlxflowError, match="emoji font not found"):
        emoji_data.find_emoji_font(tmp_path / "nope.ttf")
    (tmp_path / "bad.ttf").write_bytes(b"not a font")
    with pytest.raises(MlxflowError, match="cannot use"):
        emoji_data.open_emoji_font(tmp_path / "bad.ttf")


def _folder(tmp_path, n=4):
    src = tmp_path / "imgs"
    src.mkdir()
    lines = []
    for i in range(n):
        im = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
        im.paste((255, 0, 0, 255), (10, 5, 30, 25))
        im.save(src / f"{i}.png")
        lines.append(f"{i}.png\tred box {i}")
    (src / "captions.tsv").write_text("\n".join(lines))
    return src


def test_import_folder(tmp_path):
    info = import_image_folder(_folder(tmp_path), tmp_path / "ds", size=16)
    ds = ImageTextDataset.load(tmp_path / "ds")
    assert info["count"] == 4 and ds.captions == [f"red box {i}" for i in range(4)]
    assert ds.images.shape == (4, 16, 16, 3)
    assert tuple(ds.images[0, 8, 8]) == (255, 0, 0) and tuple(ds.images[0, 0, 0]) == (255, 255, 255)


def test_import_folder_errors(tmp_path):
    src = _folder(tmp_path)
    (src / "2.png").write_bytes(b"\x89PNG garbage")
    # A corrupt image is skipped and counted, not fatal.
    info = import_image_folder(src, tmp_path / "ds", size=16)
    assert (info["count"], info["skipped"]) == (3, 1) and info["skipped_files"][0].endswith("2.png")
    ds = ImageTextDataset.load(tmp_path / "ds")
    assert len(ds) == 3 and "red box 2" not in ds.captions
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["skipped"] == 1
    Image.new("RGB", (8, 8)).save(src / "2.png")
    Image.new("RGB", (8, 8)).save(src / "extra.png")
    with pytest.raises(MlxflowError, match="extra.png has no caption"):
        import_image_folder(src, tmp_path / "ds", size=16)
    (src / "captions.tsv").unlink()
    with pytest.raises(MlxflowError, match="no captions file"):
        import_image_folder(src, tmp_path / "ds", size=16)
    with pytest.raises(MlxflowError, match="image folder not found"):
        import_image_folder(tmp_path / "nope", tmp_path / "ds")


def test_dataset_load_errors(tmp_path):
    with pytest.raises(MlxflowError):
        ImageTextDataset.load(tmp_path / "missing")
    make_shapes_dataset(tmp_path / "ok", n=8)
    (tmp_path / "ok" / "images.npy").write_bytes(b"corrupt")
    with pytest.raises(MlxflowError):
        ImageTextDataset.load(tmp_path / "ok")


def test_batches_are_deterministic_and_resumable(tmp_path):
    ds, emb = make_shapes_dataset(tmp_path / "s", n=16)
    it = ds.batches(4, seed=3, embeddings=emb)
    first = [next(it) for _ in range(10)]  # spans 2.5 epochs
    b = first[0]
    assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0 and b["text"].shape == (4, 1, 8)
    # each epoch is a permutation; epochs differ
    ep0 = np.concatenate([x["index"] for x in first[:4]])
    ep1 = np.concatenate([x["index"] for x in first[4:8]])
    assert sorted(ep0) == list(range(16)) and not np.array_equal(ep0, ep1)
    resumed = ds.batches(4, seed=3, start=6, embeddings=emb)
    for want in first[6:]:
        got = next(resumed)
        assert np.array_equal(got["index"], want["index"]) and np.array_equal(got["image"], want["image"])
    # text rows follow their images
    assert np.array_equal(b["text"], emb[b["index"]])


def test_flips_are_deterministic(tmp_path):
    ds, _ = make_shapes_dataset(tmp_path / "s", n=16)
    a = [next(ds.batches(8, seed=1, flip=True))["image"] for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    plain = next(ds.batches(8, seed=1))
    flipped = next(ds.batches(8, seed=1, flip=True))
    assert any(np.array_equal(flipped["image"][i], plain["image"][i][:, ::-1]) and
               not np.array_equal(plain["image"][i], plain["image"][i][:, ::-1]) for i in range(8))


def test_embedding_cache(tmp_path):
    ds, _ = make_shapes_dataset(tmp_path / "s", n=8)

    class Counting:
        id, spec, dim, tokens = "fake", "fake", 4, 1
        calls = 0

        def encode(self, texts):
            Counting.calls += 1
            return np.ones((len(texts), 1, 4), np.float32)

    e1 = ds.text_embeddings(Counting())
    e2 = ImageTextDataset.load(tmp_path / "s").text_embeddings(Counting())
    assert e1.shape == (8, 1, 4) and np.array_equal(e1, e2) and Counting.calls == 1
    assert (tmp_path / "s" / "text-fake.npy").exists()
    assert json.loads((tmp_path / "s" / "dataset.json").read_text())["size"] == 16
