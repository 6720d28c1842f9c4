"""SPADE (Cohen & Hoshen 2020, "Sub-Image Anomaly Detection with Deep Pyramid Correspondences")."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from anomalox import ops
from anomalox.detectors._base import BaseDetector, as_rows, stack_taps
from anomalox.params import POSITIVE_INT


def _deepest(features: dict[str, torch.Tensor]) -> str:
    """The tap with the coarsest grid (the last such in ``layers`` on a tie)."""
    names = list(features)
    return min(reversed(names), key=lambda n: features[n].shape[-2] * features[n].shape[-1])


class SPADE(BaseDetector):
    """SPADE anomaly detector: kNN over whole images, then over the patches of the nearest ones.

    Image level: each image's global feature is the global average pool of the deepest of the
    chosen taps (the coarsest grid; the paper pools ResNet ``layer4``, which is not in the default
    ResNet taps: add it to ``layers`` to follow the paper, at the cost of stacking it into the
    patch features too). The image score is the mean Euclidean distance to the ``top_k_images``
    nearest training images' global features (capped at the number of training images).

    Pixel level: patch features are the taps resized bilinearly to the first tap's grid (list the
    shallowest first) and concatenated, without pooling. A test patch's score is the mean
    Euclidean distance to its ``num_neighbors`` nearest patches among all the positions of the
    ``top_k_images`` nearest training images. Maps are upsampled and smoothed (sigma 4).

    Memory: every training image's patch features are kept, O(N · C · h · w) float32
    (``train_maps_``), e.g. 200 images at 256 px with the default Lite taps (152 × 32 × 32): about 125 MB.

    Mergeable (``partial_fit``, ``merge``, ``anomalox.distributed.fit``): the shards' galleries
    concatenate, exactly, in merge order; a partial state is the shard's share of the memory above.

    Parameters
    ----------
    backbone : str
        See ``anomalox.backbone.BACKBONES``; default ``"efficientnet_lite0"`` (bundled weights).
    layers : sequence of str, optional
        Taps, shallowest first; default Lite: ``("_blocks.4", "_blocks.10")``, ResNets:
        ``("layer1", "layer2", "layer3")``.
    top_k_images : int
        Nearest training images: averaged for the image score, and the patch gallery of the map.
    num_neighbors : int
        Nearest gallery patches averaged for a patch's score (the paper: 1).
    <shared parameters>

    Attributes
    ----------
    train_global_ : (N, C_global) float32 array
    train_maps_ : (N, C, h, w) float32 array
    global_layer_ : str
        The tap pooled into the global features.
    input_size_ : (height, width) or None
        The preprocessed image size of the training images (untiled: every image must come out at
        it, since ``train_maps_`` has one grid); None when tiled (tiles have one size, images any).
    threshold_, pixel_threshold_ : float or None
    calibration_scores_, pixel_calibration_scores_ : (n,) float32 array or None
        The calibration images' scores and maximum map values the thresholds come from.
    backbone_ : anomalox.Backbone

    Examples
    --------
    >>> model = SPADE(top_k_images=5).fit("magnetic_tile/train/good")
    >>> maps = model.anomaly_map(["tile_1.png", "tile_2.png"])
    """

    learned_attributes = ("train_global_", "train_maps_", "global_layer_", "input_size_")
    _learned_defaults = {"input_size_": None}
    one_size_untiled = True
    mergeable = True
    _default_layers = {"efficientnet_lite": ("_blocks.4", "_blocks.10"), "resnet": ("layer1", "layer2", "layer3")}
    _parameter_constraints = {"top_k_images": [POSITIVE_INT], "num_neighbors": [POSITIVE_INT]}

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: Any = None,
        top_k_images: int = 50,
        num_neighbors: int = 1,
        image_size: Any = 256,
        crop_size: Any = None,
        keep_aspect_ratio: bool = False,
        tile_size: Any = None,
        tile_stride: Any = None,
        weights: Any = None,
        device: str = "cpu",
        preprocessing: Any = None,
        batch_size: int = 4,
        validation_fraction: float = 0.1,
        contamination: float = 0.01,
        calibration: str = "holdout",
        n_folds: int = 5,
        random_state: Any = 0,
        n_threads: int | None = None,
        verbose: bool = False,
    ) -> None:
        self.backbone = backbone
        self.layers = layers
        self.top_k_images = top_k_images
        self.num_neighbors = num_neighbors
        self.image_size = image_size
        self.crop_size = crop_size
        self.keep_aspect_ratio = keep_aspect_ratio
        self.tile_size = tile_size
        self.tile_stride = tile_stride
        self.weights = weights
        self.device = device
        self.preprocessing = preprocessing
        self.batch_size = batch_size
        self.validation_fraction = validation_fraction
        self.contamination = contamination
        self.calibration = calibration
        self.n_folds = n_folds
        self.random_state = random_state
        self.n_threads = n_threads
        self.verbose = verbose

    def _fit_features(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, Any]:
        return self._finish_partial(self._partial_features(batches))

    def _partial_features(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, Any]:
        global_parts: list[np.ndarray] = []
        map_parts: list[np.ndarray] = []
        name = None
        for feats in batches:
            name = _deepest(feats) if name is None else name
            global_parts.append(feats[name].mean(dim=(-2, -1)).numpy())
            map_parts.append(stack_taps(feats, tuple(feats), pool=0).numpy())
        return {
            "train_global": np.ascontiguousarray(np.concatenate(global_parts), dtype=np.float32),
            "train_maps": np.ascontiguousarray(np.concatenate(map_parts), dtype=np.float32),
            "global_layer": name,
        }

    def _merge_partials(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        # The galleries concatenate (exact: nothing is selected).
        if a["global_layer"] != b["global_layer"] or a["train_maps"].shape[1:] != b["train_maps"].shape[1:]:
            raise ValueError(
                f"other: SPADE partial states of patch features {a['train_maps'].shape[1:]} and "
                f"{b['train_maps'].shape[1:]} cannot merge (another backbone, layers or image size)"
            )
        return {
            "train_global": np.concatenate([a["train_global"], b["train_global"]]),
            "train_maps": np.concatenate([a["train_maps"], b["train_maps"]]),
            "global_layer": a["global_layer"],
        }

    def _finish_partial(self, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "train_global_": data["train_global"],
            "train_maps_": data["train_maps"],
            "global_layer_": data["global_layer"],
        }

    def _score_features(self, features: dict[str, torch.Tensor]) -> tuple[np.ndarray, torch.Tensor]:
        embedding = stack_taps(features, tuple(features), pool=0)
        n, width, h, w = embedding.shape
        train_maps = torch.from_numpy(self.train_maps_)
        if tuple(train_maps.shape[1:]) != (width, h, w):
            raise ValueError(
                f"X: the backbone gives patch features of shape {(width, h, w)} but train_maps_ holds "
                f"{tuple(train_maps.shape[1:])}; the detector was changed after fit: refit it"
            )
        query = features[self.global_layer_].mean(dim=(-2, -1)).contiguous()
        k = min(int(self.top_k_images), train_maps.shape[0])
        dist, nearest = ops.knn(query, torch.from_numpy(self.train_global_), k, n_threads=self.n_threads)
        scores = dist.mean(dim=1)
        maps = torch.empty(n, h, w)
        k_patch = min(int(self.num_neighbors), k * h * w)
        for i in range(n):
            gallery = as_rows(train_maps[nearest[i]])
            patch_dist, _ = ops.knn(as_rows(embedding[i : i + 1]), gallery, k_patch, n_threads=self.n_threads)
            maps[i] = patch_dist.mean(dim=1).reshape(h, w)
        return scores.numpy(), maps

    def _summary(self) -> str:
        n, c, h, w = self.train_maps_.shape
        width = self.train_global_.shape[1]
        return f"{n:,} training images, patch features {c} x {h} x {w}, global {width} ({self.global_layer_})"
