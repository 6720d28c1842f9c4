import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from anomalox import ops


@pytest.mark.parametrize(
    "shape,size",
    [
        ((3, 28, 28), (224, 224)),
        ((2, 7, 13), (30, 11)),
        ((1, 50, 40), (17, 23)),
        ((2, 1, 1), (5, 4)),
        ((2, 9, 9), (9, 9)),
    ],
)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_upsample_equals_torch_interpolate(rng, shape, size, mode):
    maps = rng.standard_normal(shape).astype(np.float32)
    got = ops.upsample(maps, size, mode=mode)
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    ref = F.interpolate(torch.from_numpy(maps)[:, None], size=size, mode=mode, **kwargs)[:, 0].numpy()
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 224, 224), (3, 15, 40), (1, 3, 5), (1, 1, 1)])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 4.0])
def test_gaussian_blur_equals_scipy_reflect(rng, shape, sigma):
    maps = rng.standard_normal(shape).astype(np.float32)
    got = ops.gaussian_blur(maps, sigma=sigma)
    ref = np.stack([ndimage.gaussian_filter(m.astype(np.float64), sigma, mode="reflect", truncate=4.0) for m in maps])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_postprocess_accepts_torch_and_non_contiguous_maps(rng):
    maps = torch.from_numpy(rng.standard_normal((4, 20, 30)).astype(np.float32)).transpose(1, 2)
    up = ops.upsample(maps, 64)
    blurred = ops.gaussian_blur(up, 2.0)
    assert isinstance(blurred, torch.Tensor) and blurred.shape == (4, 64, 64)
    ref = F.interpolate(maps.contiguous()[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(up, ref, rtol=1e-5, atol=1e-5)


def test_postprocess_errors_name_the_argument():
    maps = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="size"):
        ops.upsample(maps, (0, 4))
    with pytest.raises(ValueError, match="mode"):
        ops.upsample(maps, 8, mode="bicubic")
    with pytest.raises(ValueError, match="sigma"):
        ops.gaussian_blur(maps, sigma=0)
    with pytest.raises(ValueError, match="maps: expected a 3-D"):
        ops.gaussian_blur(np.zeros((4, 4), np.float32))
