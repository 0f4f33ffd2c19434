"""Sharpness-aware training and sharpness measurement for PyTorch Lightning."""

from lightning_sharpness.geometry import AdaptiveGeometry, Geometry, StandardGeometry
from lightning_sharpness.sam import (
    ASAM,
    SAM,
    USAM,
    ConstantRho,
    CosineRho,
    LinearRho,
    RhoSchedule,
    SAMEngine,
    StepRho,
)
from lightning_sharpness.selection import select_parameters

__version__ = "0.1.0"

__all__ = [
    "SAM",
    "ASAM",
    "USAM",
    "SAMEngine",
    "RhoSchedule",
    "ConstantRho",
    "LinearRho",
    "CosineRho",
    "StepRho",
    "Geometry",
    "StandardGeometry",
    "AdaptiveGeometry",
    "select_parameters",
]
