"""Extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalization."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_sharpness.curvature.protocol import LinearOperator

__all__ = ["lanczos_eigs", "LanczosResult"]


@dataclass
class LanczosResult:
    """Ritz values (descending for ``largest``, ascending for ``smallest``), vectors, residuals, cost."""

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residuals: Tensor
    converged: bool
    matvecs: int


def _random_unit(op: LinearOperator, generator: torch.Generator) -> Tensor:
    v = torch.randn(op.dim, generator=generator, dtype=torch.float64).to(op.dtype).to(op.device)
    return v / v.norm()


def lanczos_eigs(
    op: LinearOperator,
    k: int = 1,
    which: str = "largest",
    max_iter: int | None = None,
    tol: float = 1e-5,
    generator: torch.Generator | None = None,
    return_vectors: bool = False,
    v0: Tensor | None = None,
) -> LanczosResult:
    """The ``k`` largest or smallest eigenvalues of the symmetric ``op`` (anything with ``dim`` and ``@``).

    Runs Lanczos with full (twice-applied Gram-Schmidt) reorthogonalization and restarts with a fresh random
    vector on breakdown, so repeated eigenvalues are found with their multiplicity. Stops once the ``k``
    wanted Ritz pairs have residuals ``|beta_j s_ji| <= tol * max|theta|``, or after ``max_iter`` products.
    (The Ritz values are then far more accurate than ``tol``: their error is about ``residual^2 / gap``.)
    ``v0`` is the start vector (a random one from ``generator`` by default).

    Example::

        res = lanczos_eigs(op, k=3, generator=torch.Generator().manual_seed(0))
        res.eigenvalues   # three largest eigenvalues, descending
    """
    if which not in ("largest", "smallest"):
        raise ValueError(f"`which` must be 'largest' or 'smallest', got {which!r}.")
    if not (isinstance(k, int) and 1 <= k <= op.dim):
        raise ValueError(f"`k` must be an int between 1 and the parameter count {op.dim}, got {k!r}.")
    if not (tol > 0):
        raise ValueError(f"`tol` must be > 0, got {tol!r}.")
    n = op.dim
    max_iter = min(n, max(2 * k + 40, 100)) if max_iter is None else min(int(max_iter), n)
    if max_iter < k:
        raise ValueError(f"`max_iter` must be at least k={k}, got {max_iter}.")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    Q = torch.zeros(max_iter, n, dtype=op.dtype, device=op.device)
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples q_j and q_{j+1}
    if v0 is None:
        q = _random_unit(op, generator)
    else:
        if v0.shape != (n,) or not bool(torch.isfinite(v0).all()) or float(v0.norm()) == 0:
            raise ValueError(f"`v0` must be a finite nonzero vector of shape ({n},), got shape {tuple(v0.shape)}.")
        q = (v0 / v0.norm()).to(dtype=op.dtype, device=op.device)
    converged = False
    block_start = 0  # index where the current Krylov block began (restarts after a breakdown)
    theta = s = None
    beta = 0.0
    previous: Tensor | None = None
    m = 0
    for j in range(max_iter):
        Q[j] = q
        w = op @ q
        alpha = float(torch.dot(q.double(), w.double()))
        w = w - alpha * q
        if j > block_start:
            w = w - betas[-1] * Q[j - 1]
        basis = Q[: j + 1]
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        beta = float(w.double().norm())
        alphas.append(alpha)
        m = j + 1
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(betas, dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        theta, s = torch.linalg.eigh(T)
        scale = max(float(theta.abs().max()), torch.finfo(op.dtype).tiny)
        breakdown = beta <= 100 * torch.finfo(op.dtype).eps * scale
        if breakdown:
            beta = 0.0  # the Krylov space is invariant: its Ritz pairs are exact
        idx = _wanted(theta, k, which)
        res = (beta * s[-1, idx]).abs()
        # After a restart, give the new block a few steps to reveal repeated eigenvalues before stopping.
        settled = block_start == 0 or m - block_start >= min(k + 5, n - block_start)
        if m == n or (not breakdown and m >= k and settled and bool((res <= tol * scale).all())):
            converged = True
            break
        if breakdown:
            # Restart with a fresh vector orthogonal to the invariant space (repeated eigenvalues live there),
            # unless the block that just ended changed none of the wanted values: then they are complete.
            wanted = theta[idx]
            if m >= k and previous is not None and previous.numel() == wanted.numel():
                if bool(torch.allclose(previous, wanted, rtol=0, atol=tol * scale)):
                    converged = True
                    break
            previous = wanted
            q = _random_unit(op, generator)
            for _ in range(2):
                q = q - basis.T @ (basis @ q)
            q = q / q.norm()
            betas.append(0.0)
            block_start = m
        else:
            q = w / beta
            betas.append(beta)
    idx = _wanted(theta, k, which)
    values = theta[idx]
    residuals = (beta * s[-1, idx]).abs()
    vectors = None
    if return_vectors:
        vectors = (Q[:m].T.double() @ s[:, idx]).to(op.dtype).T  # (k, n)
    return LanczosResult(values, vectors, residuals, converged, m)


def _wanted(theta: Tensor, k: int, which: str) -> Tensor:
    k = min(k, theta.numel())
    order = torch.arange(theta.numel())
    return order.flip(0)[:k] if which == "largest" else order[:k]
