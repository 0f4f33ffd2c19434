"""Normalizing the ``batches`` argument: one batch, a list of batches, or a DataLoader."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

__all__ = ["as_batches", "batch_size", "split_batch"]


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def batch_size(batch: Any) -> int:
    """Number of examples in a batch: the leading size of its first tensor."""
    t = _first_tensor(batch)
    if t is None or t.dim() == 0:
        raise ValueError(f"`batches`: cannot find a batched tensor in a batch of type {type(batch).__name__}.")
    return int(t.shape[0])


def _is_single_batch(batches: Any) -> bool:
    if isinstance(batches, (Tensor, tuple, Mapping)):
        return True
    # A DataLoader collates a tuple dataset into a list of tensors: ``[x, y]`` is one batch.
    return isinstance(batches, list) and len(batches) > 0 and all(isinstance(b, Tensor) for b in batches)


def as_batches(batches: Any) -> tuple[list[Any], list[float]]:
    """The batches as a list (a DataLoader is iterated once) and their weights ``n_b / N``.

    A tensor, tuple, dict, or list of tensors (a DataLoader-collated ``[x, y]``) is one batch; any other list
    or iterable is a sequence of batches. To pass several single-tensor batches, wrap each in a tuple.
    """
    if _is_single_batch(batches):
        items = [batches]
    elif isinstance(batches, Iterable) and not isinstance(batches, (str, bytes)):
        items = list(batches)
    else:
        raise TypeError(
            "`batches` must be a batch (tensor, tuple or dict of tensors), a list of batches or a DataLoader, "
            f"got {type(batches).__name__}."
        )
    if not items:
        raise ValueError("`batches` is empty: pass at least one batch with at least one example.")
    sizes = [batch_size(b) for b in items]
    if any(s == 0 for s in sizes):
        raise ValueError(f"`batches` contains an empty batch (batch sizes {sizes}).")
    total = float(sum(sizes))
    return items, [s / total for s in sizes]


def split_batch(batch: Any, m: int) -> list[Any]:
    """Cut a batch into chunks of ``m`` examples along the leading dimension of its tensors."""
    n = batch_size(batch)
    if m <= 0 or n % m:
        raise ValueError(f"`m` must divide every batch size, got m={m!r} for a batch of {n} examples.")

    def cut(obj: Any, start: int) -> Any:
        if isinstance(obj, Tensor):
            return obj[start : start + m] if obj.dim() > 0 and obj.shape[0] == n else obj
        if isinstance(obj, Mapping):
            return {k: cut(v, start) for k, v in obj.items()}
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            return type(obj)(*(cut(v, start) for v in obj))
        if isinstance(obj, (list, tuple)):
            return type(obj)(cut(v, start) for v in obj)
        return obj

    return [cut(batch, s) for s in range(0, n, m)]
