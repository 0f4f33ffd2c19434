"""Random probe vectors drawn from a local generator (the global RNG is never touched)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rademacher", "rademacher_rows", "make_generator"]


def make_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU generator from a seed (``None`` means 0, for reproducibility) or the generator itself."""
    if isinstance(seed, torch.Generator):
        return seed
    if seed is None:
        seed = 0
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"`seed` must be an int or a torch.Generator, got {seed!r}.")
    return torch.Generator().manual_seed(seed)


def _signs(shape: tuple[int, int], generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    # randint straight into the working dtype: the same stream as int64, without the int64 buffer and a cast
    bits = torch.randint(0, 2, shape, generator=generator, dtype=dtype)
    return bits.mul_(2).sub_(1).to(device)


def rademacher(dim: int, k: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A ``(dim, k)`` block of independent +-1 entries (one probe per column)."""
    return _signs((dim, k), generator, dtype, device)


_SIGNS: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def rademacher_rows(k: int, dim: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``k`` probes of independent +-1 entries as the rows of a ``(k, dim)`` block, in ``dtype`` on ``device``.

    Eight signs per random byte (the bits of uniform bytes from ``generator``, looked up in a ``(256, 8)`` table of
    signs): about six times faster than one draw per entry, and no int64 buffer. The rows are the consecutive
    ``dim``-entry pieces of one stream of signs (a different stream from :func:`rademacher`)."""
    key = (dtype, torch.device(device))
    table = _SIGNS.get(key)
    if table is None:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        table = _SIGNS[key] = bits.to(dtype=dtype, device=device).mul_(2).sub_(1)
    count = k * dim
    raw = torch.empty((count + 7) // 8, dtype=torch.uint8).random_(generator=generator)
    signs = table.index_select(0, raw.to(device=device, dtype=torch.int32))  # (bytes, 8)
    return signs.view(-1)[:count].view(k, dim)
