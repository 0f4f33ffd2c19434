"""Replaying a random state: SAM's ``same_dropout`` draws the same dropout masks at ``w`` and at ``w + e``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["RNGState"]


class RNGState:
    """The state of the generators a module's random ops draw from: torch's CPU generator and, for a module
    on a CUDA device, that device's generator."""

    def __init__(self, cpu: torch.Tensor, device: torch.device, cuda: torch.Tensor | None) -> None:
        self.cpu, self.device, self.cuda = cpu, device, cuda

    @classmethod
    def capture(cls, device: torch.device) -> RNGState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), device, cuda)

    def _install(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)

    @staticmethod
    @contextmanager
    def replaying(state: RNGState | None) -> Iterator[None]:
        """Run the block from ``state`` (nothing changes when it is ``None``), then put back the state the
        block found, so the replayed draws do not advance the generators."""
        if state is None:
            yield
            return
        current = RNGState.capture(state.device)
        state._install()
        try:
            yield
        finally:
            current._install()
