"""Loss-landscape pictures: filter normalization, exact values on a linear least-squares model, no side effects."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sharpness.landscape import (
    Landscape1D,
    density_histogram,
    density_nodes_weights,
    filter_normalized_direction,
    loss_landscape_1d,
    loss_landscape_2d,
    plot_density,
    plot_landscape_1d,
    plot_landscape_2d,
)


def _mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def _linear_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(5, 3, bias=True).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 5, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(3, generator=g, dtype=torch.float64))
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = torch.randn(12, 3, generator=g, dtype=torch.float64)
    return model, x, y


def test_filter_normalized_direction_matches_filter_norms_and_ignores_biases():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    d = filter_normalized_direction(model, torch.Generator().manual_seed(1))
    params = list(model.parameters())
    assert [t.shape for t in d] == [p.shape for p in params]
    for p, t in zip(params, d):
        if p.dim() <= 1:
            assert torch.count_nonzero(t) == 0
        else:
            torch.testing.assert_close(
                t.reshape(p.shape[0], -1).norm(dim=1), p.detach().reshape(p.shape[0], -1).norm(dim=1)
            )
    again = filter_normalized_direction(model, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(d, again))


def test_1d_landscape_is_the_exact_parabola_of_least_squares():
    model, x, y = _linear_problem()
    curve = loss_landscape_1d(model, _mse, [(x[:6], y[:6]), (x[6:], y[6:])], steps=9, span=0.8, seed=3)
    assert isinstance(curve, Landscape1D)
    np.testing.assert_allclose(curve.alphas, np.linspace(-0.8, 0.8, 9))
    # Regenerate the direction: weight filters normalized, bias direction zero.
    (dw, db) = filter_normalized_direction(model, torch.Generator().manual_seed(3))
    assert torch.count_nonzero(db) == 0
    w, b = model.weight.detach(), model.bias.detach()
    r = x @ w.T + b - y  # residual at the current weights
    s = x @ dw.T  # its change per unit alpha
    n = r.numel()
    expected = [(r.pow(2).sum() + 2 * a * (r * s).sum() + a * a * s.pow(2).sum()).item() / n for a in curve.alphas]
    np.testing.assert_allclose(curve.losses, expected, rtol=1e-12)
    assert curve.losses[4] == pytest.approx(_mse(model, (x, y)).item(), rel=1e-14)


def test_2d_landscape_matches_direct_evaluation_on_the_grid():
    model, x, y = _linear_problem(1)
    surface = loss_landscape_2d(model, _mse, (x, y), steps=5, span=0.5, seed=7)
    g = torch.Generator().manual_seed(7)
    d1 = filter_normalized_direction(model, g)
    d2 = filter_normalized_direction(model, g)
    probe = nn.Linear(5, 3).double()
    for i, a in enumerate(surface.alphas):
        for j, b in enumerate(surface.betas):
            with torch.no_grad():
                for p, q, u, v in zip(probe.parameters(), model.parameters(), d1, d2):
                    p.copy_(q + a * u + b * v)
            assert surface.losses[i, j] == pytest.approx(_mse(probe, (x, y)).item(), rel=1e-12)
    # The two directions differ, so the surface is not symmetric in (alpha, beta).
    assert not np.allclose(surface.losses, surface.losses.T)


def test_landscape_has_no_side_effects_on_weights_buffers_grads_modes_and_rng():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    model.train()  # BatchNorm in train mode would update its running statistics at every evaluation
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    F.cross_entropy(model(x), y).backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())

    def ce(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    loss_landscape_1d(model, ce, [(x, y)], steps=4)
    loss_landscape_2d(model, ce, [(x, y)], steps=3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(rng[0], torch.get_rng_state())
    assert rng[1] == random.getstate()
    assert np.array_equal(rng[2], np.random.get_state()[1])


def test_pictures_are_rgb_uint8_with_content_and_leave_pyplot_backend_alone():
    import matplotlib

    backend = matplotlib.get_backend()
    model, x, y = _linear_problem()
    img1 = plot_landscape_1d(loss_landscape_1d(model, _mse, (x, y), steps=5))
    img2 = plot_landscape_2d(loss_landscape_2d(model, _mse, (x, y), steps=4))
    nodes = np.array([0.0, 0.1, 2.0, 5.0])
    img3 = plot_density(nodes, np.array([0.4, 0.3, 0.2, 0.1]))
    for img in (img1, img2, img3):
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert img.shape[0] >= 200 and img.shape[1] >= 300
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 10  # more than a blank canvas
    assert matplotlib.get_backend() == backend


def test_density_histogram_keeps_mass_and_moments():
    nodes = np.array([-1.0, 0.0, 0.5, 3.0, 3.0])
    weights = np.array([0.1, 0.4, 0.2, 0.2, 0.1])
    hist = density_histogram(nodes, weights, bins=8, count=1000.0)
    assert sum(hist["bucket_counts"]) == pytest.approx(1000.0)
    assert len(hist["bucket_counts"]) == len(hist["bucket_limits"]) == 8
    assert hist["min"] == -1.0 and hist["max"] == 3.0 and hist["bucket_limits"][-1] == 3.0
    assert hist["sum"] / hist["num"] == pytest.approx((nodes * weights).sum())
    assert hist["sum_squares"] / hist["num"] == pytest.approx((nodes**2 * weights).sum())
    # Mass 0.4 at node 0.0 sits in bin 2 of [-1, 3] cut into 8 bins of 0.5.
    assert hist["bucket_counts"][2] == pytest.approx(400.0)

    class Density:
        nodes = torch.tensor([[1.0, 2.0]])
        weights = torch.tensor([[0.25, 0.75]])

    n, w = density_nodes_weights(Density())
    np.testing.assert_array_equal(n, [1.0, 2.0])
    np.testing.assert_array_equal(w, [0.25, 0.75])
    with pytest.raises(TypeError, match="nodes and weights"):
        density_nodes_weights(3.0)


@pytest.mark.parametrize("kwargs, match", [({"steps": 1}, "steps"), ({"span": 0.0}, "span")])
def test_bad_grid_arguments_fail_with_a_message(kwargs, match):
    model, x, y = _linear_problem()
    with pytest.raises(ValueError, match=match):
        loss_landscape_1d(model, _mse, (x, y), **kwargs)
