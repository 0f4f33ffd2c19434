"""The ``batches`` argument of the measures, in one place: what is one batch and what is several.

* **One batch**: a tensor; a tuple or list of tensors (``(x, y)``, or ``[x, y]`` as a DataLoader collates a
  ``TensorDataset``); a dict of tensors (nested containers are fine: the loss function gets the batch as it is).
* **Several batches**: a list of such batches (``[(x1, y1), (x2, y2)]``), a DataLoader or any other iterable of
  batches that is not a list, tuple or dict (a generator), or ``Batches([...])``.

A list whose items are all tensors is ambiguous: ``[x, y]`` from a DataLoader is one batch, ``[x1, x2]`` may be two
single-tensor batches. It is one batch (the DataLoader convention); several single-tensor batches are passed as
``Batches([x1, x2])``. When the loss function fails on a list of tensors that could be such batches (two or more, of
one shape but the leading size), the error says so and shows the accepted forms; other errors are the loss
function's own.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from torch import Tensor

__all__ = ["Batches", "BATCH_FORMS", "as_batches", "batch_size", "is_ambiguous", "split_batch"]

#: The accepted forms, for error messages.
BATCH_FORMS = (
    "`batches` is one batch (a tensor, a tuple or list of tensors such as `[x, y]` from a DataLoader, or a dict of "
    "tensors) or several (a list of such batches, a DataLoader or another iterable of batches, or "
    "`Batches([...])`). A list of tensors is one batch: pass several single-tensor batches as "
    "`Batches([x1, x2])` (from lightning_sharpness.measures)."
)


class Batches:
    """Several batches, said explicitly: ``Batches([x1, x2])`` is two single-tensor batches, where the list
    ``[x1, x2]`` would be one batch (as ``[x, y]`` from a DataLoader is).

    Example::

        hessian_trace(model, lambda m, x: m(x).pow(2).mean(), Batches([x1, x2]))
    """

    def __init__(self, batches: Iterable[Any]) -> None:
        self._batches = list(batches)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def __repr__(self) -> str:
        return f"Batches({len(self._batches)} batches)"


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
        found = "a 0-dim tensor" if t is not None else "no tensor"
        raise ValueError(f"A batch of type {type(batch).__name__} holds {found} with a batch dimension. {BATCH_FORMS}")
    return int(t.shape[0])


def is_ambiguous(batch: Any) -> bool:
    """A list of two or more tensors of one shape but the leading size: several single-tensor batches, or one
    batch ``[x, y]`` (whose parts usually differ in shape: inputs and labels)?"""
    if not (isinstance(batch, list) and len(batch) > 1 and all(isinstance(b, Tensor) for b in batch)):
        return False
    return all(b.dim() > 0 and b.shape[1:] == batch[0].shape[1:] for b in batch)


def _is_single_batch(batches: Any) -> bool:
    if isinstance(batches, (Tensor, tuple, Mapping)):
        return True
    # A DataLoader collates a tuple dataset into a list of tensors: ``[x, y]`` is one batch.
    return isinstance(batches, list) and len(batches) > 0 and all(isinstance(b, Tensor) for b in batches)


def as_batches(batches: Any) -> tuple[list[Any], list[float]]:
    """The batches as a list (a DataLoader is iterated once) and their weights ``n_b / N`` (see the module)."""
    if isinstance(batches, Batches):
        items = list(batches)
    elif _is_single_batch(batches):
        items = [batches]
    elif isinstance(batches, Iterable) and not isinstance(batches, (str, bytes)):
        items = list(batches)
    else:
        raise TypeError(f"Got `batches` of type {type(batches).__name__}. {BATCH_FORMS}")
    if not items:
        raise ValueError(f"`batches` is empty: pass at least one batch with at least one example. {BATCH_FORMS}")
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
