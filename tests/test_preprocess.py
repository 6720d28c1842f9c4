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
