"""The SAM family's execution modes: gradient accumulation (local and global), the mixin, fp16/bf16, bitwise
resume. Each mode is compared with a run whose equality to pytorch-optimizer tests/test_sam_family.py proves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision

from lightning_sharpness import SAMEngine, SAMMixin
from lightning_sharpness.sam.bsam import BSAM, BSAMOptimizer
from lightning_sharpness.sam.family import GSAM, WSAM, FriendlySAM, LookSAM
from lightning_sharpness.sam.rsam import RSAM, RenyiAscent
from lightning_sharpness.sam.schedules import ProportionalRho
from lightning_sharpness.sam.variants import FriendlyAscent, LookAhead, SurrogateGap, WeightedSharpness
from tests.helpers import Classifier, assert_same_weights, classification_data, loader, mlp, trainer

STEPS = 4
SGD = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)  # noqa: E731
BSAM_OPT = lambda ps: BSAMOptimizer(ps, num_data=64, lr=0.05, weight_decay=1e-3, seed=3)  # noqa: E731

CALLBACKS = {
    "gsam": lambda **kw: GSAM(rho_max=0.1, rho_min=0.02, alpha=0.3, lr_min=0.01, **kw),
    "wsam-decoupled": lambda **kw: WSAM(rho=0.1, gamma=0.8, decouple=True, **kw),
    "wsam-coupled": lambda **kw: WSAM(rho=0.1, gamma=0.8, decouple=False, **kw),
    "friendlysam": lambda **kw: FriendlySAM(rho=0.1, sigma=1.0, lmbda=0.8, **kw),
    "looksam": lambda **kw: LookSAM(rho=0.1, k=2, alpha=0.5, **kw),
    "rsam": lambda **kw: RSAM(rho=0.1, alpha=1.5, gamma=0.5, **kw),
}
ENGINES = {
    "gsam": lambda: SAMEngine(rho=ProportionalRho(0.1, 0.02, lr_min=0.01), variant=SurrogateGap(0.3)),
    "wsam-decoupled": lambda: SAMEngine(rho=0.1, variant=WeightedSharpness(0.8, decouple=True)),
    "wsam-coupled": lambda: SAMEngine(rho=0.1, variant=WeightedSharpness(0.8, decouple=False)),
    "friendlysam": lambda: SAMEngine(rho=0.1, variant=FriendlyAscent(1.0, 0.8)),
    "looksam": lambda: SAMEngine(rho=0.1, variant=LookAhead(2, 0.5)),
    "rsam": lambda: SAMEngine(rho=0.1, variant=RenyiAscent(1.5, 0.5)),
}


def schedule(o):
    return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS, eta_min=0.01)


def fit(name, batch_size=16, steps=STEPS, optimizer=None, module=None, **trainer_kwargs):
    """A fit of ``name`` (a family callback, or "bsam") on the first ``steps * 16`` examples."""
    x, y = classification_data(n=steps * 16)
    if module is None:
        opt = BSAM_OPT if name == "bsam" else optimizer or SGD
        module = Classifier(mlp(), optimizer=opt, scheduler=schedule if name != "bsam" else None)
    callback = BSAM() if name == "bsam" else CALLBACKS[name](**trainer_kwargs.pop("sam_kwargs", {}))
    trainer(callbacks=[callback, *trainer_kwargs.pop("callbacks", [])], max_steps=steps, **trainer_kwargs).fit(
        module, loader(x, y, batch_size)
    )
    return module


ALL = [*CALLBACKS, "bsam"]


# RSAM's regularizer is a function of one micro-batch's gradient: global accumulation is refused (below)
@pytest.mark.parametrize("name", [n for n in ALL if n != "rsam"])
def test_global_accumulation_is_the_step_on_the_union(name):
    whole = fit(name)
    kwargs = {} if name == "bsam" else dict(sam_kwargs=dict(mode="global"))
    accumulated = fit(name, batch_size=8, accumulate_grad_batches=2, **kwargs)
    assert_same_weights(accumulated.net, whole.net, atol=1e-5)


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_local_accumulation_is_m_sharpness_over_the_micro_batches(name):
    # each micro-batch is perturbed (and its gradients combined) on its own: as chunks of m = 8 of one batch
    chunks = fit(name, sam_kwargs=dict(m=8))
    accumulated = fit(name, batch_size=8, accumulate_grad_batches=2)
    assert_same_weights(accumulated.net, chunks.net, atol=1e-5)
    assert not all(torch.equal(a, b) for a, b in zip(chunks.net.parameters(), fit(name).net.parameters()))


class Manual(SAMMixin, Classifier):
    def __init__(self, net, engine=None, optimizer=SGD, scheduler=schedule):
        super().__init__(net, optimizer=optimizer, scheduler=scheduler)
        self.automatic_optimization = False
        self.sam = engine

    def training_step(self, batch, batch_idx):
        self.sam_step(self.optimizers(), lambda b: F.cross_entropy(self(b[0]), b[1]), batch)
        if self.lr_schedulers() is not None:
            self.lr_schedulers().step()


@pytest.mark.parametrize("name", ALL)
def test_mixin_equals_the_callback(name):
    x, y = classification_data(n=STEPS * 16)
    if name == "bsam":
        manual = Manual(mlp(), optimizer=BSAM_OPT, scheduler=None)
    else:
        manual = Manual(mlp(), ENGINES[name]())
    trainer(max_steps=STEPS).fit(manual, loader(x, y))
    assert_same_weights(manual.net, fit(name).net, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_resume_is_bitwise(name, tmp_path):
    """Two epochs of two steps straight, or one epoch, a checkpoint, and the second from the checkpoint."""
    x, y = classification_data(n=32)

    def make_callback():
        if name == "looksam":  # k = 3: step 2, the first after the checkpoint, reuses the g_v of step 0
            return LookSAM(rho=0.1, k=3, alpha=0.5)
        return BSAM() if name == "bsam" else CALLBACKS[name]()

    def run(module, epochs, **kwargs):
        callback = make_callback()
        trainer(callbacks=[callback, *kwargs.pop("callbacks", [])], max_epochs=epochs, **kwargs).fit(
            module, loader(x, y), **kwargs.pop("fit", {})
        )
        return module

    def module(seed=0):
        return Classifier(mlp(seed), optimizer=BSAM_OPT if name == "bsam" else SGD, scheduler=None)

    straight = run(module(), 2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    run(module(), 1, callbacks=[checkpoint], enable_checkpointing=True)
    resumed = Classifier(mlp(seed=5), optimizer=BSAM_OPT if name == "bsam" else SGD)  # all from the checkpoint
    trainer(callbacks=[make_callback()], max_epochs=2).fit(resumed, loader(x, y), ckpt_path=str(tmp_path / "last.ckpt"))
    for a, b in zip(straight.net.state_dict().values(), resumed.net.state_dict().values()):
        assert torch.equal(a, b)


def fp16():
    return MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize("name", list(CALLBACKS))
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_close_to_fp32(name, precision):
    reference = fit(name)
    kwargs = dict(plugins=[fp16()]) if precision == "fp16" else dict(precision="bf16-mixed")
    mixed = fit(name, **kwargs)
    moved = max((a - b).abs().max().item() for a, b in zip(mlp().parameters(), reference.net.parameters()))
    gap = max((a - b).abs().max().item() for a, b in zip(mixed.net.parameters(), reference.net.parameters()))
    assert gap < 0.1 * moved, (gap, moved)  # half precision's rounding, far below what training moved


def test_bsam_bf16_trains_and_refuses_fp16_with_a_grad_scaler():
    reference = fit("bsam")
    mixed = fit("bsam", precision="bf16-mixed")
    moved = max((a - b).abs().max().item() for a, b in zip(mlp().parameters(), reference.net.parameters()))
    gap = max((a - b).abs().max().item() for a, b in zip(mixed.net.parameters(), reference.net.parameters()))
    assert gap < 0.1 * moved, (gap, moved)
    with pytest.raises(ValueError, match="BSAM cannot run under fp16 with a GradScaler"):
        fit("bsam", plugins=[fp16()])


def test_bsam_refuses_another_optimizer():
    with pytest.raises(ValueError, match="drives a `lightning_sharpness.BSAMOptimizer`.*SGD"):
        fit("bsam", module=Classifier(mlp()))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: GSAM(alpha=1.5), "`alpha` must be in \\[0, 1\\]"),
        (lambda: GSAM(rho_max=0.01, rho_min=0.1), "`rho_min` must be <= `rho_max`"),
        (lambda: GSAM(rho=0.1), "GSAM sets `rho` itself"),
        (lambda: WSAM(gamma=1.0), "`gamma` must be in \\[0, 1\\)"),
        (lambda: FriendlySAM(sigma=-1.0), "`sigma` must be a finite number >= 0"),
        (lambda: LookSAM(k=0), "`k` must be an int >= 1"),
        (lambda: LookSAM(alpha=1.0), "`alpha` must be in \\(0, 1\\)"),
        (lambda: BSAMOptimizer(mlp().parameters(), num_data=0), "`num_data` must be an int >= 1"),
    ],
)
def test_bad_hyperparameters_are_refused_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_looksam_runs_one_pass_between_full_steps():
    calls = fit("looksam", steps=4).calls
    # k = 2: steps 0 and 2 run Lightning's pass and the perturbed one, steps 1 and 3 Lightning's only
    assert len(calls) == 2 + 1 + 2 + 1


def test_rsam_refuses_global_accumulation_at_setup():
    with pytest.raises(ValueError, match="mode='global'"):
        fit("rsam", batch_size=8, accumulate_grad_batches=2, sam_kwargs=dict(mode="global"))
