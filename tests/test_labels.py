"""Meta-class assignments: balance, distinct code words, Hamming preference, save/load, errors."""

import itertools

import numpy as np
import pytest

from reir.errors import ReirError
from reir.model.meta_labels import (
    assign_meta_labels,
    distinct_assignment,
    ids_path,
    load_ids,
    min_hamming_distance,
    save_ids,
)


def brute_min_hamming(codes):
    words = codes.T
    return min(int((a != b).sum()) for a, b in itertools.combinations(words, 2))


@pytest.mark.parametrize("label_type", ["fixed", "random"])
@pytest.mark.parametrize("classes,ensemble,meta", [(98, 48, 12), (100, 6, 12), (13, 4, 3), (5, 8, 2)])
def test_groupings_are_balanced(label_type, classes, ensemble, meta):
    codes, _ = assign_meta_labels(classes, ensemble, meta, label_type, seed=1)
    assert codes.shape == (ensemble, classes)
    for row in codes:
        sizes = np.bincount(row, minlength=meta)
        assert sizes.max() - sizes.min() <= 1 and sizes.sum() == classes


@pytest.mark.parametrize("classes,ensemble,meta", [(8, 3, 2), (27, 3, 3), (100, 2, 10), (98, 48, 12), (200, 4, 4)])
def test_fixed_code_words_are_distinct_even_at_the_limit(classes, ensemble, meta):
    codes, distance = assign_meta_labels(classes, ensemble, meta, "fixed", seed=3)
    assert len({tuple(c) for c in codes.T}) == classes
    assert distance == brute_min_hamming(codes) >= 1


def test_fixed_prefers_larger_minimum_distance():
    """The chosen candidate is at least as good as any single draw from the same generator."""
    codes, distance = assign_meta_labels(40, 12, 4, "fixed", seed=7)
    single = [min_hamming_distance(distinct_assignment(40, 12, 4, np.random.default_rng(s))) for s in range(10)]
    assert distance >= np.median(single)
    assert distance == brute_min_hamming(codes)


def test_random_is_seeded_and_differs_between_branches():
    a, _ = assign_meta_labels(30, 5, 3, "random", seed=11)
    b, _ = assign_meta_labels(30, 5, 3, "random", seed=11)
    c, _ = assign_meta_labels(30, 5, 3, "random", seed=12)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len({tuple(r) for r in a}) > 1


def test_min_hamming_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(5):
        codes = rng.integers(0, 3, size=(6, 25))
        assert min_hamming_distance(codes, chunk=7) == brute_min_hamming(codes)


def test_errors_are_one_line(capsys):
    with pytest.raises(ReirError, match="smaller than the 5 training classes"):
        assign_meta_labels(5, 8, 5, "fixed")
    with pytest.raises(ReirError, match="fixed labels need"):
        assign_meta_labels(100, 2, 4, "fixed")
    # random has no code-word requirement
    _codes, distance = assign_meta_labels(100, 2, 4, "random", seed=0)
    assert distance == 0


def test_save_and_reload_identical(tmp_path):
    classes = [str(i) for i in range(12)]
    path = ids_path(tmp_path, "car", "uncropped", 6, 3)
    assert path == tmp_path / "results" / "car_uncropped_6_3_ids.json"
    fixed, fd = assign_meta_labels(12, 6, 3, "fixed", seed=0)
    rand, rd = assign_meta_labels(12, 6, 3, "random", seed=0)
    save_ids(path, fixed, classes, "fixed", fd)
    save_ids(path, rand, classes, "random", rd)
    loaded, distance = load_ids(path, classes, 6, 3, "fixed")
    assert np.array_equal(loaded, fixed) and distance == fd
    loaded, distance = load_ids(path, classes, 6, 3, "random")
    assert np.array_equal(loaded, rand) and distance == rd
    with pytest.raises(ReirError, match="other classes"):
        load_ids(path, classes[:-1], 6, 3, "fixed")
    with pytest.raises(ReirError, match="no saved ids"):
        load_ids(tmp_path / "missing.json", classes, 6, 3, "fixed")
