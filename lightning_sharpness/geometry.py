"""How a weight perturbation is measured and taken.

One geometry object serves two purposes: SAM's ascent step (one normalized step) and the worst-case
sharpness measure (several projected steps). Every geometry added here therefore gives a new SAM variant
and a new measure at once.

A geometry works in *scaled coordinates* ``u = delta / T`` where ``T`` is a per-element scale
(``T = 1`` for the standard geometry, ``T = |w| + eta`` for the adaptive one of ASAM). The perturbation
budget is ``||u|| <= rho``; the steepest ascent direction under that budget for a gradient ``g`` is
``delta = rho * T^2 g / ||T g||`` (l2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["AdaptiveGeometry", "Geometry", "GeometryName", "Norm", "StandardGeometry", "resolve_geometry"]

#: The balls a geometry may define: Euclidean (scaled by ``T``) or a box.
Norm = Literal["l2", "linf"]
#: The geometries known by name.
GeometryName = Literal["standard", "adaptive", "geodesic"]


class Geometry:
    """Base class: the standard Euclidean geometry (``T = 1``).

    Subclasses override :meth:`scale` for an element-wise rescaling, or the vector methods for a geometry
    with structure across tensors (the geodesic one for attention heads). Every method takes the list of
    perturbed parameters and the matching list of vectors (gradients or perturbations), in the same order.
    """

    name = "standard"

    def bind(self, module: torch.nn.Module, named_params: Sequence[tuple[str, Tensor]]) -> Geometry:
        """The geometry bound to ``module`` and the perturbed parameters, which takes the steps and measures the
        balls there. This geometry is left as it was (one geometry object may serve several models); an element-wise
        one needs no structure and is its own bound form.

        Example::

            >>> geo = AdaptiveGeometry()
            >>> geo.bind(torch.nn.Linear(2, 1), []) is geo
            True
        """
        return self

    def scale(self, param: Tensor) -> Tensor | None:
        """Element-wise scale ``T`` of one parameter; ``None`` means 1."""
        return None

    def dual_sq_norm(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
        """``||T g||_2^2`` summed over all tensors (a 0-dim fp32 tensor), the squared norm SAM divides by."""
        if not grads:
            return torch.zeros(())
        terms = []
        for p, g in zip(params, grads):
            t = self.scale(p)
            tg = g if t is None else g * t
            terms.append(tg.detach().float().pow(2).sum())
        return torch.stack(terms).sum()

    def ascent_(self, params: Sequence[Tensor], grads: Sequence[Tensor], coefficient: float | Tensor) -> None:
        """Turn the gradients, in place, into the ascent step ``coefficient * T^2 g``.

        SAM uses ``coefficient = rho / ||T g||`` (normalized) or ``rho`` (unnormalized, USAM). Working in
        place lets SAM reuse the gradient buffers for the perturbation: no extra copy of the parameters.
        """
        for p, g in zip(params, grads):
            t = self.scale(p)
            if t is not None:
                g.mul_(t).mul_(t)
            g.mul_(coefficient)

    def normalized_step_(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        rho: float,
        normalize: bool = True,
        eps: float = 1e-12,
        grad_divisor: float = 1.0,
        reduce_sq_norm: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor | None:
        """SAM's step of radius ``rho``: turn ``grads`` (holding ``grad_divisor * g``, e.g. a GradScaler's scale)
        in place into ``e = rho T^2 g / (||T g|| + eps)`` (``normalize=False``: ``rho T^2 g``) and return
        ``||T g||``; return ``None`` and leave ``grads`` untouched when that norm is not finite.

        ``reduce_sq_norm`` sums the squared norm over processes when the parameters are sharded (FSDP). SAM's
        ascent and the worst-case measure's normalized steps both come here.

        Example::

            >>> w, g = torch.zeros(2), torch.tensor([3.0, 4.0])
            >>> Geometry().normalized_step_([w], [g], rho=0.5, eps=0.0), g
            (tensor(5.), tensor([0.3000, 0.4000]))
        """
        sq_norm = self.dual_sq_norm(params, grads)
        if reduce_sq_norm is not None:
            sq_norm = reduce_sq_norm(sq_norm)
        grad_norm = sq_norm.sqrt() / grad_divisor
        if not bool(torch.isfinite(grad_norm)):
            return None
        coefficient = (rho / (grad_norm + eps) if normalize else rho) / grad_divisor
        with torch.no_grad():
            self.ascent_(params, grads, coefficient)
        return grad_norm

    def retract_(self, params: Sequence[Tensor], steps: Sequence[Tensor]) -> None:
        """Move the weights along the steps, in place: ``w <- w + delta`` (a geodesic step for curved ones)."""
        torch._foreach_add_(list(params), list(steps))

    # ------------------------------------------------------------------ used by the sharpness measures
    norms: tuple[str, ...] = ("l2", "linf")

    def check_norm(self, norm: str) -> Norm:
        """Raise unless this geometry defines balls of ``norm``."""
        if norm not in self.norms:
            raise ValueError(f"`norm` must be one of {list(self.norms)} for the {self.name} geometry, got {norm!r}.")
        return norm

    def sq_norm(self, params: Sequence[Tensor], steps: Sequence[Tensor]) -> Tensor:
        """``||delta / T||_2^2``: the squared size of a perturbation in this geometry (0-dim fp64, so that a
        projection onto the ball is exact to the parameters' precision)."""
        terms = [torch.zeros((), dtype=torch.float64)]
        for p, d in zip(params, steps):
            t = self.scale(p)
            terms.append((d if t is None else d / t).detach().double().pow(2).sum().cpu())
        return torch.stack(terms).sum()

    def linf_ascent_(self, params: Sequence[Tensor], grads: Sequence[Tensor], coefficient: float | Tensor) -> None:
        """Turn the gradients, in place, into the l-inf steepest ascent step ``coefficient * T * sign(g)``."""
        for p, g in zip(params, grads):
            t = self.scale(p)
            g.sign_()
            if t is not None:
                g.mul_(t)
            g.mul_(coefficient)

    def project_(self, params: Sequence[Tensor], steps: Sequence[Tensor], rho: float, norm: Norm = "l2") -> None:
        """Project perturbations, in place, onto the ball ``||delta / T|| <= rho`` (l2 or l-inf)."""
        if norm == "linf":
            for p, d in zip(params, steps):
                t = self.scale(p)
                if t is None:
                    d.clamp_(-rho, rho)
                else:
                    d.copy_(torch.maximum(torch.minimum(d, rho * t), -rho * t))
            return
        size = float(self.sq_norm(params, steps)) ** 0.5
        if size > rho:
            torch._foreach_mul_(list(steps), rho / size)

    def sample(self, params: Sequence[Tensor], generator: torch.Generator, norm: Norm = "l2") -> list[Tensor]:
        """A random perturbation: ``T * N(0, 1)`` (l2) or ``T * U(-1, 1)`` (l-inf) element-wise."""
        out = []
        for p in params:
            if norm == "linf":
                z = torch.rand(p.shape, generator=generator, dtype=p.dtype).mul_(2).sub_(1)
            else:
                z = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            z = z.to(p.device)
            t = self.scale(p)
            out.append(z if t is None else z.mul_(t))
        return out

    def retract(self, params: Sequence[Tensor], steps: Sequence[Tensor]) -> list[Tensor]:
        """Out of place and differentiable in ``steps``: the weights ``w + delta`` (curved for geodesic ones)."""
        return [p + d for p, d in zip(params, steps)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class StandardGeometry(Geometry):
    """Euclidean balls around the weights: SAM (Foret et al., 2021)."""


class AdaptiveGeometry(Geometry):
    """Ellipsoids scaled by ``T = |w| + eta``: ASAM (Kwon et al., 2021), scale-invariant sharpness.

    ``eta = 0`` gives the element-wise form of the most used PyTorch ASAM implementation.
    """

    name = "adaptive"

    def __init__(self, eta: float = 0.01) -> None:
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"`eta` must be a finite number >= 0, got {eta!r}.")
        self.eta = float(eta)

    def scale(self, param: Tensor) -> Tensor:
        t = param.detach().abs()
        return t.add_(self.eta) if self.eta else t

    def __repr__(self) -> str:
        return f"AdaptiveGeometry(eta={self.eta})"


_NAMES = ("standard", "adaptive", "geodesic")


def resolve_geometry(geometry: GeometryName | Geometry, argument: str = "geometry") -> Geometry:
    """Turn a geometry name or object into a :class:`Geometry`, with a clear error for anything else.

    Raises:
        ValueError: naming ``argument`` and the geometries allowed.
    """
    if isinstance(geometry, Geometry):
        return geometry
    if geometry == "standard":
        return StandardGeometry()
    if geometry == "adaptive":
        return AdaptiveGeometry()
    if geometry == "geodesic":
        from lightning_sharpness.geodesic import GeodesicGeometry  # it builds on AdaptiveGeometry, defined above

        return GeodesicGeometry()
    raise ValueError(f"`{argument}` must be one of {sorted(_NAMES)} or a `Geometry` instance, got {geometry!r}.")


def __getattr__(name: str):  # ``from lightning_sharpness.geometry import GeodesicGeometry`` keeps working
    if name == "GeodesicGeometry":
        from lightning_sharpness.geodesic import GeodesicGeometry

        return GeodesicGeometry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
