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
