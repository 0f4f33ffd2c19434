"""pytorch-optimizer's SAM family as callbacks: its class names and hyperparameter names, on SAM's engine.

Each class is the :class:`~lightning_sharpness.SAM` callback with a
:class:`~lightning_sharpness.sam.variants.SAMVariant` (and GSAM's radius schedule), so every option of ``SAM``
(geometry, ``perturb``, ``mode``, ``start_step``, ...) applies, and every execution mode SAM supports: fp32,
bf16, fp16 with a GradScaler, gradient accumulation and DDP in local and global mode, checkpoints and resume.
For manual optimization, give the same variant to a :class:`~lightning_sharpness.SAMEngine` (each class's
docstring shows how). ``adaptive=True`` of pytorch-optimizer is ``geometry=AdaptiveGeometry(eta=0.0)`` here.
"""

from __future__ import annotations

from typing import Any

from lightning_sharpness.sam.callback import SAM
from lightning_sharpness.sam.engine import RhoLike
from lightning_sharpness.sam.schedules import ProportionalRho
from lightning_sharpness.sam.variants import FriendlyAscent, LookAhead, SurrogateGap, WeightedSharpness

__all__ = ["GSAM", "WSAM", "FriendlySAM", "LookSAM"]


def _refuse(kwargs: dict[str, Any], names: tuple[str, ...], who: str) -> None:
    for name in names:
        if name in kwargs:
            raise ValueError(f"{who} sets `{name}` itself; it cannot be passed (got {name}={kwargs[name]!r}).")


class GSAM(SAM):
    """GSAM (Zhuang et al., *Surrogate Gap Guided Sharpness-Aware Minimization*, ICLR 2022).

    The descent gradient is ``g_p - alpha g_perp`` (``g_perp``: the part of ``g_w`` orthogonal to ``g_p``) and
    the radius follows the learning rate of the optimizer's first param group, read at every step:
    ``rho_min + (rho_max - rho_min) (lr - lr_min) / (lr_max - lr_min)``. Equal to pytorch-optimizer's ``GSAM``
    with a ``ProportionScheduler(lr_scheduler, max_lr=lr_max, min_lr=lr_min, max_value=rho_max,
    min_value=rho_min)``. Logs ``sam/cosine`` (between ``g_w`` and ``g_p``).

    Args:
        rho_max, rho_min: the radius at ``lr_max`` and at ``lr_min``.
        alpha: weight of the surrogate-gap term, in [0, 1].
        lr_max: ``None``: the param group's ``initial_lr`` (set by LR schedulers), else its learning rate.
        lr_min: the learning rate where the radius is ``rho_min``.
        **kwargs: any other option of :class:`~lightning_sharpness.SAM` (not ``rho`` or ``variant``).

    Mixin: ``SAMEngine(rho=ProportionalRho(rho_max, rho_min, lr_max, lr_min), variant=SurrogateGap(alpha))``.

    Example::

        trainer = Trainer(callbacks=[GSAM(rho_max=0.05, rho_min=0.01, alpha=0.4)])
    """

    def __init__(
        self,
        rho_max: float = 0.05,
        rho_min: float = 0.0,
        alpha: float = 0.4,
        lr_max: float | None = None,
        lr_min: float = 0.0,
        **kwargs: Any,
    ) -> None:
        _refuse(kwargs, ("rho", "variant"), "GSAM")
        super().__init__(rho=ProportionalRho(rho_max, rho_min, lr_max, lr_min), variant=SurrogateGap(alpha), **kwargs)


class WSAM(SAM):
    """WSAM (Yue et al., *Sharpness-Aware Minimization Revisited: Weighted Sharpness as a Regularization Term*,
    KDD 2023): the gradient of ``L + gamma / (1 - gamma) * (L(w + e) - L)``.

    ``decouple=True`` (the default, as pytorch-optimizer): the optimizer steps with ``g_w`` and the sharpness
    term ``gamma / (1 - gamma) (g_p - g_w)`` is applied after its step, scaled by each param group's learning
    rate; ``decouple=False``: the optimizer steps with ``g_w + gamma / (1 - gamma) (g_p - g_w)``. Lightning's
    ``gradient_clip_val`` clips what the optimizer receives (pytorch-optimizer's ``max_norm`` clips ``g_p``
    before the mixing instead; leave it ``None`` there to compare). Equal to pytorch-optimizer's ``WSAM``.

    Mixin: ``SAMEngine(rho=rho, variant=WeightedSharpness(gamma, decouple))``.

    Example::

        trainer = Trainer(callbacks=[WSAM(rho=0.05, gamma=0.9, decouple=True)])
    """

    def __init__(self, rho: RhoLike = 0.05, gamma: float = 0.9, decouple: bool = True, **kwargs: Any) -> None:
        _refuse(kwargs, ("variant",), "WSAM")
        super().__init__(rho=rho, variant=WeightedSharpness(gamma, decouple), **kwargs)


class FriendlySAM(SAM):
    """FriendlySAM (Li et al., *Friendly Sharpness-Aware Minimization*, CVPR 2024): the ascent follows
    ``g_w - sigma m``, ``m`` an EMA (``lmbda``) of past gradients at ``w``. Equal to pytorch-optimizer's
    ``FriendlySAM``. Logs ``sam/momentum_norm`` (``||m||``); ``m`` is saved in checkpoints.

    Mixin: ``SAMEngine(rho=rho, variant=FriendlyAscent(sigma, lmbda))``.

    Example::

        trainer = Trainer(callbacks=[FriendlySAM(rho=0.05, sigma=1.0, lmbda=0.9)])
    """

    def __init__(self, rho: RhoLike = 0.05, sigma: float = 1.0, lmbda: float = 0.9, **kwargs: Any) -> None:
        _refuse(kwargs, ("variant",), "FriendlySAM")
        super().__init__(rho=rho, variant=FriendlyAscent(sigma, lmbda), **kwargs)


class LookSAM(SAM):
    """LookSAM (Liu et al., *Towards Efficient and Scalable Sharpness-Aware Minimization*, CVPR 2022).

    Every ``k``-th step (counted from SAM's first) is a full SAM step that also stores ``g_v``, the component of
    the SAM gradient orthogonal to ``g_w``; the steps in between run ONE pass (Lightning's own) and step with
    ``g + alpha ||g|| / ||g_v|| g_v``: about ``1 + 1/k`` times a plain step's cost. The weights never return to
    an older snapshot. Equal to pytorch-optimizer's ``LookSAM`` (which runs two passes at every step). Logs
    ``sam/full_step`` (1 on full steps); ``g_v`` is saved in checkpoints.

    Mixin: ``SAMEngine(rho=rho, variant=LookAhead(k, alpha))``.

    Example::

        trainer = Trainer(callbacks=[LookSAM(rho=0.1, k=10, alpha=0.7)])
    """

    def __init__(self, rho: RhoLike = 0.1, k: int = 10, alpha: float = 0.7, **kwargs: Any) -> None:
        _refuse(kwargs, ("variant",), "LookSAM")
        super().__init__(rho=rho, variant=LookAhead(k, alpha), **kwargs)
