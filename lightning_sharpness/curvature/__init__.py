"""Curvature of a model's loss as linear operators, and the algorithms that only need an operator."""

from lightning_sharpness.curvature.density import SpectralDensity, slq
from lightning_sharpness.curvature.diagonal import DiagonalEstimate, diagonal
from lightning_sharpness.curvature.lanczos import LanczosResult, lanczos_eigs
from lightning_sharpness.curvature.operator import HessianOperator, select_named_parameters
from lightning_sharpness.curvature.protocol import DenseOperator, LinearOperator
from lightning_sharpness.curvature.trace import TraceEstimate, hutchinson, hutchpp
from lightning_sharpness.curvature.xtrace import xtrace

__all__ = [
    "HessianOperator",
    "LinearOperator",
    "DenseOperator",
    "select_named_parameters",
    "lanczos_eigs",
    "LanczosResult",
    "hutchinson",
    "hutchpp",
    "xtrace",
    "TraceEstimate",
    "diagonal",
    "DiagonalEstimate",
    "slq",
    "SpectralDensity",
]
