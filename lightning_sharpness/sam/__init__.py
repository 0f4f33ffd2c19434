"""Sharpness-aware training: the plain-torch engine and its Lightning faces."""

from lightning_sharpness.sam.bsam import BSAM, BSAMOptimizer
from lightning_sharpness.sam.callback import ASAM, SAM, USAM
from lightning_sharpness.sam.engine import SAMEngine
from lightning_sharpness.sam.family import GSAM, WSAM, FriendlySAM, LookSAM
from lightning_sharpness.sam.mixin import SAMMixin
from lightning_sharpness.sam.rsam import RSAM, RenyiAscent
from lightning_sharpness.sam.saf import MESA, SAF, WithIndex
from lightning_sharpness.sam.schedules import (
    ConstantRho,
    CosineRho,
    LinearRho,
    ProportionalRho,
    RhoSchedule,
    StepRho,
)
from lightning_sharpness.sam.ssam import SSAMD, SSAMF
from lightning_sharpness.sam.variants import (
    FriendlyAscent,
    LookAhead,
    SAMVariant,
    SurrogateGap,
    WeightedSharpness,
)

__all__ = [
    "SAM",
    "ASAM",
    "USAM",
    "SAMEngine",
    "SAMMixin",
    "RhoSchedule",
    "ConstantRho",
    "LinearRho",
    "CosineRho",
    "StepRho",
    "ProportionalRho",
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
    "RenyiAscent",
    "SAMVariant",
    "SurrogateGap",
    "WeightedSharpness",
    "FriendlyAscent",
    "LookAhead",
]
