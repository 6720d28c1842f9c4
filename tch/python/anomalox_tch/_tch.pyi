"""Type stubs for the tch extension. Use `anomalox.Backbone`, not this module directly."""

import os
from typing import Any, Literal

import torch

__version__: str
__torch_version__: str

def libtorch_num_threads() -> int: ...

class BackboneModel:
    def __init__(
        self,
        arch: str,
        family: Literal["efficientnet_lite", "resnet", "resnet_bottleneck"],
        config: dict[str, Any],
        state_dict: list[tuple[str, torch.Tensor]],
        cuda: int | None,
        n_threads: int,
        exclusive: bool = False,
    ) -> None: ...
    @staticmethod
    def from_safetensors(
        arch: str,
        family: Literal["efficientnet_lite", "resnet", "resnet_bottleneck"],
        config: dict[str, Any],
        path: str | os.PathLike[str],
        cuda: int | None,
        n_threads: int,
    ) -> BackboneModel: ...
    @property
    def arch(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def taps(self) -> list[tuple[str, int, int]]: ...
    @property
    def _taps_reached(self) -> int: ...
    def features(self, x: torch.Tensor, layers: list[str], n_threads: int) -> list[torch.Tensor]: ...
    def logits(self, x: torch.Tensor, n_threads: int) -> torch.Tensor: ...

class StfpmStudent:
    def __init__(
        self,
        arch: str,
        family: Literal["efficientnet_lite", "resnet", "resnet_bottleneck"],
        config: dict[str, Any],
        layers: list[str],
        seed: int,
        cuda: int | None,
        n_threads: int,
    ) -> None: ...
    @property
    def arch(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def taps(self) -> list[tuple[str, int, int]]: ...
    @property
    def step(self) -> int: ...
    def configure(
        self,
        optimizer: Literal["sgd", "adam", "adamw"],
        learning_rate: float,
        weight_decay: float,
        momentum: float,
        dampening: float,
        nesterov: bool,
        betas: tuple[float, float],
        eps: float,
        grad_clip_norm: float | None,
        schedule: Literal["constant", "cosine", "multistep"],
        total_steps: int,
    ) -> None: ...
    def train_epoch(
        self,
        images: torch.Tensor,
        teacher: list[torch.Tensor],
        order: list[int],
        batch_size: int,
        max_steps: int | None,
        n_threads: int,
    ) -> list[float]: ...
    def evaluate(self, images: torch.Tensor, teacher: list[torch.Tensor], batch_size: int, n_threads: int) -> float: ...
    def features(self, x: torch.Tensor, n_threads: int) -> list[torch.Tensor]: ...
    def state_dict(self) -> list[tuple[str, torch.Tensor]]: ...
    def load_state_dict(self, entries: list[tuple[str, torch.Tensor]]) -> None: ...

def stfpm_loss(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor: ...
def stfpm_map(
    teacher: list[torch.Tensor],
    student: list[torch.Tensor],
    size: tuple[int, int],
    combine: Literal["product", "sum"],
    n_threads: int,
) -> torch.Tensor: ...

class HeadModel:
    @staticmethod
    def reverse_distillation(
        arch: str,
        family: Literal["efficientnet_lite", "resnet", "resnet_bottleneck"],
        config: dict[str, Any],
        layers: list[str],
        seed: int,
        cuda: int | None,
        n_threads: int,
    ) -> HeadModel: ...
    @staticmethod
    def fre(
        arch: str,
        layer: str,
        channels: int,
        grid: tuple[int, int],
        pool: int,
        latent: int,
        seed: int,
        cuda: int | None,
        n_threads: int,
    ) -> HeadModel: ...
    @staticmethod
    def fastflow(
        arch: str,
        layers: list[str],
        channels: list[int],
        grids: list[tuple[int, int]],
        steps: int,
        hidden_ratio: float,
        conv3x3_only: bool,
        clamp: float,
        seed: int,
        cuda: int | None,
        n_threads: int,
    ) -> HeadModel: ...
    @staticmethod
    def supersimplenet(
        arch: str,
        layers: list[str],
        channels: list[int],
        grid: tuple[int, int],
        noise_std: float,
        perlin_threshold: float,
        seed: int,
        cuda: int | None,
        n_threads: int,
    ) -> HeadModel: ...
    def set_group(self, group: int, learning_rate: float, weight_decay: float) -> None: ...
    @property
    def arch(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def taps(self) -> list[tuple[str, int, int]]: ...
    @property
    def step(self) -> int: ...
    def configure(
        self,
        optimizer: Literal["sgd", "adam", "adamw"],
        learning_rate: float,
        weight_decay: float,
        momentum: float,
        dampening: float,
        nesterov: bool,
        betas: tuple[float, float],
        eps: float,
        grad_clip_norm: float | None,
        schedule: Literal["constant", "cosine", "multistep"],
        total_steps: int,
    ) -> None: ...
    def train_epoch(
        self,
        images: torch.Tensor,
        encoder: list[torch.Tensor],
        order: list[int],
        batch_size: int,
        max_steps: int | None,
        n_threads: int,
    ) -> list[float]: ...
    def evaluate(self, images: torch.Tensor, encoder: list[torch.Tensor], batch_size: int, n_threads: int) -> float: ...
    def features(self, encoder: list[torch.Tensor], n_threads: int) -> list[torch.Tensor]: ...
    def maps(
        self,
        encoder: list[torch.Tensor],
        size: tuple[int, int],
        mode: Literal["sum", "product", "probability", "nll", "logits"],
        n_threads: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...
    def state_dict(self) -> list[tuple[str, torch.Tensor]]: ...
    def load_state_dict(self, entries: list[tuple[str, torch.Tensor]]) -> None: ...

def rd_loss(encoder: list[torch.Tensor], decoder: list[torch.Tensor]) -> torch.Tensor: ...
def rd_map(
    encoder: list[torch.Tensor],
    decoder: list[torch.Tensor],
    size: tuple[int, int],
    combine: Literal["sum", "product"],
    n_threads: int,
) -> torch.Tensor: ...
def fre_loss(v: torch.Tensor, r: torch.Tensor) -> torch.Tensor: ...
def fre_map(v: torch.Tensor, r: torch.Tensor, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]: ...
def fastflow_flow(
    x: torch.Tensor, blocks: list[list[torch.Tensor]], clamp: float, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]: ...
def fastflow_loss(zs: list[torch.Tensor], log_dets: list[torch.Tensor]) -> torch.Tensor: ...
def fastflow_map(
    zs: list[torch.Tensor], log_dets: list[torch.Tensor], size: tuple[int, int], mode: Literal["probability", "nll"]
) -> torch.Tensor: ...
def ssn_loss(map: torch.Tensor, score: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...
def ssn_perlin_masks(seed: int, n: int, h: int, w: int, threshold: float) -> torch.Tensor: ...
