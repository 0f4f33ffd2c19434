"""Random probe vectors drawn from a local generator (the global RNG is never touched)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rademacher", "make_generator"]


def make_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU generator from a seed (``None`` means 0, for reproducibility) or the generator itself."""
    if isinstance(seed, torch.Generator):
        return seed
    if seed is None:
        seed = 0
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"`seed` must be an int or a torch.Generator, got {seed!r}.")
    return torch.Generator().manual_seed(seed)


def rademacher(dim: int, k: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A ``(dim, k)`` block of independent +-1 entries."""
    bits = torch.randint(0, 2, (dim, k), generator=generator)
    return (bits.to(dtype) * 2 - 1).to(device)
