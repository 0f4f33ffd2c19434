"""Schedules for SAM's radius ``rho``: plain objects (YAML-friendly for LightningCLI) mapping a step to a value."""

from __future__ import annotations

import math

from lightning_sharpness.validation import check_int, check_rho

__all__ = ["ConstantRho", "CosineRho", "LinearRho", "ProportionalRho", "RhoSchedule", "StepRho", "validate_rho"]

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


class ProportionalRho(RhoSchedule):
    """GSAM's radius: ``rho`` follows the learning rate, ``rho_min + (rho_max - rho_min) (lr - lr_min) /
    (lr_max - lr_min)``, read from the optimizer's first param group at each step (``rho_max`` when
    ``lr_max <= lr_min``), as pytorch-optimizer's ``ProportionScheduler``.

    ``lr_max=None`` takes the param group's ``initial_lr`` (set by torch's LR schedulers), else its learning
    rate when the engine first binds to the optimizer. The engine binds it (:meth:`follow_optimizer`).

    Raises:
        ValueError: a radius or learning rate that is not a finite number >= 0; ``rho_min > rho_max``.
    """

    def __init__(self, rho_max: float = 0.05, rho_min: float = 0.05, lr_max: float | None = None, lr_min: float = 0.0):
        self.rho_max = validate_rho(rho_max, "rho_max")
        self.rho_min = validate_rho(rho_min, "rho_min")
        if self.rho_min > self.rho_max:
            raise ValueError(f"`rho_min` must be <= `rho_max`, got rho_min={rho_min!r} > rho_max={rho_max!r}.")
        self.lr_max = None if lr_max is None else validate_rho(lr_max, "lr_max")
        self.lr_min = validate_rho(lr_min, "lr_min")
        self._optimizer = None

    def follow_optimizer(self, optimizer) -> None:
        self._optimizer = optimizer
        if self.lr_max is None:
            group = optimizer.param_groups[0]
            self.lr_max = float(group.get("initial_lr", group["lr"]))

    def __call__(self, step: int) -> float:
        if self._optimizer is None:
            raise RuntimeError("ProportionalRho reads the learning rate: bind it with `follow_optimizer` first.")
        lr = float(self._optimizer.param_groups[0]["lr"])
        if self.lr_max > self.lr_min:
            return self.rho_min + (self.rho_max - self.rho_min) * (lr - self.lr_min) / (self.lr_max - self.lr_min)
        return self.rho_max

    def __repr__(self) -> str:
        return (
            f"ProportionalRho(rho_max={self.rho_max!r}, rho_min={self.rho_min!r}, lr_max={self.lr_max!r}, "
            f"lr_min={self.lr_min!r})"
        )

    def __getstate__(self) -> dict:
        # deep copies (the mixin copies its engine per optimizer) must not drag the optimizer along
        return {**self.__dict__, "_optimizer": None}
