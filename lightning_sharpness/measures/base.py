"""What every measure shares: the result types, the measuring context (eval mode, no side effects, the measure
named in a non-finite-loss error) and the Hessian operator for custom algorithms."""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_sharpness._state import preserved
from lightning_sharpness.curvature.density import SpectralDensity
from lightning_sharpness.curvature.operator import HessianOperator, NonFiniteLossError, ParamSelection
from lightning_sharpness.measures import registry

__all__ = [
    "DensityResult",
    "DiagonalResult",
    "EigenResult",
    "Estimate",
    "Backend",
    "LossFn",
    "ProductsSeen",
    "PerturbationResult",
    "finite_loss",
    "hessian_operator",
    "measuring",
]

LossFn = Callable[[nn.Module, Any], Tensor]
#: How Hessian-vector products are taken (see :class:`~lightning_sharpness.curvature.HessianOperator`).
Backend = Literal["auto", "vmap", "jvp", "autograd"]
_PACKAGE = "lightning_sharpness.measures"


@dataclass
class Estimate:
    """A scalar estimate: ``float(result)`` is ``value``; ``stderr`` is ``None`` when it is deterministic."""

    value: float
    stderr: float | None = None
    matvecs: int = 0
    info: dict = field(default_factory=dict)

    def __float__(self) -> float:
        return float(self.value)


@dataclass
class EigenResult(Estimate):
    """``eigenvalues`` (descending for largest, ascending for smallest); ``value`` is the first of them;
    ``eigenvectors[i]`` is a list of per-parameter tensors when requested."""

    eigenvalues: Tensor = None
    eigenvectors: list[list[Tensor]] | None = None
    residuals: Tensor = None
    converged: bool = True


@dataclass
class DiagonalResult(Estimate):
    """``diagonal`` maps parameter names to tensors shaped like them; ``value`` is their sum (``tr(H)``)."""

    diagonal: dict[str, Tensor] = None
    diagonal_stderr: dict[str, Tensor] = None


@dataclass
class DensityResult(Estimate):
    """The SLQ density (``density.histogram()``, ``density.smooth()``, ``density.moment()``); ``value`` is the
    implied ``tr(H)`` (``dim * first moment``)."""

    density: SpectralDensity = None


@dataclass
class PerturbationResult(Estimate):
    """``value`` is the mean loss increase; ``per_chunk`` holds one value per chunk of ``m`` examples;
    ``base_loss`` the unperturbed loss."""

    per_chunk: Tensor = None
    base_loss: float = 0.0


@contextmanager
def measuring(model: nn.Module) -> Iterator[None]:
    with preserved(model):
        model.eval()
        with torch.no_grad():
            try:
                yield
            except NonFiniteLossError as err:
                name_measure(err)
                raise


def name_measure(err: NonFiniteLossError) -> None:
    """Prefix the error with the measure it left (the first measure function of this package on its traceback),
    so that every measure names itself without passing its name down to the operator."""
    if err.measure is not None:
        return
    for frame, _ in traceback.walk_tb(err.__traceback__):
        name = frame.f_code.co_name
        module = frame.f_globals.get("__name__", "")
        if module.startswith(_PACKAGE) and (name in registry.names() or name == "layerwise"):
            err.measure = name
            err.args = (f"{name}: {err.args[0]}", *err.args[1:])
            return


def finite_loss(value: float, where: str) -> float:
    """``value``, a loss the perturbation measures computed, if finite; else :class:`NonFiniteLossError`."""
    if not math.isfinite(value):
        hint = (
            "a smaller rho keeps the perturbed weights where the loss is defined"
            if "perturbed" in where
            else "check the model's outputs and the batch (NaN or inf in inputs or weights, log of 0, an overflow)"
        )
        raise NonFiniteLossError(f"the loss {where} is not a finite number ({value}): {hint}.")
    return value


def hessian_operator(
    model: nn.Module, loss_fn: LossFn, batches: Any, params: ParamSelection = None, backend: Backend = "auto"
) -> HessianOperator:
    """The Hessian operator of the mean loss (for custom algorithms). Call ``model.eval()`` first.

    Example::

        op = hessian_operator(model.eval(), loss_fn, (x, y))
        op @ torch.ones(op.dim)
    """
    return HessianOperator(model, loss_fn, batches, params=params, backend=backend)


class ProductsSeen:
    """An operator seen through: every block of products ``H V`` that an algorithm of
    :mod:`lightning_sharpness.curvature` asks of it is also handed to ``see(V, HV)``, so that a measure reads more
    from Hutchinson's own products (``||H v||^2``, per-group parts of ``v^T H v``) without re-writing Hutchinson.

    Example::

        >>> import torch
        >>> from lightning_sharpness.curvature import DenseOperator, hutchinson
        >>> seen_columns = []
        >>> A = DenseOperator(torch.diag(torch.tensor([2.0, 1.0])))
        >>> op = ProductsSeen(A, lambda V, HV: seen_columns.append(V.shape[1]))
        >>> hutchinson(op, matvecs=4).value, seen_columns
        (3.0, [4])
    """

    def __init__(self, op: Any, see: Callable[[Tensor, Tensor], None]) -> None:
        self.op, self.see = op, see
        self.dim, self.dtype, self.device = op.dim, op.dtype, op.device
        self.chunk_size = getattr(op, "chunk_size", 16)

    def __matmul__(self, V: Tensor) -> Tensor:
        HV = self.op @ V
        self.see(V, HV)
        return HV
