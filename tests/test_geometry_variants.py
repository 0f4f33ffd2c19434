"""Layer-wise and l-inf ASAM and the SSAM mask as geometries: SAM with each against a plain-PyTorch transcription of
the SAM-ON appendix's definitions (fp32 CPU, 1e-5), and the worst-case measure against closed forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sharpness import SAM, SAMEngine
from lightning_sharpness.geometry_variants import LayerwiseAdaptiveGeometry, LinfAdaptiveGeometry, MaskedGeometry
from lightning_sharpness.measures import worst_case_sharpness
from tests.helpers import Classifier, assert_same_weights, classification_data, clone, loader, mlp, trainer

STEPS = 4


# ------------------------------------------------------------------ plain-PyTorch transcriptions (SAM-ON A.3)
def layerwise_ascent(eta):
    def ascent(params, grads, rho):
        t = [p.detach().norm() + eta for p in params]  # one scale per tensor
        norm = torch.sqrt(sum(((s * g) ** 2).sum() for s, g in zip(t, grads)))
        return [s * s * g * rho / (norm + 1e-12) for s, g in zip(t, grads)]

    return ascent


def linf_ascent(eta):
    def ascent(params, grads, rho):
        return [rho * (p.detach().abs() + eta) * torch.sign(g) for p, g in zip(params, grads)]

    return ascent


def masked_ascent(masks):
    def ascent(params, grads, rho):
        mg = [m * g for m, g in zip(masks, grads)]
        norm = torch.sqrt(sum((x**2).sum() for x in mg))
        return [rho * x / (norm + 1e-12) for x in mg]

    return ascent


def reference_sam(net, x, y, ascent, rho, steps=STEPS, batch_size=16, optimizer=None):
    """SAM with an arbitrary ascent ``e = ascent(params, grads, rho)``: gradient at w, move, gradient at w + e,
    restore, step (SGD with momentum unless ``optimizer``)."""
    params = list(net.parameters())
    opt = (optimizer or (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)))(params)
    for i in range(steps):
        xb, yb = x[i * batch_size : (i + 1) * batch_size], y[i * batch_size : (i + 1) * batch_size]
        grads = torch.autograd.grad(F.cross_entropy(net(xb), yb), params)
        e = ascent(params, grads, rho)
        with torch.no_grad():
            for p, d in zip(params, e):
                p.add_(d)
        perturbed = torch.autograd.grad(F.cross_entropy(net(xb), yb), params)
        with torch.no_grad():
            for p, d in zip(params, e):
                p.sub_(d)
        for p, g in zip(params, perturbed):
            p.grad = g.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return net


@pytest.mark.parametrize(
    "geometry, ascent, rho",
    [
        (LayerwiseAdaptiveGeometry(eta=0.01), layerwise_ascent(0.01), 0.5),
        (LayerwiseAdaptiveGeometry(eta=0.0), layerwise_ascent(0.0), 0.5),
        (LinfAdaptiveGeometry(eta=0.01), linf_ascent(0.01), 0.002),
        (LinfAdaptiveGeometry(eta=0.0), linf_ascent(0.0), 0.002),
    ],
    ids=["layerwise", "layerwise-eta0", "linf", "linf-eta0"],
)
def test_sam_with_geometry_matches_reference(geometry, ascent, rho):
    x, y = classification_data()
    net = mlp()
    ref_net = clone(net)
    trainer(max_steps=STEPS, callbacks=[SAM(rho=rho, geometry=geometry)]).fit(Classifier(net), loader(x, y))
    reference_sam(ref_net, x, y, ascent, rho)
    assert_same_weights(net, ref_net, atol=1e-5)
    # the variants move the weights differently from each other (the test can fail)
    plain = clone(mlp())
    reference_sam(plain, x, y, lambda ps, gs, r: [r * g / torch.sqrt(sum((h**2).sum() for h in gs)) for g in gs], rho)
    assert not torch.allclose(plain[0].weight, net[0].weight, atol=1e-5)


def test_masked_geometry_moves_only_the_selected_elements():
    x, y = classification_data()
    net = mlp()
    ref_net = clone(net)
    g = torch.Generator().manual_seed(3)
    masks = {n: torch.rand(p.shape, generator=g) > 0.7 for n, p in net.named_parameters()}
    geometry = MaskedGeometry()
    geometry.set_masks({f"net.{n}": m for n, m in masks.items()})  # names as the LightningModule sees them
    trainer(max_steps=STEPS, callbacks=[SAM(rho=0.05, geometry=geometry)]).fit(Classifier(net), loader(x, y))
    reference_sam(ref_net, x, y, masked_ascent([m.float() for m in masks.values()]), 0.05)
    assert_same_weights(net, ref_net, atol=1e-5)
    masked_out = sum(int((~m).sum()) for m in masks.values())
    assert geometry.sparsity() == pytest.approx(masked_out / sum(m.numel() for m in masks.values()))


def test_masked_geometry_direct_step():
    w, grad = torch.zeros(3), torch.tensor([3.0, 4.0, 12.0])
    geometry = MaskedGeometry()
    geometry.bind(nn.Module(), [("w", w)])
    geometry.set_masks({"w": torch.tensor([1, 1, 0])})
    assert float(geometry.normalized_step_([w], [grad], rho=1.0, eps=0.0)) == pytest.approx(5.0)
    assert torch.allclose(grad, torch.tensor([0.6, 0.8, 0.0]))


def test_linf_reports_the_dual_norm_and_scales_by_the_divisor():
    w, g = torch.tensor([1.0, -2.0]), torch.tensor([3.0, -4.0]) * 8  # a GradScaler's scale of 8
    norm = LinfAdaptiveGeometry(eta=0.0).normalized_step_([w], [g], rho=0.1, grad_divisor=8.0)
    assert float(norm) == pytest.approx(1 * 3 + 2 * 4)
    assert torch.allclose(g, torch.tensor([0.1, -0.2]))


@pytest.mark.parametrize("normalize", [False])
def test_linf_refuses_unnormalized_steps(normalize):
    x, y = classification_data()
    with pytest.raises(ValueError, match="no unnormalized form"):
        trainer(max_steps=1, callbacks=[SAM(rho=0.1, normalize=normalize, geometry=LinfAdaptiveGeometry())]).fit(
            Classifier(mlp()), loader(x, y)
        )


@pytest.mark.parametrize("bad", [-1.0, float("nan"), True, "x"])
def test_bad_eta_is_refused(bad):
    for cls in (LayerwiseAdaptiveGeometry, LinfAdaptiveGeometry):
        with pytest.raises(ValueError, match="`eta`"):
            cls(eta=bad)


def test_masked_base_must_be_elementwise():
    with pytest.raises(ValueError, match="`base`"):
        MaskedGeometry(base=LinfAdaptiveGeometry())


# ------------------------------------------------------------------ as measures: closed forms on a linear loss
def linear_problem():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x = torch.randn(8, 4)

    def loss_fn(m, batch):  # linear in the weights: L(w + d) - L(w) = <g, d> exactly
        return m(batch).sum()

    grads = torch.autograd.grad(loss_fn(model, x), list(model.parameters()))
    return model, loss_fn, x, grads


def test_linf_measure_is_rho_times_the_dual_norm_on_a_linear_loss():
    model, loss_fn, x, grads = linear_problem()
    rho, eta = 0.01, 0.1
    expected = rho * sum(((p.detach().abs() + eta) * g).abs().sum() for p, g in zip(model.parameters(), grads))
    got = worst_case_sharpness(model, loss_fn, x, rho=rho, geometry=LinfAdaptiveGeometry(eta), norm="linf", steps=5)
    assert float(got) == pytest.approx(float(expected), rel=1e-4)
    with pytest.raises(ValueError, match="norm"):
        worst_case_sharpness(model, loss_fn, x, rho=rho, geometry=LinfAdaptiveGeometry(eta), norm="l2")


def test_layerwise_measure_is_rho_times_the_scaled_norm_on_a_linear_loss():
    model, loss_fn, x, grads = linear_problem()
    rho, eta = 0.01, 0.1
    scales = [p.detach().norm() + eta for p in model.parameters()]
    expected = rho * torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(scales, grads)))
    got = worst_case_sharpness(model, loss_fn, x, rho=rho, geometry=LayerwiseAdaptiveGeometry(eta), steps=10)
    assert float(got) == pytest.approx(float(expected), rel=1e-3)


def test_mixin_engine_accepts_the_geometries():
    engine = SAMEngine(rho=0.5, geometry=LayerwiseAdaptiveGeometry())
    assert isinstance(engine.geometry, LayerwiseAdaptiveGeometry)
