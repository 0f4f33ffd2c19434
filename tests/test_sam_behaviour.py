"""The SAM callback's contract beyond the reference loop: logging, precision, resume, bad input, NaN safety."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torchmetrics.classification import MulticlassAccuracy

from lightning_sharpness import SAM, LinearRho
from tests import reference
from tests.helpers import Classifier, RecordingLogger, classification_data, clone, loader, mlp, trainer

STEPS = 4


def test_user_logs_once_per_step_with_unperturbed_loss_and_sam_diagnostics():
    x, y = classification_data()
    net = mlp()
    ref_net = clone(net)
    logger = RecordingLogger()
    trainer(max_steps=STEPS, logger=logger, log_every_n_steps=1, callbacks=[SAM(rho=0.05)]).fit(
        Classifier(net), loader(x, y)
    )
    opt = torch.optim.SGD(ref_net.parameters(), lr=0.1, momentum=0.9)
    ref = [
        reference.sam_step(ref_net, opt, x[i * 16 : (i + 1) * 16], y[i * 16 : (i + 1) * 16], rho=0.05)
        for i in range(STEPS)
    ]

    logged = logger.values("train_loss")
    assert [s for s, _ in logged] == list(range(STEPS))  # once per step, never twice
    assert [v for _, v in logged] == pytest.approx([r[0] for r in ref], abs=1e-6)
    assert [v for _, v in logger.values("sam/perturbed_loss")] == pytest.approx([r[1] for r in ref], abs=1e-6)
    gaps = [v for _, v in logger.values("sam/sharpness_gap")]
    assert gaps == pytest.approx([r[1] - r[0] for r in ref], abs=1e-6)
    assert all(g > 0 for g in gaps)  # ascent along the gradient raises the loss for a small rho
    assert [v for _, v in logger.values("sam/rho")] == pytest.approx([0.05] * STEPS)
    assert all(v > 0 for _, v in logger.values("sam/grad_norm"))


def test_bf16_autocasts_both_passes_and_trains():
    x, y = classification_data()
    module = Classifier(mlp())
    before = clone(module.net)
    trainer(max_steps=STEPS, precision="bf16-mixed", callbacks=[SAM(rho=0.05)]).fit(module, loader(x, y))
    assert len(module.calls) == 2 * STEPS
    assert all(c["dtype"] == torch.bfloat16 for c in module.calls)  # autocast in Lightning's pass and in SAM's
    assert all(torch.isfinite(p).all() for p in module.net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), module.net.parameters()))


def test_resume_from_checkpoint_is_bitwise_identical(tmp_path):
    x, y = classification_data()

    def callback():
        return SAM(rho=LinearRho(0.0, 0.1, steps=8), start_epoch=1)

    straight = Classifier(mlp())
    trainer(max_epochs=4, callbacks=[callback()]).fit(straight, loader(x, y))

    first = Classifier(mlp())
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=2, callbacks=[callback(), ckpt], enable_checkpointing=True).fit(first, loader(x, y))
    resumed = Classifier(mlp(seed=123))  # different init: everything must come from the checkpoint
    trainer(max_epochs=4, callbacks=[callback()]).fit(resumed, loader(x, y), ckpt_path=str(tmp_path / "last.ckpt"))
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


class PoisonedPerturbedPass(Classifier):
    """Returns a NaN loss from every second training_step call: SAM's perturbed pass."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if len(self.calls) % 2 == 0 else loss


def test_non_finite_perturbed_gradient_skips_the_step_and_counts_it():
    x, y = classification_data()
    module = PoisonedPerturbedPass(mlp())
    before = clone(module.net)
    logger = RecordingLogger()
    sam = SAM(rho=0.05)
    trainer(max_steps=STEPS, logger=logger, log_every_n_steps=1, callbacks=[sam]).fit(module, loader(x, y))
    for a, b in zip(before.parameters(), module.net.parameters()):
        assert torch.equal(a, b)
    assert sam.skipped_steps == STEPS
    assert [v for _, v in logger.values("sam/skipped_steps")] == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rho=-0.1), "`rho` must be a finite number >= 0"),
        (dict(rho=float("nan")), "`rho` must be a finite number >= 0"),
        (dict(rho=float("inf")), "`rho` must be a finite number >= 0"),
        (dict(m=0), "`m` must be an int >= 1"),
        (dict(m=2.5), "`m` must be an int >= 1"),
        (dict(geometry="hyperbolic"), "`geometry` must be one of"),
        (dict(perturb="convs"), "`perturb` must be None or .all., .norm., a list of parameter names or a callable"),
        (dict(mode="global", m=4), "cannot be combined with m-sharpness"),
        (dict(mode="sometimes"), "`mode` must be one of"),
        (dict(bn_update="never"), "`bn_update` must be one of"),
        (dict(start_step=-1), "`start_step` must be an int >= 0"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SAM(**kwargs)


def test_filter_selecting_nothing_fails_before_any_step():
    module = Classifier(mlp())
    before = clone(module.net)
    with pytest.raises(ValueError, match=r"`perturb=.*` selects no parameter \(trainable or frozen\)"):
        trainer(max_steps=STEPS, callbacks=[SAM(perturb="norm")]).fit(module, loader(*classification_data()))
    assert module.calls == []
    for a, b in zip(before.parameters(), module.net.parameters()):
        assert torch.equal(a, b)


class Manual(Classifier):
    def __init__(self, net):
        super().__init__(net)
        self.automatic_optimization = False


def test_manual_optimization_module_is_pointed_to_the_mixin():
    with pytest.raises(ValueError, match="SAMMixin"):
        trainer(max_steps=1, callbacks=[SAM()]).fit(Manual(mlp()), loader(*classification_data()))


def test_lbfgs_is_refused_before_any_step():
    module = Classifier(mlp(), optimizer=lambda ps: torch.optim.LBFGS(ps))
    with pytest.raises(ValueError, match="LBFGS"):
        trainer(max_steps=1, callbacks=[SAM()]).fit(module, loader(*classification_data()))
    assert module.calls == []


def test_schedule_producing_a_bad_rho_names_the_step():
    class Broken(LinearRho):
        def __call__(self, step):
            return -1.0

    with pytest.raises(ValueError, match="schedule value at step 0"):
        trainer(max_steps=1, callbacks=[SAM(rho=Broken())]).fit(Classifier(mlp()), loader(*classification_data()))


class WithTrainAccuracy(Classifier):
    """Counts training accuracy with a torchmetrics Metric and records the predictions of every call."""

    def __init__(self, net):
        super().__init__(net)
        self.train_acc = MulticlassAccuracy(num_classes=3, average="micro")
        self.predictions = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.predictions.append((logits.argmax(1).detach(), y))
        self.train_acc(logits, y)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return F.cross_entropy(logits, y)


def test_metrics_updated_in_training_step_count_the_unperturbed_pass_only():
    x, y = classification_data()
    module = WithTrainAccuracy(mlp())
    logger = RecordingLogger()
    trainer(max_epochs=1, logger=logger, callbacks=[SAM(rho=0.5)]).fit(module, loader(x, y))
    assert len(module.predictions) == 2 * 4  # Lightning's pass and SAM's pass, 4 steps
    clean = module.predictions[0::2]
    expected = sum(int((p == t).sum()) for p, t in clean) / len(y)
    perturbed = module.predictions[1::2]
    assert any(not torch.equal(p, q) for (p, _), (q, _) in zip(clean, perturbed))  # rho=0.5 changes predictions
    assert logger.values("train_acc")[-1][1] == pytest.approx(expected)
