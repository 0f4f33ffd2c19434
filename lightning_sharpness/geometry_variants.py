"""The ASAM variants of the SAM-ON appendix (Mueller et al., 2023, A.3) and the sparse mask of SSAM, as geometries.

Each is a :class:`~lightning_sharpness.geometry.Geometry`, so each gives a SAM variant
(``SAM(geometry=LayerwiseAdaptiveGeometry())``) and a worst-case sharpness measure
(``worst_case_sharpness(..., geometry=LinfAdaptiveGeometry(), norm="linf")``) at once:

* elementwise l2 (ASAM as the library has it): ``T = |w| + eta`` per element, ``e = rho T^2 g / ||T g||_2``
  (:class:`~lightning_sharpness.geometry.AdaptiveGeometry`);
* **layer-wise** l2: ``T`` constant over each parameter tensor, ``T = ||w_tensor||_2 + eta``, the same ascent
  formula (:class:`LayerwiseAdaptiveGeometry`);
* elementwise **l-inf**: the steepest ascent in the ball ``||delta / T||_inf <= rho``, ``e = rho T sign(T g)``
  ``= rho T sign(g)`` (:class:`LinfAdaptiveGeometry`);
* a binary **mask** ``M`` (SSAM, Mi et al., 2022): ``T = M``, so ``e = rho M g / ||M g||``: only the selected
  elements move (:class:`MaskedGeometry`; :mod:`lightning_sharpness.sam.ssam` chooses and refreshes the mask).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_sharpness.geometry import AdaptiveGeometry, Geometry, StandardGeometry

__all__ = ["LayerwiseAdaptiveGeometry", "LinfAdaptiveGeometry", "MaskedGeometry"]


def _check_eta(eta: float) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"`eta` must be a finite number >= 0, got {eta!r}.")
    return float(eta)


class LayerwiseAdaptiveGeometry(Geometry):
    """Layer-wise ASAM (SAM-ON appendix A.3): one scale per parameter tensor, ``T = ||w_tensor||_2 + eta``.

    The ascent is ASAM's, ``e = rho T^2 g / ||T g||``, with ``T`` constant inside each tensor: a layer with large
    weights may move further, but directions inside a layer are not reweighted element by element.

    Args:
        eta: added to each tensor's norm, a finite number >= 0 (keeps an all-zero tensor, a freshly initialized
            bias, perturbable).

    Raises:
        ValueError: for a negative or non-finite ``eta``.

    Example::

        trainer = Trainer(callbacks=[SAM(rho=0.5, geometry=LayerwiseAdaptiveGeometry(eta=0.01))])
    """

    name = "layerwise-adaptive"

    def __init__(self, eta: float = 0.01) -> None:
        self.eta = _check_eta(eta)

    def scale(self, param: Tensor) -> Tensor:
        # A 0-dim tensor broadcasts against the tensor's gradient: no per-element copy of the scale.
        return param.detach().float().norm().add_(self.eta).to(param.dtype)

    def bind(self, module: torch.nn.Module, named_params: Sequence[tuple[str, Tensor]]) -> Geometry:
        return self

    def __repr__(self) -> str:
        return f"LayerwiseAdaptiveGeometry(eta={self.eta})"


class LinfAdaptiveGeometry(AdaptiveGeometry):
    """Elementwise l-inf ASAM (SAM-ON appendix A.3): the ball ``||delta / T||_inf <= rho``, ``T = |w| + eta``.

    Its steepest ascent step is ``e = rho T sign(T g) = rho T sign(g)`` (every element moves by ``rho T``); the norm
    the step reports (``sam/grad_norm``) is the dual norm ``||T g||_1``. As a measure it defines l-inf balls only:
    call ``worst_case_sharpness(..., geometry=LinfAdaptiveGeometry(), norm="linf")``.

    A sign step has no unnormalized form: ``SAM(normalize=False)`` (or ``SAMEngine``) with this geometry raises at
    construction (:attr:`supports_unnormalized` is ``False``).

    Raises:
        ValueError: for a negative or non-finite ``eta``.

    Example::

        trainer = Trainer(callbacks=[SAM(rho=0.001, geometry=LinfAdaptiveGeometry(eta=0.0))])
    """

    name = "linf-adaptive"
    norms = ("linf",)
    #: read by ``SAMEngine``, which refuses ``normalize=False`` with this geometry before any step
    supports_unnormalized = False

    def __init__(self, eta: float = 0.01) -> None:
        super().__init__(_check_eta(eta))

    def dual_sq_norm(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
        """``||T g||_1^2``: the square of the dual norm of l-inf (what the ascent's size is measured against)."""
        if not grads:
            return torch.zeros(())
        return self._dual_norm(params, grads).pow(2)

    def _dual_norm(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
        terms = [(g * self.scale(p)).detach().float().abs().sum() for p, g in zip(params, grads)]
        return torch.stack(terms).sum() if terms else torch.zeros(())

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
        """Turn ``grads`` in place into ``e = rho T sign(g)`` and return ``||T g||_1`` (``grads`` holding
        ``grad_divisor * g``); ``None`` and untouched gradients when that norm is not finite.

        Raises:
            ValueError: for ``normalize=False`` (a sign step is its own normalization).
        """
        if not normalize:
            raise ValueError(
                "LinfAdaptiveGeometry takes sign steps e = rho T sign(g), which have no unnormalized form: use "
                "`normalize=True` (the default) with this geometry."
            )
        dual = self._dual_norm(params, grads)
        if reduce_sq_norm is not None:  # sharded parameters: the l1 norm is a sum over processes too
            dual = reduce_sq_norm(dual)
        dual = dual / grad_divisor
        if not bool(torch.isfinite(dual)):
            return None
        with torch.no_grad():
            self.linf_ascent_(params, grads, rho)
        return dual

    def bind(self, module: torch.nn.Module, named_params: Sequence[tuple[str, Tensor]]) -> Geometry:
        return self

    def __repr__(self) -> str:
        return f"LinfAdaptiveGeometry(eta={self.eta})"


class MaskedGeometry(Geometry):
    """A binary mask ``M`` on the perturbation (SSAM, Mi et al., 2022): ``T = M * T_base``, so with the standard
    base ``e = rho M g / ||M g||``; masked-out elements never move. Masks are elementwise, one boolean tensor per
    perturbed parameter, kept by parameter name (so that they survive a re-bind and a checkpoint).

    Until a mask is set for a parameter it is all ones (that parameter is perturbed as by plain SAM).
    :class:`~lightning_sharpness.sam.ssam.SSAMF` and :class:`~lightning_sharpness.sam.ssam.SSAMD` set and
    refresh the masks; with the mixin, call :meth:`set_masks` yourself.

    Args:
        base: the geometry whose scale the mask multiplies (standard by default; an
            :class:`~lightning_sharpness.geometry.AdaptiveGeometry` gives a sparse ASAM).

    Example::

        geometry = MaskedGeometry()
        geometry.set_masks({"net.0.weight": torch.rand(16, 8) > 0.5})
    """

    name = "masked"

    def __init__(self, base: Geometry | None = None) -> None:
        base = StandardGeometry() if base is None else base
        if not isinstance(base, Geometry) or type(base).normalized_step_ is not Geometry.normalized_step_:
            raise ValueError(
                "`base` must be a Geometry with an element-wise scale (standard or adaptive), got "
                f"{type(base).__name__}."
            )
        self.base = base
        self.masks: dict[str, Tensor] = {}
        self._names: dict[int, str] = {}
        self._numels: dict[str, int] = {}

    def bind(self, module: torch.nn.Module, named_params: Sequence[tuple[str, Tensor]]) -> Geometry:
        self._names = {id(p): n for n, p in named_params}
        self._numels = {n: p.numel() for n, p in named_params}
        return self

    @property
    def names(self) -> list[str]:
        """The names of the perturbed parameters, in the order the engine passes them."""
        return list(self._names.values())

    def set_masks(self, masks: dict[str, Tensor]) -> None:
        """Replace the masks of the named parameters (boolean, or 0/1, tensors of each parameter's shape).

        Raises:
            ValueError: for a mask that is not boolean or 0/1.
        """
        for name, mask in masks.items():
            if mask.dtype != torch.bool:
                if not bool(((mask == 0) | (mask == 1)).all()):
                    raise ValueError(f"The mask of {name!r} must be boolean or 0/1.")
                mask = mask.bool()
            self.masks[name] = mask

    def scale(self, param: Tensor) -> Tensor | None:
        mask = self.masks.get(self._names.get(id(param), ""))
        base = self.base.scale(param)
        if mask is None:
            return base
        mask = mask.to(device=param.device, dtype=param.dtype)
        return mask if base is None else base * mask

    def sparsity(self) -> float:
        """The fraction of perturbed-parameter elements the masks hold fixed (0 before any mask is set)."""
        total = sum(self._numels.values())
        zeros = sum(int((~self.masks[n]).sum()) for n in self._numels if n in self.masks)
        return zeros / total if total else 0.0

    def sq_norm(self, params: Sequence[Tensor], steps: Sequence[Tensor]) -> Tensor:
        # Masked-out elements never move; their (zero) steps add nothing, instead of 0 / 0.
        terms = [torch.zeros((), dtype=torch.float64)]
        for p, d in zip(params, steps):
            t = self.scale(p)
            if t is not None:
                d = torch.where(t != 0, d / torch.where(t != 0, t, torch.ones_like(t)), torch.zeros_like(d))
            terms.append(d.detach().double().pow(2).sum().cpu())
        return torch.stack(terms).sum()

    def __repr__(self) -> str:
        return f"MaskedGeometry(base={self.base!r})"
