"""Tar / folder readers and the sharded, resumable latent + token cache, with fake encoders."""

import io
import json
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from mlxflow.data.dataset import write_dataset_folder
from mlxflow.data.latent_cache import INDEX, LatentCache, build_latent_cache
from mlxflow.data.shards import (DatasetFolderReader, ImageFolderReader, TarShardReader, open_samples,
                                 split_key)
from mlxflow.errors import MlxflowError

SIZE = 16  # readers' output side in these tests (the product uses 64)


def _png(w, h, colour, mode="RGB"):
    b = io.BytesIO()
    Image.new(mode, (w, h), colour).save(b, "PNG")
    return b.getvalue()


def _jpg(w, h, colour):
    b = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(b, "JPEG", quality=95)
    return b.getvalue()


def _add(tf, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _colour(i):
    return (37 * i % 256, 91 * i % 256, 53 * i % 256)


def write_tar(path, n, start=0, extra=()):
    """n good samples (png + json prompt), keys start..start+n-1, then ``extra`` members."""
    with tarfile.open(path, "w") as tf:
        for i in range(start, start + n):
            _add(tf, f"{i:05d}.png", _png(24, 20, _colour(i)))
            _add(tf, f"{i:05d}.json", json.dumps({"prompt": f"sample {i}", "width": 24}).encode())
        for name, data in extra:
            _add(tf, name, data)
    return path


def encode_images(images):
    """Fake VAE: uint8 (B, S, S, 3) -> float32 (B, S/4, S/4, 4): 4x4 average pool + mean channel."""
    x = images.astype(np.float32) / 127.5 - 1.0
    b, s = x.shape[:2]
    pooled = x.reshape(b, s // 4, 4, s // 4, 4, 3).mean(axis=(2, 4))
    return np.concatenate([pooled, pooled.mean(-1, keepdims=True)], -1)


def tokenize(captions, length=6):
    """Fake tokenizer: words hashed into ids 1..99, padded with 0 to ``length``."""
    ids = np.zeros((len(captions), length), np.int32)
    mask = np.zeros((len(captions), length), np.int32)
    for i, c in enumerate(captions):
        words = c.split()[:length]
        ids[i, : len(words)] = [zlib.crc32(w.encode()) % 99 + 1 for w in words]
        mask[i, : len(words)] = 1
    return ids, mask


class Counting:
    """The fake encoder, counting images it saw, optionally failing after k calls."""

    def __init__(self, fail_after=None):
        self.calls, self.images, self.fail_after = 0, 0, fail_after

    def __call__(self, images):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt  # what Ctrl-C looks like mid-build
        self.calls += 1
        self.images += len(images)
        return encode_images(images)


META = {"vae": {"kind": "fake-pool", "scale": 1.0}, "t5": {"kind": "fake-hash"}, "random": False, "image_size": SIZE}


# --------------------------------------------------------------------------- readers


def test_split_key_is_webdataset_style():
    assert split_key("0001.jpg") == ("0001", "jpg")
    assert split_key("a/b/0001.seg.PNG") == ("a/b/0001", "seg.png")


def test_tar_grouping_captions_and_skips(tmp_path):
    with tarfile.open(tmp_path / "a.tar", "w") as tf:
        _add(tf, "k0.jpg", _jpg(30, 20, (200, 0, 0)))
        _add(tf, "k0.json", json.dumps({"caption": "from caption"}).encode())
        _add(tf, "k1.txt", b"from txt\n")  # caption first, image second: still one sample
        _add(tf, "k1.png", _png(20, 20, (0, 200, 0, 128), mode="RGBA"))
        _add(tf, "k2.jpg", b"this is not a jpeg")  # corrupt image
        _add(tf, "k2.json", json.dumps({"prompt": "x"}).encode())
        _add(tf, "k3.jpg", _jpg(20, 20, (0, 0, 200)))  # no caption at all
        _add(tf, "k4.jpg", _jpg(20, 20, (0, 0, 200)))
        _add(tf, "k4.json", b"{not json")  # bad JSON
        _add(tf, "k5.json", json.dumps({"prompt": "no image"}).encode())
        _add(tf, "k6.webp", _png(20, 20, (9, 9, 9)))  # PNG bytes named .webp: Pillow sniffs the format
        _add(tf, "k6.json", json.dumps({"prompt": " prompt wins ", "caption": "c", "text": "t"}).encode())
    r = TarShardReader(tmp_path / "a.tar", size=SIZE)
    got = list(r)
    assert [(k, c) for k, _, c in got] == [("k0", "from caption"), ("k1", "from txt"), ("k6", "prompt wins")]
    assert all(im.dtype == np.uint8 and im.shape == (SIZE, SIZE, 3) for _, im, _ in got)
    assert dict(r.skipped) == {"bad_image": 1, "missing_caption": 1, "bad_json": 1, "missing_image": 1}
    assert r.consumed == 7
    # half-transparent green composited on white: (127, 227, 127)-ish, not green on black
    assert np.allclose(got[1][1][8, 8], (127, 227, 127), atol=3)


def test_tar_sources_folder_glob_list_and_truncation(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    write_tar(d / "s0.tar", 3, 0)
    write_tar(d / "s1.tar", 3, 3)
    with tarfile.open(d / "s1.tar") as tf:
        cut = tf.getmember("00005.png").offset_data + 10
    (d / "s1.tar").write_bytes((d / "s1.tar").read_bytes()[:cut])  # cut inside 00005's image
    write_tar(d / "s2.tar", 2, 6)
    (d / "s3.tar").write_bytes(b"garbage, not a tar file at all")
    r = open_samples(d, size=SIZE)
    assert isinstance(r, TarShardReader)
    keys = [k for k, _, _ in r]
    # s1 keeps its intact prefix and loses the sample it broke in; s2 is read whole
    assert keys == ["00000", "00001", "00002", "00003", "00004", "00006", "00007"]
    assert dict(r.skipped) == {"truncated_tar": 1, "bad_tar": 1} and r.consumed == 9
    assert r.bad_files == [str(d / "s1.tar"), str(d / "s3.tar")]
    globbed = TarShardReader(str(d / "s[02].tar"), size=SIZE)
    assert [k for k, _, _ in globbed] == ["00000", "00001", "00002", "00006", "00007"]
    assert [k for k, _, _ in TarShardReader([d / "s2.tar", d / "s0.tar"], size=SIZE)][:2] == ["00006", "00007"]
    with tarfile.open(tmp_path / "z.tar.gz", "w:gz") as tf:
        _add(tf, "g.jpg", _jpg(20, 20, (5, 5, 5)))
        _add(tf, "g.txt", b"gzipped")
    assert [(k, c) for k, _, c in TarShardReader(tmp_path / "z.tar.gz", size=SIZE)] == [("g", "gzipped")]
    with pytest.raises(MlxflowError, match="no tar shards match"):
        TarShardReader(str(tmp_path / "*.tar"))


def test_resume_position_skips_without_decoding(tmp_path, monkeypatch):
    write_tar(tmp_path / "a.tar", 4, 0, extra=[("bad.jpg", b"nope"), ("bad.json", b'{"prompt": "p"}')])
    write_tar(tmp_path / "b.tar", 3, 10)
    r = TarShardReader([tmp_path / "a.tar", tmp_path / "b.tar"], size=SIZE)
    full = [(r.consumed, k) for k, _, _ in r]
    assert r.consumed == 8 and dict(r.skipped) == {"bad_image": 1}
    import mlxflow.data.shards as shards

    decoded = []
    real = shards.decode_square
    monkeypatch.setattr(shards, "decode_square", lambda data, *a: decoded.append(1) or real(data, *a))
    for start in range(0, 9):
        decoded.clear()
        part = [(r.consumed, k) for k, _, _ in r.iter_from(start)]
        assert part == [p for p in full if p[0] > start] and r.consumed == 8
        assert len(decoded) == 8 - start  # nothing before ``start`` is decoded
        assert r.skipped["bad_image"] == (1 if start < 5 else 0)


def test_crop_then_resize_keeps_aspect(tmp_path):
    # 60x20 white image with a red 20x20 square in the middle: a centre crop is all red,
    # a squash would leave white bands left and right.
    img = Image.new("RGB", (60, 20), (255, 255, 255))
    img.paste((220, 20, 20), (20, 0, 40, 20))
    (tmp_path / "wide.png").write_bytes(b"")
    img.save(tmp_path / "wide.png")
    Image.new("RGB", (10, 40), (0, 0, 250)).save(tmp_path / "tall.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "nocap.png").write_bytes(_png(8, 8, (1, 2, 3)))
    (tmp_path / "captions.tsv").write_text("wide.png\ta red square\ntall.jpg\ta blue bar\nbroken.jpg\tx\n")
    r = open_samples(tmp_path, size=SIZE)
    assert isinstance(r, ImageFolderReader) and r.total == 4
    got = {k: (im, c) for k, im, c in r}
    assert sorted(got) == ["tall.jpg", "wide.png"] and got["wide.png"][1] == "a red square"
    red = got["wide.png"][0].astype(int)
    assert np.abs(red - (220, 20, 20)).max() <= 2  # every pixel red, including the edges
    assert dict(r.skipped) == {"bad_image": 1, "missing_caption": 1}
    # a tar image goes through the same crop-then-resize
    b = io.BytesIO()
    img.save(b, "PNG")
    with tarfile.open(tmp_path / "w.tar", "w") as tf:
        _add(tf, "w.png", b.getvalue())
        _add(tf, "w.txt", b"red")
    (im,) = [im for _, im, _ in TarShardReader(tmp_path / "w.tar", size=SIZE)]
    assert np.array_equal(im, got["wide.png"][0])


def test_dataset_folder_reader_resizes(tmp_path):
    images = np.zeros((3, 32, 32, 3), np.uint8)
    images[:, :, 16:] = 255
    write_dataset_folder(tmp_path / "ds", images, [{"text": f"t{i}"} for i in range(3)], {"kind": "test"})
    r = open_samples(tmp_path / "ds", size=SIZE)
    assert isinstance(r, DatasetFolderReader) and r.total == 3
    got = list(r)
    assert [(k, c) for k, _, c in got] == [("0", "t0"), ("1", "t1"), ("2", "t2")]
    assert got[0][1].shape == (SIZE, SIZE, 3) and got[0][1][0, 0, 0] == 0 and got[0][1][0, -1, 0] == 255


# --------------------------------------------------------------------------- cache


def make_source(tmp_path, n=(9, 8)):
    """Two tars: n[0] + n[1] good samples with a corrupt one and a caption-less one in between."""
    write_tar(tmp_path / "src" / "a.tar", n[0], 0, extra=[("zz.jpg", b"bad"), ("zz.json", b'{"prompt": "p"}')])
    write_tar(tmp_path / "src" / "b.tar", n[1], 100, extra=[("zz.png", _png(8, 8, (1, 1, 1)))])
    return tmp_path / "src"


@pytest.fixture
def src(tmp_path):
    (tmp_path / "src").mkdir()
    return make_source(tmp_path)


def build(src, out, enc=None, **kw):
    kw = {"shard_size": 5, "batch_size": 2, "meta": META, **kw}
    return build_latent_cache(TarShardReader(src, size=SIZE), out, encode_images=enc or Counting(),
                              tokenize=tokenize, **kw)


def test_build_writes_shards_and_index(src, tmp_path):
    progress = []
    enc = Counting()
    cache = build(src, tmp_path / "c", enc, on_progress=lambda *a: progress.append(a))
    assert len(cache) == 17 and enc.images == 17
    index = json.loads((tmp_path / "c" / INDEX).read_text())
    assert [s["count"] for s in index["shards"]] == [5, 5, 5, 2]
    # shard 1 holds samples 5..8 of a.tar, the corrupt zz (counted), then 100 of b.tar
    assert [s["consumed"] for s in index["shards"]] == [5, 6, 5, 3]
    assert index["shards"][1]["skipped"] == {"bad_image": 1}
    assert index["shards"][3]["skipped"] == {"missing_caption": 1}  # the trailing skip lands in the last shard
    assert index["skipped"] == {"bad_image": 1, "missing_caption": 1} == cache.skipped
    assert index["count"] == 17 and index["consumed"] == 19 and index["complete"]
    assert index["latent_shape"] == [4, 4, 4] and index["text_tokens"] == 6 and index["meta"] == META
    shard = tmp_path / "c" / "shard-00001"
    lat, tok, mask = (np.load(shard / f) for f in ("latents.npy", "tokens.npy", "mask.npy"))
    assert (lat.dtype, lat.shape, tok.dtype, tok.shape) == (np.float16, (5, 4, 4, 4), np.int32, (5, 6))
    assert mask.dtype == np.uint8 and mask.shape == (5, 6)
    lines = [json.loads(x) for x in (shard / "captions.jsonl").read_text().splitlines()]
    assert lines[0] == {"key": "00005", "caption": "sample 5"} and lines[-1]["key"] == "00100"
    assert (tok[mask == 0] == 0).all() and mask.sum() == 10  # "sample N": two words each
    assert cache.caption(16) == "sample 107" and cache.key(4) == "00004"
    assert cache.latent_shape == (4, 4, 4) and cache.text_tokens == 6 and cache.meta == META
    assert progress[-1] == (17, 2, None)
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(progress, progress[1:]))
    assert not list((tmp_path / "c").glob("*.tmp-*"))


def test_batches_match_in_memory_arrays_and_resume(src, tmp_path):
    cache = build(src, tmp_path / "c")
    reader = TarShardReader(src, size=SIZE)
    samples = list(reader)
    images = np.stack([im for _, im, _ in samples])
    latents = encode_images(images).astype(np.float16).astype(np.float32)
    ids, mask = tokenize([c for _, _, c in samples])
    bs, nb = 4, 17 // 4
    assert cache.batches_per_epoch(bs) == nb
    stream = cache.batches(bs, seed=3)
    got = [next(stream) for _ in range(2 * nb + 1)]
    for k, batch in enumerate(got):
        epoch, i = divmod(k, nb)
        idx = cache.epoch_order(3, epoch)[i * bs : (i + 1) * bs]
        assert np.array_equal(batch["index"], idx) and batch["index"].dtype == np.int64
        assert batch["image"].dtype == np.float32 and np.array_equal(batch["image"], latents[idx])
        assert batch["text"].dtype == np.int32 and np.array_equal(batch["text"], ids[idx])
        assert batch["mask"].dtype == np.uint8 and np.array_equal(batch["mask"], mask[idx])
    # the order is ImageTextDataset's: a pure function of (seed, epoch)
    assert np.array_equal(cache.epoch_order(3, 1), np.random.default_rng([3, 1]).permutation(17))
    # resume: start = batches consumed, across an epoch boundary
    for start in (1, nb - 1, nb + 1):
        resumed = cache.batches(bs, seed=3, start=start)
        for k in range(start, len(got)):
            assert np.array_equal(next(resumed)["index"], got[k]["index"])
    emb = np.arange(17 * 2, dtype=np.float32).reshape(17, 2)
    b0 = next(cache.batches(bs, seed=3, embeddings=emb))
    assert np.array_equal(b0["text"], emb[got[0]["index"]])
    with pytest.raises(MlxflowError, match="flip"):
        cache.batches(bs, seed=3, flip=True)
    with pytest.raises(MlxflowError, match="do not match"):
        cache.batches(bs, seed=3, embeddings=emb[:5])
    with pytest.raises(MlxflowError, match="larger than the cache"):
        cache.batches(18, seed=0)
    # the first n samples, for overfit runs
    sub = cache.subset(7)
    assert len(sub) == 7 and len(sub.shards) == 2 and len(LatentCache.load(tmp_path / "c", limit=7)) == 7
    b = next(sub.batches(7, seed=0))
    assert sorted(b["index"].tolist()) == list(range(7)) and np.array_equal(b["image"], latents[b["index"]])


def test_interrupted_build_resumes_to_identical_cache(src, tmp_path):
    ref_enc = Counting()
    build(src, tmp_path / "ref", ref_enc)
    # interrupt after 6 encoder calls: shards 0 and 1 (2 + 2 + 1 and 2 + 2 + 1 samples) are written
    first = Counting(fail_after=6)
    with pytest.raises(KeyboardInterrupt):
        build(src, tmp_path / "c", first)
    index = json.loads((tmp_path / "c" / INDEX).read_text())
    assert [s["count"] for s in index["shards"]] == [5, 5] and not index["complete"]
    with pytest.raises(MlxflowError, match="unfinished"):
        LatentCache.load(tmp_path / "c")
    assert len(LatentCache.load(tmp_path / "c", allow_incomplete=True)) == 10
    # what a kill -9 can leave: a half-written temp shard, and a renamed shard that
    # cache.json does not list yet; both are redone, not trusted
    (tmp_path / "c" / "shard-00002.tmp-99999").mkdir()
    (tmp_path / "c" / "shard-00002").mkdir()
    (tmp_path / "c" / "shard-00002" / "latents.npy").write_bytes(b"stale")
    second = Counting()
    cache = build(src, tmp_path / "c", second)
    assert second.images == 17 - 10  # nothing already cached is encoded again
    assert "resumed after 10" in cache.build_status
    assert (tmp_path / "c" / INDEX).read_text() == (tmp_path / "ref" / INDEX).read_text()
    for shard in sorted(p.name for p in (tmp_path / "ref").glob("shard-*")):
        for f in ("latents.npy", "tokens.npy", "mask.npy", "captions.jsonl"):
            assert (tmp_path / "c" / shard / f).read_bytes() == (tmp_path / "ref" / shard / f).read_bytes()
    third = Counting()
    again = build(src, tmp_path / "c", third)
    assert third.calls == 0 and "already complete" in again.build_status and len(again) == 17


def test_plain_iterable_resume_and_meta_mismatch(tmp_path):
    rng = np.random.default_rng(0)
    samples = [(f"k{i}", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), f"word{i % 3} x") for i in range(7)]
    with pytest.raises(KeyboardInterrupt):
        build_latent_cache(samples, tmp_path / "c", encode_images=Counting(fail_after=1), tokenize=tokenize,
                           shard_size=2, batch_size=2, meta=META)
    enc = Counting()
    cache = build_latent_cache(samples, tmp_path / "c", encode_images=enc, tokenize=tokenize,
                               shard_size=2, batch_size=2, meta=META)
    assert enc.images == 5 and len(cache) == 7 and cache.key(6) == "k6" and cache.latent_shape == (2, 2, 4)
    other = {**META, "vae": {"kind": "another-vae"}}
    with pytest.raises(MlxflowError, match="vae"):
        build_latent_cache(samples, tmp_path / "c", encode_images=enc, tokenize=tokenize, shard_size=2, meta=other)
    with pytest.raises(MlxflowError, match="shard size"):
        build_latent_cache(samples, tmp_path / "c", encode_images=enc, tokenize=tokenize, shard_size=3, meta=META)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("mine")
    with pytest.raises(MlxflowError, match="not a latent cache"):
        build_latent_cache(samples, tmp_path / "junk", encode_images=enc, tokenize=tokenize, meta=META)
    assert sorted(p.name for p in (tmp_path / "junk").iterdir()) == ["x.txt"]  # left untouched
    with pytest.raises(MlxflowError, match="no readable samples"):
        build_latent_cache([], tmp_path / "empty", encode_images=enc, tokenize=tokenize, meta=META)
    retry = build_latent_cache(samples[:3], tmp_path / "empty", encode_images=enc, tokenize=tokenize, meta=META)
    assert len(retry) == 3  # a failed empty build is retried, not taken for a finished cache


def test_load_errors_are_clear(src, tmp_path):
    with pytest.raises(MlxflowError, match="not found"):
        LatentCache.load(tmp_path / "nope")
    build(src, tmp_path / "c")
    (tmp_path / "c" / INDEX).write_text("{broken")
    with pytest.raises(MlxflowError, match="corrupt"):
        LatentCache.load(tmp_path / "c")
    build(src, tmp_path / "d")
    (tmp_path / "d" / "shard-00002" / "latents.npy").unlink()
    with pytest.raises(MlxflowError, match="shard-00002.*missing"):
        LatentCache.load(tmp_path / "d")
    import shutil

    shutil.rmtree(tmp_path / "d" / "shard-00001")
    with pytest.raises(MlxflowError, match="missing shard-00001"):
        LatentCache.load(tmp_path / "d")
