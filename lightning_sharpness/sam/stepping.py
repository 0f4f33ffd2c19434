"""What the callback and the mixin both do around a SAM step: refuse closure optimizers, keep a non-finite
gradient from the weights, and name the ``sam/`` diagnostics."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_sharpness.sam.engine import SAMStepStats, all_finite

__all__ = ["average_over_processes", "diagnostics", "refuse_closure_optimizer", "skip_if_not_finite"]


def refuse_closure_optimizer(optimizer: Any, who: str) -> None:
    """Raise for optimizers that re-evaluate the loss through a closure of their own (LBFGS)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
    if isinstance(inner, torch.optim.LBFGS):
        raise ValueError(
            f"{who} cannot drive torch.optim.LBFGS: it re-evaluates the loss through a closure of its own, so the "
            "perturbed gradient would be replaced. Use a first-order optimizer."
        )


def skip_if_not_finite(optimizer: Any, precision_plugin: Any) -> bool:
    """Whether the optimizer's gradients hold an inf or nan; if so, and no GradScaler will skip the step,
    drop the gradients so that the optimizer leaves every weight alone."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if all_finite(grads):
        return False
    if getattr(precision_plugin, "scaler", None) is None:
        optimizer.zero_grad(set_to_none=True)
    return True


def average_over_processes(grads: list[Tensor | None], sums: list[Tensor | None]) -> list[Tensor | None]:
    """Average ``grads`` (in place) and ``sums`` over the processes of the default group in ONE all-reduce of
    their concatenation; returns the averaged ``sums``. A no-op without an initialized process group.

    Every process must pass tensors of the same shapes in the same order (``None`` in the same places).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return sums
    world = torch.distributed.get_world_size()
    present = [t for t in grads if t is not None] + [t for t in sums if t is not None]
    if world == 1 or not present:
        return sums
    dtype = torch.promote_types(torch.float32, present[0].dtype)
    flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in present])
    torch.distributed.all_reduce(flat)
    flat.div_(world)
    pieces = iter(flat.split([t.numel() for t in present]))
    for g in grads:
        if g is not None:
            g.copy_(next(pieces).view_as(g))
    return [None if t is None else next(pieces).view_as(t).to(t.dtype).clone() for t in sums]


def diagnostics(stats: SAMStepStats, skipped_steps: int, prefix: str = "sam/") -> dict[str, Any]:
    """``rho``, ``skipped_steps``, ``grad_norm`` (``||T g||``), ``perturbed_loss`` and ``sharpness_gap``
    (``L(w + e) - L(w)``) of one step, under ``prefix``."""
    metrics: dict[str, Any] = {f"{prefix}rho": stats.rho, f"{prefix}skipped_steps": float(skipped_steps)}
    if stats.grad_norm is not None:
        metrics[f"{prefix}grad_norm"] = stats.grad_norm.detach().float()
    if stats.perturbed_loss is not None:
        metrics[f"{prefix}perturbed_loss"] = stats.perturbed_loss.detach().float()
        if stats.loss is not None:
            metrics[f"{prefix}sharpness_gap"] = _gap(stats.perturbed_loss, stats.loss)
    return metrics


def _gap(perturbed: Tensor, loss: Tensor) -> Tensor:
    return (perturbed - loss).detach().float()
