"""RSAM (Zhang et al., *Rényi Sharpness: A Novel Sharpness that Strongly Correlates with Generalization*, ICLR
2026, arXiv 2510.07758): SAM whose ascent follows the loss regularized by the Rényi sharpness of the gradient.

The paper's method, as its text and its authors' README describe it. Rényi sharpness is the negative Rényi
entropy of the normalized Hessian spectrum, ``-H_alpha(p)`` with ``p_i = lambda_i / sum_j lambda_j``. For
training, the paper replaces the Hessian by the gradient magnitudes ``GM = Diag(g)^2`` (``g`` the mini-batch
gradient), which makes one global regularizer differentiable:

    S_alpha(g) = -H_alpha(p) = log(sum_j p_j^alpha) / (alpha - 1),   p = g^2 / ||g||^2

(``sum_j p_j log p_j`` at ``alpha = 1``), in ``[-log d, 0]``. RSAM "follows the SAM approach: perturb the weights
along the regularized gradient, then compute the loss at the perturbed point":

    e = rho * grad(L + gamma * S_alpha(g))(w) / ||grad(L + gamma * S_alpha(g))(w)||,   descent along grad L(w + e)

with a warm-up of plain training first (the authors' command trains 5 epochs without RSAM: ``start_epoch``).
Where the paper leaves a choice open, ours:

* ``regularize="ascent"`` (default) is the sentence above: the regularizer shapes the ascent direction only, the
  descent gradient is the training loss's at ``w + e``. ``regularize="both"`` is SAM on ``L + gamma S_alpha``
  (the descent gradient regularized too), our former reading, kept as an option; it costs a second double backward.
* ``grad S_alpha(g(w))`` is a Hessian-vector product, computed exactly by double backward in the pass at ``w``
  (about two ordinary passes), over all trainable parameters (the paper's "global" regularizer).
* The passes at ``w`` run scaled-dot-product attention through its math kernel (:func:`double_backward_kernels`):
  torch's fused kernels, which ``nn.TransformerEncoder`` and HF models pick even on CPU, have no double backward.
* ``alpha = 1.5`` by default: the paper's order for spectra with one cluster of large eigenvalues (``0.5`` for
  several clusters; its README's command uses 1.2). ``gamma`` (the regularizer's weight) is 0.1 by default:
  the paper's value could not be read off its public material.
* ``S_alpha`` is scale-invariant in ``g``, so a GradScaler's scale cancels (fp16 differentiates the scaled loss,
  which keeps the inner gradient in range). Zero gradient components count as ``p_j = 0``.

Logged: ``sam/renyi_sharpness`` (``S_alpha`` at ``w``, the step's first pass) next to SAM's diagnostics.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_sharpness.sam.callback import SAM
from lightning_sharpness.sam.engine import RhoLike, loss_scale
from lightning_sharpness.sam.variants import SAMVariant
from lightning_sharpness.validation import check_choice, check_number

__all__ = ["RSAM", "RenyiAscent", "renyi_of_gradient"]

Regularize = Literal["ascent", "both"]


def double_backward_kernels() -> AbstractContextManager:
    """Scaled-dot-product attention through its math kernel inside the block: the fused kernels (flash, memory-
    efficient; on CPU too, where ``nn.TransformerEncoder`` and HF models pick them) have no double backward, which
    RSAM's passes at ``w`` need. The math kernel costs more memory on long sequences; outside these passes
    nothing changes."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no kernel choice, no fused CPU kernel either
        return nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def renyi_of_gradient(grads: list[Tensor], alpha: float) -> Tensor | None:
    """``S_alpha(g) = log(sum_j p_j^alpha) / (alpha - 1)``, ``p = g^2 / ||g||^2`` (``sum p log p`` at ``alpha = 1``),
    differentiable in ``g``; ``None`` for a zero or non-finite gradient."""
    sq = torch.cat([g.reshape(-1).float().pow(2) for g in grads])
    total = sq.sum()
    if not bool(torch.isfinite(total.detach())) or float(total.detach()) == 0:
        return None
    p = sq / total
    positive = p > 0
    safe = torch.where(positive, p, torch.ones_like(p))  # no inf gradients from 0^alpha or log 0
    if alpha == 1:
        return torch.where(positive, safe * safe.log(), torch.zeros_like(p)).sum()
    return torch.where(positive, safe.pow(alpha), torch.zeros_like(p)).sum().log() / (alpha - 1)


class RenyiAscent(SAMVariant):
    """RSAM's rule on SAM's engine: the passes at ``w`` back-propagate ``L + gamma * S_alpha(grad L)`` (and, with
    ``regularize="both"``, the passes at ``w + e`` too). The same object serves the :class:`RSAM` callback and the
    mixin (``SAMEngine(variant=RenyiAscent(...))``).

    Args:
        alpha: Rényi order, > 0.
        gamma: weight of the regularizer, >= 0.
        regularize: ``"ascent"`` (the paper) or ``"both"``.

    Example::

        self.sam = SAMEngine(rho=0.05, variant=RenyiAscent(alpha=1.5, gamma=0.1))  # then self.sam_step(...)
    """

    #: the regularizer differentiates through a gradient, which torch's DistributedDataParallel cannot do.
    double_backward = True

    def __init__(self, alpha: float = 1.5, gamma: float = 0.1, regularize: Regularize = "ascent") -> None:
        super().__init__()
        self.alpha = check_number(alpha, "alpha", minimum=0, strict=True)
        self.gamma = check_number(gamma, "gamma", minimum=0)
        self.regularize = check_choice(regularize, "regularize", ("ascent", "both"))
        self._renyi: Tensor | None = None
        self.last_term: Tensor | None = None  # gamma * S_alpha added by the last pass at w (for the diagnostics)

    def begin_step(self, step: int) -> None:
        super().begin_step(step)
        self._renyi = self.last_term = None

    def _regularizes(self, perturbed: bool) -> bool:
        return self.gamma > 0 and not (perturbed and self.regularize == "ascent")

    def pass_context(self, perturbed: bool) -> AbstractContextManager:
        return double_backward_kernels() if self._regularizes(perturbed) else nullcontext()

    def objective(self, loss: Tensor, params: list[torch.nn.Parameter], perturbed: bool, scale: float) -> Tensor:
        if not self._regularizes(perturbed):
            return loss
        with torch.enable_grad():  # the scaled loss keeps fp16's inner gradient in range; S_alpha ignores the scale
            grads = torch.autograd.grad(loss * scale, params, create_graph=True, allow_unused=True)
        renyi = renyi_of_gradient([g for g in grads if g is not None], self.alpha)
        if renyi is None:  # a zero or non-finite gradient: the pass goes on unregularized (inf is then skipped)
            return loss
        term = self.gamma * renyi.to(loss.dtype)
        if not perturbed:
            self.last_term = term.detach()
            if self._renyi is None:
                self._renyi = renyi.detach()
        return loss + term

    def diagnostics(self) -> dict[str, Any]:
        if self._renyi is None or not bool(torch.isfinite(self._renyi)):
            return {}
        return {"renyi_sharpness": self._renyi.float()}


class RSAM(SAM):
    """Rényi-sharpness-aware minimization (Zhang et al., 2026; see the module docstring): the ascent along the
    gradient of ``L + gamma * S_alpha(g)``, the descent along ``grad L(w + e)``.

    Args:
        rho: SAM's radius (or schedule); ``rho=0`` gives the regularizer alone (the second pass then runs at w).
        alpha: Rényi order, > 0 (1.5 by default, the paper's).
        gamma: weight of the regularizer, >= 0.
        regularize: ``"ascent"`` (the paper: the regularizer shapes the perturbation) or ``"both"`` (SAM on the
            regularized loss: the descent gradient includes it too).
        **kwargs: the :class:`~lightning_sharpness.SAM` callback's other options (``start_epoch`` for the
            paper's warm-up).

    Raises:
        ValueError: for ``alpha <= 0``, ``gamma < 0``, another ``regularize`` or a ``variant``; at setup, under
            DDP (double backward inside DDP's forward is not supported by torch) and for ``mode="global"`` with
            gradient accumulation (the regularizer needs one micro-batch's whole gradient graph).

    Example::

        trainer = Trainer(callbacks=[RSAM(rho=0.05, alpha=1.5, gamma=0.1, start_epoch=5)])
    """

    def __init__(
        self,
        rho: RhoLike = 0.05,
        alpha: float = 1.5,
        gamma: float = 0.1,
        regularize: Regularize = "ascent",
        **kwargs: Any,
    ) -> None:
        if "variant" in kwargs:
            raise ValueError("RSAM sets its own `variant` (RenyiAscent); use the SAM callback for another one.")
        super().__init__(rho=rho, variant=RenyiAscent(alpha, gamma, regularize), **kwargs)

    @property
    def alpha(self) -> float:
        return self.engine.variant.alpha

    @property
    def gamma(self) -> float:
        return self.engine.variant.gamma

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not pl_module.automatic_optimization:
            raise ValueError(
                f"The RSAM callback needs automatic optimization, but {type(pl_module).__name__}."
                "automatic_optimization is False. For manual optimization, mix `lightning_sharpness.SAMMixin` into "
                "the module and call `self.sam_step(optimizer, loss_fn, batch, sam=SAMEngine(rho=..., "
                "variant=RenyiAscent(alpha=..., gamma=...)))`."
            )
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.world_size > 1:
            raise ValueError(
                "RSAM differentiates through the gradient (double backward) inside training_step, which torch's "
                "DistributedDataParallel does not support; run RSAM on one device per model, or use SAM/ASAM."
            )
        if stage == "fit" and self.engine.mode == "global" and trainer.accumulate_grad_batches > 1:
            raise ValueError(
                "RSAM's regularizer is a function of one micro-batch's gradient (its double backward cannot span "
                f"the {trainer.accumulate_grad_batches} accumulated micro-batches), so `mode='global'` cannot "
                "perturb along the effective batch's regularized gradient; use `mode='local'` (the default)."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.shadow_on(pl_module, "training_step", partial(self._regularized_step, trainer))
        super().on_fit_start(trainer, pl_module)

    def _regularized_step(self, trainer: pl.Trainer, training_step: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Every ``training_step`` of the fit, Lightning's and SAM's own passes alike, goes through here."""
        if not self._sam_is_on(trainer):
            return training_step(*args, **kw)
        engine = self.engine
        with engine.variant.pass_context(engine.perturbed):
            output = training_step(*args, **kw)
        loss = output["loss"] if isinstance(output, dict) else output
        if not isinstance(loss, Tensor):
            return output
        scale = loss_scale(trainer.precision_plugin)
        regularized = engine.variant.objective(loss, engine._trainable, engine.perturbed, scale)
        return {**output, "loss": regularized} if isinstance(output, dict) else regularized

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        # SAM's statistics (sam/sharpness_gap = L(w + e) - L(w)) are of the training loss, not of the regularized
        # one Lightning back-propagates: that is ``scale * (L + term) / k`` here.
        term = self.engine.variant.last_term if self._active else None
        if term is not None:
            loss = loss - term * (loss_scale(trainer.precision_plugin) / trainer.accumulate_grad_batches)
        super().on_before_backward(trainer, pl_module, loss)
