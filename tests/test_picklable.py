"""Every callback survives pickling: ``strategy="ddp_spawn"`` (and ``DDPStrategy(start_method="spawn")``) pickles the
Trainer's callbacks into each process. MESA's default input picker was a lambda and the monitor's measure records
held lambdas: both were fatal there before training started."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F

from lightning_sharpness import (
    ASAM,
    BSAM,
    GSAM,
    MESA,
    RSAM,
    SAF,
    SAM,
    SSAMD,
    SSAMF,
    USAM,
    WSAM,
    CosineRho,
    FriendlySAM,
    LayerwiseAdaptiveGeometry,
    LinfAdaptiveGeometry,
    LookSAM,
    SharpnessMonitor,
)
from tests.ddp_modules import DDPClassifier
from tests.helpers import classification_data, loader, mlp, trainer

CALLBACKS = {
    "SAM": lambda: SAM(),
    "ASAM": lambda: ASAM(),
    "USAM": lambda: USAM(),
    "SAM m-vectorized": lambda: SAM(m=4, vectorize=True),
    "SAM geodesic": lambda: SAM(geometry="geodesic"),
    "SAM layer-wise": lambda: SAM(geometry=LayerwiseAdaptiveGeometry()),
    "SAM l-inf": lambda: SAM(geometry=LinfAdaptiveGeometry()),
    "SAM cosine rho": lambda: SAM(rho=CosineRho(0.1, 0.01, 100)),
    "GSAM": lambda: GSAM(),
    "WSAM": lambda: WSAM(),
    "FriendlySAM": lambda: FriendlySAM(),
    "LookSAM": lambda: LookSAM(),
    "BSAM": lambda: BSAM(),
    "SSAMF": lambda: SSAMF(),
    "SSAMD": lambda: SSAMD(),
    "SAF": lambda: SAF(),
    "MESA": lambda: MESA(),
    "RSAM": lambda: RSAM(),
    "SharpnessMonitor": lambda: SharpnessMonitor(),
    "SharpnessMonitor, every measure kind": lambda: SharpnessMonitor(
        measures=["hessian_eigenvalues", "hessian_trace", {"name": "worst_case_sharpness", "rho": 0.05}]
    ),
}


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_callback_pickles_as_ddp_spawn_needs(name):
    callback = CALLBACKS[name]()
    copy = pickle.loads(pickle.dumps(callback))
    assert type(copy) is type(callback)
    if isinstance(callback, SharpnessMonitor):  # the measures come back as the same registered records
        assert [m.record for m in copy.measures] == [m.record for m in callback.measures]
        assert [m.options for m in copy.measures] == [m.options for m in callback.measures]


class LogitsClassifier(DDPClassifier):
    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["MESA", "SSAMD"])
def test_trains_under_ddp_spawn(name):
    """torch.multiprocessing's pickler (tensors through shared memory) is stricter than pickle: SSAMD's
    torch.Generator killed the spawned processes."""
    make = {"MESA": lambda: MESA(lmbda=0.5, tau=2.0), "SSAMD": lambda: SSAMD(rho=0.05, update_freq=1)}[name]
    x, y = classification_data(n=32)
    module = LogitsClassifier(mlp())
    before = [p.detach().clone() for p in module.parameters()]
    trainer(devices=2, strategy="ddp_spawn", max_steps=2, callbacks=[make()]).fit(module, loader(x, y, 8))
    # ddp_spawn trains in the child processes and loads the result back into this module
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_ssamd_generator_survives_pickling_where_it_was():
    ssamd = SSAMD(seed=3)
    torch.rand(5, generator=ssamd.generator)  # moved on from its seed
    copy = pickle.loads(pickle.dumps(ssamd))
    assert torch.equal(torch.rand(5, generator=copy.generator), torch.rand(5, generator=ssamd.generator))
