"""Extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalization, and a probabilistic
certificate that no eigenvalue beyond the returned ones was missed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_sharpness.curvature.protocol import LinearOperator

__all__ = ["lanczos_eigs", "LanczosResult"]


@dataclass
class LanczosResult:
    """Ritz values (descending for ``largest``, ascending for ``smallest``), vectors, residuals, cost.

    ``miss_probability`` bounds the probability (over the random start) that an eigenvalue more than ``tol``
    (relative to the largest Ritz value) beyond the returned ones was missed; ``converged`` means it is at most
    the ``delta`` asked for and every returned Ritz pair has a residual within ``tol``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residuals: Tensor
    converged: bool
    matvecs: int
    miss_probability: float = 1.0


class _Basis:
    """Orthonormal rows ``q_0, q_1, ...`` stored in chunks of 8 rows allocated as the basis fills: at most 7 rows
    more than in use, and nothing is ever copied (the old code preallocated ``max_iter`` rows, 100 by default)."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, capacity: int) -> None:
        self.n, self.dtype, self.device, self.capacity = n, dtype, device, capacity
        self.chunks: list[Tensor] = []
        self.size = 0

    def append(self, q: Tensor) -> None:
        allocated = sum(c.shape[0] for c in self.chunks)
        if self.size == allocated:
            rows = min(8, self.capacity - allocated)
            self.chunks.append(torch.empty(rows, self.n, dtype=self.dtype, device=self.device))
        offset = self.size
        for c in self.chunks:
            if offset < c.shape[0]:
                c[offset] = q
                break
            offset -= c.shape[0]
        self.size += 1

    def _filled(self) -> list[Tensor]:
        out, left = [], self.size
        for c in self.chunks:
            if left <= 0:
                break
            out.append(c[:left])
            left -= c.shape[0]
        return out

    def row(self, i: int) -> Tensor:
        for c in self.chunks:
            if i < c.shape[0]:
                return c[i]
            i -= c.shape[0]
        raise IndexError(i)

    def orthogonalize(self, w: Tensor) -> Tensor:
        """One classical Gram-Schmidt pass, in place: ``w -= Q^T (Q w)``."""
        for c in self._filled():
            w.addmv_(c.T, c @ w, alpha=-1)
        return w

    def combine(self, S: Tensor) -> Tensor:
        """``Q^T S`` for a ``(size, k)`` float64 coefficient block, in the working dtype: ``(n, k)``."""
        out, start = None, 0
        for c in self._filled():
            part = c.T @ S[start : start + c.shape[0]].to(self.dtype)
            out = part if out is None else out + part
            start += c.shape[0]
        return out

    @property
    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.chunks)


def _random_unit(op: LinearOperator, generator: torch.Generator) -> Tensor:
    v = torch.randn(op.dim, generator=generator, dtype=torch.float64).to(op.dtype).to(op.device)
    return v / v.norm()


def _christoffel(alphas: list[float], betas: list[float], lam: float) -> float:
    """``K(lam) = sum_j p_j(lam)^2`` over the Lanczos polynomials ``p_0 = 1, ..., p_m`` (``q_{j+1} = p_j(A) q_1``):
    for every eigenpair ``(lam, v)`` of the operator, ``|v . q_1| <= 1 / sqrt(K(lam))`` (the unit vector
    ``sum_j p_j(lam) q_{j+1} / sqrt(K)`` of the Krylov space has component ``(v . q_1) sqrt(K)`` along ``v``)."""
    p_prev, p, total = 0.0, 1.0, 1.0
    for j, (a, b) in enumerate(zip(alphas, betas)):
        p_prev, p = p, ((lam - a) * p - (betas[j - 1] if j else 0.0) * p_prev) / b
        total += p * p
        if not math.isfinite(total):
            return math.inf
    return total


def _miss_probability(alphas: list[float], betas: list[float], points: list[float], dim: int, bias: float) -> float:
    """Bound on the probability that the start (a uniformly random unit vector plus a fixed vector of norm ``bias``)
    has a component small enough to hide an eigenvalue at any of ``points``: a uniform unit vector's component
    ``s`` along a fixed direction has a density at most ``sqrt(dim / (2 pi))`` (about; exactly
    ``Gamma(dim/2) / (sqrt(pi) Gamma((dim-1)/2))``), and the start's norm is at most ``1 + bias``."""
    if dim <= 1:
        return 0.0
    log_density = math.lgamma(dim / 2) - math.lgamma((dim - 1) / 2) - 0.5 * math.log(math.pi)
    worst = min(_christoffel(alphas, betas, x) for x in points)
    if worst == math.inf:
        return 0.0
    return min(1.0, 2 * math.exp(log_density) * (1 + bias) / math.sqrt(worst))


def lanczos_eigs(
    op: LinearOperator,
    k: int = 1,
    which: str = "largest",
    max_iter: int | None = None,
    tol: float = 1e-5,
    generator: torch.Generator | None = None,
    return_vectors: bool = False,
    v0: Tensor | None = None,
    delta: float = 1e-2,
) -> LanczosResult:
    """The ``k`` largest or smallest eigenvalues of the symmetric ``op`` (anything with ``dim`` and ``@``).

    Lanczos from a uniformly random unit vector (plus ``v0`` if given), with full reorthogonalization (one
    classical Gram-Schmidt pass, a second only when the first removed more than half the norm: "twice is
    enough"), restarting with a fresh random vector on breakdown so that repeated eigenvalues are found with their
    multiplicity. The basis grows as it fills.

    ``converged`` is claimed only when both hold:

    * every wanted Ritz pair has residual ``|beta_m s_mi| <= tol * max|theta|``: each returned value is within
      ``tol * max|theta|`` of an eigenvalue (a rigorous bound);
    * a certificate that no eigenvalue lies more than ``tol * max|theta|`` beyond the extreme Ritz value (or, for
      ``k > 1``, in the gaps between the returned values) was missed, except with probability at most ``delta``
      over the random start. A small residual alone does not prove this: a start with a tiny component along the
      top eigenvector yields an accurate Ritz pair of the second one first. The Krylov space bounds that
      component through the Lanczos polynomials (see :func:`_christoffel`), and a uniformly random start has it
      that small only with a known probability. The bound holds for any matrix and any ``v0``: a ``v0`` close to
      an eigenvector only takes longer to certify (the random part must have been amplified enough).

    With both, the extreme returned value is within ``tol * max|theta|`` of the extreme eigenvalue with
    probability at least ``1 - delta`` (the Ritz value never overshoots it). Not certified: an eigenvalue repeated
    (or nearly, within ``tol``) inside the returned range beyond the multiplicity the breakdown restarts find.

    ``v0``: a fixed vector added to the random unit start (its norm is its weight; ``None``: the random start).

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
    if not (0 < delta < 1):
        raise ValueError(f"`delta` must be in (0, 1), got {delta!r}.")
    n = op.dim
    max_iter = min(n, max(2 * k + 40, 100)) if max_iter is None else min(int(max_iter), n)
    if max_iter < k:
        raise ValueError(f"`max_iter` must be at least k={k}, got {max_iter}.")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    q = _random_unit(op, generator)
    bias = 0.0
    if v0 is not None:
        if v0.shape != (n,) or not bool(torch.isfinite(v0).all()) or float(v0.norm()) == 0:
            raise ValueError(f"`v0` must be a finite nonzero vector of shape ({n},), got shape {tuple(v0.shape)}.")
        v0 = v0.to(dtype=op.dtype, device=op.device)
        bias = float(v0.double().norm())
        q = q + v0
        q = q / q.norm()
    basis = _Basis(n, op.dtype, op.device, max_iter)
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples q_j and q_{j+1}
    converged = False
    block_start = 0  # index where the current Krylov block began (restarts after a breakdown)
    block_dim = n  # dimension of the space the current block's random start is uniform in
    theta = s = None
    beta = 0.0
    miss = 1.0
    previous: Tensor | None = None
    m = 0
    for j in range(max_iter):
        basis.append(q)
        w = op @ q
        # Sums in the working dtype: the reductions are cascaded (about 1e-9 of the terms' magnitudes in float32).
        alpha = float((q * w).sum())
        w = torch.sub(w, q, alpha=alpha)  # a new tensor: the operator's output is never written into
        if j > block_start:
            w.sub_(basis.row(j - 1), alpha=betas[-1])
        before = float(w.norm())
        w = basis.orthogonalize(w)
        beta = float(w.norm())
        if beta < before / math.sqrt(2):  # the pass cancelled much of w: once more ("twice is enough")
            w = basis.orthogonalize(w)
            beta = float(w.norm())
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
        if m == n:
            converged, miss = True, 0.0
            break
        # After a restart, give the new block a few steps to reveal repeated eigenvalues before stopping.
        settled = block_start == 0 or m - block_start >= min(k + 5, n - block_start)
        if not breakdown and m >= k and settled and bool((res <= tol * scale).all()):
            points = _beyond(theta[idx], tol * scale, which)
            miss = _miss_probability(alphas[block_start:], [*betas[block_start:], beta], points, block_dim, bias)
            miss = min(1.0, miss * len(idx))  # a union bound over the k true eigenvalues that could be the missed one
            if miss <= delta:
                converged = True
                break
        if breakdown:
            # Restart with a fresh vector orthogonal to the invariant space (repeated eigenvalues live there),
            # unless the block that just ended changed none of the wanted values: then they are complete.
            wanted = theta[idx]
            if m >= k and previous is not None and previous.numel() == wanted.numel():
                if bool(torch.allclose(previous, wanted, rtol=0, atol=tol * scale)):
                    converged, miss = True, 0.0
                    break
            previous = wanted
            q = _random_unit(op, generator)
            for _ in range(2):
                q = basis.orthogonalize(q)
            q = q / q.norm()
            betas.append(0.0)
            block_start, block_dim, bias = m, n - m, 0.0
        else:
            q = w / beta
            betas.append(beta)
    idx = _wanted(theta, k, which)
    values = theta[idx]
    residuals = (beta * s[-1, idx]).abs()
    vectors = None
    if return_vectors:
        vectors = basis.combine(s[:, idx]).T  # (k, n)
    return LanczosResult(values, vectors, residuals, converged, m, miss)


def _wanted(theta: Tensor, k: int, which: str) -> Tensor:
    k = min(k, theta.numel())
    order = torch.arange(theta.numel())
    return order.flip(0)[:k] if which == "largest" else order[:k]


def _beyond(values: Tensor, margin: float, which: str, per_gap: int = 32) -> list[float]:
    """Where a missed eigenvalue would falsify the result: ``margin`` beyond the extreme returned value, and the
    gaps between the returned values, ``margin`` away from each (a grid; the bound is smooth there)."""
    v = sorted(float(x) for x in values)
    points = [v[-1] + margin] if which == "largest" else [v[0] - margin]
    for lo, hi in zip(v[:-1], v[1:]):
        lo, hi = lo + margin, hi - margin
        if hi > lo:
            points += torch.linspace(lo, hi, per_gap, dtype=torch.float64).tolist()
    return points
