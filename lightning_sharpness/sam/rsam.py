"""RSAM (Zhang et al., *Rényi Sharpness: A Novel Sharpness that Strongly Correlates with Generalization*, arXiv
2510.07758): SAM on the loss regularized by a Rényi sharpness of the gradient.

What we could and could not read. The paper's text was not reachable from this project (only its abstract and its
public reviews). From them: Rényi sharpness is the negative Rényi entropy of the normalized Hessian spectrum
``-H_alpha(p)``, ``p_i = lambda_i / sum_j lambda_j``; RSAM uses "a variant of Rényi sharpness as regularizer"
whose proxy for the spectrum is the squared gradient components (``lambda_j ~ g_j^2``, the reviews' remarks on the
paper's Eqs. 9-10), with a radius ``rho`` tuned like SAM's and a warm-up. Our reading, to be replaced by the
paper's update once it can be checked:

    L_RSAM(w) = L(w) + gamma * S_alpha(g(w)),   S_alpha(g) = log(sum_j p_j^alpha) / (alpha - 1),  p = g^2 / ||g||^2

(``sum_j p_j log p_j`` at ``alpha = 1``), with ``g`` the (micro-)batch gradient over all trainable parameters, and
SAM's two-pass update applied to ``L_RSAM``: ``e = rho grad L_RSAM(w) / ||grad L_RSAM(w)||``, descent along
``grad L_RSAM(w + e)``. The gradient of ``S_alpha(g(w))`` is a Hessian-vector product, computed exactly by double
backward inside ``training_step`` (each pass costs about two ordinary ones). ``S_alpha`` is scale-invariant in
``g`` (so a GradScaler's scale cancels, and fp16 computes the inner gradient of the scaled loss) and lies in
``[-log d, 0]``. Zero gradient components count as ``p_j = 0``. Warm-up: ``start_step`` / ``start_epoch`` (SAM's).

Logged: ``sam/renyi_sharpness`` (``S_alpha`` at ``w``) next to SAM's diagnostics.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_sharpness.sam.callback import SAM
from lightning_sharpness.sam.engine import RhoLike, loss_scale
from lightning_sharpness.sam.saf import _wrap_training_step
from lightning_sharpness.validation import check_number

__all__ = ["RSAM", "renyi_of_gradient"]


def renyi_of_gradient(grads: list[Tensor], alpha: float) -> Tensor | None:
    """``S_alpha(g) = log(sum_j p_j^alpha) / (alpha - 1)``, ``p = g^2 / ||g||^2`` (``sum p log p`` at ``alpha = 1``),
    differentiable in ``g``; ``None`` for a zero or non-finite gradient."""
    sq = torch.cat([g.reshape(-1).float().pow(2) for g in grads])
    total = sq.sum()
    if not bool(torch.isfinite(total)) or float(total) == 0:
        return None
    p = sq / total
    positive = p > 0
    safe = torch.where(positive, p, torch.ones_like(p))  # no inf gradients from 0^alpha or log 0
    if alpha == 1:
        return torch.where(positive, safe * safe.log(), torch.zeros_like(p)).sum()
    return torch.where(positive, safe.pow(alpha), torch.zeros_like(p)).sum().log() / (alpha - 1)


class RSAM(SAM):
    """Rényi-sharpness-aware minimization (our reading of Zhang et al., 2025; see the module docstring): SAM on
    ``L + gamma * S_alpha(g)``.

    Args:
        rho: SAM's radius (or schedule); ``rho=0`` gives the regularizer alone (the second pass then runs at w).
        alpha: Rényi order, > 0 (2 by default).
        gamma: weight of the regularizer, >= 0.
        **kwargs: the :class:`~lightning_sharpness.SAM` callback's other options (``start_step`` for the warm-up).

    Raises:
        ValueError: for ``alpha <= 0`` or ``gamma < 0``; at setup, under DDP (double backward inside DDP's forward
            is not supported by torch) and for manual optimization.

    Example::

        trainer = Trainer(callbacks=[RSAM(rho=0.05, alpha=2.0, gamma=0.1, start_epoch=5)])
    """

    def __init__(self, rho: RhoLike = 0.05, alpha: float = 2.0, gamma: float = 0.1, **kwargs: Any) -> None:
        self.alpha = check_number(alpha, "alpha", minimum=0, strict=True)
        self.gamma = check_number(gamma, "gamma", minimum=0)
        super().__init__(rho=rho, **kwargs)
        self._undo = None
        self._renyi: Tensor | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.world_size > 1:
            raise ValueError(
                "RSAM differentiates through the gradient (double backward) inside training_step, which torch's "
                "DistributedDataParallel does not support; run RSAM on one device per model, or use SAM/ASAM."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._undo = _wrap_training_step(pl_module, lambda out, args: self._regularize(trainer, pl_module, out))
        super().on_fit_start(trainer, pl_module)

    def _regularize(self, trainer: pl.Trainer, pl_module: pl.LightningModule, output: Any) -> Any:
        loss = output["loss"] if isinstance(output, dict) else output
        if not isinstance(loss, Tensor) or not self._sam_is_on(trainer) or self.gamma == 0:
            return output
        params = [p for p in pl_module.parameters() if p.requires_grad]
        scale = loss_scale(trainer.precision_plugin)  # S is scale-invariant: the scaled gradient keeps fp16 in range
        with torch.enable_grad():
            grads = torch.autograd.grad(loss * scale, params, create_graph=True, allow_unused=True)
        renyi = renyi_of_gradient([g for g in grads if g is not None], self.alpha)
        if renyi is None:
            return output
        if self._renyi is None:
            self._renyi = renyi.detach()
        regularized = loss + self.gamma * renyi.to(loss.dtype)
        return {**output, "loss": regularized} if isinstance(output, dict) else regularized

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._micro_count == 0:
            self._renyi = None
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        logged = self._active and self.log_diagnostics and trainer._logger_connector.should_update_logs
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if logged and self._renyi is not None and math.isfinite(float(self._renyi)):
            pl_module.log("sam/renyi_sharpness", self._renyi.float(), on_step=True, on_epoch=False)

    def _remove(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._remove()
