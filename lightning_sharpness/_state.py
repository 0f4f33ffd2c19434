"""A guard that leaves a model and the global random state bitwise as it found them.

Every sharpness measure runs inside :func:`preserved`: parameters, buffers, ``.grad`` fields,
``requires_grad`` flags, train/eval modes and the torch (CPU and CUDA), Python and NumPy random states are
snapshotted on entry and written back on exit, in place, so that optimizers and hooks that hold references
to the tensors keep seeing the same objects.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

try:  # NumPy is optional for the package.
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

__all__ = ["preserved"]


def _rng_snapshot() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if np is not None:
        state["numpy"] = np.random.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _rng_restore(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def preserved(module: nn.Module) -> Iterator[nn.Module]:
    """Run a block with ``module`` and the global RNG states restored bitwise afterwards (even on error).

    Example::

        with preserved(model):
            model.eval()
            model(x).sum().backward()   # .grad, modes and RNG are all put back on exit
    """
    rng = _rng_snapshot()
    modes = [(m, m.training) for m in module.modules()]
    slots = []  # (owner dict, key, original object, saved values, requires_grad, grad object, saved grad)
    with torch.no_grad():
        for m in module.modules():
            for store in (m._parameters, m._buffers):
                for key, t in store.items():
                    if t is None:
                        continue
                    grad = t.grad if isinstance(t, nn.Parameter) or t.requires_grad else None
                    slots.append(
                        (
                            store,
                            key,
                            t,
                            t.detach().clone(),
                            t.requires_grad,
                            grad,
                            None if grad is None else grad.detach().clone(),
                        )
                    )
    try:
        yield module
    finally:
        with torch.no_grad():
            for store, key, obj, values, requires_grad, grad, grad_values in slots:
                store[key] = obj
                obj.copy_(values)
                if obj.requires_grad != requires_grad:
                    obj.requires_grad_(requires_grad)
                if obj.is_leaf:
                    if grad is None:
                        obj.grad = None
                    else:
                        grad.copy_(grad_values)
                        obj.grad = grad
        for m, training in modes:
            m.training = training
        _rng_restore(rng)
