"""When the monitor measures and how much: the schedule, the time budget, and the plan made at fit start from a
forecast of the cost (timed products and gradients, times the units each measure's record counts).

Example::

    >>> from lightning_sharpness.monitor.spec import parse_measures
    >>> measures = parse_measures([{"name": "hessian_trace", "method": "hutchinson", "matvecs": 10}], seed=0)
    >>> options = {m.tag: dict(m.options) for m in measures}
    >>> cost = lambda o: sum(o[m.tag]["matvecs"] for m in measures)  # seconds: one per product
    >>> fit_products(measures, options, 4.5, cost, dim=100)["hessian_trace"]["matvecs"]
    4
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_sharpness.batching import Batches
from lightning_sharpness.measures import LossFn, hessian_operator, measuring
from lightning_sharpness.monitor.context import positive_finite, sync
from lightning_sharpness.monitor.spec import Measure

__all__ = [
    "AUTO_MAX_OVERHEAD",
    "Plan",
    "Schedule",
    "final_step",
    "fit_products",
    "forecast_training",
    "plan_line",
    "scheduled_points",
    "size_plan",
    "time_gradient",
    "time_products",
]

#: ``max_overhead="auto"``: this budget for the default schedule, none for an explicit one.
AUTO_MAX_OVERHEAD = 0.05
#: Under a budget, the plan sizes a measurement so that this many of them (fewer on a shorter schedule) fit.
PLANNED_POINTS = 8
#: Under a budget, the probe set is halved down to this many examples before the products are cut.
MIN_EXAMPLES = 8
#: The end-of-training measurement of the plan is skipped only when it would bring the time spent measuring over
#: this multiple of ``max_overhead`` (the plan reserved room for it, but its forecasts may be off by this much).
END_SLACK = 2.0


@dataclass(frozen=True)
class Schedule:
    """When to measure: every ``every_n_steps`` optimizer steps, every ``every_n_epochs`` epochs, at the end."""

    every_n_steps: int | None
    every_n_epochs: int | None
    on_train_end: bool


@dataclass
class Plan:
    """What the monitor measures in this run, decided at fit start from a forecast of the cost (see ``plan``)."""

    examples: int  # the first ``examples`` of the probe set are measured
    probe_examples: int
    options: dict[str, dict[str, Any]]  # per measure tag
    at_start: bool  # measure at fit start
    at_end: bool  # room reserved for the end of training
    forecast_seconds: float  # one measurement
    hvp_seconds: float  # one Hessian-vector product on the measured examples
    build_seconds: float  # one gradient with its graph on the measured examples
    train_seconds: float | None  # forecast training time of the run (None: unbounded or not known)
    budget: float | None  # max_overhead in force
    timing_seconds: float = 0.0  # what the forecast itself took
    reason: str = ""
    scheduled: int | None = None  # measurements the schedule asks for in this fit (None: not known)

    @property
    def measurements(self) -> int:
        """Measurements the plan reserved room for (fit start and end of training)."""
        return int(self.at_start) + int(self.at_end)


def final_step(trainer: pl.Trainer) -> bool:
    """Whether this is the last optimizer step of the fit, which the end-of-training measurement covers."""
    try:
        total = positive_finite(trainer.estimated_stepping_batches)
    except Exception:  # noqa: BLE001 - a loader without a length, a strategy without the estimate
        total = None
    return total is not None and trainer.global_step >= total


def forecast_training(trainer: pl.Trainer, step_seconds: float, probe_batch_size: int) -> float | None:
    """Training seconds left in this fit: the batches to train times the timed forward-backward pass, scaled
    from the probe batch to the training batch size (``None`` when the run has no known length)."""
    try:
        steps = positive_finite(trainer.estimated_stepping_batches)
    except Exception:  # noqa: BLE001
        steps = None
    if steps is None:
        return None
    steps = max(steps - trainer.global_step, 1)
    train_batch = getattr(trainer.train_dataloader, "batch_size", None)
    scale = train_batch / probe_batch_size if isinstance(train_batch, int) and train_batch > 0 else 1.0
    return steps * trainer.accumulate_grad_batches * step_seconds * scale


def scheduled_points(trainer: pl.Trainer, schedule: Schedule) -> int:
    """Measurements the schedule asks for in this fit: at fit start, the periodic ones, at the end."""
    try:
        steps = positive_finite(trainer.estimated_stepping_batches)
        per_epoch = positive_finite(trainer.num_training_batches)
    except Exception:  # noqa: BLE001
        steps = per_epoch = None
    if steps is None:
        return PLANNED_POINTS
    steps = int(steps)
    periodic, last_covered = 0, False
    if schedule.every_n_steps:
        periodic += steps // schedule.every_n_steps
        last_covered = steps % schedule.every_n_steps == 0
    if schedule.every_n_epochs and per_epoch is not None:
        epochs = math.ceil(steps / max(1, math.ceil(per_epoch / trainer.accumulate_grad_batches)))
        periodic += epochs // schedule.every_n_epochs
        last_covered = last_covered or epochs % schedule.every_n_epochs == 0
    return 1 + periodic + int(schedule.on_train_end and not last_covered)


def fit_products(
    measures: Sequence[Measure],
    options: Mapping[str, dict[str, Any]],
    target: float,
    cost: Callable[[dict], float],
    dim: int,
) -> dict[str, dict[str, Any]] | None:
    """The options with every measure's products scaled by the largest common factor that fits ``target``."""

    def at(factor: float) -> dict[str, dict[str, Any]]:
        return {m.tag: m.scaled(options[m.tag], factor, dim) for m in measures}

    if cost(at(0.0)) > target:
        return None
    low, high = 0.0, 1.0
    for _ in range(20):
        mid = (low + high) / 2
        low, high = (mid, high) if cost(at(mid)) <= target else (low, mid)
    return at(low)


def plan_line(plan: Plan, measures: Sequence[Measure], schedule: Schedule) -> str:
    """The one line the monitor announces its plan in."""
    what = ", ".join(Measure.describe(m.name, plan.options.get(m.tag, m.options)) for m in measures)
    examples = f"{plan.examples} probe examples"
    if plan.examples < plan.probe_examples:
        examples += f" (of {plan.probe_examples})"
    when = []
    if plan.at_start:
        when.append("at fit start")
    if schedule.every_n_steps:
        when.append(f"every {schedule.every_n_steps} steps")
    if schedule.every_n_epochs:
        when.append("every epoch" if schedule.every_n_epochs == 1 else f"every {schedule.every_n_epochs} epochs")
    if schedule.on_train_end:
        when.append("at the end of training")
    if plan.budget is not None and len(when) > int(plan.at_start) + int(plan.at_end):
        when[-1] += f" (periodic ones{'' if plan.at_end else ' and the end one'} while within the budget)"
    line = f"SharpnessMonitor plan: {what} on {examples}, {', '.join(when) or 'never'}; forecast "
    line += f"{plan.forecast_seconds:.3g} s per measurement (one HVP {plan.hvp_seconds:.3g} s)"
    if plan.train_seconds is not None and plan.budget is None and plan.scheduled:
        total = plan.scheduled * plan.forecast_seconds
        line += (
            f", {total:.3g} s for the {plan.scheduled} scheduled = {total / plan.train_seconds:.1%} of the "
            f"forecast training time {plan.train_seconds:.3g} s"
        )
    elif plan.train_seconds is not None and plan.measurements:
        reserved = plan.measurements * plan.forecast_seconds
        line += (
            f", {reserved:.3g} s for {'start and end' if plan.measurements == 2 else 'one'} = "
            f"{reserved / plan.train_seconds:.1%} of the forecast training time {plan.train_seconds:.3g} s"
        )
    line += "; no time budget" if plan.budget is None else f"; budget max_overhead={plan.budget}"
    if plan.reason:
        line += f"; {plan.reason}"
    return line + "."


def size_plan(
    measures: Sequence[Measure],
    budget: float | None,
    *,
    examples: int,
    dim: int,
    points: int,
    on_train_end: bool,
    time_products: Callable[[int, bool], tuple[float, float]],
    train_seconds: Callable[[], float | None],
    bounded: bool,
    start: float,
) -> Plan:
    """Count the products of each measure, price them with ``time_products(n, warm_up)`` (seconds of a gradient
    graph and of one Hessian-vector product on the first ``n`` probe examples) and size the measurement to the
    budget of the forecast training time (``train_seconds()``, ``None`` for a run of unknown length; ``bounded``
    says beforehand whether the run has a length): first fewer probe examples (halving down to ``MIN_EXAMPLES``),
    then fewer products, then only one measurement (the end of training), else none. ``points``: the measurements
    the schedule asks for; ``start``: when the forecast began (its own time counts against the budget)."""
    total = examples
    full = {m.tag: dict(m.options) for m in measures}
    timings: dict[int, tuple[float, float]] = {}

    def timed(n: int) -> tuple[float, float]:
        if n not in timings:
            timings[n] = time_products(n, not timings)
        return timings[n]

    def cost(n: int, options: Mapping[str, dict[str, Any]]) -> float:
        build, hvp = timed(n)
        units = {"build": 0.0, "hvp": 0.0, "grad": 0.0, "forward": 0.0}
        for m in measures:
            for kind, count in m.cost_units(options[m.tag], dim).items():
                units[kind] += count
        return (units["build"] + units["grad"] + units["forward"] / 3) * build + units["hvp"] * hvp

    def plan(n: int, options: dict, count: int = 2, reason: str = "") -> Plan:
        build, hvp = timed(n)
        return Plan(
            examples=n,
            probe_examples=total,
            options=options,
            at_start=count >= 2 or (count == 1 and not on_train_end),
            at_end=on_train_end and count >= 1,
            forecast_seconds=cost(n, options),
            hvp_seconds=hvp,
            build_seconds=build,
            train_seconds=train,
            budget=budget,
            reason=reason,
            scheduled=points,
        )

    rungs = [total]
    while rungs[-1] // 2 >= MIN_EXAMPLES:
        rungs.append(rungs[-1] // 2)
    rungs.reverse()  # ascending: each timing costs little next to the measurements the next one may allow
    sizing = budget is not None and bounded
    timed(rungs[0] if sizing else total)  # first: it warms the kernels up for the gradient's timing
    train = train_seconds()
    if not sizing or train is None:
        return plan(total, full)
    # Under a budget the Lanczos count is capped at its forecast, so that the forecast bounds the cost.
    sized = {m.tag: m.scaled(full[m.tag], 1.0, dim) for m in measures}
    pair = min(points, 2)

    def left() -> float:  # the budget, less what the forecast has taken so far
        return budget * train - (time.perf_counter() - start)

    chosen = None
    for n in rungs:
        if cost(n, sized) > left() / min(points, PLANNED_POINTS):
            break
        chosen = n
    if chosen is not None:
        return plan(chosen, sized)
    smallest = rungs[0]
    if cost(smallest, sized) <= left() / pair:
        return plan(smallest, sized)
    for count in (pair, 1) if pair == 2 else (1,):
        target = left() / count
        options = fit_products(measures, sized, target, lambda o: cost(smallest, o), dim)
        if options is not None:
            reason = "" if count == pair else "only one measurement fits in the budget"
            return plan(smallest, options, count=count, reason=reason)
    least = {m.tag: m.scaled(sized[m.tag], 0.0, dim) for m in measures}
    forecast = cost(smallest, least)
    return plan(
        smallest,
        least,
        count=0,
        reason=(
            f"no measurement fits in the budget: at its smallest ({smallest} examples, fewest products) one is "
            f"forecast at {forecast:.3g} s, more than max_overhead={budget} of the forecast training time "
            f"{train:.3g} s; it measures only where the training turns out slower than forecast. Pass "
            "max_overhead=None (or a larger one) to measure anyway, or measure the saved checkpoint with "
            "trainer.validate"
        ),
    )


def time_gradient(pl_module: pl.LightningModule, loss_fn: LossFn, batch: Any) -> float:
    """Seconds of one forward and backward pass of the loss on one batch, about a training step's work (timed
    after the products, which warmed the kernels up)."""
    params = [p for p in pl_module.parameters() if p.requires_grad]
    with measuring(pl_module), torch.enable_grad():
        sync(pl_module.device)
        start = time.perf_counter()
        torch.autograd.grad(loss_fn(pl_module, batch), params, allow_unused=True)
        sync(pl_module.device)
        return time.perf_counter() - start


def time_products(
    pl_module: pl.LightningModule, loss_fn: LossFn, batches: Sequence[Any], warm_up: bool = False
) -> tuple[float, float]:
    """Seconds of building the gradient graphs of ``batches`` and of one Hessian-vector product through them,
    by the operator the measures use (the same backend choice; a model it cannot handle fails here). With
    ``warm_up``, the faster of two of each: the first of a process pays for warming the kernels up (twice the
    time on a CPU ResNet-18)."""
    build = hvp = math.inf
    with measuring(pl_module):
        op = hessian_operator(pl_module, loss_fn, Batches(batches))
        v = torch.ones(op.dim, dtype=op.dtype, device=op.device)
        for _ in range(2 if warm_up else 1):
            op.release()
            sync(op.device)
            start = time.perf_counter()
            op.gradient()
            sync(op.device)
            build = min(build, time.perf_counter() - start)
            start = time.perf_counter()
            op @ v
            sync(op.device)
            hvp = min(hvp, time.perf_counter() - start)
        op.release()
    return build, hvp
