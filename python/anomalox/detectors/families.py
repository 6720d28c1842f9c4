"""Per-backbone-family rules the detectors share, keyed by ``anomalox.backbone.family_of(name)``.

A detector's default taps are its own (they differ on purpose), written once per tap naming
(``FamilyRules.taps``); the ResNet families share stage names, so they share those entries.
"""

from __future__ import annotations

from dataclasses import dataclass

from anomalox.backbone import family_of

__all__ = ["FAMILIES", "FamilyRules", "padim_n_features_for_width", "rules_for"]


@dataclass(frozen=True)
class FamilyRules:
    """What the detectors need to know about a backbone family.

    taps : the naming of its taps, the key of a detector's ``_default_layers`` table:
        ``"efficientnet_lite"`` (``_blocks.N``) or ``"resnet"`` (``layer1`` … ``layer4``).
    padim_n_features : channels PaDiM keeps by default (the paper: 100 for ResNet-18, 550 for
        WRN-50-2, whose bottleneck stages are 4× wider).
    """

    taps: str
    padim_n_features: int


FAMILIES: dict[str, FamilyRules] = {
    "efficientnet_lite": FamilyRules(taps="efficientnet_lite", padim_n_features=100),
    "resnet": FamilyRules(taps="resnet", padim_n_features=100),
    "resnet_bottleneck": FamilyRules(taps="resnet", padim_n_features=550),
}


def rules_for(backbone: str) -> FamilyRules:
    """The rules of backbone `backbone`'s family (``ValueError`` naming the known backbones otherwise)."""
    return FAMILIES[family_of(backbone)]


def padim_n_features_for_width(width: int) -> int:
    """PaDiM's default channel count for a torch module backbone, by the stacked taps' width.

    The rule the named families follow, by width instead of name: 550 when the taps have at least
    1,024 channels together (WRN-50-2's layer1-3: 1,792, the paper's 550), else 100 (ResNet-18's
    layer1-3: 448, the paper's 100).
    """
    return 550 if width >= 1024 else 100
