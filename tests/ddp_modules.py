"""Picklable modules, callbacks and a counting DDP communication hook for the 2-process (gloo) tests."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import DistributedSampler

from lightning_sharpness import SAMEngine, SAMMixin

COMMUNICATION = {"calls": 0, "bytes": 0}


def counting_allreduce_hook(state, bucket):
    """The default all-reduce, counted: how many gradient all-reduces, and how many bytes."""
    buffer = bucket.buffer()
    COMMUNICATION["calls"] += 1
    COMMUNICATION["bytes"] += buffer.numel() * buffer.element_size()
    return default_hooks.allreduce_hook(state, bucket)


class CountAllReduces(pl.Callback):
    """Registers :func:`counting_allreduce_hook` on the DDP wrapper. Lightning registers `ddp_comm_hook` on CUDA
    only, so on CPU the hook has to be put in place by hand, before the first backward."""

    def on_fit_start(self, trainer, pl_module) -> None:
        trainer.strategy.model.register_comm_hook(None, counting_allreduce_hook)


class DDPClassifier(pl.LightningModule):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class ManualDDPClassifier(SAMMixin, DDPClassifier):
    def __init__(self, net: torch.nn.Module, sam: SAMEngine) -> None:
        super().__init__(net)
        self.automatic_optimization = False
        self.sam = sam

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.sam_step(self.optimizers(), lambda b: F.cross_entropy(self.net(b[0]), b[1]), batch)


def shard_indices(n: int, world: int) -> list[torch.Tensor]:
    """The examples each process trains on: Lightning's training DistributedSampler always shuffles (seed 0)."""
    return [
        torch.tensor(list(DistributedSampler(range(n), world, rank, shuffle=True, seed=0))) for rank in range(world)
    ]


class ReleaseProcessGroup(pl.Callback):
    """Destroys the process group once every process is done. Lightning registers that clean-up at exit for
    NCCL only; a spawned gloo worker that exits while its peer's connections are closing can abort ("terminate
    called without an active exception") after the run itself has finished, which fails the test for nothing.
    Not for FSDP: the spawn launcher gathers its sharded state dict after teardown."""

    def teardown(self, trainer, pl_module, stage) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


class DumpState(pl.Callback):
    """Each process writes its final weights and its communication count to ``folder/rank<r>.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        # the strategy gathers a full state dict where parameters are sharded (FSDP)
        full = trainer.strategy.lightning_module_state_dict()
        state = {k: v.detach().cpu().clone() for k, v in full.items()}
        torch.save({"state": state, **COMMUNICATION}, Path(self.folder) / f"rank{trainer.global_rank}.pt")
