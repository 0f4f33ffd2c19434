"""Measures where a naive estimate is silently wrong: tr(diag(H)^1/2) near zero diagonals, worst-case sharpness
at local maxima and stationary points, ambiguous batches, non-finite losses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_sharpness import measures as M
from tests.test_curvature import QBATCH, Quadratic, quad_loss, rotated


# ---------------------------------------------------------------------------------------------- diag_sqrt_trace
class DiagonalNet(nn.Module):
    """``f(x) = <u * v, x>``: a diagonal linear network, whose GD solutions from small init are sparse."""

    def __init__(self, d: int, init: float = 0.01) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.full((d,), init, dtype=torch.float64))
        self.v = nn.Parameter(torch.full((d,), init, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.u * self.v)


def mse(model: nn.Module, batch) -> torch.Tensor:
    return 0.5 * (model(batch[0]) - batch[1]).pow(2).mean()


def sparse_diagonal_net(d: int = 50, n: int = 40, k: int = 5, steps: int = 1500, seed: int = 0):
    """A diagonal network trained by GD to a sparse solution of a noisy sparse regression: 10 of its 100 Hessian
    diagonal entries are large, the other 90 are near 0 while their rows are not (their estimates are noisy)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    beta = torch.zeros(d, dtype=torch.float64)
    beta[:k] = 1 + torch.rand(k, generator=g, dtype=torch.float64)
    y = x @ beta + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    net = DiagonalNet(d)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        mse(net, (x, y)).backward()
        opt.step()
    return net, (x, y)


def exact_sqrt_trace(model: nn.Module, loss_fn, batch) -> float:
    """Ground truth from the dense Hessian (``torch.autograd.functional.hessian``, float64)."""
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    H = torch.autograd.functional.hessian(
        lambda *ps: loss_fn(lambda b: torch.func.functional_call(model, dict(zip(names, ps)), (b,)), batch), params
    )
    diag = torch.cat([H[i][i].reshape(p.numel(), p.numel()).diagonal() for i, p in enumerate(params)])
    return float(diag.clamp_min(0).sqrt().sum())


def coverage(model, loss_fn, batch, truth: float, seeds: int, **kw) -> tuple[float, list]:
    """How often the reported 95% interval ``value +- 1.96 stderr`` holds the exact value, over ``seeds`` seeds."""
    results = [M.diag_sqrt_trace(model, loss_fn, batch, seed=s, **kw) for s in range(seeds)]
    hits = [abs(float(r) - truth) <= 1.96 * r.stderr for r in results]
    return sum(hits) / seeds, results


def test_diag_sqrt_trace_interval_covers_exact_value_on_sparse_diagonal_network():
    net, batch = sparse_diagonal_net()
    truth = exact_sqrt_trace(net, lambda f, b: 0.5 * (f(b[0]) - b[1]).pow(2).mean(), batch)
    # 40 probes for 100 parameters: the stochastic estimator (the exact diagonal would cost 100 products)
    rate, results = coverage(net, mse, batch, truth, seeds=100, matvecs=40)
    assert rate >= 0.9  # nominal 95%, 100 fixed seeds (the clamped plug-in and its jackknife error covered 51%)
    r = results[0]
    assert r.info["interval"] == pytest.approx((r.value - 1.96 * r.stderr, r.value + 1.96 * r.stderr), rel=1e-3)
    assert r.info["unresolved"] > 0.5  # the regime where the bias bound matters
    mean_value = sum(float(r) for r in results) / len(results)
    mean_plug_in = sum(r.info["plug_in"] for r in results) / len(results)
    assert abs(mean_value - truth) < abs(mean_plug_in - truth) / 2  # the corrected value is much less biased


def test_diag_sqrt_trace_interval_is_near_nominal_when_the_diagonal_is_resolved():
    A = rotated(torch.linspace(0.5, 3, 40, dtype=torch.float64), seed=4)
    model = Quadratic(A)
    truth = float(A.diagonal().sqrt().sum())
    rate, results = coverage(model, quad_loss, QBATCH, truth, seeds=100, matvecs=30)
    assert all(r.info["unresolved"] == 0 for r in results)
    assert 0.88 <= rate <= 0.99  # a 95% interval: neither optimistic nor uselessly wide


def test_diag_sqrt_trace_exact_has_no_error_bar():
    net, batch = sparse_diagonal_net(d=10, n=8, k=2, steps=200)
    truth = exact_sqrt_trace(net, lambda f, b: 0.5 * (f(b[0]) - b[1]).pow(2).mean(), batch)
    r = M.diag_sqrt_trace(net, mse, batch, exact=True)
    assert float(r) == pytest.approx(truth, rel=1e-10) and r.stderr is None
