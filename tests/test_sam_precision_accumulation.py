"""SAM under fp16 with a GradScaler and under gradient accumulation, against plain-PyTorch references."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_sharpness import SAM
from tests import reference
from tests.helpers import (
    Classifier,
    RecordingLogger,
    assert_same_weights,
    classification_data,
    clone,
    fp16_plugin,
    loader,
    mlp,
    trainer,
)
from tests.reference import reference_fp16_sam

STEPS = 4


def test_fp16_with_grad_scaler_matches_reference():
    x, y = classification_data()
    net = mlp()
    ref_net = clone(net)
    module = Classifier(net)
    plugin = fp16_plugin()
    trainer(max_steps=STEPS, plugins=[plugin], callbacks=[SAM(rho=0.05)]).fit(module, loader(x, y))
    ref_scaler = reference_fp16_sam(ref_net, x, y, rho=0.05)
    assert all(c["dtype"] == torch.float16 for c in module.calls)  # both passes autocast
    assert plugin.scaler.get_scale() == ref_scaler.get_scale()
    assert_same_weights(net, ref_net)


class Overflowing(Classifier):
    """Blows the loss up (fp16-scaled gradients overflow) in one of SAM's two passes."""

    def __init__(self, net, poisoned_pass: int) -> None:
        super().__init__(net)
        self.poisoned_pass = poisoned_pass

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 1e38 if len(self.calls) % 2 == self.poisoned_pass % 2 else loss


@pytest.mark.parametrize("poisoned_pass", [1, 2], ids=["first-pass", "perturbed-pass"])
def test_fp16_overflow_in_either_pass_skips_the_step_and_backs_off(poisoned_pass):
    x, y = classification_data()
    module = Overflowing(mlp(), poisoned_pass)
    before = clone(module.net)
    plugin = fp16_plugin()
    logger = RecordingLogger()
    sam = SAM(rho=0.05)
    trainer(max_steps=STEPS, plugins=[plugin], logger=logger, log_every_n_steps=1, callbacks=[sam]).fit(
        module, loader(x, y)
    )
    # Exactly what GradScaler does on overflow: no update, scale halved at every step.
    assert plugin.scaler.get_scale() == 2.0**16 * 0.5**STEPS
    for a, b in zip(before.parameters(), module.net.parameters()):
        assert torch.equal(a, b)
    assert sam.skipped_steps == STEPS
    assert all(math.isfinite(v) for _, v in logger.values("sam/skipped_steps"))


def test_accumulation_local_mode_perturbs_each_micro_batch_by_its_own_gradient():
    # local mode with k micro-batches of 16 = m-SAM with m = 16 over the effective batch of 32
    x, y = classification_data()
    net = mlp()
    ref_net = clone(net)
    trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[SAM(rho=0.05)]).fit(Classifier(net), loader(x, y))
    opt = torch.optim.SGD(ref_net.parameters(), lr=0.1, momentum=0.9)
    for i in range(2):
        s = slice(i * 32, (i + 1) * 32)
        reference.sam_step(ref_net, opt, x[s], y[s], rho=0.05, m=16)
    assert_same_weights(net, ref_net)


def test_accumulation_global_mode_is_n_sam_over_the_effective_batch():
    x, y = classification_data()
    net = mlp()
    ref_net = clone(net)
    callback = SAM(rho=0.05, mode="global")
    trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[callback]).fit(Classifier(net), loader(x, y))
    opt = torch.optim.SGD(ref_net.parameters(), lr=0.1, momentum=0.9)
    for i in range(2):
        s = slice(i * 32, (i + 1) * 32)
        reference.sam_step(ref_net, opt, x[s], y[s], rho=0.05)
    assert_same_weights(net, ref_net)


def test_accumulation_with_m_chunks_inside_micro_batches():
    x, y = classification_data()
    net = mlp()
    ref_net = clone(net)
    trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[SAM(rho=0.05, m=4)]).fit(Classifier(net), loader(x, y))
    opt = torch.optim.SGD(ref_net.parameters(), lr=0.1, momentum=0.9)
    for i in range(2):
        s = slice(i * 32, (i + 1) * 32)
        reference.sam_step(ref_net, opt, x[s], y[s], rho=0.05, m=4)
    assert_same_weights(net, ref_net)
