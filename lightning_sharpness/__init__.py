"""Sharpness-aware training and sharpness measurement for PyTorch Lightning."""

from lightning_sharpness import measures
from lightning_sharpness.curvature import DenseOperator, HessianOperator
from lightning_sharpness.geodesic import GeodesicGeometry
from lightning_sharpness.geometry import AdaptiveGeometry, Geometry, StandardGeometry
from lightning_sharpness.monitor import DEFAULT_MEASURES, SharpnessMonitor, available_measures
from lightning_sharpness.plotting import log_density
from lightning_sharpness.sam import (
    ASAM,
    SAM,
    USAM,
    ConstantRho,
    CosineRho,
    LinearRho,
    RhoSchedule,
    SAMEngine,
    SAMMixin,
    StepRho,
)
from lightning_sharpness.selection import select_parameters

__version__ = "0.1.0"

__all__ = [
    "SAM",
    "SharpnessMonitor",
    "available_measures",
    "DEFAULT_MEASURES",
    "log_density",
    "ASAM",
    "USAM",
    "SAMEngine",
    "SAMMixin",
    "RhoSchedule",
    "ConstantRho",
    "LinearRho",
    "CosineRho",
    "StepRho",
    "Geometry",
    "StandardGeometry",
    "AdaptiveGeometry",
    "GeodesicGeometry",
    "HessianOperator",
    "DenseOperator",
    "measures",
    "select_parameters",
]
