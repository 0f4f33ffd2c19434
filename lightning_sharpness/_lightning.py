"""Lightning glue shared by the callbacks."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn
from torchmetrics import Metric

__all__ = ["muted_logging", "untouched_metrics", "quiet", "shadow_method"]


@contextmanager
def muted_logging(module: pl.LightningModule) -> Iterator[None]:
    """Make ``self.log`` / ``self.log_dict`` no-ops inside the block.

    SAM's extra passes and the monitor's measuring calls run the module's own ``training_step``; what it logs
    there would be logged twice, or with perturbed values. Instance attributes shadow the methods for the
    duration and whatever the instance had before is put back.
    """
    had = {name: module.__dict__[name] for name in ("log", "log_dict") if name in module.__dict__}
    module.log = _noop  # type: ignore[method-assign]
    module.log_dict = _noop  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            module.__dict__.pop(name, None)
        module.__dict__.update(had)


@contextmanager
def untouched_metrics(module: nn.Module) -> Iterator[None]:
    """Put every torchmetrics ``Metric`` of ``module`` back as it was: a ``self.train_acc(preds, y)`` in
    ``training_step`` must count the unperturbed predictions once, not SAM's perturbed ones too.

    Tensor states are cloned (they are small and updated in place); list states (concatenating metrics) keep
    their objects and are cut back to their length, so the cost does not grow with the epoch.
    """
    saved = []
    for metric in (m for m in module.modules() if isinstance(m, Metric)):
        states = {}
        for name in metric._defaults:
            value = getattr(metric, name)
            states[name] = value.clone() if isinstance(value, Tensor) else (value, len(value))
        saved.append((metric, states, metric._update_count, metric._computed, metric._forward_cache))
    try:
        yield
    finally:
        for metric, states, update_count, computed, forward_cache in saved:
            for name, state in states.items():
                if isinstance(state, Tensor):
                    setattr(metric, name, state)
                else:
                    values, length = state
                    del values[length:]
                    setattr(metric, name, values)
            metric._update_count, metric._computed, metric._forward_cache = update_count, computed, forward_cache


@contextmanager
def quiet(module: pl.LightningModule) -> Iterator[None]:
    """Run the module's own step without side effects on what it logs: logging muted, metrics untouched."""
    with muted_logging(module), untouched_metrics(module):
        yield


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def shadow_method(obj: Any, name: str, replacement: Callable[..., Any]) -> Callable[[], None]:
    """Shadow ``obj.name`` by an instance attribute ``replacement(original, *args, **kwargs)`` for a fit, and
    return the undo (which removes the shadow only if it is still the one installed here).

    A callback changes what Lightning calls on the module (``training_step``, ``backward``) this way, without
    subclassing the user's module and leaving nothing behind once the fit ends.
    """
    original = getattr(obj, name)

    @functools.wraps(original)  # keeps the signature Lightning inspects (training_step's batch_idx)
    def shadow(*args: Any, **kwargs: Any) -> Any:
        return replacement(original, *args, **kwargs)

    setattr(obj, name, shadow)

    def undo() -> None:
        if obj.__dict__.get(name) is shadow:
            del obj.__dict__[name]

    return undo
