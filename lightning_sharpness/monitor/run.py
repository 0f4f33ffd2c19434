"""One measurement: every measure of the monitor on the probe batches, in order, within the products and seconds
left. Under DDP a measure whose record says it is a mean over examples runs on each process's share of the batches
and the shares are combined weighted by size (exactly the value on all of them); any other runs on all the batches on
every process, so that the logged number is that of the probe set, not a mean of per-shard values (a different,
biased number)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_sharpness.batching import Batches, batch_size
from lightning_sharpness.measures import LossFn
from lightning_sharpness.monitor.context import agree, run_together
from lightning_sharpness.monitor.spec import Measure

__all__ = ["extra_scalars", "run_measures"]


def run_measures(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    measures: Sequence[Measure],
    batches: list[Any],
    loss_fn: LossFn,
    planned: Mapping[str, dict[str, Any]],
    max_seconds: float | None,
    max_hvps: int | None,
    start: float,
) -> tuple[dict[str, float], dict[str, Any]]:
    """The values (``{tag: float}``, with extra scalars as ``tag/key``) and the results of every measure, each with
    its ``planned`` options (its own where the plan has none), capped to the ``max_hvps`` left; a measure that would
    start after ``max_seconds`` since ``start`` or cannot fit the products left is skipped with a warning."""
    device = pl_module.device
    world, rank = trainer.world_size, trainer.global_rank
    shard = batches[rank::world]
    shard_size = sum(batch_size(b) for b in shard)
    values: dict[str, float] = {}
    results: dict[str, Any] = {}
    hvps_left = max_hvps
    for m in measures:
        if max_seconds is not None and values:  # the first measure always runs
            late = time.perf_counter() - start > max_seconds
            if agree(trainer, late):
                rank_zero_warn(f"SharpnessMonitor: max_seconds={max_seconds} spent; skipping {m.tag}.")
                continue
        base = planned.get(m.tag, m.options)
        options = base if hvps_left is None else m.within(hvps_left, base)
        if options is None:
            rank_zero_warn(f"SharpnessMonitor: max_hvps={max_hvps} spent; skipping {m.tag}.")
            continue
        if world > 1 and m.linear:
            # Each process measures its share; mean of means weighted by the number of examples.
            def local(m: Measure = m, options: dict = options) -> Any:
                return m.fn(pl_module, loss_fn, Batches(shard), **options) if shard else None

            result = run_together(trainer, pl_module, local)
            local_value = 0.0 if result is None else float(result)
            total = trainer.strategy.reduce(
                torch.tensor([local_value * shard_size, float(shard_size)], dtype=torch.float64, device=device),
                reduce_op="sum",
            )
            values[m.tag] = float(total[0] / total[1])
            results[m.tag] = result
            if hvps_left is not None:  # the most any process used
                used = getattr(result, "matvecs", 0) if result is not None else 0
                hvps_left -= int(trainer.strategy.reduce(torch.tensor(used, device=device), reduce_op="max"))
        else:
            result = run_together(
                trainer,
                pl_module,
                lambda m=m, options=options: m.fn(pl_module, loss_fn, Batches(batches), **options),
            )
            values[m.tag] = float(result)
            results[m.tag] = result
            for key, value in extra_scalars(result).items():
                values[f"{m.tag}/{key}"] = value
            if hvps_left is not None:
                hvps_left -= int(getattr(result, "matvecs", 0) or 0)
    if world > 1:  # whole-set measures ran on every process; float noise aside they agree: take rank 0's
        values = trainer.strategy.broadcast(values, src=0)
    return values, results


def extra_scalars(result: Any) -> dict[str, float]:
    """Further scalars of a result worth a curve: each of several eigenvalues, the standard error."""
    extra: dict[str, float] = {}
    eigenvalues = getattr(result, "eigenvalues", None)
    if isinstance(eigenvalues, Tensor) and eigenvalues.numel() > 1:
        for i, v in enumerate(eigenvalues.flatten().tolist()):
            extra[f"eigenvalue_{i}"] = float(v)
    stderr = getattr(result, "stderr", None)
    if isinstance(stderr, (int, float, Tensor)) and (not isinstance(stderr, Tensor) or stderr.numel() == 1):
        extra["stderr"] = float(stderr)
    return extra
