"""The batch contract, in one place: what one batch and several batches are, how a batch is sized, cut into
chunks of examples and moved to a device. The measures, the monitor, the landscapes and SAM's m-sharpness all
read batches through this module.

**One batch** is any nest of dicts, tuples, lists and named tuples holding tensors: a tensor; a tuple or list of
tensors (``(x, y)``, or ``[x, y]`` as a DataLoader collates a ``TensorDataset``); a dict of tensors. **Several
batches** are a list of such batches (``[(x1, y1), (x2, y2)]``), a DataLoader or any other iterable of batches
that is not a list, tuple or dict (a generator), or ``Batches([...])``.

A list whose items are all tensors is ambiguous: ``[x, y]`` from a DataLoader is one batch, ``[x1, x2]`` may be two
single-tensor batches. It is one batch (the DataLoader convention); several single-tensor batches are passed as
``Batches([x1, x2])`` (as curvlinops fixes its data contract and offers ``batch_size_fn`` as the escape).

**Size.** :func:`batch_size` is the leading size of a batch's first tensor (what weighs a batch in a mean over
batches); :func:`count_examples` is stricter and checks that every per-example field agrees (what cutting needs).

**Cutting** (m-sharpness). A batch's *per-example fields* are the tensors and NumPy arrays with a leading
dimension, and the lists or tuples of plain values (file names, string labels, metadata: anything that is not a
tensor, an array or a container). Every per-example field must have one entry per example; a chunk takes the same
rows of all of them. 0-dim tensors and non-sequence values are shared by every chunk. A field whose length differs
from the batch's is an error that names the field: cutting tensors and leaving a list whole would pair example
``i`` with someone else's metadata. :func:`split_examples` allows a short last chunk and weighs it by its size.

**Moving**: :func:`move_to_device` is Lightning's ``move_data_to_device``.

Example::

    >>> import torch
    >>> x, y = torch.zeros(6, 3), torch.arange(6)
    >>> items, weights = as_batches([(x, y), (x[:2], y[:2])])
    >>> len(items), weights
    (2, [0.75, 0.25])
    >>> [batch_size(c) for c in split_batch((x, y), 3)]
    [3, 3]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor

try:  # NumPy is optional for the package.
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

__all__ = [
    "BATCH_FORMS",
    "Batches",
    "as_batches",
    "batch_size",
    "count_examples",
    "first_examples",
    "is_ambiguous",
    "move_to_device",
    "split_batch",
    "split_examples",
]

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

        >>> import torch
        >>> x1, x2 = torch.zeros(4, 3), torch.zeros(2, 3)
        >>> as_batches(Batches([x1, x2]))[1], as_batches([x1, x2])[1]
        ([0.6666666666666666, 0.3333333333333333], [1.0])
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
    """Number of examples in a batch: the leading size of its first tensor.

    Raises:
        ValueError: when the batch holds no tensor or its first tensor is 0-dim.
    """
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


def as_list(batches: Any) -> list[Any]:
    """The batches as a list (a DataLoader is iterated once), by the contract of the module.

    Raises:
        TypeError: when ``batches`` is neither one batch nor an iterable of batches.
    """
    if isinstance(batches, Batches):
        return list(batches)
    if _is_single_batch(batches):
        return [batches]
    if isinstance(batches, Iterable) and not isinstance(batches, (str, bytes)):
        return list(batches)
    raise TypeError(f"Got `batches` of type {type(batches).__name__}. {BATCH_FORMS}")


def as_batches(batches: Any) -> tuple[list[Any], list[float]]:
    """The batches as a list and their weights ``n_b / N``, which make a mean over batches a mean over examples.

    Raises:
        TypeError: when ``batches`` is neither one batch nor an iterable of batches.
        ValueError: when there is no batch, a batch has no tensor with a batch dimension, or a batch is empty.
    """
    items = as_list(batches)
    if not items:
        raise ValueError(f"`batches` is empty: pass at least one batch with at least one example. {BATCH_FORMS}")
    sizes = [batch_size(b) for b in items]
    if any(s == 0 for s in sizes):
        raise ValueError(f"`batches` contains an empty batch (batch sizes {sizes}).")
    total = float(sum(sizes))
    return items, [s / total for s in sizes]


def move_to_device(batch: Any, device: torch.device | str) -> Any:
    """The batch with every tensor (and anything with a ``.to``) on ``device``: Lightning's own utility, which keeps
    the containers' types (named tuples, dataclasses, a tokenizer's ``BatchEncoding``)."""
    return move_data_to_device(batch, device)


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


def split_batch(batch: Any, m: int) -> list[Any]:
    """Cut a batch into chunks of ``m`` examples: the measures' m-sharpness, where every chunk has the same size.

    Raises:
        ValueError: when ``m`` does not divide the batch size (or the fields disagree, see :func:`count_examples`).
    """
    n = batch_size(batch)
    if not (isinstance(m, int) and m > 0) or n % m:
        raise ValueError(f"`m` must divide every batch size, got m={m!r} for a batch of {n} examples.")
    return [chunk for chunk, _ in split_examples(batch, m)]


def first_examples(batches: Sequence[Any], n: int | None) -> list[Any]:
    """The first ``n`` examples of ``batches`` (all of them for ``None``): whole batches, then the head of one.

    Example::

        >>> import torch
        >>> [batch_size(b) for b in first_examples([torch.zeros(4), torch.zeros(4)], 6)]
        [4, 2]
    """
    if n is None:
        return list(batches)
    out, left = [], n
    for batch in batches:
        if left <= 0:
            break
        size = batch_size(batch)
        out.append(batch if size <= left else _cut(batch, 0, left))
        left -= size
    return out
