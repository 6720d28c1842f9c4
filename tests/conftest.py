import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def brute_force_sqdist(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Exact squared distances in float64 (the independent reference for kNN)."""
    q = queries.astype(np.float64)
    b = bank.astype(np.float64)
    return ((q[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def greedy_k_center(x: np.ndarray, size: int, start: int) -> list[int]:
    """Textbook farthest-point selection in float64, ties to the lowest index."""
    x = x.astype(np.float64)
    selected = [start]
    min_d = ((x - x[start]) ** 2).sum(1)
    min_d[start] = 0.0
    while len(selected) < size:
        nxt = int(np.argmax(min_d))
        selected.append(nxt)
        min_d = np.minimum(min_d, ((x - x[nxt]) ** 2).sum(1))
        min_d[nxt] = 0.0
    return selected


# ---------------------------------------------------------------- synthetic inspection images
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

SIZE = 64


def texture(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A smooth random gray texture, uint8 (H, W, 3)."""
    noise = torch.from_numpy(rng.random((1, 1, size // 8, size // 8), dtype=np.float32))
    smooth = F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
    img = (60 + 120 * smooth + rng.normal(0, 3, (size, size))).clip(0, 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=2)


def with_spot(img: np.ndarray) -> np.ndarray:
    out = img.copy()
    out[20:34, 24:38] = 250
    return out


@pytest.fixture(scope="session")
def images():
    """Synthetic 64 px textures: 14 good for training, 4 good and 4 with a bright spot for testing."""
    rng = np.random.default_rng(7)
    good = np.stack([texture(rng) for _ in range(14)])
    test_good = np.stack([texture(rng) for _ in range(4)])
    test_bad = np.stack([with_spot(texture(rng)) for _ in range(4)])
    return good, test_good, test_bad


@pytest.fixture(scope="session")
def mvtec(tmp_path_factory, images):
    """A tiny MVTec-layout category on disk."""
    good, test_good, test_bad = images
    root = tmp_path_factory.mktemp("category")
    for sub in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (root / sub).mkdir(parents=True)
    for i, img in enumerate(good):
        Image.fromarray(img).save(root / "train/good" / f"{i:03d}.png")
    for i, img in enumerate(test_good):
        Image.fromarray(img).save(root / "test/good" / f"{i:03d}.png")
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[20:34, 24:38] = 255
    for i, img in enumerate(test_bad):
        Image.fromarray(img).save(root / "test/spot" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "ground_truth/spot" / f"{i:03d}_mask.png")
    (root / "train/good/notes.txt").write_text("not an image")
    return root
