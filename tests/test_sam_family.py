"""pytorch-optimizer's SAM family on our engine (GSAM, WSAM, FriendlySAM, LookSAM) against pytorch-optimizer's
own classes in a plain PyTorch loop: fp32 CPU, 20 steps, SGD with momentum and AdamW, weights equal to 1e-5."""

from __future__ import annotations

import pytest
import pytorch_optimizer as po
import torch
import torch.nn.functional as F

from lightning_sharpness.sam.family import GSAM, WSAM, FriendlySAM, LookSAM
from tests.helpers import Classifier, assert_same_weights, classification_data, clone, loader, mlp, trainer

STEPS, BATCH = 20, 16

BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01)),
}


def batches(x, y):
    return [(x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]) for i in range(STEPS)]


def closure_loop(net, opt, x, y):
    """pytorch-optimizer's usage for the classes whose step takes a closure: gradient at w, then step."""
    for xb, yb in batches(x, y):
        opt.zero_grad()
        F.cross_entropy(net(xb), yb).backward()

        def closure(xb=xb, yb=yb):
            opt.zero_grad()
            loss = F.cross_entropy(net(xb), yb)
            loss.backward()
            return loss

        opt.step(closure)


def wsam_loop(net, opt, x, y):
    for xb, yb in batches(x, y):
        opt.zero_grad()

        def closure(xb=xb, yb=yb):
            loss = F.cross_entropy(net(xb), yb)
            loss.backward()
            return loss

        opt.step(closure)


def gsam_loop(net, base_name, x, y, rho_max, rho_min, alpha):
    make, kwargs = BASES[base_name]
    base = make(net.parameters(), **kwargs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=STEPS, eta_min=kwargs["lr"] / 10)
    rho = po.ProportionScheduler(
        sched, max_lr=kwargs["lr"], min_lr=kwargs["lr"] / 10, max_value=rho_max, min_value=rho_min
    )
    opt = po.GSAM(net.parameters(), base, net, rho, alpha=alpha)
    for xb, yb in batches(x, y):
        opt.set_closure(F.cross_entropy, xb, yb)
        opt.step()
        sched.step()
        opt.update_rho_t()


def cosine_schedule(base_name):
    lr = BASES[base_name][1]["lr"]
    return lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS, eta_min=lr / 10)


def run_ours(net, base_name, callback, scheduler=None):
    make, kwargs = BASES[base_name]
    x, y = classification_data(n=STEPS * BATCH)
    module = Classifier(net, optimizer=lambda ps: make(ps, **kwargs), scheduler=scheduler)
    trainer(max_steps=STEPS, callbacks=[callback]).fit(module, loader(x, y, BATCH))
    return module


@pytest.mark.parametrize("base_name", list(BASES))
@pytest.mark.parametrize(
    "variant",
    ["gsam", "wsam-decoupled", "wsam-coupled", "friendlysam", "friendlysam-sigma.5", "looksam"],
)
def test_equals_pytorch_optimizer(variant, base_name):
    x, y = classification_data(n=STEPS * BATCH)
    net = mlp()
    ref = clone(net)
    make, kwargs = BASES[base_name]
    if variant == "gsam":
        lr = kwargs["lr"]
        run_ours(net, base_name, GSAM(rho_max=0.1, rho_min=0.02, alpha=0.3, lr_min=lr / 10), cosine_schedule(base_name))
        gsam_loop(ref, base_name, x, y, rho_max=0.1, rho_min=0.02, alpha=0.3)
    elif variant.startswith("wsam"):
        decouple = variant == "wsam-decoupled"
        run_ours(net, base_name, WSAM(rho=0.1, gamma=0.8, decouple=decouple))
        wsam_loop(ref, po.WSAM(ref, ref.parameters(), make, rho=0.1, gamma=0.8, decouple=decouple, **kwargs), x, y)
    elif variant.startswith("friendlysam"):
        sigma = 0.5 if variant.endswith(".5") else 1.0
        run_ours(net, base_name, FriendlySAM(rho=0.1, sigma=sigma, lmbda=0.8))
        closure_loop(ref, po.FriendlySAM(ref.parameters(), make, rho=0.1, sigma=sigma, lmbda=0.8, **kwargs), x, y)
    else:
        run_ours(net, base_name, LookSAM(rho=0.1, k=3, alpha=0.5))
        closure_loop(ref, po.LookSAM(ref.parameters(), make, rho=0.1, k=3, alpha=0.5, **kwargs), x, y)
    assert_same_weights(net, ref, atol=1e-5)


def test_bsam_equals_pytorch_optimizer():
    from lightning_sharpness.sam.bsam import BSAM, BSAMOptimizer

    x, y = classification_data(n=STEPS * BATCH)
    net = mlp()
    ref = clone(net)
    hyper = dict(num_data=STEPS * BATCH, lr=0.05, weight_decay=1e-3, rho=0.05, damping=0.1)
    optimizer = lambda ps: BSAMOptimizer(ps, seed=7, algorithm="pytorch-optimizer", **hyper)  # noqa: E731
    module = Classifier(net, optimizer=optimizer)
    trainer(max_steps=STEPS, callbacks=[BSAM()]).fit(module, loader(x, y, BATCH))
    opt = po.BSAM(ref.parameters(), **hyper)
    torch.manual_seed(7)  # pytorch-optimizer draws its noise from the global generator; ours from its own
    for i, (xb, yb) in enumerate(batches(x, y)):
        # pytorch-optimizer's BSAM adds noise only to parameters that hold a gradient when its step begins (and
        # makes its state only for those): its closure zeroes the gradients, so none is cleared out here, and
        # one backward gives the first step its gradients.
        if i == 0:
            F.cross_entropy(ref(xb), yb).backward()

        def closure(xb=xb, yb=yb):
            opt.zero_grad()
            loss = F.cross_entropy(ref(xb), yb)
            loss.backward()
            return loss

        opt.step(closure)
    assert_same_weights(net, ref, atol=1e-5)


def test_bsam_equals_the_papers_algorithm():
    """BSAMOptimizer's default is Algorithm 1 of the paper (tests/reference.py's PaperBSAM); it is a different
    update from pytorch-optimizer's (the test can fail)."""
    from lightning_sharpness.sam.bsam import BSAM, BSAMOptimizer
    from tests.reference import PaperBSAM

    x, y = classification_data(n=STEPS * BATCH)
    net = mlp()
    ref, library = clone(net), clone(net)
    hyper = dict(num_data=STEPS * BATCH, lr=0.05, weight_decay=1e-3, rho=0.05, damping=0.1)
    module = Classifier(net, optimizer=lambda ps: BSAMOptimizer(ps, seed=7, **hyper))
    trainer(max_steps=STEPS, callbacks=[BSAM()]).fit(module, loader(x, y, BATCH))
    opt = PaperBSAM(ref.parameters(), seed=7, **hyper)
    for xb, yb in batches(x, y):
        opt.step(lambda xb=xb, yb=yb: torch.autograd.grad(F.cross_entropy(ref(xb), yb), list(ref.parameters())))
    assert_same_weights(net, ref, atol=1e-5)
    module = Classifier(library, optimizer=lambda ps: BSAMOptimizer(ps, seed=7, algorithm="pytorch-optimizer", **hyper))
    trainer(max_steps=STEPS, callbacks=[BSAM()]).fit(module, loader(x, y, BATCH))
    assert max((a - b).abs().max() for a, b in zip(net.parameters(), library.parameters())) > 1e-3
