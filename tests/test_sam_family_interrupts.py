"""An exception or a Ctrl-C inside a SAM-family variant's perturbed pass: the weights stay bitwise at w, nothing the
callback shadowed on the module (training_step, backward) survives the fit, and the same callback object then
trains a new fit exactly as a fresh one does."""

from __future__ import annotations

import signal

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_sharpness import (
    GSAM,
    RSAM,
    SAM,
    SSAMD,
    SSAMF,
    WSAM,
    FriendlySAM,
    LayerwiseAdaptiveGeometry,
    LinfAdaptiveGeometry,
    LookSAM,
)
from tests.helpers import Classifier, classification_data, clone, loader, mlp, trainer

BATCH = 16

VARIANTS = {
    "gsam": lambda: GSAM(rho_max=0.2, rho_min=0.05, alpha=0.3),
    "wsam": lambda: WSAM(rho=0.2, gamma=0.8, decouple=True),
    "friendlysam": lambda: FriendlySAM(rho=0.2, sigma=1.0, lmbda=0.8),
    "looksam": lambda: LookSAM(rho=0.2, k=1, alpha=0.5),
    "ssamf": lambda: SSAMF(rho=0.2, sparsity=0.5, num_samples=4, update_freq=1),
    "ssamd": lambda: SSAMD(rho=0.2, sparsity=0.5, update_freq=1),
    "rsam": lambda: RSAM(rho=0.2, gamma=0.5),
    "layerwise-asam": lambda: SAM(rho=0.5, geometry=LayerwiseAdaptiveGeometry()),
    "linf-asam": lambda: SAM(rho=0.05, geometry=LinfAdaptiveGeometry()),
    "m-sam": lambda: SAM(rho=0.2, m=4),  # 16 examples: per chunk of 4 a pass at w and one at w + e
}


def calls_per_step(make) -> int:
    """How many times one step calls training_step; its last call is a pass at w + e for every variant here."""
    x, y = classification_data()
    probe = Classifier(mlp())
    trainer(max_steps=1, callbacks=[make()]).fit(probe, loader(x, y, BATCH))
    assert len(probe.calls) >= 2
    return len(probe.calls)


class FailsOnCall(Classifier):
    """Raises ``error`` in its ``fail_at``-th training_step call."""

    def __init__(self, net, error: BaseException | None = None, fail_at: int = 0) -> None:
        super().__init__(net)
        self.error, self.fail_at = error, fail_at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if len(self.calls) == self.fail_at:
            raise self.error
        return loss


class AfterFirstStep(Callback):
    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == 1:
            self.weights = clone(pl_module.net)


def assert_nothing_shadowed(module):
    assert not {"training_step", "backward"} & set(module.__dict__), sorted(module.__dict__)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_exception_in_perturbed_pass_keeps_w_and_the_callback_reusable(name):
    make = VARIANTS[name]
    per_step = calls_per_step(make)
    x, y = classification_data()
    callback, snapshot = make(), AfterFirstStep()
    failing = FailsOnCall(mlp(), RuntimeError("boom"), fail_at=2 * per_step)  # step 1's last pass at w + e
    with pytest.raises(RuntimeError, match="boom"):
        trainer(max_steps=3, callbacks=[callback, snapshot]).fit(failing, loader(x, y, BATCH))
    for key, value in failing.net.state_dict().items():
        assert torch.equal(value, snapshot.weights.state_dict()[key]), key  # bitwise w, not w + e
    assert_nothing_shadowed(failing)
    # the interrupted callback starts the next fit clean: as a fresh one
    reused, fresh = Classifier(mlp(seed=3)), Classifier(mlp(seed=3))
    trainer(max_steps=3, callbacks=[callback]).fit(reused, loader(x, y, BATCH))
    trainer(max_steps=3, callbacks=[make()]).fit(fresh, loader(x, y, BATCH))
    for a, b in zip(reused.net.state_dict().values(), fresh.net.state_dict().values()):
        assert torch.equal(a, b)
    assert len(reused.calls) == 3 * per_step  # every step ran the variant's passes
    assert_nothing_shadowed(reused)


@pytest.mark.parametrize("name", ["rsam", "m-sam"])
def test_ctrl_c_in_perturbed_pass_keeps_w(name):
    make = VARIANTS[name]
    x, y = classification_data()
    module = FailsOnCall(mlp(), KeyboardInterrupt(), fail_at=calls_per_step(make))  # step 0's last pass
    before = clone(module.net)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown on Ctrl-C
            trainer(max_steps=3, callbacks=[make()]).fit(module, loader(x, y, BATCH))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C after the first
    for a, b in zip(before.state_dict().values(), module.net.state_dict().values()):
        assert torch.equal(a, b)
    assert_nothing_shadowed(module)
