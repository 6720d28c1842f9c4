"""scikit-learn-style anomaly detectors over pretrained backbones."""

from anomalox.detectors._base import BaseDetector, Inspection, NotFittedError
from anomalox.detectors.dfm import DFM
from anomalox.detectors.fastflow import FastFlow
from anomalox.detectors.fre import FRE
from anomalox.detectors.padim import PaDiM
from anomalox.detectors.patchcore import PatchCore
from anomalox.detectors.reverse_distillation import ReverseDistillation
from anomalox.detectors.spade import SPADE
from anomalox.detectors.stfpm import STFPM
from anomalox.detectors.supersimplenet import SuperSimpleNet

__all__ = [
    "BaseDetector",
    "Inspection",
    "NotFittedError",
    "PaDiM",
    "PatchCore",
    "SPADE",
    "DFM",
    "STFPM",
    "ReverseDistillation",
    "FRE",
    "FastFlow",
    "SuperSimpleNet",
]
