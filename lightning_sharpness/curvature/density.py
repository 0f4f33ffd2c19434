"""Spectral density by stochastic Lanczos quadrature (Golub & Meurant; Ghorbani et al., 2019)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_sharpness.curvature.probes import rademacher
from lightning_sharpness.curvature.protocol import LinearOperator

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


def slq(
    op: LinearOperator, probes: int = 8, steps: int = 80, generator: torch.Generator | None = None
) -> SpectralDensity:
    """Run ``probes`` independent Lanczos processes of ``steps`` steps together (one block product per step),
    from normalized Rademacher vectors, with full reorthogonalization; each gives a ``steps``-point Gauss
    quadrature, exact for polynomials up to degree ``2 steps - 1``.
    """
    if not (isinstance(probes, int) and probes >= 1):
        raise ValueError(f"`probes` must be an int >= 1, got {probes!r}.")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"`steps` must be an int >= 1, got {steps!r}.")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    steps = min(steps, op.dim)
    q = rademacher(op.dim, probes, generator, op.dtype, op.device) / op.dim**0.5
    Q = torch.zeros(steps, op.dim, probes, dtype=op.dtype, device=op.device)
    alpha = torch.zeros(steps, probes, dtype=torch.float64)
    beta = torch.zeros(steps, probes, dtype=torch.float64)
    eps = torch.finfo(op.dtype).eps
    for j in range(steps):
        Q[j] = q
        w = op @ q
        a = (q * w).sum(0)
        w = w - a * q
        if j > 0:
            w = w - beta[j - 1].to(op.dtype) * Q[j - 1]
        for _ in range(2):
            coef = torch.einsum("jnp,np->jp", Q[: j + 1], w)
            w = w - torch.einsum("jnp,jp->np", Q[: j + 1], coef)
        b = w.norm(dim=0)
        alpha[j] = a.double()
        scale = alpha[: j + 1].abs().max(0).values + beta[:j].abs().sum(0) if j else alpha[0].abs()
        alive = b.double() > 100 * eps * scale.clamp_min(torch.finfo(torch.float64).tiny)
        beta[j] = torch.where(alive, b.double(), torch.zeros_like(b.double()))
        # A finished probe continues from the zero vector: its extra nodes decouple and get zero weight.
        q = torch.where(alive, w / b.clamp_min(torch.finfo(op.dtype).tiny), torch.zeros_like(w))
    T = torch.diag_embed(alpha.T) + torch.diag_embed(beta[:-1].T, 1) + torch.diag_embed(beta[:-1].T, -1)
    theta, S = torch.linalg.eigh(T)
    weights = S[:, 0, :].pow(2) / probes
    return SpectralDensity(theta, weights, op.dim)
