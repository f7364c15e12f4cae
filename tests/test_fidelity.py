"""Prompt fidelity on synthetic data with known answers."""

import numpy as np

from mlxflow.fidelity import nearest_neighbours, prompt_fidelity


def _refs(n=6, size=32):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8)


def test_copies_score_one_and_wrong_classes_zero():
    ref = _refs()
    idx = np.arange(6)
    assert prompt_fidelity(ref, idx, ref) == 1.0
    assert prompt_fidelity(ref, (idx + 1) % 6, ref) == 0.0


def test_noisy_copies_still_match():
    ref = _refs()
    rng = np.random.default_rng(1)
    noisy = np.clip(ref.astype(int) + rng.normal(0, 25, ref.shape), 0, 255).astype(np.uint8)
    assert np.array_equal(nearest_neighbours(noisy, ref), np.arange(6))
    assert prompt_fidelity(noisy, np.arange(6), ref) == 1.0


def test_duplicate_references_count_as_hits():
    ref = _refs()
    ref[3] = ref[2]  # same picture under two labels
    assert prompt_fidelity(ref[[2, 3]], np.array([3, 2]), ref) == 1.0


def test_half_right():
    ref = _refs()
    gen = ref[[0, 1, 2, 3]]
    assert prompt_fidelity(gen, np.array([0, 1, 5, 5]), ref) == 0.5
