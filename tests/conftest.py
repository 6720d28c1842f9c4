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
