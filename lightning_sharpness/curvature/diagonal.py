"""The diagonal of a symmetric operator: Hutchinson's estimator or exact from unit vectors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_sharpness.curvature.probes import rademacher
from lightning_sharpness.curvature.protocol import LinearOperator

__all__ = ["diagonal", "DiagonalEstimate"]


@dataclass
class DiagonalEstimate:
    """``value[i]`` estimates ``A_ii``; ``stderr[i]`` its standard error (zeros when exact); ``group_means`` are
    the means of ``v * (A v)`` over disjoint groups of probes, ``(groups, dim)``, for jackknife errors of
    functions of the diagonal (``None`` when exact)."""

    value: Tensor
    stderr: Tensor
    group_means: Tensor | None
    matvecs: int


def diagonal(
    op: LinearOperator,
    matvecs: int = 100,
    exact: bool = False,
    generator: torch.Generator | None = None,
    block: int = 32,
    groups: int = 10,
) -> DiagonalEstimate:
    """``diag(A) ~ mean_i v_i * (A v_i)`` (Bekas et al., 2007) with Rademacher ``v_i``, or exactly from the
    ``dim`` products ``A e_j`` when ``exact=True`` (tiny models only).

    Example::

        diagonal(op, matvecs=300, generator=torch.Generator().manual_seed(0)).value
    """
    if exact:
        diag = torch.empty(op.dim, dtype=torch.float64, device=op.device)
        for start in range(0, op.dim, block):
            idx = torch.arange(start, min(start + block, op.dim), device=op.device)
            E = torch.zeros(op.dim, len(idx), dtype=op.dtype, device=op.device)
            E[idx, torch.arange(len(idx), device=op.device)] = 1
            diag[idx] = (op @ E)[idx, torch.arange(len(idx), device=op.device)].double()
        return DiagonalEstimate(diag, torch.zeros_like(diag), None, op.dim)
    if not (isinstance(matvecs, int) and matvecs >= 2):
        raise ValueError(f"`matvecs` must be an int >= 2, got {matvecs!r}.")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    groups = max(2, min(groups, matvecs))
    bounds = torch.linspace(0, matvecs, groups + 1).round().long().tolist()
    group_sums = torch.zeros(groups, op.dim, dtype=torch.float64, device=op.device)
    total_sq = torch.zeros(op.dim, dtype=torch.float64, device=op.device)
    for g in range(groups):
        for start in range(bounds[g], bounds[g + 1], block):
            V = rademacher(op.dim, min(block, bounds[g + 1] - start), generator, op.dtype, op.device)
            z = (V * (op @ V)).double()
            group_sums[g] += z.sum(1)
            total_sq += z.pow(2).sum(1)
    mean = group_sums.sum(0) / matvecs
    var = (total_sq - matvecs * mean.pow(2)).clamp_min(0) / (matvecs - 1)
    sizes = torch.tensor([bounds[g + 1] - bounds[g] for g in range(groups)], dtype=torch.float64, device=op.device)
    return DiagonalEstimate(mean, (var / matvecs).sqrt(), group_sums / sizes[:, None], matvecs)
