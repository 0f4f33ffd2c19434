"""RSAM (Zhang et al., 2026) against a plain-PyTorch transcription of the paper's update (fp32 CPU, 1e-5): the ascent
along the gradient of L + gamma * S_alpha(g), S_alpha the negative Renyi entropy of p = g^2 / ||g||^2, the descent
along grad L(w + e) (and, with regularize="both", along the regularized gradient); the mixin; modes and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision

from lightning_sharpness import RSAM, SAMEngine
from lightning_sharpness.sam.rsam import RenyiAscent, renyi_of_gradient
from tests.helpers import (
    Classifier,
    ManualClassifier,
    RecordingLogger,
    assert_same_weights,
    classification_data,
    clone,
    loader,
    mlp,
    trainer,
)

STEPS, RHO = 4, 0.05


def renyi(grads, alpha):
    p = torch.cat([g.reshape(-1) ** 2 for g in grads])
    p = p / p.sum()
    if alpha == 1:
        return (p * torch.log(p)).sum()
    return torch.log((p**alpha).sum()) / (alpha - 1)


def reference_rsam(net, x, y, alpha, gamma, regularize="ascent", steps=STEPS, batch=16, micro=1):
    """Returns the net and, per step, the training loss at w and at w + e (what sam/sharpness_gap reports).
    With ``micro`` > 1, each step accumulates that many micro-batches of ``batch`` examples, each perturbed by its
    own regularized gradient (the callback's local mode)."""
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    losses = []

    def objective(xb, yb, regularized):
        loss = F.cross_entropy(net(xb), yb)
        if not regularized:
            return loss, loss
        g = torch.autograd.grad(loss, params, create_graph=True)
        return loss + gamma * renyi(g, alpha), loss

    for t in range(steps * micro):
        xb, yb = x[t * batch : (t + 1) * batch], y[t * batch : (t + 1) * batch]
        regularized, at_w = objective(xb, yb, True)
        g1 = torch.autograd.grad(regularized, params)
        norm = torch.sqrt(sum((g**2).sum() for g in g1))
        e = [RHO * g / (norm + 1e-12) for g in g1]
        with torch.no_grad():
            for p, d in zip(params, e):
                p.add_(d)
        descent, at_e = objective(xb, yb, regularize == "both")
        g2 = torch.autograd.grad(descent, params)
        with torch.no_grad():
            for p, d in zip(params, e):
                p.sub_(d)
        for p, g in zip(params, g2):
            p.grad = g / micro if p.grad is None else p.grad + g / micro
        if (t + 1) % micro == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append((float(at_w), float(at_e)))
    return net, losses


@pytest.mark.parametrize("alpha, regularize", [(2.0, "ascent"), (1.0, "ascent"), (0.7, "ascent"), (1.5, "both")])
def test_rsam_matches_reference(alpha, regularize):
    x, y = classification_data()
    net = mlp()
    ref_net = clone(net)
    logger = RecordingLogger()
    callback = RSAM(rho=RHO, alpha=alpha, gamma=0.5, regularize=regularize)
    trainer(max_steps=STEPS, callbacks=[callback], logger=logger, log_every_n_steps=1).fit(
        Classifier(net), loader(x, y)
    )
    _, losses = reference_rsam(ref_net, x, y, alpha, 0.5, regularize)
    assert_same_weights(net, ref_net, atol=1e-5)
    logged = [v for _, v in logger.values("sam/renyi_sharpness")]
    assert len(logged) == STEPS and all(-math.log(467) <= v <= 0 for v in logged)
    if regularize == "ascent":  # the gap is of the training loss, not of the regularized objective
        gaps = [v for _, v in logger.values("sam/sharpness_gap")]
        assert gaps == pytest.approx([e - w for w, e in losses], abs=1e-5)
    # the regularizer changes the trajectory (the test can fail): gamma = 0 is plain SAM
    sam, _ = reference_rsam(clone(mlp()), x, y, alpha, 0.0)
    assert not torch.allclose(sam[0].weight, net[0].weight, atol=1e-5)


def test_ascent_only_differs_from_both():
    """The paper's form (regularizer in the ascent only) is a different update from SAM on the regularized loss."""
    x, y = classification_data()
    ascent, _ = reference_rsam(mlp(), x, y, 1.5, 0.5, "ascent")
    both, _ = reference_rsam(mlp(), x, y, 1.5, 0.5, "both")
    assert not torch.allclose(ascent[0].weight, both[0].weight, atol=1e-5)


@pytest.mark.parametrize("regularize", ["ascent", "both"])
def test_mixin_matches_reference(regularize):
    x, y = classification_data()
    net = mlp()
    ref_net = clone(net)
    logger = RecordingLogger()
    engine = SAMEngine(rho=RHO, variant=RenyiAscent(alpha=1.5, gamma=0.5, regularize=regularize))
    trainer(max_steps=STEPS, logger=logger, log_every_n_steps=1).fit(ManualClassifier(net, sam=engine), loader(x, y))
    _, losses = reference_rsam(ref_net, x, y, 1.5, 0.5, regularize)
    assert_same_weights(net, ref_net, atol=1e-5)
    assert len(logger.values("sam/renyi_sharpness")) == STEPS
    if regularize == "ascent":
        gaps = [v for _, v in logger.values("sam/sharpness_gap")]
        assert gaps == pytest.approx([e - w for w, e in losses], abs=1e-5)


def test_renyi_of_gradient_edge_values():
    uniform = [torch.ones(4)]
    assert float(renyi_of_gradient(uniform, 2.0)) == pytest.approx(-math.log(4))
    one_hot = [torch.tensor([0.0, 3.0, 0.0])]
    assert float(renyi_of_gradient(one_hot, 2.0)) == pytest.approx(0.0, abs=1e-7)
    g = torch.tensor([0.0, 1.0, 2.0], requires_grad=True)
    (grad,) = torch.autograd.grad(renyi_of_gradient([g], 0.7), g)
    assert torch.isfinite(grad).all()  # a zero component gives no inf
    assert renyi_of_gradient([torch.zeros(3)], 2.0) is None


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision(precision):
    x, y = classification_data()
    kwargs = (
        dict(plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**16))])
        if precision == "fp16"
        else dict(precision="bf16-mixed")
    )
    logger = RecordingLogger()
    module = Classifier(mlp())
    trainer(max_steps=STEPS, callbacks=[RSAM(rho=RHO, gamma=0.5)], logger=logger, log_every_n_steps=1, **kwargs).fit(
        module, loader(x, y)
    )
    expected = torch.float16 if precision == "fp16" else torch.bfloat16
    assert all(c["dtype"] == expected for c in module.calls)
    logged = [v for _, v in logger.values("sam/renyi_sharpness")]
    assert len(logged) == STEPS and all(-math.log(467) <= v <= 0 for v in logged)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_accumulation_local_mode_matches_reference():
    x, y = classification_data()
    net = mlp()
    ref_net = clone(net)
    module = Classifier(net)
    trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[RSAM(rho=RHO, gamma=0.5)]).fit(module, loader(x, y, 8))
    assert len(module.calls) == 2 * 2 * 2  # per micro-batch: Lightning's pass and the perturbed one
    assert "training_step" not in module.__dict__  # the wrapper is gone after fit
    reference_rsam(ref_net, x, y, 1.5, 0.5, steps=2, batch=8, micro=2)
    assert_same_weights(net, ref_net, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=0), "alpha"),
        (dict(gamma=-1), "gamma"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(regularize="descent"), "regularize"),
        (dict(variant=RenyiAscent()), "variant"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RSAM(**kwargs)


def test_manual_optimization_is_pointed_to_the_mixin():
    x, y = classification_data()
    with pytest.raises(ValueError, match="RenyiAscent"):
        trainer(max_steps=1, callbacks=[RSAM()]).fit(ManualClassifier(mlp()), loader(x, y))
