"""The SAM callback against the plain-PyTorch reference loop (fp32, CPU), weights equal to 1e-6."""

from __future__ import annotations

import pytest
import torch
import torch_optimizer

from lightning_sharpness import ASAM, SAM, USAM, LinearRho
from tests import reference
from tests.helpers import Classifier, assert_same_weights, classification_data, clone, cnn_bn, loader, mlp, trainer

STEPS = 4


def run_reference(net, x, y, batch_size=16, optimizer=None, steps=STEPS, **kwargs):
    opt = (optimizer or (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)))(net.parameters())
    losses = []
    for i in range(steps):
        s = slice(i * batch_size, (i + 1) * batch_size)
        losses.append(reference.sam_step(net, opt, x[s], y[s], **kwargs))
    return losses


VARIANTS = {
    "sam": (lambda: SAM(rho=0.05), dict(rho=0.05)),
    "asam-eta0": (lambda: ASAM(rho=0.5, eta=0.0), dict(rho=0.5, eta=0.0)),
    "asam-eta0.01": (lambda: ASAM(rho=0.5, eta=0.01), dict(rho=0.5, eta=0.01)),
    "usam": (lambda: USAM(rho=0.3), dict(rho=0.3, normalize=False)),
    "m1": (lambda: SAM(rho=0.05, m=1), dict(rho=0.05, m=1)),
    "m4": (lambda: SAM(rho=0.05, m=4), dict(rho=0.05, m=4)),
    "m5-uneven": (lambda: SAM(rho=0.05, m=5), dict(rho=0.05, m=5)),
    "asam-m4": (lambda: ASAM(rho=0.5, m=4), dict(rho=0.5, eta=0.01, m=4)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_match_reference(variant):
    make_callback, ref_kwargs = VARIANTS[variant]
    x, y = classification_data()
    net = mlp()
    ref_net = clone(net)
    module = Classifier(net)
    trainer(max_steps=STEPS, callbacks=[make_callback()]).fit(module, loader(x, y))
    losses = run_reference(ref_net, x, y, **ref_kwargs)
    assert_same_weights(net, ref_net)
    # The user's own loss (the first training_step call of each step) is the unperturbed one.
    assert module.calls[0]["loss"] == pytest.approx(losses[0][0], abs=1e-6)


def test_bn_statistics_follow_the_first_pass_only():
    x, y = classification_data(image=True)
    net = cnn_bn()
    ref_net = clone(net)
    trainer(max_steps=STEPS, callbacks=[SAM(rho=0.05)]).fit(Classifier(net), loader(x, y))
    run_reference(ref_net, x, y, rho=0.05)
    assert_same_weights(net, ref_net)  # state_dict includes running_mean / running_var / num_batches_tracked
    assert int(net[1].num_batches_tracked) == STEPS


def test_bn_update_both_lets_every_pass_update_statistics():
    x, y = classification_data(image=True)
    net = cnn_bn()
    ref_net = clone(net)
    trainer(max_steps=STEPS, callbacks=[SAM(rho=0.05, m=8, bn_update="both")]).fit(Classifier(net), loader(x, y))
    run_reference(ref_net, x, y, rho=0.05, m=8, bn_update="both")
    assert_same_weights(net, ref_net)
    # ordinary pass + per chunk (pass at w + pass at w + e): 1 + 2 * 2 updates per step
    assert int(net[1].num_batches_tracked) == STEPS * 5


@pytest.mark.parametrize("opt_name", ["Lamb", "AdaBelief", "RAdam"])
def test_torch_optimizer_bases(opt_name):
    make = {
        "Lamb": lambda ps: torch_optimizer.Lamb(ps, lr=0.01),
        "AdaBelief": lambda ps: torch_optimizer.AdaBelief(ps, lr=0.01),
        "RAdam": lambda ps: torch_optimizer.RAdam(ps, lr=0.01),
    }[opt_name]
    x, y = classification_data()
    net = mlp()
    ref_net = clone(net)
    trainer(max_steps=STEPS, callbacks=[SAM(rho=0.05)]).fit(Classifier(net, optimizer=make), loader(x, y))
    run_reference(ref_net, x, y, rho=0.05, optimizer=make)
    assert_same_weights(net, ref_net)


def test_lr_scheduler_and_gradient_clipping_apply_to_the_sam_gradient():
    make_opt = lambda ps: torch.optim.SGD(ps, lr=0.5)
    make_sched = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)
    x, y = classification_data()
    net = mlp()
    ref_net = clone(net)
    module = Classifier(net, optimizer=make_opt, scheduler=make_sched)
    trainer(max_steps=STEPS, gradient_clip_val=0.05, callbacks=[SAM(rho=0.05)]).fit(module, loader(x, y))
    opt = make_opt(ref_net.parameters())
    sched = make_sched(opt)
    for i in range(STEPS):
        s = slice(i * 16, (i + 1) * 16)
        reference.sam_step(ref_net, opt, x[s], y[s], rho=0.05, clip_norm=0.05)
        sched.step()
    assert_same_weights(net, ref_net)


def test_sam_on_and_predicate_perturb_only_selected_parameters():
    x, y = classification_data(image=True)
    for perturb, select in [
        ("norm", lambda n, p: n.startswith("1.")),
        (lambda n, p: n.endswith("weight"), lambda n, p: n.endswith("weight")),
    ]:
        net = cnn_bn()
        ref_net = clone(net)
        trainer(max_steps=STEPS, callbacks=[SAM(rho=0.5, perturb=perturb)]).fit(Classifier(net), loader(x, y))
        run_reference(ref_net, x, y, rho=0.5, select=select)
        assert_same_weights(net, ref_net)


def test_frozen_parameters_are_left_alone():
    x, y = classification_data()
    net = mlp()
    net[0].weight.requires_grad_(False)
    frozen = net[0].weight.detach().clone()
    ref_net = clone(net)
    trainer(max_steps=STEPS, callbacks=[SAM(rho=0.05)]).fit(Classifier(net), loader(x, y))
    run_reference(ref_net, x, y, rho=0.05)
    assert torch.equal(net[0].weight, frozen)
    assert_same_weights(net, ref_net)


def test_erm_then_sam_and_scheduled_rho():
    x, y = classification_data()
    net = mlp()
    ref_net = clone(net)
    schedule = LinearRho(start=0.0, end=0.1, steps=4)
    trainer(max_steps=STEPS, callbacks=[SAM(rho=schedule, start_step=2)]).fit(Classifier(net), loader(x, y))
    opt = torch.optim.SGD(ref_net.parameters(), lr=0.1, momentum=0.9)
    for i in range(STEPS):
        s = slice(i * 16, (i + 1) * 16)
        if i < 2:
            reference.erm_step(ref_net, opt, x[s], y[s])
        else:
            reference.sam_step(ref_net, opt, x[s], y[s], rho=schedule(i - 2))  # counted from SAM's first step
    assert_same_weights(net, ref_net)
