"""Sharpness-aware training and sharpness measurement for PyTorch Lightning."""

from lightning_sharpness import measures
from lightning_sharpness.curvature import DenseOperator, HessianOperator
from lightning_sharpness.geodesic import GeodesicGeometry
from lightning_sharpness.geometry import AdaptiveGeometry, Geometry, StandardGeometry
from lightning_sharpness.geometry_variants import LayerwiseAdaptiveGeometry, LinfAdaptiveGeometry, MaskedGeometry
from lightning_sharpness.monitor import DEFAULT_MEASURES, SharpnessMonitor, available_measures
from lightning_sharpness.plotting import log_density
from lightning_sharpness.sam import (
    ASAM,
    BSAM,
    GSAM,
    MESA,
    RSAM,
    SAF,
    SAM,
    SSAMD,
    SSAMF,
    USAM,
    WSAM,
    BSAMOptimizer,
    ConstantRho,
    CosineRho,
    FriendlyAscent,
    FriendlySAM,
    LinearRho,
    LookAhead,
    LookSAM,
    ProportionalRho,
    RhoSchedule,
    SAMEngine,
    SAMMixin,
    SAMVariant,
    StepRho,
    SurrogateGap,
    WeightedSharpness,
    WithIndex,
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
    "GSAM",
    "WSAM",
    "FriendlySAM",
    "LookSAM",
    "BSAM",
    "BSAMOptimizer",
    "SSAMF",
    "SSAMD",
    "SAF",
    "MESA",
    "WithIndex",
    "RSAM",
    "SAMVariant",
    "SurrogateGap",
    "WeightedSharpness",
    "FriendlyAscent",
    "LookAhead",
    "ProportionalRho",
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
    "LayerwiseAdaptiveGeometry",
    "LinfAdaptiveGeometry",
    "MaskedGeometry",
    "HessianOperator",
    "DenseOperator",
    "measures",
    "select_parameters",
]
