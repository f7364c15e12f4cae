"""The batch pipeline under stress: many epoch boundaries on a busy machine, abandoned
generators, resume across an epoch boundary. mlx-data 0.1.0's prefetch thread pool could
hang forever in its destructor at an epoch boundary; the pipeline now owns no threads."""

import gc
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from mlxflow.data.dataset import ImageTextDataset


def _dataset(n, size=4, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ImageTextDataset("/nonexistent", images, [f"c{i}" for i in range(n)], {})


def _expected(ds, batch_size, seed, step, flip, embeddings=None):
    """What batch number ``step`` of a fresh stream must be, computed straight from numpy."""
    nb = len(ds) // batch_size
    epoch, k = divmod(step, nb)
    index = ds.epoch_order(seed, epoch)[k * batch_size : (k + 1) * batch_size].astype(np.int64)
    image = ds.images[index].astype(np.float32) / 127.5 - 1.0
    if flip:
        f = ds.epoch_flips(seed, epoch)[index]
        image[f] = image[f, :, ::-1]
    out = {"image": image, "index": index}
    if embeddings is not None:
        out["text"] = embeddings[index]
    return out


def _assert_same(got, want):
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert np.array_equal(got[key], want[key]), key


def _native_threads():
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None


@pytest.mark.timeout(60)
def test_hundreds_of_epoch_boundaries_on_a_busy_machine():
    ds = _dataset(6)
    emb = np.random.default_rng(1).standard_normal((6, 2, 3)).astype(np.float32)
    batch, epochs, seed = 3, 650, 11
    stop = threading.Event()

    def spin():  # contends for the GIL with the consumer
        x = 0
        while not stop.is_set():
            x += 1

    spinner = threading.Thread(target=spin, daemon=True)
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    spinner.start()
    t0 = time.monotonic()
    try:
        it = ds.batches(batch, seed=seed, flip=True, embeddings=emb)
        nb = len(ds) // batch
        for epoch in range(epochs):
            seen = []
            for k in range(nb):
                got = next(it)
                _assert_same(got, _expected(ds, batch, seed, epoch * nb + k, True, emb))
                seen.append(got["index"])
            # every epoch is the expected permutation of the whole dataset
            assert np.array_equal(np.concatenate(seen), ds.epoch_order(seed, epoch))
    finally:
        stop.set()
        spinner.join()
        burner.kill()
        burner.wait()
    assert time.monotonic() - t0 < 20


@pytest.mark.timeout(60)
def test_abandoned_generators_mid_epoch():
    ds = _dataset(10)
    first = ds.batches(3, seed=2, flip=True)
    _assert_same(next(first), _expected(ds, 3, 2, 0, True))  # warm up: imports, buffers
    before = _native_threads()
    for trial in range(300):
        start, take = trial % 7, 1 + trial % 4
        it = ds.batches(3, seed=2, start=start, flip=True)
        for j in range(take):
            _assert_same(next(it), _expected(ds, 3, 2, start + j, True))
        if trial % 50 == 0 and before is not None:
            assert _native_threads() == before  # a live, mid-epoch generator owns no thread
        del it
        if trial % 10 == 0:
            gc.collect()
    gc.collect()
    # the first generator still continues correctly after all that churn
    _assert_same(next(first), _expected(ds, 3, 2, 1, True))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flip", [False, True])
def test_resume_across_epoch_boundaries(flip):
    ds = _dataset(10)  # batch 3: 3 batches per epoch, one image dropped each epoch
    emb = np.random.default_rng(2).standard_normal((10, 1, 4)).astype(np.float32)
    total = 12
    it = ds.batches(3, seed=5, flip=flip, embeddings=emb)
    full = [next(it) for _ in range(total)]
    for step, got in enumerate(full):
        _assert_same(got, _expected(ds, 3, 5, step, flip, emb))
    for start in range(total):
        resumed = ds.batches(3, seed=5, start=start, flip=flip, embeddings=emb)
        for want in full[start:]:
            _assert_same(next(resumed), want)


@pytest.mark.parametrize("flip", [False, True])
def test_index_batches_name_the_rows_the_host_stream_delivers(flip):
    """A trainer holding the set on its device gathers index_batches' rows: they must be the
    host stream's, batch for batch, from any resume position and across epochs."""
    from mlxflow.data.dataset import index_batches

    ds = _dataset(10)
    host = ds.batches(3, seed=5, flip=flip)
    full = [next(host) for _ in range(12)]
    for start in (0, 2, 7):
        rows = index_batches(len(ds), 3, seed=5, start=start, flip=flip)
        for want in full[start:]:
            got = next(rows)
            assert np.array_equal(got["index"], want["index"])
            image = ds.images[got["index"]].astype(np.float32) / 127.5 - 1.0
            if flip:
                image[got["flip"]] = image[got["flip"], :, ::-1]
            else:
                assert "flip" not in got
            assert np.array_equal(image, want["image"])


def test_index_batches_refuse_a_batch_larger_than_the_set():
    from mlxflow.data.dataset import index_batches
    from mlxflow.errors import MlxflowError

    with pytest.raises(MlxflowError, match="batch size 8 does not fit a dataset of 5 samples"):
        next(index_batches(5, 8, seed=0))
