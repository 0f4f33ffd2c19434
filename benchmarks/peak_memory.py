"""Peak tensor memory of a block of code on CPU, where the allocator keeps no statistics."""

from __future__ import annotations

from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action  # the timeline behind export_memory_timeline


class PeakMemory:
    """Peak bytes of live tensors while the block runs, from the profiler's memory timeline: every tensor created
    adds its size, every one destroyed subtracts it.

    Example::

        with PeakMemory() as mem:
            train_one_step()
        print(mem.peak)
    """

    def __enter__(self) -> PeakMemory:
        self._prof = profile(
            activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
        )
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        current = peak = 0
        for _, action, _, size in sorted(self._prof._memory_profile().timeline, key=lambda r: r[0]):
            current += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
            peak = max(peak, current)
        self.peak = peak
