"""Schedules for SAM's radius ``rho``: plain objects (YAML-friendly for LightningCLI) mapping a step to a value."""

from __future__ import annotations

import math

from lightning_sharpness.validation import check_int, check_rho

__all__ = ["ConstantRho", "CosineRho", "LinearRho", "RhoSchedule", "StepRho", "validate_rho"]

#: The radius check, under the name this module exported first.
validate_rho = check_rho


class RhoSchedule:
    """A radius that depends on the optimizer step counted from the start of SAM (``trainer.global_step``)."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class ConstantRho(RhoSchedule):
    """``rho`` at every step."""

    def __init__(self, rho: float = 0.05) -> None:
        self.rho = validate_rho(rho)

    def __call__(self, step: int) -> float:
        return self.rho


class LinearRho(RhoSchedule):
    """Linear ramp from ``start`` to ``end`` over ``steps`` steps, then constant at ``end``.

    Example: ``LinearRho(start=0.0, end=0.05, steps=1000)`` warms the radius up.
    """

    def __init__(self, start: float = 0.0, end: float = 0.05, steps: int = 1000) -> None:
        self.start = validate_rho(start, "start")
        self.end = validate_rho(end, "end")
        self.steps = check_int(steps, "steps")

    def __call__(self, step: int) -> float:
        frac = min(max(step, 0), self.steps) / self.steps
        return self.start + frac * (self.end - self.start)


class CosineRho(LinearRho):
    """Cosine interpolation from ``start`` to ``end`` over ``steps`` steps, then constant at ``end``."""

    def __call__(self, step: int) -> float:
        frac = min(max(step, 0), self.steps) / self.steps
        return self.end + 0.5 * (self.start - self.end) * (1.0 + math.cos(math.pi * frac))


class StepRho(RhoSchedule):
    """Piecewise constant: ``values[i]`` from step ``milestones[i - 1]`` on (``values[0]`` before the first)."""

    def __init__(self, milestones: list[int], values: list[float]) -> None:
        if len(values) != len(milestones) + 1:
            raise ValueError(
                f"`values` must have one more entry than `milestones`, got {len(values)} values for "
                f"{len(milestones)} milestones."
            )
        if list(milestones) != sorted(milestones) or any(not isinstance(s, int) or s < 0 for s in milestones):
            raise ValueError(f"`milestones` must be increasing non-negative integers, got {milestones!r}.")
        self.milestones = list(milestones)
        self.values = [validate_rho(v, "values") for v in values]

    def __call__(self, step: int) -> float:
        return self.values[sum(step >= s for s in self.milestones)]
