"""Validation split and batch streaming: coverage, order, exact pixel values, dtypes, memory."""

import tracemalloc

import numpy as np
import pytest

from cnntrain.data.batches import iterate_batches, num_batches, split_validation


def indexed_images(n, h=2, w=3):
    """Images whose first pixel is their own index (n <= 256), labels index % 10."""
    images = np.zeros((n, h, w), np.uint8)
    images[:, 0, 0] = np.arange(n)
    return images, (np.arange(n) % 10).astype(np.uint8)


def epoch_order(batches):
    """The image indices in the order an epoch visited them, read back from the pixels."""
    return np.concatenate([np.rint(x[:, 0, 0, 0] * 255).astype(int) for x, _ in batches])


@pytest.mark.parametrize("rng", [None, np.random.default_rng(0)])
def test_every_index_once_per_epoch(rng):
    images, labels = indexed_images(103)
    batches = list(iterate_batches(images, labels, 10, np.float32, rng=rng))
    order = epoch_order(batches)
    assert sorted(order) == list(range(103))
    assert np.array_equal(np.concatenate([y for _, y in batches]), order % 10)  # labels follow their images


def test_sequential_without_rng():
    images, labels = indexed_images(25)
    assert epoch_order(iterate_batches(images, labels, 7, np.float64)).tolist() == list(range(25))


def test_shuffled_order_is_the_generators_permutation():
    images, labels = indexed_images(50)
    order = epoch_order(iterate_batches(images, labels, 8, np.float32, rng=np.random.default_rng(42)))
    assert np.array_equal(order, np.random.default_rng(42).permutation(50))
    again = epoch_order(iterate_batches(images, labels, 8, np.float32, rng=np.random.default_rng(42)))
    other = epoch_order(iterate_batches(images, labels, 8, np.float32, rng=np.random.default_rng(43)))
    assert np.array_equal(order, again) and not np.array_equal(order, other)


def test_one_generator_gives_a_new_order_each_epoch():
    images, labels = indexed_images(50)
    rng = np.random.default_rng(7)
    first = epoch_order(iterate_batches(images, labels, 50, np.float32, rng=rng))
    second = epoch_order(iterate_batches(images, labels, 50, np.float32, rng=rng))
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixels_are_exactly_value_over_255(dtype):
    images = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    (x, y), = iterate_batches(images, np.zeros(4, np.uint8), 4, dtype)
    assert x.dtype == dtype and x.shape == (4, 1, 8, 8)
    assert y.dtype == np.int64
    # Reference: float64 division rounded once to dtype (for float32 that double rounding
    # equals the correctly rounded float32 quotient, since 53 >= 2 * 24 + 2).
    assert np.array_equal(x.ravel(), (np.arange(256) / 255).astype(dtype))
    assert x.ravel()[0] == 0.0 and x.ravel()[255] == 1.0


def test_last_partial_batch_is_kept():
    images, labels = indexed_images(10, h=3, w=5)
    shapes = [(x.shape, y.shape) for x, y in iterate_batches(images, labels, 4, np.float32)]
    assert shapes == [((4, 1, 3, 5), (4,)), ((4, 1, 3, 5), (4,)), ((2, 1, 3, 5), (2,))]
    assert (num_batches(10, 4), num_batches(8, 4), num_batches(1, 64)) == (3, 2, 1)


def test_float32_batches_make_no_float64_temporary():
    # One batch of 4096 28x28 images: uint8 copy 3.2 MB, float32 result 12.8 MB, and a float64
    # temporary would add 25.7 MB. numpy reports its allocations to tracemalloc.
    images = np.zeros((4096, 28, 28), np.uint8)
    labels = np.zeros(4096, np.uint8)
    tracemalloc.start()
    try:
        x, _ = next(iterate_batches(images, labels, 4096, np.float32))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert x.dtype == np.float32
    assert peak < 20e6


@pytest.mark.parametrize("bad, match", [
    (dict(dtype=np.float16), "dtype must be float32 or float64"),
    (dict(dtype=np.int64), "dtype must be float32 or float64"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(images=np.zeros((3, 2, 2), np.float32)), "images must be uint8"),
    (dict(labels=np.zeros(4, np.uint8)), r"labels must have shape \(3,\)"),
])
def test_bad_arguments(bad, match):
    args = dict(images=np.zeros((3, 2, 2), np.uint8), labels=np.zeros(3, np.uint8), batch_size=2, dtype=np.float32)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        next(iterate_batches(args["images"], args["labels"], args["batch_size"], args["dtype"]))


@pytest.mark.parametrize("n, validation, expected", [
    (100, 0.1, (90, 10)),
    (100, 0, (100, 0)),
    (100, 0.0, (100, 0)),
    (100, 25, (75, 25)),
    (100, 99, (1, 99)),
    (7, 0.5, (3, 4)),  # 3.5 rounds half to even: 4
    (10, 0.25, (8, 2)),  # 2.5 rounds half to even: 2
    (3, 0.1, (3, 0)),  # a small fraction of a small set holds out nothing
    (100, np.int64(5), (95, 5)),
    (100, np.float32(0.5), (50, 50)),
])
def test_split_validation(n, validation, expected):
    assert split_validation(n, validation) == expected


@pytest.mark.parametrize("n, validation, match", [
    (10, 10, "holds out 10 of 10 training images, leaving none"),
    (10, 0.96, "holds out 10 of 10"),
    (10, 1.0, r"fraction must be in \[0, 1\)"),
    (10, -0.1, r"fraction must be in \[0, 1\)"),
    (10, float("nan"), r"fraction must be in \[0, 1\)"),
    (10, -1, "count must be >= 0"),
    (10, True, "fraction in"),
    (10, "0.1", "fraction in"),
    (0, 0, "need at least 1 training image"),
])
def test_split_validation_errors(n, validation, match):
    with pytest.raises(ValueError, match=match):
        split_validation(n, validation)
