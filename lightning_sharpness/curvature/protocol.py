"""What the curvature algorithms need from an operator: ``dim``, ``dtype``, ``device`` and ``@``."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["LinearOperator", "DenseOperator"]


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric linear map on flat vectors: ``op @ v`` for ``(dim,)`` and ``op @ V`` for ``(dim, k)``."""

    dim: int
    dtype: torch.dtype
    device: torch.device

    def __matmul__(self, x: Tensor) -> Tensor: ...


class DenseOperator:
    """A dense symmetric matrix as an operator (tests, and small blocks).

    Example::

        op = DenseOperator(torch.diag(torch.tensor([3.0, 1.0])))
        op @ torch.ones(2)   # tensor([3., 1.])
    """

    def __init__(self, matrix: Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"`matrix` must be square, got shape {tuple(matrix.shape)}.")
        self.matrix = matrix
        self.dim = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.matvecs = 0

    def __matmul__(self, x: Tensor) -> Tensor:
        self.matvecs += 1 if x.dim() == 1 else x.shape[1]
        return self.matrix @ x.to(self.dtype)
