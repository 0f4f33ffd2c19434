"""SAMMixin (manual optimization) against the plain-PyTorch reference: one and two optimizers, fp16, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sharpness import SAMEngine, SAMMixin
from tests import reference
from tests.helpers import (
    Classifier,
    ManualClassifier,
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


@pytest.mark.parametrize(
    "engine, ref_kwargs",
    [
        (SAMEngine(rho=0.05), dict(rho=0.05)),
        (SAMEngine(rho=0.5, geometry="adaptive"), dict(rho=0.5, eta=0.01)),
        (SAMEngine(rho=0.3, normalize=False), dict(rho=0.3, normalize=False)),
        (SAMEngine(rho=0.05, m=4), dict(rho=0.05, m=4)),
    ],
    ids=["sam", "asam", "usam", "m4"],
)
def test_mixin_matches_reference(engine, ref_kwargs):
    x, y = classification_data()
    net = mlp()
    ref_net = clone(net)
    logger = RecordingLogger()
    module = ManualClassifier(net, engine)
    fit = trainer(max_steps=STEPS, logger=logger, log_every_n_steps=1)
    fit.fit(module, loader(x, y))
    opt = torch.optim.SGD(ref_net.parameters(), lr=0.1, momentum=0.9)
    ref = [
        reference.sam_step(ref_net, opt, x[i * 16 : (i + 1) * 16], y[i * 16 : (i + 1) * 16], **ref_kwargs)
        for i in range(STEPS)
    ]
    assert_same_weights(net, ref_net)
    assert fit.global_step == STEPS  # one optimizer step per sam_step, counted by Lightning
    assert [s for s, _ in logger.values("sam/perturbed_loss")] == list(range(STEPS))  # logged once per step
    if engine.m is None:
        assert [v for _, v in logger.values("train_loss")] == pytest.approx([r[0] for r in ref], abs=1e-6)
    assert [v for _, v in logger.values("sam/perturbed_loss")] == pytest.approx([r[1] for r in ref], abs=1e-6)


def test_mixin_fp16_with_grad_scaler_matches_reference():
    x, y = classification_data()
    net = mlp()
    ref_net = clone(net)
    plugin = fp16_plugin()
    module = ManualClassifier(net, SAMEngine(rho=0.05))
    trainer(max_steps=STEPS, plugins=[plugin]).fit(module, loader(x, y))
    ref_scaler = reference_fp16_sam(ref_net, x, y, rho=0.05)
    assert all(c["dtype"] == torch.float16 for c in module.calls)
    assert plugin.scaler.get_scale() == ref_scaler.get_scale()
    assert_same_weights(net, ref_net)


class TwoPlayers(SAMMixin, Classifier):
    """GAN-shaped: an encoder and a head with an optimizer each, each stepping with SAM on its own loss."""

    def __init__(self, encoder, head):
        super().__init__(nn.Sequential(encoder, head))
        self.automatic_optimization = False
        self.sam_encoder = SAMEngine(rho=0.05)
        self.sam_head = SAMEngine(rho=0.1, geometry="adaptive")

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.net[0].parameters(), lr=0.1, momentum=0.9),
            torch.optim.Adam(self.net[1].parameters(), lr=0.01),
        )

    def training_step(self, batch, batch_idx):
        enc_opt, head_opt = self.optimizers()
        self.toggle_optimizer(enc_opt)
        self.sam_step(enc_opt, lambda b: encoder_loss(self.net, b), batch, sam=self.sam_encoder, log_prefix="sam/enc/")
        self.untoggle_optimizer(enc_opt)
        self.toggle_optimizer(head_opt)
        self.sam_step(head_opt, lambda b: head_loss(self.net, b), batch, sam=self.sam_head, log_prefix="sam/head/")
        self.untoggle_optimizer(head_opt)


def encoder_loss(net, batch):
    x, y = batch
    return F.cross_entropy(net(x), y)


def head_loss(net, batch):
    x, y = batch
    return F.cross_entropy(net(x), (y + 1) % 3)  # a different objective, as a discriminator's would be


def test_two_optimizers_each_with_its_own_sam_variant():
    x, y = classification_data()
    net = mlp()
    ref_net = clone(net)
    logger = RecordingLogger()
    trainer(max_steps=2 * STEPS, logger=logger, log_every_n_steps=1).fit(TwoPlayers(net[:2], net[2:]), loader(x, y))
    enc, head = ref_net[:2], ref_net[2:]
    enc_opt = torch.optim.SGD(enc.parameters(), lr=0.1, momentum=0.9)
    head_opt = torch.optim.Adam(head.parameters(), lr=0.01)
    for i in range(STEPS):
        s = slice(i * 16, (i + 1) * 16)
        for opt, frozen, kwargs, loss in [
            (enc_opt, head, dict(rho=0.05), lambda out, t: F.cross_entropy(out, t)),
            (head_opt, enc, dict(rho=0.1, eta=0.01), lambda out, t: F.cross_entropy(out, (t + 1) % 3)),
        ]:
            frozen.requires_grad_(False)
            reference.sam_step(ref_net, opt, x[s], y[s], loss_fn=loss, **kwargs)
            frozen.requires_grad_(True)
    assert_same_weights(net, ref_net)
    assert len(logger.values("sam/enc/sharpness_gap")) == STEPS
    assert len(logger.values("sam/head/sharpness_gap")) == STEPS


class AutomaticWithMixin(SAMMixin, Classifier):
    def training_step(self, batch, batch_idx):
        return self.sam_step(self.optimizers(), lambda b: F.cross_entropy(self(b[0]), b[1]), batch)


def test_mixin_on_an_automatic_module_fails_with_a_pointer_to_the_callback():
    with pytest.raises(ValueError, match="automatic_optimization is True.*SAM` callback"):
        trainer(max_steps=1).fit(AutomaticWithMixin(mlp()), loader(*classification_data()))


def test_mixin_refuses_lbfgs_before_touching_the_weights():
    module = ManualClassifier(mlp(), optimizer=lambda ps: torch.optim.LBFGS(ps))
    before = clone(module.net)
    with pytest.raises(ValueError, match="LBFGS"):
        trainer(max_steps=1).fit(module, loader(*classification_data()))
    for a, b in zip(before.parameters(), module.net.parameters()):
        assert torch.equal(a, b)
