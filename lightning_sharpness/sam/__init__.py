"""Sharpness-aware training: the plain-torch engine and its Lightning faces."""

from lightning_sharpness.sam.callback import ASAM, SAM, USAM
from lightning_sharpness.sam.engine import SAMEngine
from lightning_sharpness.sam.mixin import SAMMixin
from lightning_sharpness.sam.schedules import ConstantRho, CosineRho, LinearRho, RhoSchedule, StepRho

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
]
