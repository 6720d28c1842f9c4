"""Image loading and preprocessing, checked against plain numpy arithmetic, Pillow and torchvision."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalox.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, to_float_batches

Image = pytest.importorskip("PIL.Image")
tv_functional = pytest.importorskip("torchvision.transforms.v2.functional")


def as_nchw(x: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) float numpy -> (N, C, H, W) tensor: the expected layout, by hand."""
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).float()


def single(images) -> torch.Tensor:
    batches = to_float_batches(images)
    assert len(batches) == 1
    return batches[0]


@pytest.fixture
def rgb_u8(rng):
    return rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)


def test_numpy_hwc_uint8_is_divided_by_255(rgb_u8):
    expected = as_nchw(rgb_u8[None].astype(np.float64) / 255.0)
    assert torch.allclose(single(rgb_u8), expected, atol=1e-7)


def test_numpy_uint16_is_divided_by_65535(rng):
    img = rng.integers(0, 65536, size=(20, 30, 3), dtype=np.uint16)
    assert torch.allclose(single(img), as_nchw(img[None] / 65535.0), atol=1e-7)
    big_endian = img.astype(">u2")
    assert torch.allclose(single(big_endian), as_nchw(img[None] / 65535.0), atol=1e-7)


def test_numpy_floats_are_taken_as_unit_range(rng):
    img = rng.random((20, 30, 3))  # float64
    assert torch.allclose(single(img), as_nchw(img[None]), atol=1e-7)


def test_numpy_2d_is_one_grayscale_image_replicated(rng):
    gray = rng.integers(0, 256, size=(20, 30), dtype=np.uint8)
    out = single(gray)
    assert out.shape == (1, 3, 20, 30)
    for c in range(3):
        assert torch.allclose(out[0, c], torch.from_numpy(gray / 255.0).float())


def test_numpy_3d_last_axis_decides_image_or_grayscale_batch(rng):
    one = rng.random((20, 30, 1))
    assert single(one).shape == (1, 3, 20, 30)
    rgba = rng.random((20, 30, 4))
    assert torch.allclose(single(rgba), as_nchw(rgba[None, :, :, :3]))  # alpha dropped
    batch = rng.random((5, 20, 30))  # last axis 30: five grayscale images
    out = single(batch)
    assert out.shape == (5, 3, 20, 30)
    assert torch.allclose(out[:, 2], torch.from_numpy(batch).float())


def test_numpy_4d_is_nhwc(rng):
    batch = rng.integers(0, 256, size=(4, 20, 30, 3), dtype=np.uint8)
    assert torch.allclose(single(batch), as_nchw(batch / 255.0), atol=1e-7)
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        to_float_batches(rng.random((4, 20, 30, 5)))


def test_torch_chw_and_nchw(rgb_u8):
    chw = torch.from_numpy(rgb_u8).permute(2, 0, 1)
    expected = as_nchw(rgb_u8[None] / 255.0)
    assert torch.allclose(single(chw), expected, atol=1e-7)
    assert torch.allclose(single(chw[None].float() / 255), expected, atol=1e-7)
    gray = chw[:1]
    assert torch.equal(single(gray)[0, 1], gray[0].float() / 255)
    u16 = (chw.to(torch.int32) * 257).to(torch.uint16)
    assert torch.allclose(single(u16), expected, atol=1e-7)


def test_pil_images_and_paths(rgb_u8, tmp_path):
    rgb = Image.fromarray(rgb_u8)
    expected = as_nchw(rgb_u8[None] / 255.0)
    assert torch.allclose(single(rgb), expected, atol=1e-7)
    rgba = Image.fromarray(np.dstack([rgb_u8, np.full(rgb_u8.shape[:2], 7, np.uint8)]), mode="RGBA")
    assert torch.allclose(single(rgba), expected, atol=1e-7)
    gray = Image.fromarray(rgb_u8[:, :, 0])
    assert torch.allclose(single(gray)[0, 2], torch.from_numpy(rgb_u8[:, :, 0] / 255.0).float())
    path = tmp_path / "image.png"
    rgb.save(path)
    assert torch.allclose(single(str(path)), expected, atol=1e-7)
    assert torch.allclose(single(path), expected, atol=1e-7)


def test_16_bit_png_keeps_its_depth(rng, tmp_path):
    img = rng.integers(0, 65536, size=(20, 30), dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(img).save(path)
    with Image.open(path) as check:
        assert check.mode in ("I;16", "I")  # Pillow's mode for 16-bit grayscale PNGs
    out = single(path)
    assert torch.allclose(out[0, 0], torch.from_numpy(img / 65535.0).float(), atol=1e-7)


def test_list_of_mixed_inputs_is_one_batch_per_item(rng, rgb_u8):
    items = [rgb_u8, torch.rand(2, 3, 8, 9), Image.fromarray(rgb_u8)]
    batches = to_float_batches(items)
    assert [tuple(b.shape) for b in batches] == [(1, 3, 20, 30), (2, 3, 8, 9), (1, 3, 20, 30)]
    out = Preprocessing(image_size=16)(items)
    assert out.shape == (4, 3, 16, 16)


def test_resize_crop_and_normalise_match_torchvision(rng):
    img = rng.random((2, 3, 70, 90)).astype(np.float32)
    prep = Preprocessing(image_size=(64, 80), center_crop=(50, 61))
    x = torch.from_numpy(img)
    expected = tv_functional.resize(x, [64, 80], antialias=True)
    expected = tv_functional.center_crop(expected, [50, 61])
    expected = tv_functional.normalize(expected, list(IMAGENET_MEAN), list(IMAGENET_STD))
    out = prep(x)
    assert out.shape == (2, 3, 50, 61) and out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-5)
    assert prep.output_size == (50, 61)


def test_symmetric_normalisation_maps_unit_range_to_minus_one_one():
    prep = Preprocessing(image_size=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = prep([torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)])
    assert torch.equal(out[0], torch.full((3, 4, 4), -1.0))
    assert torch.equal(out[1], torch.full((3, 4, 4), 1.0))


def test_same_size_input_is_not_resampled(rng):
    x = torch.from_numpy(rng.random((1, 3, 32, 32)).astype(np.float32))
    out = Preprocessing(image_size=32, mean=(0, 0, 0), std=(1, 1, 1))(x)
    assert torch.equal(out, x)


def test_bad_inputs_are_named(rng, tmp_path):
    with pytest.raises(TypeError, match="dtype int32"):
        to_float_batches(np.zeros((4, 4), np.int32))
    with pytest.raises(TypeError, match="dtype torch.int64"):
        to_float_batches(torch.zeros(3, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="got shape"):
        to_float_batches(np.zeros((1, 2, 3, 4, 5), np.float32))
    with pytest.raises(ValueError, match=r"\(C, H, W\) or \(N, C, H, W\)"):
        to_float_batches(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"\(C, H, W\) or \(N, C, H, W\)"):
        to_float_batches(torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="empty"):
        to_float_batches([])
    with pytest.raises(TypeError, match="got dict"):
        to_float_batches({"a": 1})
    with pytest.raises(FileNotFoundError, match="missing.png"):
        to_float_batches(tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="junk.png"):
        to_float_batches(str(junk))
    with pytest.raises(ValueError, match="image_size"):
        Preprocessing(image_size=0)
    with pytest.raises(ValueError, match="center_crop"):
        Preprocessing(image_size=10, center_crop=11)


# ------------------------------------------------------------- aspect-preserving and native sizes
def test_resized_size_keeps_the_aspect_ratio_with_the_short_side_given():
    prep = Preprocessing(image_size=64, keep_aspect_ratio=True)
    assert prep.resized_size(96, 320) == (64, 213)  # 213.3
    assert prep.resized_size(320, 96) == (213, 64)
    assert prep.resized_size(60, 100) == (64, 106)  # 106.7: truncated, as torchvision
    assert prep.resized_size(50, 50) == (64, 64)
    assert not prep.fixed_size
    assert Preprocessing(image_size=64).resized_size(96, 320) == (64, 64)
    assert Preprocessing(image_size=(40, 50)).map_size(96, 320) == (40, 50)
    assert Preprocessing(image_size=64, keep_aspect_ratio=True, center_crop=48).map_size(96, 320) == (48, 48)


@pytest.mark.parametrize("size", [(96, 320), (320, 96), (60, 100), (100, 60), (37, 91), (90, 301), (64, 64)])
def test_keep_aspect_ratio_gives_torchvision_resize_int_sizes(size):
    x = torch.zeros(1, 3, *size)
    assert tuple(tv_functional.resize(x, [64], antialias=True).shape[-2:]) == (
        Preprocessing(image_size=64, keep_aspect_ratio=True).resized_size(*size)
    )


def test_image_size_none_keeps_each_image_as_it_is(rng):
    prep = Preprocessing(image_size=None, mean=(0, 0, 0), std=(1, 1, 1))
    assert prep.resized_size(37, 91) == (37, 91) and not prep.fixed_size
    x = torch.from_numpy(rng.random((1, 3, 37, 91)).astype(np.float32))
    out, sizes = prep.transform(x)
    assert torch.equal(out, x) and sizes == [(37, 91)]
    with pytest.raises(ValueError, match="output_size: the size depends on each image"):
        _ = prep.output_size
    with pytest.raises(ValueError, match="output_size"):
        _ = Preprocessing(image_size=32, keep_aspect_ratio=True).output_size
    assert Preprocessing(image_size=None, center_crop=(20, 30)).output_size == (20, 30)


def test_keep_aspect_ratio_needs_an_int_image_size():
    with pytest.raises(ValueError, match="keep_aspect_ratio: True needs an int image_size"):
        Preprocessing(image_size=(64, 80), keep_aspect_ratio=True)
    Preprocessing(image_size=None, keep_aspect_ratio=True)  # nothing to resize: allowed


def test_transform_refuses_images_that_come_out_at_different_sizes(rng):
    a = rng.integers(0, 256, (96, 320, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (120, 80, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="2 different sizes.*transform_each"):
        Preprocessing(image_size=64, keep_aspect_ratio=True).transform([a, b])
    with pytest.raises(ValueError, match="transform_each"):
        Preprocessing(image_size=None).transform([a, b])
    # Equal aspect ratios, or a fixed size, still make one batch.
    assert Preprocessing(image_size=64, keep_aspect_ratio=True)([a, a]).shape == (2, 3, 64, 213)
    assert Preprocessing(image_size=64)([a, b]).shape == (2, 3, 64, 64)


def test_transform_each_resizes_and_normalises_every_image_alone(rng):
    a = rng.integers(0, 256, (96, 320, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (120, 80, 3), dtype=np.uint8)
    c = rng.random((2, 3, 50, 70)).astype(np.float32)  # one item holding two images
    prep = Preprocessing(image_size=64, keep_aspect_ratio=True)
    out, sizes = prep.transform_each([a, b, torch.from_numpy(c)])
    assert sizes == [(96, 320), (120, 80), (50, 70), (50, 70)]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    units = [as_nchw(a[None] / 255.0), as_nchw(b[None] / 255.0), torch.from_numpy(c[:1]), torch.from_numpy(c[1:])]
    shapes = [(64, 213), (96, 64), (64, 89), (64, 89)]
    assert len(out) == 4
    for got, unit, shape in zip(out, units, shapes):
        resized = torch.nn.functional.interpolate(
            unit, size=shape, mode="bilinear", align_corners=False, antialias=True
        )
        expected = (resized[0] - mean) / std
        assert got.shape == (3, *shape) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
