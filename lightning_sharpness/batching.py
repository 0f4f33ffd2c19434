"""Cutting a training batch into chunks of examples (m-sharpness) without ever pairing rows wrongly.

A batch is any nest of dicts, tuples, lists and named tuples. Its *per-example fields* are the tensors and
NumPy arrays with a leading dimension, and the lists or tuples of plain values (file names, string labels,
metadata: anything that is not a tensor, an array or a container). Every per-example field must have one
entry per example; a chunk takes the same rows of all of them. 0-dim tensors and non-sequence values are
shared by every chunk. A field whose length differs from the batch's is an error that names the field:
cutting tensors and leaving a list whole would pair example ``i`` with someone else's metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

try:  # NumPy is optional for the package.
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

__all__ = ["count_examples", "split_examples"]


def _is_array(obj: Any) -> bool:
    return isinstance(obj, Tensor) or (np is not None and isinstance(obj, np.ndarray))


def _is_value_list(obj: Any) -> bool:
    """A list or tuple of plain values (strings, numbers, objects): one field with one entry per example."""
    if not isinstance(obj, (list, tuple)) or _is_namedtuple(obj) or not obj:
        return False
    return not any(_is_array(item) or isinstance(item, (Mapping, list, tuple)) for item in obj)


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def _fields(batch: Any, path: str = "batch") -> list[tuple[str, int]]:
    """``(path, length)`` of every per-example field of ``batch``."""
    if _is_array(batch):
        return [(path, int(batch.shape[0]))] if batch.ndim > 0 else []
    if _is_value_list(batch):
        return [(path, len(batch))]
    if isinstance(batch, Mapping):
        return [f for key, value in batch.items() for f in _fields(value, f"{path}[{key!r}]")]
    if isinstance(batch, (list, tuple)):
        return [f for i, value in enumerate(batch) for f in _fields(value, f"{path}[{i}]")]
    return []


def count_examples(batch: Any) -> int:
    """The number of examples in ``batch``: the common length of its per-example fields.

    Raises:
        ValueError: when the batch has no per-example field, or when two of them disagree (naming both).
    """
    fields = _fields(batch)
    if not fields:
        raise ValueError(
            f"m-sharpness cuts a batch into chunks of examples, but this {type(batch).__name__} has no tensor, "
            "array or list with one entry per example."
        )
    path, n = fields[0]
    for other, length in fields[1:]:
        if length != n:
            raise ValueError(
                f"m-sharpness cuts a batch into chunks of examples, but {other} has {length} entries while {path} "
                f"has {n}: every per-example field (tensor, array, list of values) must have one entry per example. "
                "Move fields that are not per-example out of the training batch, or drop `m`."
            )
    return n


def _cut(obj: Any, start: int, stop: int) -> Any:
    if _is_array(obj):
        return obj[start:stop] if obj.ndim > 0 else obj
    if _is_value_list(obj):
        return type(obj)(obj[start:stop])
    if isinstance(obj, Mapping):
        cut = {k: _cut(v, start, stop) for k, v in obj.items()}
        try:  # keep the mapping's own type (OrderedDict, a tokenizer's BatchEncoding) where it rebuilds from a dict
            return type(obj)(cut)
        except TypeError:
            return cut
    if _is_namedtuple(obj):
        return type(obj)(*(_cut(v, start, stop) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cut(v, start, stop) for v in obj)
    return obj


def split_examples(batch: Any, m: int | None) -> list[tuple[Any, float]]:
    """Chunks of ``m`` consecutive examples of ``batch`` with their weights ``|chunk| / |batch|``.

    When ``m`` does not divide the batch (the last batch of an epoch), the last chunk is smaller and weighs
    proportionally less, so the chunk losses still average to the batch mean. ``m=None`` or ``m >= |batch|``
    gives the batch itself.

    Example::

        >>> import torch
        >>> batch = {"x": torch.arange(5), "name": ["a", "b", "c", "d", "e"]}
        >>> [(chunk["name"], weight) for chunk, weight in split_examples(batch, 2)]
        [(['a', 'b'], 0.4), (['c', 'd'], 0.4), (['e'], 0.2)]
    """
    if m is None:
        return [(batch, 1.0)]
    n = count_examples(batch)
    if m >= n:
        return [(batch, 1.0)]
    return [(_cut(batch, s, min(s + m, n)), (min(s + m, n) - s) / n) for s in range(0, n, m)]
