"""Where the numbers go: the values on every logger as ``sharpness/<tag>``, and on TensorBoard the loss-landscape
pictures and the spectral densities."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_sharpness.batching import move_to_device
from lightning_sharpness.landscape import loss_landscape_1d, loss_landscape_2d
from lightning_sharpness.measures import DensityResult, LossFn
from lightning_sharpness.monitor.spec import Measure
from lightning_sharpness.plotting import log_density, plot_landscape_1d, plot_landscape_2d

__all__ = ["landscape_images", "log_measurement"]


def landscape_images(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    loss_fn: LossFn,
    probe_batches: list[Any],
    config: Mapping[str, Any],
) -> dict[str, Any]:
    """The loss-landscape pictures of ``config`` (rank zero, TensorBoard only), on the whole probe set."""
    if not trainer.is_global_zero or not any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers):
        return {}
    batches = [move_to_device(b, pl_module.device) for b in probe_batches]
    cfg = config
    images = {}
    if 1 in cfg["dims"]:
        curve = loss_landscape_1d(pl_module, loss_fn, batches, steps=cfg["steps"], span=cfg["span"], seed=cfg["seed"])
        images["landscape_1d"] = plot_landscape_1d(curve)
    if 2 in cfg["dims"]:
        surface = loss_landscape_2d(pl_module, loss_fn, batches, steps=cfg["steps"], span=cfg["span"], seed=cfg["seed"])
        images["landscape_2d"] = plot_landscape_2d(surface)
    return images


def log_measurement(
    trainer: pl.Trainer,
    step: int,
    values: dict[str, float],
    results: dict[str, Any],
    images: dict[str, Any],
    measures: Sequence[Measure],
    density: str,
    scalars: bool = True,
) -> None:
    """The values as ``sharpness/<tag>`` on every logger; on TensorBoard the pictures and the spectral densities."""
    if not trainer.is_global_zero:
        return
    if scalars:  # (trainer.validate logs them through the module instead)
        metrics = {f"sharpness/{k}": v for k, v in values.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
    tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    for logger in tensorboards:
        writer = logger.experiment
        for tag, image in images.items():
            writer.add_image(f"sharpness/{tag}", image, global_step=step, dataformats="HWC")
        for m in measures:
            if isinstance(results.get(m.tag), DensityResult) and density != "none":
                log_density(writer, f"sharpness/{m.tag}", results[m.tag], step, mode=density)
        writer.flush()
