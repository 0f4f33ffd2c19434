"""SAF and MESA (Du et al., 2022) against plain-PyTorch transcriptions (fp32 CPU, 1e-5): the trajectory loss towards
stored logits of epochs earlier, and towards an EMA teacher; accumulation, fp16, bf16, resume, contract errors; the
manual-optimization form (`regularized_loss`, by hand and through `SAMMixin.sam_step`) and SAM with the term."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision

from lightning_sharpness import SAM, SAMEngine, SAMMixin
from lightning_sharpness.sam.saf import MESA, SAF, WithIndex
from tests import reference
from tests.helpers import (
    IndexedClassifier,
    RecordingLogger,
    assert_same_weights,
    classification_data,
    clone,
    cnn_bn,
    indexed_loader,
    mlp,
    trainer,
)

N, BATCH, EPOCHS, TAU, LMBDA, RHO = 32, 8, 4, 2.0, 0.5, 0.05


def kl(logits, target):
    """The authors' trajectory loss per example: tau^2 KL of the softened distributions (distillation's scaling)."""
    p = F.softmax(target / TAU, -1)
    return TAU**2 * (p * (F.log_softmax(target / TAU, -1) - F.log_softmax(logits / TAU, -1))).sum(-1)


def reference_saf(net, x, y, epochs_back, epochs=EPOCHS, batch=BATCH):
    """Per example: the logits of the pass ``epochs_back`` epochs earlier; loss = CE + lmbda * sum_i KL_i / |B|."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    stored: dict[tuple[int, int], torch.Tensor] = {}
    for epoch in range(epochs):
        for s in range(0, len(y), batch):
            idx = list(range(s, min(s + batch, len(y))))
            logits = net(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            old = [stored.get((epoch - epochs_back, i)) for i in idx]
            if any(o is not None for o in old):
                terms = [kl(logits[j], o) if o is not None else logits.new_zeros(()) for j, o in enumerate(old)]
                loss = loss + LMBDA * torch.stack(terms).sum() / len(idx)
            for j, i in enumerate(idx):
                stored[(epoch, i)] = logits[j].detach().clone()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return net


def reference_mesa(net, x, y, decay, epochs=EPOCHS, batch=BATCH):
    """Teacher = EMA of the weights updated after every step; loss = CE + lmbda * mean KL(teacher || student)."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    teacher = copy.deepcopy(net)
    for _ in range(epochs):
        for s in range(0, len(y), batch):
            xb, yb = x[s : s + batch], y[s : s + batch]
            logits = net(xb)
            with torch.no_grad():
                target = teacher(xb)
            loss = F.cross_entropy(logits, yb) + LMBDA * kl(logits, target).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for v, w in zip(teacher.parameters(), net.parameters()):
                    v.mul_(decay).add_(w, alpha=1 - decay)
    return net


@pytest.mark.parametrize("epochs_back", [1, 2])
def test_saf_matches_reference(epochs_back):
    x, y = classification_data(n=N)
    net = mlp()
    ref_net = clone(net)
    logger = RecordingLogger()
    saf = SAF(lmbda=LMBDA, tau=TAU, epochs_back=epochs_back)
    trainer(max_epochs=EPOCHS, callbacks=[saf], logger=logger, log_every_n_steps=1).fit(
        IndexedClassifier(net), indexed_loader(*classification_data(n=N))
    )
    reference_saf(ref_net, x, y, epochs_back)
    assert_same_weights(net, ref_net, atol=1e-5)
    # the term is on from epoch `epochs_back` (4 steps per epoch), with every example covered
    coverage = logger.values("sam/saf_coverage")
    assert [s for s, _ in coverage] == list(range(4 * epochs_back, 4 * EPOCHS))
    assert all(v == 1.0 for _, v in coverage)
    assert saf.stored_bytes == epochs_back * N * (3 * 4 + 4)
    # and it changes training (the test can fail)
    plain = clone(mlp())
    reference_saf(plain, x, y, epochs_back=EPOCHS)  # never reaches back: plain SGD
    assert not torch.allclose(plain[0].weight, net[0].weight, atol=1e-4)


def test_mesa_matches_reference():
    x, y = classification_data(n=N)
    net = mlp()
    ref_net = clone(net)
    logger = RecordingLogger()
    trainer(
        max_epochs=EPOCHS, callbacks=[MESA(lmbda=LMBDA, tau=TAU, decay=0.8)], logger=logger, log_every_n_steps=1
    ).fit(IndexedClassifier(net), indexed_loader(x, y))
    reference_mesa(ref_net, x, y, decay=0.8)
    assert_same_weights(net, ref_net, atol=1e-5)
    assert len(logger.values("sam/mesa_kl")) == EPOCHS * N // BATCH


@pytest.mark.parametrize("which", ["saf", "mesa"])
def test_accumulation_equals_the_whole_batch(which):
    # two micro-batches of 8 = one batch of 16: the term is a per-example mean, as the loss
    x, y = classification_data(n=N)
    net = mlp()
    ref_net = clone(net)
    callback = SAF(lmbda=LMBDA, tau=TAU, epochs_back=1) if which == "saf" else MESA(lmbda=LMBDA, tau=TAU, decay=0.8)
    trainer(max_epochs=3, accumulate_grad_batches=2, callbacks=[callback]).fit(
        IndexedClassifier(net), indexed_loader(x, y)
    )
    if which == "saf":
        reference_saf(ref_net, x, y, epochs_back=1, epochs=3, batch=16)
    else:
        reference_mesa(ref_net, x, y, decay=0.8, epochs=3, batch=16)
    assert_same_weights(net, ref_net, atol=1e-5)


@pytest.mark.parametrize("which", ["saf", "mesa"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_runs_the_term_under_autocast(which, precision):
    x, y = classification_data(n=N)
    callback = SAF(lmbda=LMBDA, tau=TAU, epochs_back=1) if which == "saf" else MESA(lmbda=LMBDA, tau=TAU, decay=0.8)
    kwargs = (
        dict(plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**8))])
        if precision == "fp16"
        else dict(precision="bf16-mixed")
    )
    logger = RecordingLogger()
    module = IndexedClassifier(mlp())
    trainer(max_epochs=2, callbacks=[callback], logger=logger, log_every_n_steps=1, **kwargs).fit(
        module, indexed_loader(x, y)
    )
    expected = torch.float16 if precision == "fp16" else torch.bfloat16
    assert set(module.dtypes) == {expected}
    key = "sam/saf_kl" if which == "saf" else "sam/mesa_kl"
    values = [v for _, v in logger.values(key)]
    assert values and all(0 <= v < 10 for v in values)
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("which", ["saf", "mesa"])
def test_checkpoint_resume_is_bitwise(which, tmp_path):
    x, y = classification_data(n=N)
    make = (
        (lambda: SAF(lmbda=LMBDA, tau=TAU, epochs_back=2))
        if which == "saf"
        else (lambda: MESA(lmbda=LMBDA, tau=TAU, decay=0.8))
    )
    straight = IndexedClassifier(mlp())
    trainer(max_epochs=4, callbacks=[make()]).fit(straight, indexed_loader(x, y))
    first = IndexedClassifier(mlp())
    t1 = trainer(max_epochs=2, callbacks=[make()])
    t1.fit(first, indexed_loader(x, y))
    t1.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = IndexedClassifier(mlp())
    trainer(max_epochs=4, callbacks=[make()]).fit(resumed, indexed_loader(x, y), ckpt_path=tmp_path / "mid.ckpt")
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert "training_step" not in resumed.__dict__  # the wrapper is gone after fit


def test_contract_errors_name_what_to_return():
    from tests.helpers import Classifier, loader

    x, y = classification_data(n=N)
    with pytest.raises(RuntimeError, match="WithIndex"):
        trainer(max_steps=1, callbacks=[SAF()]).fit(Classifier(mlp()), loader(x, y))
    with pytest.raises(RuntimeError, match="logits"):
        trainer(max_steps=1, callbacks=[MESA()]).fit(Classifier(mlp()), loader(x, y))


def loss_with_term(logits, y, targets):
    """CE + lmbda * sum_i KL_i / |B| over the examples that have a target (``None``: that example adds 0)."""
    loss = F.cross_entropy(logits, y)
    if all(t is None for t in targets):
        return loss
    terms = [kl(logits[j], t) if t is not None else logits.new_zeros(()) for j, t in enumerate(targets)]
    return loss + LMBDA * torch.stack(terms).sum() / len(targets)


def reference_sam_with_term(net, x, y, which, epochs=EPOCHS, batch=BATCH, epochs_back=1, decay=0.8):
    """SAM (Foret et al.) of CE + lmbda * KL: the term is part of the loss at w and at w + e, with the same targets in
    both passes (SAF: the logits of ``epochs_back`` epochs earlier, stored from the pass at w; MESA: the EMA
    teacher's, updated after each step). Trains ``net`` in place; returns SAF's stored logits by (epoch, index)."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    params = list(net.parameters())
    teacher = copy.deepcopy(net)
    stored: dict[tuple[int, int], torch.Tensor] = {}
    for epoch in range(epochs):
        for s in range(0, len(y), batch):
            idx = list(range(s, min(s + batch, len(y))))
            xb, yb = x[idx], y[idx]
            if which == "mesa":
                with torch.no_grad():
                    targets = list(teacher(xb))
            else:
                targets = [stored.get((epoch - epochs_back, i)) for i in idx]
            logits = net(xb)
            grads = torch.autograd.grad(loss_with_term(logits, yb, targets), params)
            for j, i in enumerate(idx):
                stored[(epoch, i)] = logits[j].detach().clone()
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, e in zip(params, reference.ascent(params, grads, RHO)):
                    p.add_(e)
            loss_with_term(net(xb), yb, targets).backward()
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for v, w in zip(teacher.parameters(), net.parameters()):
                    v.mul_(decay).add_(w, alpha=1 - decay)
    return stored


class ManualIndexed(SAMMixin, IndexedClassifier):
    """Manual optimization: the loss from ``term.regularized_loss``, stepped by hand or, with ``sam``, by
    ``sam_step`` (the term then enters the loss at w and at w + e)."""

    def __init__(self, net, term, sam=None):
        super().__init__(net)
        self.automatic_optimization = False
        self.term, self.sam = term, sam

    def loss_of(self, batch):
        return self.term.regularized_loss(IndexedClassifier.training_step(self, batch, 0), batch)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        if self.sam is not None:
            self.sam_step(opt, self.loss_of, batch)
            return
        loss = self.loss_of(batch)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def make_term(which, epochs_back=1):
    return (
        SAF(lmbda=LMBDA, tau=TAU, epochs_back=epochs_back) if which == "saf" else MESA(lmbda=LMBDA, tau=TAU, decay=0.8)
    )


@pytest.mark.parametrize("which", ["saf", "mesa"])
def test_manual_optimization_matches_reference(which):
    x, y = classification_data(n=N)
    net = mlp()
    ref_net = clone(net)
    logger, term = RecordingLogger(), make_term(which, epochs_back=2)
    module = ManualIndexed(net, term)
    fit = trainer(max_epochs=EPOCHS, callbacks=[term], logger=logger, log_every_n_steps=1)
    fit.fit(module, indexed_loader(x, y))
    if which == "saf":
        reference_saf(ref_net, x, y, epochs_back=2)
    else:
        reference_mesa(ref_net, x, y, decay=0.8)
    assert_same_weights(net, ref_net, atol=1e-5)
    assert fit.global_step == EPOCHS * N // BATCH  # one optimizer.step() per batch, each followed by the batch end
    assert "training_step" not in module.__dict__  # manual optimization: nothing wrapped
    if which == "saf":  # the term from epoch 2 on, every example covered, as in automatic optimization
        assert [v for _, v in logger.values("sam/saf_coverage")] == [1.0] * (4 * (EPOCHS - 2))
    else:
        assert len(logger.values("sam/mesa_kl")) == EPOCHS * N // BATCH


@pytest.mark.parametrize("which", ["saf", "mesa"])
@pytest.mark.parametrize("face", ["mixin", "callback"])
def test_sam_with_the_term_matches_reference(which, face):
    """SAM of the regularized loss, through SAMMixin.sam_step + regularized_loss and through the SAM callback with
    SAF/MESA under automatic optimization: both equal the plain SAM loop with the term in both passes."""
    x, y = classification_data(n=N)
    net = mlp()
    ref_net = clone(net)
    term = make_term(which)
    if face == "mixin":
        module, callbacks = ManualIndexed(net, term, sam=SAMEngine(rho=RHO)), [term]
    else:
        module, callbacks = IndexedClassifier(net), [term, SAM(rho=RHO)]
    trainer(max_epochs=3, callbacks=callbacks).fit(module, indexed_loader(x, y))
    logged = reference_sam_with_term(ref_net, x, y, which, epochs=3)
    assert_same_weights(net, ref_net, atol=1e-5)
    if which == "saf":  # what is stored is each example's logits of the pass at w, not of the one at w + e
        stored = torch.stack([logged[(2, i)] for i in range(N)])
        assert torch.allclose(term.outputs[0], stored, atol=1e-5)


@pytest.mark.parametrize("which", ["saf", "mesa"])
def test_manual_optimization_that_never_calls_the_method_fails_at_the_first_batch(which):
    class Forgets(ManualIndexed):
        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(IndexedClassifier.training_step(self, batch, batch_idx)["loss"])
            opt.step()

    x, y = classification_data(n=N)
    term = make_term(which)
    name = type(term).__name__
    module = Forgets(mlp(), term)
    with pytest.raises(RuntimeError, match=rf"first training batch never called `{name}\.regularized_loss`"):
        trainer(max_epochs=1, callbacks=[term]).fit(module, indexed_loader(x, y))
    assert module.global_step == 1  # the error comes at the end of the first batch


def test_regularized_loss_refuses_automatic_optimization_and_calls_outside_fit():
    class Twice(IndexedClassifier):
        def __init__(self, net, term):
            super().__init__(net)
            self.term = term

        def training_step(self, batch, batch_idx):
            return {**super().training_step(batch, batch_idx), "loss": self.term.regularized_loss({}, batch)}

    x, y = classification_data(n=N)
    term = make_term("mesa")
    with pytest.raises(RuntimeError, match="count twice"):
        trainer(max_steps=1, callbacks=[term]).fit(Twice(mlp(), term), indexed_loader(x, y))
    with pytest.raises(RuntimeError, match="training step of a `Trainer.fit`"):
        term.regularized_loss({"loss": torch.zeros(()), "logits": torch.zeros(1, 3)})


@pytest.mark.parametrize("which", ["saf", "mesa"])
@pytest.mark.parametrize("with_sam", [False, True], ids=["manual", "sam_step"])
def test_manual_optimization_fp16_with_grad_scaler_runs_finite(which, with_sam):
    x, y = classification_data(n=N)
    term, logger = make_term(which), RecordingLogger()
    module = ManualIndexed(mlp(), term, sam=SAMEngine(rho=RHO) if with_sam else None)
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    trainer(max_epochs=2, callbacks=[term], plugins=[plugin], logger=logger, log_every_n_steps=1).fit(
        module, indexed_loader(x, y)
    )
    assert set(module.dtypes) == {torch.float16}
    values = [v for _, v in logger.values("sam/saf_kl" if which == "saf" else "sam/mesa_kl")]
    assert values and all(0 <= v < 10 for v in values)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def reference_mesa_with_buffers(net, x, y, decay, epochs=2, batch=BATCH):
    """reference_mesa for a net with BatchNorm: the teacher, in eval mode, averages the parameters and the float
    buffers (running statistics) and copies the others (num_batches_tracked)."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    teacher = copy.deepcopy(net).eval()
    for _ in range(epochs):
        for s in range(0, len(y), batch):
            xb, yb = x[s : s + batch], y[s : s + batch]
            with torch.no_grad():
                target = teacher(xb)
            logits = net(xb)
            (F.cross_entropy(logits, yb) + LMBDA * kl(logits, target).mean()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for v, w in zip(teacher.state_dict().values(), net.state_dict().values()):
                    v.mul_(decay).add_(w, alpha=1 - decay) if v.is_floating_point() else v.copy_(w)
    return net, teacher


def test_mesa_teacher_averages_buffers_and_runs_in_eval_mode():
    x, y = classification_data(n=N, image=True)
    net = cnn_bn()
    ref_net = clone(net)
    mesa = MESA(lmbda=LMBDA, tau=TAU, decay=0.8)
    module = IndexedClassifier(net)
    trainer(max_epochs=2, callbacks=[mesa]).fit(module, indexed_loader(x, y))
    _, teacher = reference_mesa_with_buffers(ref_net, x, y, decay=0.8)
    assert_same_weights(net, ref_net, atol=1e-5)
    # the teacher is the average of the tensors alone, by name, not a copy of the module
    assert mesa.average.keys() == module.state_dict().keys()
    for name, value in teacher.state_dict().items():
        assert torch.allclose(mesa.average[f"net.{name}"].float(), value.float(), atol=1e-5), name
    assert module.training and all(m.training for m in module.modules())  # the student's modes are put back


@pytest.mark.parametrize("sam", [None, "local", "global"])
def test_mesa_teacher_runs_first_and_once_per_micro_batch(sam):
    """The teacher's forward (eval mode) runs at each micro-batch's start, before the student's, and its logits
    serve every pass of that micro-batch: SAM's perturbed pass, and its global mode's replay of the step's
    micro-batches at the last one, run no teacher forward of their own."""
    x, y = classification_data(n=N)
    module = IndexedClassifier(mlp())
    modes: list[bool] = []
    module.net.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    callbacks = [MESA(lmbda=LMBDA, tau=TAU, decay=0.8)] + ([SAM(rho=RHO, mode=sam)] if sam else [])
    trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=callbacks).fit(module, indexed_loader(x, y))
    teacher, student = False, True
    step = {
        None: [teacher, student] * 2,
        "local": [teacher, student, student] * 2,
        "global": [teacher, student, teacher, student, student, student],
    }[sam]
    assert modes == step * (N // BATCH // 2)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SAF(lmbda=-1), "lmbda"),
        (lambda: SAF(tau=0), "tau"),
        (lambda: SAF(epochs_back=0), "epochs_back"),
        (lambda: SAF(store_dtype="int8"), "store_dtype"),
        (lambda: MESA(decay=1.0), "decay"),
    ],
)
def test_bad_arguments_fail_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_with_index_forms():
    assert WithIndex([(1, 2)])[0] == (1, 2, 0)
    assert WithIndex([{"x": 1}])[0] == {"x": 1, "index": 0}
    assert WithIndex([5])[0] == (5, 0)
