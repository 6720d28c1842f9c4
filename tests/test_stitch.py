"""`ops.stitch` and `ops.tile_offsets` against a numpy reference (np.add.at sums divided by counts)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from anomalox import ops


def reference(tiles, offsets, size, image_index=None):
    """Overlap averaging by definition: float64 sums and counts with np.add.at, then divide."""
    t, th, tw = tiles.shape
    idx = np.zeros(t, dtype=np.int64) if image_index is None else np.asarray(image_index)
    n = int(idx.max()) + 1
    total = np.zeros((n, *size))
    count = np.zeros((n, *size))
    rr, cc = np.meshgrid(np.arange(th), np.arange(tw), indexing="ij")
    for k, (r, c) in enumerate(np.asarray(offsets)):
        np.add.at(total, (idx[k], rr + r, cc + c), tiles[k].astype(np.float64))
        np.add.at(count, (idx[k], rr + r, cc + c), 1.0)
    return (total / count).astype(np.float32)


def test_stitch_of_uneven_overlapping_tiles_matches_the_numpy_reference(rng):
    offsets = ops.tile_offsets(50, 77, tile_size=(16, 20), tile_stride=(11, 13))
    tiles = rng.normal(size=(len(offsets), 16, 20)).astype(np.float32)
    got = ops.stitch(tiles, offsets, (50, 77))
    assert got.shape == (50, 77) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference(tiles, offsets, (50, 77))[0], rtol=1e-6, atol=1e-7)


def test_stitch_of_tiles_cut_from_one_image_gives_the_image_back(rng):
    image = rng.normal(size=(40, 64)).astype(np.float32)
    offsets = ops.tile_offsets(40, 64, tile_size=24, tile_stride=10)
    tiles = np.stack([image[r : r + 24, c : c + 24] for r, c in offsets])
    np.testing.assert_allclose(ops.stitch(tiles, offsets, (40, 64)), image, rtol=1e-6, atol=1e-6)


def test_single_tile_is_returned_unchanged(rng):
    tiles = rng.normal(size=(1, 9, 13)).astype(np.float32)
    np.testing.assert_array_equal(ops.stitch(tiles, [[0, 0]], (9, 13)), tiles[0])


def test_image_index_stitches_several_images_in_one_call(rng):
    offsets = ops.tile_offsets(30, 45, tile_size=20, tile_stride=12)
    both = np.concatenate([offsets, offsets[::-1]])
    image_index = np.repeat([0, 1], len(offsets))
    tiles = rng.normal(size=(len(both), 20, 20)).astype(np.float32)
    got = ops.stitch(tiles, both, (30, 45), image_index=image_index)
    assert got.shape == (2, 30, 45)
    np.testing.assert_allclose(got, reference(tiles, both, (30, 45), image_index), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got[0], ops.stitch(tiles[: len(offsets)], offsets, (30, 45)))


def test_non_contiguous_and_float64_tiles_give_the_same_result(rng):
    offsets = ops.tile_offsets(20, 20, tile_size=12, tile_stride=8)
    wide = rng.normal(size=(len(offsets), 12, 24)).astype(np.float32)
    strided = wide[:, :, ::2]
    want = ops.stitch(np.ascontiguousarray(strided), offsets, 20)
    np.testing.assert_array_equal(ops.stitch(strided, offsets, 20), want)
    np.testing.assert_array_equal(ops.stitch(strided.astype(np.float64), offsets, 20), want)


def test_torch_tiles_give_a_torch_map_and_threads_do_not_change_the_result(rng):
    offsets = ops.tile_offsets(70, 90, tile_size=32, tile_stride=19)
    tiles = rng.normal(size=(len(offsets), 32, 32)).astype(np.float32)
    want = ops.stitch(tiles, offsets, (70, 90), n_threads=1)
    got = ops.stitch(torch.from_numpy(tiles), torch.from_numpy(offsets), (70, 90), n_threads=4)
    assert isinstance(got, torch.Tensor)
    np.testing.assert_array_equal(got.numpy(), want)


def test_tile_offsets_cover_the_image_with_the_last_tile_flush_with_the_border():
    offsets = ops.tile_offsets(100, 50, tile_size=(32, 20), tile_stride=(30, 20))
    rows, cols = sorted(set(offsets[:, 0])), sorted(set(offsets[:, 1]))
    assert rows == [0, 30, 60, 68] and cols == [0, 20, 30]
    assert offsets.dtype == np.int64 and offsets.shape == (12, 2)
    assert offsets[:, 0].tolist() == sorted(offsets[:, 0].tolist())  # row-major order
    assert ops.tile_offsets(64, 64, 64).tolist() == [[0, 0]]
    assert ops.tile_offsets(10, 30, 10).tolist() == [[0, 0], [0, 10], [0, 20]]


def rx(text: str) -> str:
    return "^" + re.escape(text)


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        (
            {"size": (4, 9)},
            ValueError,
            "offsets: expected tiles covering every output pixel, got none covering pixel (row 0, col 8) of image 0",
        ),
        (
            {"offsets": [[0, 0], [0, 5]]},
            ValueError,
            "offsets: expected tiles of size (4, 4) inside the (4, 8) output, got offset (0, 5) for tile 1",
        ),
        ({"offsets": [[0, 0]]}, ValueError, "offsets: expected shape (T, 2) = (2, 2), got (1, 2)"),
        ({"offsets": [[0, 0], [-1, 6]]}, ValueError, "offsets: expected non-negative int64 values, got -1"),
        ({"offsets": [[0.0, 0.0], [0.0, 6.0]]}, TypeError, "offsets: expected integers, got dtype float64"),
        (
            {"image_index": [1, 1]},
            ValueError,
            "offsets: expected tiles covering every output pixel, got none covering pixel (row 0, col 0) of image 0",
        ),
        ({"image_index": [0]}, ValueError, "image_index: expected shape (T,) = (2,), got (1,)"),
        ({"image_index": [0, -1]}, ValueError, "image_index: expected non-negative int64 values, got -1"),
        ({"size": (4, 0)}, ValueError, "size: expected a positive integer, got 0"),
        ({"size": "big"}, TypeError, "size: expected an int or a pair of ints (rows, cols), got 'big'"),
        (
            {"tiles": np.zeros((2, 4), np.float32)},
            ValueError,
            "tiles: expected a 3-D array (T, th, tw), got shape (2, 4)",
        ),
        (
            {"tiles": np.zeros((2, 4, 4), np.int32)},
            TypeError,
            "tiles: expected a float32 array (T, th, tw), got dtype int32",
        ),
        ({"tiles": np.full((2, 4, 4), np.nan, np.float32)}, ValueError, "tiles: expected finite values, found NaN"),
        ({"n_threads": 0}, ValueError, "n_threads: expected"),
    ],
)
def test_bad_inputs_raise_errors_naming_the_argument(kwargs, exc, message):
    args = {"tiles": np.ones((2, 4, 4), np.float32), "offsets": [[0, 0], [0, 4]], "size": (4, 8)}
    args.update(kwargs)
    with pytest.raises(exc, match=rx(message)):
        ops.stitch(**args)


@pytest.mark.parametrize(
    ("args", "exc", "message"),
    [
        ((10, 10, 12), ValueError, "tile_size: expected at most the image size (10, 10), got (12, 12)"),
        (
            (10, 10, 4, 5),
            ValueError,
            "tile_stride: expected at most tile_size (4, 4) so that tiles leave no gaps, got (5, 5)",
        ),
        ((0, 10, 4), ValueError, "height: expected a positive integer, got 0"),
        ((10, 10, (4, 4, 4)), TypeError, "tile_size: expected an int or a pair of ints"),
        ((10, 10, 4, 0), ValueError, "tile_stride: expected a positive integer, got 0"),
    ],
)
def test_tile_offsets_bad_inputs_raise_errors_naming_the_argument(args, exc, message):
    with pytest.raises(exc, match=rx(message)):
        ops.tile_offsets(*args)
