"""SharpnessMonitor together with the SAM callback: measurements never see SAM's perturbed weights."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback

from lightning_sharpness.monitor import SharpnessMonitor
from lightning_sharpness.sam.callback import SAM
from tests.helpers import TRACE
from tests.helpers import MonitorNet as Net
from tests.helpers import monitor_loader as loader
from tests.helpers import monitor_trainer as make_trainer


class Weights(Callback):
    def __init__(self) -> None:
        self.at_batch_start: list[list[torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.at_batch_start.append([p.detach().clone() for p in pl_module.parameters()])


def _run(with_monitor: bool):
    torch.manual_seed(0)
    model, weights = Net(), Weights()
    callbacks = [weights, SAM(rho=0.5)]
    measured: list[list[torch.Tensor]] = []
    if with_monitor:
        monitor = SharpnessMonitor(measures=[TRACE], every_n_steps=1, on_train_end=False, max_overhead=None)
        fn = monitor.measures[0].fn

        def spy(module, *args, **kwargs):
            measured.append([p.detach().clone() for p in module.parameters()])
            return fn(module, *args, **kwargs)

        monitor.measures[0].fn = spy
        callbacks.append(monitor)
    make_trainer(max_steps=4, callbacks=callbacks).fit(model, loader(shuffle=True))
    return model, weights.at_batch_start, measured


def test_monitor_measures_the_unperturbed_weights_and_leaves_sam_training_unchanged():
    plain, _, _ = _run(False)
    model, starts, measured = _run(True)
    assert len(measured) == 5 and len(starts) == 4  # at fit start (step 0), then after every step
    # The weights measured after step t are those the next step starts from (w_t+1), not SAM's w + e.
    for after_step, next_start in zip(measured[:-1], starts):
        assert all(torch.equal(a, b) for a, b in zip(after_step, next_start))
    assert all(torch.equal(a, b) for a, b in zip(measured[-1], model.parameters()))
    # ... and SAM with the monitor trains bitwise as SAM without it.
    for a, b in zip(plain.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
