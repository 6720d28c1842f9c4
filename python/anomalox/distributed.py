"""Scale-out on Ray: scoring at scale, mergeable fitting, one model per product.

Needs Ray (``pip install 'anomalox[ray]'``, which pulls in ``ray[data]``). Every function uses
the Ray instance the process is connected to: call ``ray.init()`` (a local instance) or
``ray.init(address="ray://head:10001")`` / ``ray.init(address="auto")`` (a cluster) first; without
either, Ray starts a local instance on first use.

- ``score(model, images)``: a Ray Data pipeline; each actor of a pool loads the model once and
  scores batches with ``n_threads`` equal to its CPUs. Rows: path, score, label, error (and the
  written map's path).
- ``fit(detector, images, shards=N)``: PaDiM, DFM, SPADE and PatchCore learn from shards of the
  images as Ray tasks (``shard_state``: the state ``partial_fit`` keeps), their partial states
  merge in a tree of Ray tasks, and the merged detector is calibrated with its own rule (hold-out,
  or cross-fitting run as Ray tasks).
- ``fit_many({name: images}, detector, output_dir)``: one model per product as Ray tasks, one
  model file each, a summary table back; one product's error fails only its row.

Where things go: models reach the workers through Ray's object store (a fitted detector is
serialised as its model file's bytes; a path to a model file is read by each actor, so it must be
on storage every node sees). Image paths are read by the workers: on a cluster they must name
files every node sees (a shared file system), or pass a ``ray.data.Dataset`` that holds the
images. ``fit_many`` writes its model files into ``output_dir``, which every node must be able to
write on a cluster (a shared or mounted folder).

Threads: an actor or task given ``c`` CPUs scores with ``n_threads=c`` and
``torch.set_num_threads(c)``, so rayon, libtorch and Ray's workers never run more threads than
the CPUs Ray assigned (Ray itself sets ``OMP_NUM_THREADS`` to the same number in its workers).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["fit", "fit_many", "score"]


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ImportError("anomalox.distributed needs Ray: pip install 'anomalox[ray]' (ray[data])") from exc
    return ray


def _positive_int(value: Any, name: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def _cluster_cpus(ray: Any) -> int:
    if not ray.is_initialized():
        ray.init()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _paths(images: Any, role: str, name: str = "images") -> list[str]:
    """A folder (MVTec layout honoured for `role`) or a sequence of paths, as a list of strings."""
    from anomalox.data import resolve_folder

    if isinstance(images, (str, os.PathLike)):
        if os.path.isdir(images):
            return resolve_folder(images, role)
        return [os.fspath(images)]
    if isinstance(images, Sequence) and all(isinstance(p, (str, os.PathLike)) for p in images):
        if not images:
            raise ValueError(f"{name}: expected at least one image path, got an empty sequence")
        return [os.fspath(p) for p in images]
    raise ValueError(
        f"{name}: expected a folder or a sequence of image paths{' or a ray.data.Dataset' if role == 'test' else ''}, "
        f"got {type(images).__name__}"
    )


# ----------------------------------------------------------------------------- models
def _payload(model: Any, ray: Any) -> tuple[str, Any]:
    """What actors load the model from: ("path", file every node reads) or ("bytes", object ref)."""
    from anomalox.detectors._base import BaseDetector

    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model: no such model file: {path!r}")
        return "path", path
    if isinstance(model, BaseDetector):
        model.check_is_fitted()
        with tempfile.TemporaryDirectory(prefix="anomalox-ray-") as folder:
            path = model.save(os.path.join(folder, "model.safetensors"))
            with open(path, "rb") as f:
                data = f.read()
        return "bytes", ray.put(data)
    raise ValueError(f"model: expected a fitted detector or the path of a model file, got {type(model).__name__}")


def _load(payload: tuple[str, Any], n_threads: int) -> Any:
    import torch

    import anomalox

    torch.set_num_threads(n_threads)
    kind, value = payload
    if kind == "path":
        model = anomalox.load(value)
    else:
        data = value if isinstance(value, bytes) else _ray().get(value)
        with tempfile.TemporaryDirectory(prefix="anomalox-ray-") as folder:
            path = os.path.join(folder, "model.safetensors")
            with open(path, "wb") as f:
                f.write(data)
            model = anomalox.load(path)
    model.set_params(n_threads=n_threads, verbose=False)
    return model


def _map_name(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0] or "image"
    return f"{stem}-{hashlib.sha1(path.encode()).hexdigest()[:12]}.npy"


class _Scorer:
    """A Ray Data actor: loads the model once, scores batches of rows {path[, image]}."""

    def __init__(self, payload: tuple[str, Any], n_threads: int, maps_dir: str | None, on_error: str) -> None:
        self.model = _load(payload, n_threads)
        self.maps_dir = maps_dir
        self.on_error = on_error

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from anomalox.preprocess import read_image

        paths = [str(p) for p in batch["path"]]
        held = batch.get("image")
        images: list[Any] = []
        errors: list[str | None] = []
        for i, path in enumerate(paths):
            try:
                images.append(np.asarray(held[i]) if held is not None else read_image(path))
                errors.append(None)
            except Exception as exc:
                if self.on_error == "raise":
                    raise
                images.append(None)
                errors.append(f"{type(exc).__name__}: {exc}")
        good = [i for i, e in enumerate(errors) if e is None]
        n = len(paths)
        scores = np.full(n, np.nan, dtype=np.float64)
        labels = np.full(n, -1, dtype=np.int64)
        map_paths: list[str | None] = [None] * n
        if good:
            try:
                found = self.model.inspect([images[i] for i in good])
            except Exception:
                if self.on_error == "raise":
                    raise
                # One image that fails the batch's pass fails only its row: score them one by one.
                for i in good:
                    try:
                        self._fill(i, self.model.inspect([images[i]]), 0, paths, scores, labels, map_paths)
                    except Exception as exc:
                        errors[i] = f"{type(exc).__name__}: {exc}"
                        scores[i], labels[i], map_paths[i] = np.nan, -1, None
            else:
                for k, i in enumerate(good):
                    try:
                        self._fill(i, found, k, paths, scores, labels, map_paths)
                    except Exception as exc:  # writing its map failed: fail the row
                        if self.on_error == "raise":
                            raise
                        errors[i] = f"{type(exc).__name__}: {exc}"
                        scores[i], labels[i], map_paths[i] = np.nan, -1, None
        out: dict[str, Any] = {
            "path": np.array(paths, dtype=object),
            "score": scores,
            "label": labels,
            "error": np.array(errors, dtype=object),
        }
        if self.maps_dir is not None:
            out["map_path"] = np.array(map_paths, dtype=object)
        return out

    def _fill(
        self,
        i: int,
        found: Any,
        k: int,
        paths: list[str],
        scores: np.ndarray,
        labels: np.ndarray,
        map_paths: list[str | None],
    ) -> None:
        scores[i] = float(found.scores[k])
        if found.labels is not None:
            labels[i] = int(found.labels[k])
        if self.maps_dir is not None:
            target = os.path.join(self.maps_dir, _map_name(paths[i]))
            partial = target + ".partial.npy"
            np.save(partial, np.asarray(found.maps[k], dtype=np.float32))
            os.replace(partial, target)
            map_paths[i] = target


def score(
    model: Any,
    images: Any,
    *,
    num_actors: int | None = None,
    cpus_per_actor: int = 2,
    batch_size: int = 16,
    maps_dir: str | os.PathLike[str] | None = None,
    on_error: str = "row",
    output: str | os.PathLike[str] | None = None,
) -> Any:
    """Score images on Ray: a Ray Data pipeline over an actor pool, one model load per actor.

    Parameters
    ----------
    model : fitted detector or str
        A detector (shipped through Ray's object store as its model file's bytes) or the path of
        a model file (``anomalox.save``), read by each actor: on storage every node sees.
    images : folder, sequence of paths or ray.data.Dataset
        A folder (an MVTec category: its ``test`` images) or paths, read by the actors; or a
        Dataset with a ``path`` column and optionally an ``image`` column (as
        ``ray.data.read_images(..., include_paths=True)`` gives; without it, the paths are read).
    num_actors : int, optional
        Actors in the pool; default the cluster's CPUs // ``cpus_per_actor`` (at least 1), one CPU
        fewer for a Dataset. A Dataset that reads files (``read_images``) runs Ray read tasks
        beside the actors, each needing a CPU: when the actors hold every CPU of the cluster the
        pipeline waits for ever, so leave one free (``num_actors * cpus_per_actor`` below the
        cluster's CPUs; the default raises when ``cpus_per_actor`` leaves none). Paths and folders
        are read by the actors themselves and need none.
    cpus_per_actor : int
        CPUs Ray reserves for each actor, and its scoring threads (``n_threads``).
    batch_size : int
        Images per actor call (per backbone pass when they share a size).
    maps_dir : folder, optional
        Write each image's anomaly map there as float32 ``.npy`` (``<stem>-<hash of path>.npy``),
        and its path in a ``map_path`` column; every node must be able to write it.
    on_error : {"row", "raise"}
        "row": an image that cannot be read or scored gets a NaN score, label -1 and its error
        message in ``error``; the others are scored. "raise": the first such error stops the job.
    output : str, optional
        Write the table there and return the path: a ``.csv`` name writes CSV files, any other a
        Parquet folder (Ray writes one file per block into the folder).

    Returns
    -------
    ray.data.Dataset (lazy; ``.to_pandas()``, ``.iter_rows()``, ``.write_parquet(...)``) with
    columns path, score (float64), label (0/1, -1 without a threshold or on error), error (None
    when scored) and map_path with ``maps_dir``; or ``output``'s path. Every input appears once:
    Ray restarts a dead actor and retries its batch, and a batch's rows come out only when it
    completes. Scores equal ``model.inspect`` in one process to float32 rounding of features
    computed in other batches and thread counts (1e-5).
    """
    ray = _ray()
    cpus = _positive_int(cpus_per_actor, "cpus_per_actor")
    actors = _positive_int(num_actors, "num_actors", allow_none=True)
    size = _positive_int(batch_size, "batch_size")
    assert cpus is not None and size is not None
    if on_error not in ("row", "raise"):
        raise ValueError(f"on_error: expected 'row' or 'raise', got {on_error!r}")
    if isinstance(images, ray.data.Dataset):
        dataset = images
        columns = dataset.schema().names
        if "path" not in columns:
            raise ValueError(
                f"images: a Dataset needs a 'path' column (read_images(..., include_paths=True)), got {columns}"
            )
        dataset = dataset.select_columns([c for c in ("path", "image") if c in columns])
    else:
        paths = _paths(images, "test")
        blocks = max(1, min(len(paths), -(-len(paths) // size)))
        dataset = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
    folder = None
    if maps_dir is not None:
        folder = os.path.abspath(os.fspath(maps_dir))
        os.makedirs(folder, exist_ok=True)
    if actors is None:
        # A Dataset may still read its files (read_images): its read tasks need a CPU beside the pool.
        total = _cluster_cpus(ray)
        spare = 1 if isinstance(images, ray.data.Dataset) else 0
        if total - spare < cpus:
            raise ValueError(
                f"cpus_per_actor: expected at most {total - spare} (the cluster's {total} CPUs, one left for the "
                f"Dataset's read tasks), got {cpus}; or pass paths, which the actors read themselves"
            )
        actors = (total - spare) // cpus
    payload = _payload(model, ray)
    scored = dataset.map_batches(
        _Scorer,
        fn_constructor_args=(payload, cpus, folder, on_error),
        batch_size=size,
        num_cpus=cpus,
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_format="numpy",
    )
    if output is None:
        return scored
    target = os.fspath(output)
    if target.endswith(".csv"):
        scored.write_csv(target)
    else:
        scored.write_parquet(target)
    return target


# ----------------------------------------------------------------------------- fitting
def _partial_task(detector: Any, paths: list[str], n_threads: int) -> dict[str, Any]:
    import torch
    from sklearn.base import clone

    torch.set_num_threads(n_threads)
    return clone(detector).set_params(n_threads=n_threads, verbose=False).shard_state(paths)


def _merge_task(detector: Any, *parts: dict[str, Any]) -> dict[str, Any]:
    return detector.merge_states(*parts)


def _fold_task(detector: Any, n_threads: int, held: list[str], *parts: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from sklearn.base import clone

    torch.set_num_threads(n_threads)
    fold = clone(detector).set_params(n_threads=n_threads, verbose=False).merge(*parts)
    return fold.calibration_values(held)


def _tree(merge: Any, detector: Any, refs: list[Any], fanout: int) -> Any:
    """One object ref of the merge of `refs`, merged `fanout` at a time in Ray tasks."""
    while len(refs) > 1:
        refs = [
            merge.remote(detector, *refs[i : i + fanout]) if len(refs[i : i + fanout]) > 1 else refs[i]
            for i in range(0, len(refs), fanout)
        ]
    return refs[0]


def _watch(ray: Any, refs: list[Any], desc: str, unit: str, verbose: bool) -> None:
    """Wait for `refs` with a progress bar (when `verbose`), in the order they finish."""
    if not verbose:
        return
    from tqdm import tqdm

    pending = list(refs)
    with tqdm(total=len(pending), desc=desc, unit=unit, leave=False) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(len(done))


def _chunks(indices: np.ndarray, count: int) -> list[np.ndarray]:
    return [c for c in np.array_split(indices, min(count, len(indices))) if len(c)]


def fit(
    detector: Any,
    images: Any,
    *,
    shards: int | None = None,
    cpus_per_shard: int = 1,
    fanout: int = 4,
) -> Any:
    """Fit a mergeable detector on Ray: shards as tasks, partial states merged in a tree.

    Each shard is a Ray task computing the partial state of its images (``shard_state``, with
    ``cpus_per_shard`` CPUs and as many threads); the partial states come back through Ray's
    object store and merge ``fanout`` at a time in Ray tasks until one is left, which a clone of
    `detector` adopts (``merge``). Then it is calibrated by its own rule:

    - ``calibration="holdout"``: the same ``validation_fraction`` of the images as ``fit`` holds
      out (same seed) are not learned from; the driver scores them for ``threshold_``.
    - ``calibration="cv"``: runs distributed. The images are split into the same ``n_folds``
      folds as ``fit``; each fold's shards are fitted once; fold k's model is the merge of the
      other folds' partial states and scores fold k in a Ray task; the final model is the merge
      of all. So ``n_folds`` partial passes replace ``fit``'s ``n_folds + 1`` fits.

    The result equals ``fit`` on the same training images for PaDiM and SPADE (exact merges; to
    float rounding) and DFM (exact sufficient statistics; 1e-4), and differs for PatchCore, whose
    shards keep twice ``coreset_ratio`` before one selection over their union (see its docstring).

    With the detector's ``verbose`` on, a progress bar counts finished shards (and folds).
    A ``random_state`` that is not an int (None, a Generator) is replaced by one seed drawn from
    it, in the tasks and in the returned detector (and its calibration split), so that every shard
    draws the same channels (PaDiM) and projection (PatchCore) and the fit can be repeated.

    Parameters
    ----------
    detector : PaDiM, DFM, SPADE or PatchCore
        Its parameters are used (it is cloned; the fitted clone is returned).
    images : folder or sequence of image paths
        Read by the workers: on a cluster, paths every node sees.
    shards : int, optional
        Default: the cluster's CPUs // ``cpus_per_shard``; at most one per training image. With
        cross-fitting, rounded up to a multiple of ``n_folds``.
    cpus_per_shard : int
    fanout : int >= 2
        Partial states merged per merge task.

    Returns
    -------
    The fitted detector (a clone of `detector`), with ``threshold_`` from its calibration rule.
    """
    ray = _ray()
    from sklearn.base import clone

    from anomalox.detectors._base import BaseDetector, seed_from

    if not isinstance(detector, BaseDetector):
        raise ValueError(f"detector: expected an anomalox detector, got {type(detector).__name__}")
    if not detector.mergeable:
        raise TypeError(
            f"detector: {type(detector).__name__} cannot learn from shards and merge (it trains a network); "
            f"mergeable detectors: PaDiM, DFM, SPADE and PatchCore"
        )
    detector.check_params()
    cpus = _positive_int(cpus_per_shard, "cpus_per_shard")
    count = _positive_int(shards, "shards", allow_none=True)
    assert cpus is not None
    if isinstance(fanout, bool) or not isinstance(fanout, (int, np.integer)) or fanout < 2:
        raise ValueError(f"fanout: expected an int >= 2, got {fanout!r}")
    paths = _paths(images, "train")
    if detector.calibration == "cv" and len(paths) < detector.n_folds:
        raise ValueError(
            f"images: calibration='cv' with n_folds={detector.n_folds} needs at least {detector.n_folds} images, "
            f"got {len(paths)}"
        )
    if count is None:
        count = max(1, _cluster_cpus(ray) // cpus)
    # What the tasks run: the detector's parameters, as many threads as the task's CPUs.
    template = clone(detector).set_params(verbose=False, n_threads=cpus)
    result = clone(detector)
    if not isinstance(detector.random_state, (int, np.integer)):
        # Every shard must draw the same channels / projection: one seed for all (None or a
        # Generator would draw anew in each task).
        seed = seed_from(detector.random_state)
        template.set_params(random_state=seed)
        result.set_params(random_state=seed)
    partial = ray.remote(num_cpus=cpus)(_partial_task)
    merge = ray.remote(num_cpus=cpus)(_merge_task)
    split = result.calibration_split(len(paths))  # with the seed fixed above
    if detector.calibration == "cv":
        # Fold k's model is the merge of the other folds' partial states: each fold is learned once.
        folds = [scored for _, scored in split]
        per_fold = max(1, -(-count // len(folds)))
        shard_refs = [
            [partial.remote(template, [paths[i] for i in chunk], cpus) for chunk in _chunks(fold, per_fold)]
            for fold in folds
        ]
        fold_refs = [_tree(merge, template, refs, fanout) for refs in shard_refs]
        scorer = ray.remote(num_cpus=cpus)(_fold_task)
        scored = [
            scorer.remote(template, cpus, [paths[i] for i in fold], *[r for j, r in enumerate(fold_refs) if j != k])
            for k, fold in enumerate(folds)
        ]
        final = _tree(merge, template, list(fold_refs), fanout)
        _watch(ray, [r for refs in shard_refs for r in refs], "fit: shards", "shard", detector.verbose)
        _watch(ray, scored, "fit: calibration folds", "fold", detector.verbose)
        values = ray.get(scored)
        result.merge(ray.get(final))
        result.set_threshold_from_values(np.concatenate([v[0] for v in values]), np.concatenate([v[1] for v in values]))
        return result
    ((learned, held),) = split
    refs = [partial.remote(template, [paths[i] for i in chunk], cpus) for chunk in _chunks(learned, count)]
    final = _tree(merge, template, refs, fanout)
    _watch(ray, refs, "fit: shards", "shard", detector.verbose)
    result.merge(ray.get(final))
    if len(held):
        result.set_threshold([paths[i] for i in held])
    return result


# ----------------------------------------------------------------------------- many products
SUMMARY_COLUMNS = ("product", "path", "n_images", "fit_s", "size_bytes", "threshold", "error")


def _fit_product(detector: Any, product: str, images: Any, target: str, n_threads: int) -> dict[str, Any]:
    import torch
    from sklearn.base import clone

    row: dict[str, Any] = dict.fromkeys(SUMMARY_COLUMNS)
    row["product"] = product
    start = time.perf_counter()
    try:
        torch.set_num_threads(n_threads)
        model = clone(detector).set_params(n_threads=n_threads, verbose=False)
        paths = _paths(images, "train", name=f"products[{product!r}]")
        model.fit(paths)
        row["fit_s"] = time.perf_counter() - start
        row["path"] = model.save(target)
        row["n_images"] = len(paths)
        row["size_bytes"] = os.path.getsize(target)
        row["threshold"] = model.threshold_
    except Exception as exc:
        row["fit_s"] = time.perf_counter() - start
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def fit_many(
    products: Mapping[str, Any],
    detector: Any,
    output_dir: str | os.PathLike[str],
    *,
    cpus_per_task: int = 1,
    overwrite: bool = False,
    as_frame: bool | None = None,
) -> Any:
    """Fit one model per product as Ray tasks; each writes ``<output_dir>/<product>.safetensors``.

    Parameters
    ----------
    products : mapping of name to a folder or a sequence of image paths
        Names become file names: letters, digits, ``-``, ``_`` and ``.`` only.
    detector : any anomalox detector
        Cloned per product (its parameters, ``n_threads`` set to ``cpus_per_task``).
    output_dir : folder
        Created if missing; on a cluster, a folder every node can write (shared or mounted).
    cpus_per_task : int
    overwrite : bool
        Replace existing model files; False (default) fails that product's row instead.
    as_frame : bool or None
        A pandas DataFrame (None: when pandas is installed) or a list of dicts.

    Returns
    -------
    One row per product, in the order given: product, path, n_images, fit_s, size_bytes,
    threshold, error (None when it worked). A product whose images fail (a corrupt file, too few
    images) gets its error in its row; the others are fitted. Ray retries a task whose worker
    died; the model file is written atomically, so a retry replaces a partial write.
    With the detector's ``verbose`` on, a progress bar counts finished products.
    """
    ray = _ray()
    import re

    from anomalox.detectors._base import BaseDetector

    if not isinstance(products, Mapping) or not products:
        raise ValueError(f"products: expected a non-empty mapping of product name to images, got {products!r}")
    for name in products:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
            raise ValueError(f"products: names become file names: letters, digits, '-', '_', '.' only, got {name!r}")
    if not isinstance(detector, BaseDetector):
        raise ValueError(f"detector: expected an anomalox detector, got {type(detector).__name__}")
    cpus = _positive_int(cpus_per_task, "cpus_per_task")
    assert cpus is not None
    if as_frame not in (None, True, False):
        raise TypeError(f"as_frame: expected True, False or None, got {as_frame!r}")
    folder = os.path.abspath(os.fspath(output_dir))
    os.makedirs(folder, exist_ok=True)
    task = ray.remote(num_cpus=cpus)(_fit_product)
    # Existing files are refused here, before any task: a task that Ray retries after its model
    # file was written must replace it, not report it as existing.
    refs: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name, images in products.items():
        target = os.path.join(folder, f"{name}.safetensors")
        if os.path.exists(target) and not overwrite:
            rows[name] = {
                **dict.fromkeys(SUMMARY_COLUMNS),
                "product": name,
                "error": f"FileExistsError: output_dir: {target!r} exists; pass overwrite=True to replace it",
            }
        else:
            refs[name] = task.remote(detector, name, images, target, cpus)
    _watch(ray, list(refs.values()), "fit_many", "product", detector.verbose)
    rows.update(zip(refs, ray.get(list(refs.values()))))
    ordered = [rows[name] for name in products]
    if as_frame is None or as_frame:
        try:
            import pandas as pd
        except ImportError:
            if as_frame:
                raise ImportError("as_frame=True needs pandas: pip install pandas") from None
            return ordered
        return pd.DataFrame(ordered, columns=list(SUMMARY_COLUMNS))
    return ordered
