"""Lightning glue shared by the callbacks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl

__all__ = ["muted_logging"]


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


def _noop(*args: Any, **kwargs: Any) -> None:
    return None
