"""Worst-case and average-case sharpness against exact answers and invariances."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sharpness import measures as M
from lightning_sharpness.geometry import AdaptiveGeometry
from tests.helpers import QBATCH, Quadratic, quad_loss, rotated


def trust_region_max(A: torch.Tensor, g: torch.Tensor, rho: float) -> float:
    """Exact ``max_{||d|| <= rho} g^T d + d^T A d / 2`` (easy case): ``d = (mu I - A)^-1 g``, ``||d|| = rho``."""
    lam, U = torch.linalg.eigh(A)
    c = U.T @ g
    lo, hi = lam[-1].item() + 1e-12, lam[-1].item() + c.norm().item() / rho + abs(lam).max().item() + 1
    for _ in range(200):
        mu = (lo + hi) / 2
        if (c / (mu - lam)).norm() > rho:
            lo = mu
        else:
            hi = mu
    d = U @ (c / (mu - lam))
    return (g @ d + 0.5 * d @ A @ d).item()


def test_worst_case_l2_equals_exact_ball_maximum():
    A = rotated(torch.tensor([3.0, 1.0, 0.5, -0.5, -1.0, 0.2], dtype=torch.float64), seed=0)
    w0 = torch.tensor([0.3, -0.2, 0.1, 0.4, 0.0, -0.1], dtype=torch.float64)
    model = Quadratic(A, w0=w0)
    base = model(QBATCH).item()
    g = A @ w0
    for rho in (0.1, 0.5):
        truth = trust_region_max(A, g, rho)
        res = M.worst_case_sharpness(model, quad_loss, QBATCH, rho=rho, steps=60)
        assert float(res) == pytest.approx(truth, rel=1e-4)
        assert res.base_loss == pytest.approx(base)
        assert float(res) <= truth + 1e-9  # feasible: never above the true maximum


def test_worst_case_at_minimum_is_half_rho_squared_lambda_max():
    eigs = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.1], dtype=torch.float64)
    model = Quadratic(rotated(eigs, seed=1))
    res = M.worst_case_sharpness(model, quad_loss, QBATCH, rho=0.2, steps=100)
    assert float(res) == pytest.approx(0.5 * 0.2**2 * 2.0, rel=1e-3)


def test_worst_case_linf_equals_exact_box_maximum():
    a = torch.tensor([2.0, 0.5, 1.0, 0.0], dtype=torch.float64)
    w0 = torch.tensor([0.5, -1.0, 0.2, 0.3], dtype=torch.float64)
    b = torch.tensor([0.1, 0.3, -0.7, 0.2], dtype=torch.float64)
    model = Quadratic(torch.diag(a), w0=w0, b=b)
    g = a * w0 + b
    rho = 0.05
    # separable and convex per coordinate: the maximum is at a corner, |g_i| rho + a_i rho^2 / 2
    truth = (g.abs() * rho + 0.5 * a * rho**2).sum().item()
    res = M.worst_case_sharpness(model, quad_loss, QBATCH, rho=rho, norm="linf", steps=20)
    assert float(res) == pytest.approx(truth, rel=1e-9)
    # adaptive l-inf: box |d_i| <= rho (|w_i| + eta)
    geo = AdaptiveGeometry(eta=0.1)
    t = w0.abs() + 0.1
    truth = (g.abs() * rho * t + 0.5 * a * (rho * t) ** 2).sum().item()
    res = M.worst_case_sharpness(model, quad_loss, QBATCH, rho=rho, norm="linf", geometry=geo, steps=20)
    assert float(res) == pytest.approx(truth, rel=1e-9)


def relu_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()


def rescale_neurons(net: nn.Module, c: torch.Tensor) -> nn.Module:
    """The same function: hidden neuron i scaled by c_i in, 1 / c_i out (ReLU is positively homogeneous)."""
    import copy

    out = copy.deepcopy(net)
    with torch.no_grad():
        out[0].weight.mul_(c[:, None])
        out[0].bias.mul_(c)
        out[2].weight.div_(c[None, :])
    return out


def mse(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_adaptive_sharpness_is_invariant_to_neuron_rescaling(norm):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, generator=g).double(), torch.randn(16, 2, generator=g).double()
    net = relu_net()
    other = rescale_neurons(net, torch.tensor([0.2, 5.0, 1.0, 3.0, 0.5], dtype=torch.float64))
    assert torch.allclose(net(x), other(x))
    geo = AdaptiveGeometry(eta=0.0)
    kw = dict(rho=0.1, norm=norm, steps=10)
    a = M.worst_case_sharpness(net, mse, (x, y), geometry=geo, **kw)
    b = M.worst_case_sharpness(other, mse, (x, y), geometry=geo, **kw)
    assert float(a) > 0 and float(a) == pytest.approx(float(b), rel=1e-9)
    avg_a = M.average_case_sharpness(net, mse, (x, y), rho=0.1, norm=norm, geometry=geo, samples=20)
    avg_b = M.average_case_sharpness(other, mse, (x, y), rho=0.1, norm=norm, geometry=geo, samples=20)
    assert float(avg_a) == pytest.approx(float(avg_b), rel=1e-9)
    # while the standard geometry sees a different sharpness
    s_a = M.worst_case_sharpness(net, mse, (x, y), **kw)
    s_b = M.worst_case_sharpness(other, mse, (x, y), **kw)
    assert abs(float(s_a) - float(s_b)) > 0.05 * float(s_a)


def test_m_sharpness_is_the_mean_over_chunks():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 3, generator=g).double(), torch.randn(12, 2, generator=g).double()
    net = relu_net()
    res = M.worst_case_sharpness(net, mse, [(x[:8], y[:8]), (x[8:], y[8:])], rho=0.05, m=4, steps=5)
    assert res.per_chunk.shape == (3,)
    # each chunk maximized on its own: the best of 10 starts drawn from the chunk's own generator (seed 0 and the
    # chunk's position in its batch)
    from lightning_sharpness.curvature.operator import HessianOperator
    from lightning_sharpness.geometry import resolve_geometry
    from lightning_sharpness.measures import _best_ascent, _chunk_generator

    net.eval()
    op = HessianOperator(net, mse, (x, y))
    geo = resolve_geometry("standard")
    geo = geo.bind(net, list(net.named_parameters()))
    params = list(net.parameters())
    with torch.no_grad():
        chunks = [((x[s : s + 4], y[s : s + 4]), _chunk_generator(0, index)) for s, index in ((0, 0), (4, 1), (8, 0))]
        runs = [_best_ascent(op, geo, params, c, 0.05, "l2", 5, 0.1, "random", 10, gen) for c, gen in chunks]
        manual = [best - base for best, base in runs]
    assert torch.allclose(res.per_chunk, torch.tensor(manual, dtype=torch.float64))
    assert float(res) == pytest.approx(sum(manual) / 3)
    assert res.stderr == pytest.approx(torch.tensor(manual).std().item() / math.sqrt(3), rel=1e-6)
    # 1-sharpness is at least n-sharpness on average (each example gets its own worst direction)
    one = M.worst_case_sharpness(net, mse, (x, y), rho=0.05, m=1, steps=5)
    full = M.worst_case_sharpness(net, mse, (x, y), rho=0.05, steps=5)
    assert float(one) > float(full)


@pytest.mark.parametrize("norm,second_moment", [("l2", 1.0), ("linf", 1.0 / 3.0)])
def test_average_case_of_quadratic(norm, second_moment):
    eigs = torch.tensor([2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    A = rotated(eigs, seed=2)
    w0 = torch.tensor([0.5, -1.0, 2.0, 0.1], dtype=torch.float64)
    model = Quadratic(A, w0=w0, b=-(A @ w0))  # minimum at w0: L(w0 + d) - L(w0) = d^T A d / 2
    rho = 0.1
    std = M.average_case_sharpness(model, quad_loss, QBATCH, rho=rho, norm=norm, geometry="standard", samples=400)
    truth = 0.5 * rho**2 * second_moment * A.trace().item()
    assert abs(float(std) - truth) < 4 * std.stderr
    ada = M.average_case_sharpness(model, quad_loss, QBATCH, rho=rho, norm=norm, samples=400)  # adaptive default
    t2 = (w0.abs() + 0.01).pow(2)
    truth = 0.5 * rho**2 * second_moment * (A.diagonal() * t2).sum().item()
    assert abs(float(ada) - truth) < 4 * ada.stderr


def test_rho_zero_and_bad_inputs():
    net = relu_net()
    x, y = torch.randn(8, 3).double(), torch.randn(8, 2).double()
    assert float(M.worst_case_sharpness(net, mse, (x, y), rho=0.0)) == 0.0
    with pytest.raises(ValueError, match="`rho`"):
        M.worst_case_sharpness(net, mse, (x, y), rho=-0.1)
    with pytest.raises(ValueError, match="`rho`"):
        M.average_case_sharpness(net, mse, (x, y), rho=float("nan"))
    with pytest.raises(ValueError, match="`geometry`"):
        M.worst_case_sharpness(net, mse, (x, y), rho=0.1, geometry="riemann")
    with pytest.raises(ValueError, match="`norm`"):
        M.worst_case_sharpness(net, mse, (x, y), rho=0.1, norm="l1")
    with pytest.raises(ValueError, match="`norm`"):
        M.worst_case_sharpness(net, mse, (x, y), rho=0.1, geometry="geodesic", norm="linf")
    with pytest.raises(ValueError, match="`m`"):
        M.worst_case_sharpness(net, mse, (x, y), rho=0.1, m=3)
    with pytest.raises(ValueError, match="`m`"):
        M.worst_case_sharpness(net, mse, (x, y), rho=0.1, m=0)
    with pytest.raises(ValueError, match="`batches` is empty"):
        M.average_case_sharpness(net, mse, [], rho=0.1)
    with pytest.raises(ValueError, match="no trainable"):
        M.worst_case_sharpness(relu_net().requires_grad_(False), mse, (x, y), rho=0.1)
