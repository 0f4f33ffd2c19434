"""On what the monitor measures: the probe set (a fixed, seeded draw of examples from a DataLoader, collated by its
``collate_fn``, kept across resumes by its indices) and the loss it measures (the module's own step loss by
default)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_sharpness.measures import LossFn

__all__ = ["ProbeSet", "extract_loss", "probe_loader", "select_probe", "step_loss"]


@dataclass
class ProbeSet:
    """The probe batches: ``indices[b]`` are the dataset indices of batch ``b`` (``None``: the first batches)."""

    indices: list[list[int]] | None
    batches: list[Any] = field(default_factory=list)


def select_probe(loader: DataLoader, n_batches: int, seed: int, indices: list[list[int]] | None) -> ProbeSet:
    dataset = loader.dataset
    batch_size = loader.batch_size
    map_style = not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__") and batch_size is not None
    if not map_style:
        batches: list[Any] = []
        for batch in loader:
            batches.append(batch)
            if len(batches) == n_batches:
                break
        if not batches:
            raise ValueError("The probe dataloader yields no batch; SharpnessMonitor has nothing to measure on.")
        return ProbeSet(indices=None, batches=batches)
    n = len(dataset)
    if indices is None or any(i >= n for chunk in indices for i in chunk):
        take = min(n, n_batches * batch_size)
        if take == 0:
            raise ValueError("The probe dataset is empty; SharpnessMonitor has nothing to measure on.")
        if take < n_batches * batch_size:
            rank_zero_warn(
                f"SharpnessMonitor: the probe dataset has {n} examples, fewer than probe_batches * batch_size = "
                f"{n_batches} * {batch_size}; measuring on all {n}."
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:take].tolist()
        indices = [perm[i : i + batch_size] for i in range(0, take, batch_size)]
    collate = loader.collate_fn
    batches = [collate([dataset[i] for i in chunk]) for chunk in indices]
    return ProbeSet(indices=indices, batches=batches)


def probe_loader(probe: str | DataLoader, trainer: pl.Trainer, pl_module: pl.LightningModule) -> DataLoader:
    """The DataLoader the probe set is drawn from: ``probe`` itself, or the run's train or validation loader.

    Raises:
        ValueError: when the run has no such loader, naming ``probe`` and the alternatives.
    """
    if isinstance(probe, DataLoader):
        return probe
    if probe == "train":
        loader = trainer.train_dataloader
        if loader is None:  # trainer.validate(): the train dataloader was never loaded
            source = trainer.datamodule if trainer.datamodule is not None else pl_module
            try:
                loader = source.train_dataloader()
            except Exception as err:
                raise ValueError(
                    "SharpnessMonitor(probe='train') found no train dataloader (this run only validates and "
                    f"{type(source).__name__}.train_dataloader() failed: {err}). Pass probe='val' or a DataLoader."
                ) from err
    else:
        loader = trainer.val_dataloaders
        if loader is None or (isinstance(loader, (list, tuple, Mapping)) and len(loader) == 0):
            loader = _val_source(trainer, pl_module)
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()))
    if not isinstance(loader, DataLoader):
        raise ValueError(f"SharpnessMonitor needs a torch DataLoader as probe source, got {type(loader).__name__}.")
    return loader


def _val_source(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    """The validation dataloader before the loop has loaded it (at fit start, when there is no sanity check):
    the one given to ``fit`` / ``validate``, or the datamodule's or module's ``val_dataloader()``."""
    loop = trainer.validate_loop if trainer.state.fn == "validate" else trainer.fit_loop.epoch_loop.val_loop
    source = getattr(loop, "_data_source", None)
    loader = None
    if source is not None and source.is_defined():
        loader = source.dataloader()
    elif source is None:  # another Lightning: the hooks themselves
        for owner in (trainer.datamodule, pl_module):
            if owner is not None and is_overridden("val_dataloader", owner):
                loader = owner.val_dataloader()
                break
    if loader is None or (isinstance(loader, (list, tuple, Mapping)) and len(loader) == 0):
        raise ValueError(
            "SharpnessMonitor(probe='val') measures on the validation dataloader, and this run has none: pass "
            "one (`trainer.fit(model, train_loader, val_loader)`, or `val_dataloader()` in the module or "
            "datamodule), or set the monitor's `probe` to 'train' or a DataLoader of its own."
        )
    return loader


def extract_loss(output: Any, hook: str) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    raise ValueError(
        f"SharpnessMonitor uses the module's `{hook}` loss, but `{hook}` returned {type(output).__name__}, not a "
        "loss tensor or a dict with a `loss` tensor. Pass `loss_fn=lambda model, batch: ...` to the monitor."
    )


def step_loss(hook: str) -> LossFn:
    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        return extract_loss(getattr(model, hook)(batch, 0), hook)

    loss_fn.__name__ = f"{hook}_loss"
    return loss_fn
