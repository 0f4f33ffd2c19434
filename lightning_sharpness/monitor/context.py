"""How a measurement runs inside a fit: the module in eval mode and fp32 (restored bitwise after), the Lightning
logging muted, and, under DDP, every process learning what the others decided or where they failed, so that none
waits in a collective the others left."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_sharpness._lightning import quiet

__all__ = ["MeasurementFailed", "agree", "failure", "run_together", "max_over_processes", "measuring_context"]


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def float32(module: nn.Module) -> Iterator[None]:
    """Parameters and buffers of half types cast to fp32 in place, and cast back bitwise afterwards."""
    tensors = [
        t for t in list(module.parameters()) + list(module.buffers()) if t.dtype in (torch.float16, torch.bfloat16)
    ]
    if not tensors:
        yield
        return
    saved = [(t, t.data, None if not isinstance(t, nn.Parameter) or t.grad is None else t.grad) for t in tensors]
    for t in tensors:
        t.data = t.data.float()
        if isinstance(t, nn.Parameter):
            t.grad = None
    try:
        yield
    finally:
        for t, data, grad in saved:
            t.data = data
            if isinstance(t, nn.Parameter):
                t.grad = grad


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def positive_finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


class MeasurementFailed(Exception):
    """A measurement failed on some process; ``error`` is this process's error (or one naming the other's)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


@contextmanager
def measuring_context(trainer: pl.Trainer, pl_module: pl.LightningModule, fp32: bool) -> Iterator[None]:
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(quiet(pl_module))
        stack.enter_context(eval_mode(pl_module))
        if fp32:
            stack.enter_context(torch.autocast(pl_module.device.type, enabled=False))
            stack.enter_context(float32(pl_module))
        else:
            stack.enter_context(trainer.precision_plugin.forward_context())
        yield


def agree(trainer: pl.Trainer, decision: bool) -> bool:
    """Rank zero's decision on every process (decisions that depend on a clock may differ)."""
    if trainer.world_size > 1:
        return bool(trainer.strategy.broadcast(decision, src=0))
    return decision


def failure(trainer: pl.Trainer, pl_module: pl.LightningModule, error: BaseException | None) -> BaseException | None:
    """This process's error, or one naming another process's: every process learns whether any failed, so
    that all of them skip (or raise) together and none waits in a collective the others left."""
    if trainer.world_size <= 1:
        return error
    failed = trainer.strategy.reduce(torch.tensor(float(error is not None), device=pl_module.device), reduce_op="max")
    if float(failed) == 0:
        return None
    messages: list[Any] = [None] * trainer.world_size
    mine = None if error is None else f"{type(error).__name__}: {error}"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_gather_object(messages, mine)
    if error is None:
        others = "; ".join(f"process {r}: {m}" for r, m in enumerate(messages) if m is not None)
        error = RuntimeError(f"SharpnessMonitor: the measurement failed on another process ({others or '?'}).")
    return error


def max_over_processes(trainer: pl.Trainer, pl_module: pl.LightningModule, seconds: float) -> float:
    if trainer.world_size > 1:
        seconds = float(trainer.strategy.reduce(torch.tensor(seconds, device=pl_module.device), reduce_op="max"))
    return seconds


def run_together(trainer: pl.Trainer, pl_module: pl.LightningModule, fn: Callable[[], Any]) -> Any:
    """``fn()`` on every process; if it raised on any, every process raises :class:`MeasurementFailed` together."""
    try:
        out, error = fn(), None
    except Exception as err:  # noqa: BLE001 - any error of a measurement is reported, then skipped or raised
        out, error = None, err
    error = failure(trainer, pl_module, error)
    if error is not None:
        raise MeasurementFailed(error)
    return out
