"""anomalox.distributed on a local Ray instance (loopback only, 2 CPUs, no dashboard).

References: the same detector in one process (``inspect`` for scores and maps, ``fit`` for the
fitted state and threshold), and the inputs themselves (every path exactly once in the output).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.base import clone

import anomalox
from anomalox.detectors import DFM, FRE, SPADE, PaDiM, PatchCore

ray = pytest.importorskip("ray", reason="anomalox.distributed needs ray[data] (requirements-dev.txt)")
from anomalox import distributed  # noqa: E402

COMMON = {"image_size": 64, "batch_size": 2, "n_threads": 2, "validation_fraction": 0.3, "contamination": 0.25}
# Ray's own deprecation notices (its DataContext reads deprecated settings of itself).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # A pipeline that stops making progress (a CPU deadlock) fails in 2 minutes, not Ray's 30.
    ctx.execution_no_progress_timeout_s = 120
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, images):
    """Training images (14 good) and a test folder (8 images) on disk, and one corrupt file."""
    good, test_good, test_bad = images
    root = tmp_path_factory.mktemp("ray")
    train, test = root / "train", root / "test"
    train.mkdir()
    test.mkdir()
    for i, img in enumerate(good):
        Image.fromarray(img).save(train / f"{i:03d}.png")
    for i, img in enumerate(list(test_good) + list(test_bad)):
        Image.fromarray(img).save(test / f"{i:03d}.png")
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return train, test, corrupt


@pytest.fixture(scope="module")
def model(folders):
    train, _, _ = folders
    return PaDiM(**COMMON).fit(train)


def rows_by_path(dataset):
    frame = dataset.to_pandas()
    assert frame["path"].is_unique, "an input was scored twice"
    return frame.set_index("path")


def test_score_equals_one_process_inspect(model, folders, tmp_path):
    _, test, corrupt = folders
    paths = sorted(str(p) for p in test.iterdir()) + [str(corrupt)]
    frame = rows_by_path(
        distributed.score(model, paths, num_actors=2, cpus_per_actor=1, batch_size=3, maps_dir=tmp_path)
    )
    assert sorted(frame.index) == sorted(paths)
    found = model.inspect(paths[:-1])
    got = frame.loc[paths[:-1]]
    np.testing.assert_allclose(got["score"].to_numpy(), found.scores, rtol=1e-5)
    np.testing.assert_array_equal(got["label"].to_numpy(), found.labels)
    assert got["error"].isna().all()
    for path, amap in zip(paths[:-1], found.maps):
        np.testing.assert_allclose(np.load(got.loc[path, "map_path"]), amap, rtol=1e-5, atol=1e-5 * amap.max())
    bad = frame.loc[str(corrupt)]
    assert np.isnan(bad["score"]) and bad["label"] == -1 and "corrupt.png" in bad["error"]


def test_score_from_a_model_file_and_a_dataset_with_images(model, folders, tmp_path):
    _, test, _ = folders
    path = model.save(tmp_path / "model.safetensors")
    dataset = ray.data.read_images(str(test), include_paths=True, mode="RGB")
    # The read tasks need a CPU beside the pool: the default leaves one (1 actor x 1 CPU here).
    frame = rows_by_path(distributed.score(path, dataset, cpus_per_actor=1, batch_size=4))
    assert len(frame) == 8
    # read_images gives paths without the leading "/" of the local file system on some versions.
    local = {os.path.basename(p): p for p in frame.index}
    ordered = [local[f"{i:03d}.png"] for i in range(8)]
    found = model.inspect(sorted(str(p) for p in test.iterdir()))
    np.testing.assert_allclose(frame.loc[ordered, "score"].to_numpy(), found.scores, rtol=1e-5)
    written = distributed.score(path, test, output=str(tmp_path / "scores.csv"), batch_size=4)
    table = pd.concat(pd.read_csv(tmp_path / "scores.csv" / f) for f in os.listdir(written))
    assert len(table) == 8 and table["error"].isna().all()


def test_score_on_error_raise_stops_the_job(model, folders):
    _, test, corrupt = folders
    with pytest.raises(Exception, match="corrupt.png"):
        distributed.score(model, [str(corrupt)], on_error="raise").materialize()


def test_a_killed_actor_loses_and_repeats_no_image(model, folders, tmp_path):
    """SIGKILL one scoring actor's process mid-run (some maps written, not all): Ray starts a new
    actor and retries the dead one's batch; every image comes out once, scored as in one process."""
    train, test, _ = folders
    paths = [str(p) for p in sorted(train.iterdir())] * 6 + [str(p) for p in sorted(test.iterdir())] * 6
    # Unique paths (the same image under many names) so that duplicates would show.
    root = train.parent / "many"
    root.mkdir(exist_ok=True)
    unique = []
    for i, p in enumerate(paths):
        target = root / f"{i:04d}.png"
        if not target.exists():
            os.symlink(p, target)
        unique.append(str(target))
    maps = tmp_path / "maps"
    killed: list[int] = []
    written_at_kill: list[int] = []

    def kill_one() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            done = len(list(maps.glob("*.npy"))) if maps.is_dir() else 0
            if done >= 10:
                for info in ray._private.state.actors().values():
                    if "_Scorer" in info["ActorClassName"] and info["State"] == "ALIVE":
                        os.kill(info["Pid"], signal.SIGKILL)
                        killed.append(info["Pid"])
                        written_at_kill.append(done)
                        return
            time.sleep(0.05)

    thread = threading.Thread(target=kill_one)
    thread.start()
    frame = rows_by_path(distributed.score(model, unique, num_actors=2, cpus_per_actor=1, batch_size=2, maps_dir=maps))
    thread.join()
    assert killed, "no scoring actor was killed"
    assert written_at_kill[0] < len(unique), "the actor was killed after the run had finished"
    assert sorted(frame.index) == sorted(unique)
    assert frame["error"].isna().all()
    assert len(list(maps.glob("*.npy"))) == len(unique) and not list(maps.glob("*.partial.npy"))
    np.testing.assert_allclose(frame.loc[unique, "score"], model.decision_function(paths), rtol=1e-5)


@pytest.mark.parametrize(
    "detector",
    [PaDiM(**COMMON), SPADE(top_k_images=3, **COMMON), DFM(pooling_kernel_size=1, **COMMON)],
    ids=["padim", "spade", "dfm"],
)
def test_distributed_fit_equals_one_fit(detector, folders):
    train, test, _ = folders
    one = clone(detector).fit(train)
    # 10 learned images (4 held out) in shards of 4 / 3 / 3: batches differ from one pass, so
    # features differ at float32 rounding; the tolerance is 1e-4.
    merged = distributed.fit(detector, train, shards=3)
    assert merged.threshold_ == pytest.approx(one.threshold_, rel=1e-4)
    np.testing.assert_allclose(merged.calibration_scores_, one.calibration_scores_, rtol=1e-4)
    np.testing.assert_allclose(merged.decision_function(test), one.decision_function(test), rtol=1e-4)


def test_distributed_fit_fixes_one_seed_for_all_shards(folders):
    """random_state=None would draw other PaDiM channels in every shard: one seed is drawn for all."""
    train, test, _ = folders
    merged = distributed.fit(PaDiM(**{**COMMON, "random_state": None}), train, shards=2)
    assert isinstance(merged.random_state, int)
    again = PaDiM(**{**COMMON, "random_state": merged.random_state}).fit(train)
    np.testing.assert_allclose(merged.decision_function(test), again.decision_function(test), rtol=1e-4)


def test_distributed_cross_fitting(folders):
    train, test, _ = folders
    detector = PaDiM(**{**COMMON, "calibration": "cv", "n_folds": 3, "contamination": 0.1})
    one = clone(detector).fit(train)
    merged = distributed.fit(detector, train, shards=3)
    np.testing.assert_allclose(merged.calibration_scores_, one.calibration_scores_, rtol=1e-4)
    assert merged.threshold_ == pytest.approx(one.threshold_, rel=1e-4)
    np.testing.assert_allclose(merged.decision_function(test), one.decision_function(test), rtol=1e-5)


def test_distributed_patchcore_fit(folders):
    train, test, _ = folders
    detector = PatchCore(coreset_ratio=0.1, **COMMON)
    one = clone(detector).fit(train)
    merged = distributed.fit(detector, train, shards=2)
    assert merged.memory_bank_.shape == one.memory_bank_.shape
    assert merged.threshold_ is not None
    scores = merged.decision_function(test)
    assert scores[4:].min() > scores[:4].max()


def test_fit_many_fails_only_the_bad_product(folders, tmp_path):
    train, test, corrupt = folders
    good_paths = sorted(str(p) for p in train.iterdir())
    products = {"plain": train, "broken": good_paths[:6] + [str(corrupt)], "tiny": good_paths[:1]}
    frame = distributed.fit_many(products, PaDiM(**COMMON), tmp_path)
    assert list(frame["product"]) == ["plain", "broken", "tiny"]
    plain = frame.iloc[0]
    assert pd.isna(plain["error"]) and os.path.getsize(plain["path"]) == plain["size_bytes"]
    reference = PaDiM(**COMMON).fit(train)
    loaded = anomalox.load(plain["path"])
    np.testing.assert_allclose(loaded.decision_function(test), reference.decision_function(test), rtol=1e-5)
    assert plain["threshold"] == pytest.approx(reference.threshold_, rel=1e-5)
    assert "corrupt.png" in frame.iloc[1]["error"] and pd.isna(frame.iloc[1]["path"])
    assert "at least 2 training images" in frame.iloc[2]["error"]
    assert not (tmp_path / "broken.safetensors").exists()
    # An existing model file is never replaced silently.
    again = distributed.fit_many({"plain": train}, PaDiM(**COMMON), tmp_path, as_frame=False)
    assert "exists" in again[0]["error"] and "overwrite=True" in again[0]["error"]


def test_argument_errors(model, folders, tmp_path):
    train, test, _ = folders
    with pytest.raises(ValueError, match="on_error: expected 'row' or 'raise'"):
        distributed.score(model, test, on_error="skip")
    with pytest.raises(ValueError, match="cpus_per_actor: expected a positive int"):
        distributed.score(model, test, cpus_per_actor=0)
    with pytest.raises(ValueError, match="model: expected a fitted detector"):
        distributed.score(42, test)
    with pytest.raises(ValueError, match="images: expected a folder"):
        distributed.score(model, 3.5)
    with pytest.raises(TypeError, match="FRE cannot learn from shards"):
        distributed.fit(FRE(), train)
    with pytest.raises(ValueError, match="fanout: expected an int >= 2"):
        distributed.fit(PaDiM(), train, fanout=1)
    with pytest.raises(ValueError, match="products: names become file names"):
        distributed.fit_many({"a/b": train}, PaDiM(), tmp_path)
