"""Sharpness measures of a model's mean loss over some batches: one function per measure, no side effects.

Every function has the shape ``measure(model, loss_fn, batches, **options)``: ``loss_fn(model, batch)`` returns
the mean loss of a batch; ``batches`` is one batch (a tensor, a tuple / dict of tensors, or a DataLoader-style
list ``[x, y]``), a list of batches, a DataLoader, or ``Batches([x1, x2])`` for several single-tensor batches (see
:mod:`lightning_sharpness.batching`), and the measure is of the mean loss over all their examples. A NaN or
infinite loss raises :class:`NonFiniteLossError`, naming the measure.
The model is measured in eval mode (BatchNorm uses its running statistics) and is left bitwise as it was, with
the global RNG states; randomness comes from a local generator seeded by ``seed``. Each returns a result that
``float()`` turns into the estimate and that carries ``stderr`` where the estimate is stochastic.

==========================  ===================================================================================
``hessian_eigenvalues``     top / bottom ``k`` eigenvalues (Lanczos, full reorthogonalization)
``hessian_trace``           ``tr(H)``: Hutchinson (default), Hutch++ or XTrace
``hessian_diagonal``        ``diag(H)``: Hutchinson or exact
``diag_sqrt_trace``         ``tr(diag(H)^1/2)``, the sharpness Adam reduces (beside ``tr(H)``, SGD's)
``spectral_density``        eigenvalue density by stochastic Lanczos quadrature
``renyi_sharpness``         negative Renyi entropy of the normalized spectrum
``worst_case_sharpness``    ``max_{||delta|| <= rho} L(w + delta) - L(w)`` (APGD, m-sharpness, any geometry)
``average_case_sharpness``  ``E L(w + delta) - L(w)`` for Gaussian / uniform ``delta``
``layerwise``               per-module or per-parameter trace and top eigenvalue
==========================  ===================================================================================

The package is split by kind: :mod:`~lightning_sharpness.measures.spectral` (functions of the Hessian's
spectrum), :mod:`~lightning_sharpness.measures.perturbation` (loss increases under weight perturbations, with the
APGD search), :mod:`~lightning_sharpness.measures.layerwise`, and :mod:`~lightning_sharpness.measures.registry`,
what a scheduler such as :class:`~lightning_sharpness.SharpnessMonitor` needs to know about each measure.
"""

from __future__ import annotations

from lightning_sharpness.batching import Batches
from lightning_sharpness.curvature.operator import NonFiniteLossError
from lightning_sharpness.measures import registry
from lightning_sharpness.measures.base import (
    DensityResult,
    DiagonalResult,
    EigenResult,
    Estimate,
    LossFn,  # noqa: F401 - the type of a measure's loss_fn, for annotations
    PerturbationResult,
    hessian_operator,
    measuring,
)
from lightning_sharpness.measures.layerwise import layerwise
from lightning_sharpness.measures.perturbation import (
    _best_ascent,  # noqa: F401 - the search itself, for tests that check it against brute force
    _chunk_generator,  # noqa: F401
    average_case_sharpness,
    worst_case_sharpness,
)
from lightning_sharpness.measures.spectral import (
    diag_sqrt_trace,
    hessian_diagonal,
    hessian_eigenvalues,
    hessian_trace,
    renyi_sharpness,
    spectral_density,
)

__all__ = [
    "Batches",
    "NonFiniteLossError",
    "Estimate",
    "EigenResult",
    "DiagonalResult",
    "DensityResult",
    "PerturbationResult",
    "hessian_operator",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_diagonal",
    "diag_sqrt_trace",
    "spectral_density",
    "renyi_sharpness",
    "worst_case_sharpness",
    "average_case_sharpness",
    "layerwise",
    "registry",
]

#: The measure functions, by the names ``SharpnessMonitor(measures=[...])`` accepts, in the order the docs list them.
MEASURE_NAMES = registry.names()

# Former private names, kept for code that reached into the single module this package was.
_measuring = measuring
