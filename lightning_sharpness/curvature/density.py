"""Spectral density by stochastic Lanczos quadrature (Golub & Meurant; Ghorbani et al., 2019)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_sharpness.curvature.probes import rademacher
from lightning_sharpness.curvature.protocol import LinearOperator
from lightning_sharpness.curvature.trace import _products

__all__ = ["slq", "SpectralDensity"]


@dataclass
class SpectralDensity:
    """Gauss quadrature nodes and weights, one row per probe, of the normalized spectral measure
    ``(1/dim) sum_i delta(lambda_i)``: ``weights`` sum to 1 overall, ``dim`` turns mass into eigenvalue counts.

    Example::

        d = slq(op, probes=4, steps=60)
        edges, mass = d.histogram(bins=40)       # mass sums to 1
        d.moment(1) * d.dim                      # ~ tr(H)
    """

    nodes: Tensor  # (probes, steps), float64
    weights: Tensor  # (probes, steps), float64, all summing to 1
    dim: int

    def expect(self, f: Callable[[Tensor], Tensor]) -> float:
        """``(1/dim) tr f(H)`` estimated as ``sum_j w_j f(theta_j)``."""
        return float((self.weights * f(self.nodes)).sum())

    def per_probe(self, f: Callable[[Tensor], Tensor]) -> Tensor:
        """The quadrature of ``f`` from each probe alone (their mean is :meth:`expect`)."""
        return (self.weights * f(self.nodes)).sum(1) * self.nodes.shape[0]

    def moment(self, p: int) -> float:
        """``(1/dim) tr(H^p)``."""
        return self.expect(lambda x: x.pow(p))

    def histogram(self, bins: int = 50, range: tuple[float, float] | None = None) -> tuple[Tensor, Tensor]:
        """Bin edges ``(bins + 1,)`` and the spectral mass per bin ``(bins,)``, summing to 1 over the full range."""
        lo, hi = range if range is not None else (float(self.nodes.min()), float(self.nodes.max()))
        if hi <= lo:
            hi = lo + 1.0
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        nodes, weights = self.nodes.flatten(), self.weights.flatten()
        inside = (nodes >= lo) & (nodes <= hi)  # bins are [a, b), the last one [a, b], as numpy's
        idx = torch.bucketize(nodes[inside], edges[1:-1], right=True)
        mass = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, weights[inside])
        return edges, mass

    def smooth(self, grid: Tensor, sigma: float) -> Tensor:
        """The density convolved with a Gaussian of width ``sigma``, evaluated on ``grid``."""
        grid = grid.to(torch.float64)
        z = (grid[:, None] - self.nodes.flatten()[None, :]) / sigma
        kernel = torch.exp(-0.5 * z.pow(2)) / (sigma * (2 * torch.pi) ** 0.5)
        return kernel @ self.weights.flatten()


class _Rows:
    """The Lanczos vectors of all probes, step by step: chunks of ``(8, probes, dim)`` allocated as the steps come
    (at most 7 steps ahead of use; the old code preallocated ``steps x dim x probes`` before the first product)."""

    def __init__(self, probes: int, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.shape, self.dtype, self.device = (probes, dim), dtype, device
        self.chunks: list[Tensor] = []
        self.size = 0

    def append(self, q: Tensor) -> None:
        if self.size == 8 * len(self.chunks):
            self.chunks.append(torch.empty(8, *self.shape, dtype=self.dtype, device=self.device))
        self.chunks[-1][self.size % 8] = q
        self.size += 1

    def orthogonalize(self, w: Tensor) -> Tensor:
        """One classical Gram-Schmidt pass per probe against its own earlier vectors, in place."""
        for index, c in enumerate(self.chunks):
            filled = c[: min(8, self.size - 8 * index)]
            coef = torch.einsum("jpn,pn->jp", filled, w)
            w.sub_(torch.einsum("jpn,jp->pn", filled, coef))
        return w


def slq(
    op: LinearOperator, probes: int = 8, steps: int = 80, generator: torch.Generator | None = None
) -> SpectralDensity:
    """Run ``probes`` independent Lanczos processes of ``steps`` steps together (one block product per step),
    from normalized Rademacher vectors, with full reorthogonalization (one classical Gram-Schmidt pass, a second
    when the first removed more than half of some probe's norm: "twice is enough"); each gives a ``steps``-point
    Gauss quadrature, exact for polynomials up to degree ``2 steps - 1``.

    The vectors are rows ``(probes, dim)`` (the operator's row products, no transposes), and the basis grows in
    chunks of 8 steps as the steps come: a run that stops early, or a large model, never holds the full
    ``steps x probes x dim`` block up front.

    Raises:
        ValueError: ``probes`` or ``steps`` is not an int >= 1.
    """
    if not (isinstance(probes, int) and probes >= 1):
        raise ValueError(f"`probes` must be an int >= 1, got {probes!r}.")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"`steps` must be an int >= 1, got {steps!r}.")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    steps = min(steps, op.dim)
    # the same stream of signs as a (dim, probes) draw, as rows
    q = rademacher(op.dim, probes, generator, op.dtype, op.device).T.contiguous().div_(op.dim**0.5)
    basis = _Rows(probes, op.dim, op.dtype, op.device)
    alpha = torch.zeros(steps, probes, dtype=torch.float64)
    beta = torch.zeros(steps, probes, dtype=torch.float64)
    eps = torch.finfo(op.dtype).eps
    for j in range(steps):
        basis.append(q)
        w = _products(op, q)
        a = (q * w).sum(1)
        w = w - a[:, None] * q  # a new tensor: the operator's output is never written into
        if j > 0:
            w.sub_(beta[j - 1].to(op.dtype)[:, None] * basis.chunks[(j - 1) // 8][(j - 1) % 8])
        before = w.norm(dim=1)
        w = basis.orthogonalize(w)
        b = w.norm(dim=1)
        if bool((b < before / 2**0.5).any()):
            w = basis.orthogonalize(w)
            b = w.norm(dim=1)
        alpha[j] = a.double().cpu()
        scale = alpha[: j + 1].abs().max(0).values + beta[:j].abs().sum(0) if j else alpha[0].abs()
        b64 = b.double().cpu()
        alive = b64 > 100 * eps * scale.clamp_min(torch.finfo(torch.float64).tiny)
        beta[j] = torch.where(alive, b64, torch.zeros_like(b64))
        # A finished probe continues from the zero vector: its extra nodes decouple and get zero weight.
        alive_rows = alive.to(w.device)[:, None]
        q = torch.where(alive_rows, w / b.clamp_min(torch.finfo(op.dtype).tiny)[:, None], torch.zeros_like(w))
    del basis
    T = torch.diag_embed(alpha.T) + torch.diag_embed(beta[:-1].T, 1) + torch.diag_embed(beta[:-1].T, -1)
    theta, S = torch.linalg.eigh(T)
    weights = S[:, 0, :].pow(2) / probes
    return SpectralDensity(theta, weights, op.dim)
