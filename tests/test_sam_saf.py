"""SAF and MESA (Du et al., 2022) against plain-PyTorch transcriptions (fp32 CPU, 1e-5): the trajectory loss towards
stored logits of epochs earlier, and towards an EMA teacher; accumulation, fp16, bf16, resume, contract errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision

from lightning_sharpness.sam.saf import MESA, SAF, WithIndex
from tests.helpers import (
    IndexedClassifier,
    RecordingLogger,
    assert_same_weights,
    classification_data,
    clone,
    indexed_loader,
    mlp,
    trainer,
)

N, BATCH, EPOCHS, TAU, LMBDA = 32, 8, 4, 2.0, 0.5


def kl(logits, target):
    p = F.softmax(target / TAU, -1)
    return (p * (F.log_softmax(target / TAU, -1) - F.log_softmax(logits / TAU, -1))).sum(-1)


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
    trainer(max_epochs=EPOCHS, callbacks=[MESA(lmbda=LMBDA, tau=TAU, decay=0.8)], logger=logger, log_every_n_steps=1).fit(
        IndexedClassifier(net), indexed_loader(x, y)
    )
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
    trainer(max_epochs=3, accumulate_grad_batches=2, callbacks=[callback]).fit(IndexedClassifier(net), indexed_loader(x, y))
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
    trainer(max_epochs=2, callbacks=[callback], logger=logger, log_every_n_steps=1, **kwargs).fit(module, indexed_loader(x, y))
    expected = torch.float16 if precision == "fp16" else torch.bfloat16
    assert set(module.dtypes) == {expected}
    key = "sam/saf_kl" if which == "saf" else "sam/mesa_kl"
    values = [v for _, v in logger.values(key)]
    assert values and all(0 <= v < 10 for v in values)
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("which", ["saf", "mesa"])
def test_checkpoint_resume_is_bitwise(which, tmp_path):
    x, y = classification_data(n=N)
    make = (lambda: SAF(lmbda=LMBDA, tau=TAU, epochs_back=2)) if which == "saf" else (lambda: MESA(lmbda=LMBDA, tau=TAU, decay=0.8))
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


def test_manual_optimization_is_refused_at_setup():
    class Manual(IndexedClassifier):
        def __init__(self, net):
            super().__init__(net)
            self.automatic_optimization = False

    x, y = classification_data(n=N)
    for callback in (SAF(), MESA()):
        with pytest.raises(ValueError, match="automatic optimization"):
            trainer(max_steps=1, callbacks=[callback]).fit(Manual(mlp()), indexed_loader(x, y))


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
