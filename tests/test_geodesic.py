"""Geodesic (symmetry-aware) geometry for attention: invariance under GL(h), metric, projection, geodesic."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sharpness import measures as M
from lightning_sharpness.geometry import AdaptiveGeometry, GeodesicGeometry, resolve_geometry


class Attn(nn.Module):
    def __init__(self, e: int = 6, heads: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(e, heads, batch_first=True)
        self.head = nn.Linear(e, 1)

    def forward(self, x):
        return self.head(self.mha(x, x, x, need_weights=False)[0].mean(1))


def mse(model, batch):
    return F.mse_loss(model(batch[0]).squeeze(-1), batch[1])


def reparametrize_head(model: Attn, head: int, A: torch.Tensor, B: torch.Tensor) -> Attn:
    """(W_q, W_k) -> (A^T W_q, A^-1 W_k) and (W_v, W_o) -> (B^T W_v, W_o B^-T) for one head: same function."""
    out = copy.deepcopy(model)
    m = out.mha
    e, h = m.embed_dim, m.head_dim
    rows = [slice(k * e + head * h, k * e + (head + 1) * h) for k in range(3)]
    with torch.no_grad():
        W, b = m.in_proj_weight, m.in_proj_bias
        W[rows[0]] = A.T @ W[rows[0]]
        b[rows[0]] = A.T @ b[rows[0]]
        W[rows[1]] = torch.linalg.solve(A, W[rows[1]])
        b[rows[1]] = torch.linalg.solve(A, b[rows[1]])
        W[rows[2]] = B.T @ W[rows[2]]
        b[rows[2]] = B.T @ b[rows[2]]
        cols = slice(head * h, (head + 1) * h)
        m.out_proj.weight[:, cols] = m.out_proj.weight[:, cols] @ torch.linalg.inv(B).T
    return out


def setup():
    model = Attn().double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, 6, generator=g).double(), torch.randn(8, generator=g).double()
    A = torch.tensor([[2.0, 0.7, 0.1], [0.0, 0.5, 0.3], [0.4, 0.0, 1.5]], dtype=torch.float64)
    B = torch.tensor([[0.3, 0.0, 0.0], [1.0, 2.0, 0.0], [0.2, -0.5, 1.2]], dtype=torch.float64)
    other = reparametrize_head(model, 1, A, B)
    return model, other, (x, y)


def test_reparametrization_keeps_the_function():
    model, other, (x, y) = setup()
    assert torch.allclose(model(x), other(x), atol=1e-12)
    assert not torch.allclose(model.mha.in_proj_weight, other.mha.in_proj_weight)


def test_geodesic_sharpness_invariant_where_adaptive_is_not():
    model, other, batch = setup()
    kw = dict(rho=0.1, steps=8)
    geo_a = M.worst_case_sharpness(model, mse, batch, geometry="geodesic", **kw)
    geo_b = M.worst_case_sharpness(other, mse, batch, geometry="geodesic", **kw)
    assert float(geo_a) > 0 and float(geo_a) == pytest.approx(float(geo_b), rel=1e-7)
    ada_a = M.worst_case_sharpness(model, mse, batch, geometry="adaptive", **kw)
    ada_b = M.worst_case_sharpness(other, mse, batch, geometry="adaptive", **kw)
    assert abs(float(ada_a) - float(ada_b)) > 0.02 * float(ada_a)
    avg_a = M.average_case_sharpness(model, mse, batch, rho=0.1, geometry="geodesic", samples=10)
    avg_b = M.average_case_sharpness(other, mse, batch, rho=0.1, geometry="geodesic", samples=10)
    assert float(avg_a) == pytest.approx(float(avg_b), rel=1e-7)


def bound(model) -> tuple[GeodesicGeometry, list[torch.Tensor]]:
    geo = GeodesicGeometry()
    named = [(n, p) for n, p in model.named_parameters()]
    geo = geo.bind(model, named)
    return geo, [p for _, p in named]


def test_blocks_found_in_mha_and_transformer_layer():
    model, _, _ = setup()
    geo, _ = bound(model)
    assert len(geo.blocks) == 4  # (qk, vo) per head, 2 heads
    layer = nn.TransformerEncoderLayer(8, 4, dim_feedforward=16, batch_first=True)
    geo = GeodesicGeometry()
    geo = geo.bind(layer, list(layer.named_parameters()))
    assert len(geo.blocks) == 8
    assert resolve_geometry("geodesic").name == "geodesic"


def test_horizontal_projection_and_metric():
    model, _, _ = setup()
    geo, params = bound(model)
    gen = torch.Generator().manual_seed(0)
    xi = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    once = [t.clone() for t in xi]
    geo.horizontal_(params, once)
    twice = [t.clone() for t in once]
    geo.horizontal_(params, twice)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(once, twice))  # idempotent
    index, blocks = geo._active(params)
    pd = [p.detach() for p in params]
    for b in blocks:
        G, H = geo._factors(b, index, pd)
        xg, xh = geo._factors(b, index, once)
        # metric-orthogonal to every vertical (G L, -H L^T): G^T xg P^-1 == Q^-1 xh^T H
        lhs = G.T @ xg @ torch.linalg.inv(G.T @ G)
        rhs = torch.linalg.inv(H.T @ H) @ xh.T @ H
        assert torch.allclose(lhs, rhs, atol=1e-10)
    # SAM's contract: the step ascent_(g, 1) has metric norm^2 equal to the dual norm^2 of g
    grads = [t.clone() for t in once]
    dual = geo.dual_sq_norm(params, grads)
    geo.ascent_(params, grads, 1.0)
    assert geo.sq_norm(params, grads).item() == pytest.approx(dual.item(), rel=1e-5)


def test_retraction_is_second_order_geodesic_and_retract_inplace_reports_displacement():
    # 1x1 factor: metric dx^2 / x^2, geodesic x exp(t v / x)
    geo = GeodesicGeometry()
    G = torch.tensor([[2.0]], dtype=torch.float64)
    for t in (1e-1, 5e-2):
        xi = torch.tensor([[0.3 * t]], dtype=torch.float64)
        exact = 2.0 * torch.exp(xi / 2.0)
        err = (geo._geodesic(G, xi) - exact).abs().item()
        assert err < 1e-3 * t**3 * 10 and err > 0
    model, _, _ = setup()
    geo, params = bound(model)
    before = [p.detach().clone() for p in params]
    steps = geo.sample(params, torch.Generator().manual_seed(1))
    steps = [s * 0.05 for s in steps]
    expected = geo.retract(params, steps)
    geo.retract_(params, steps)
    for p, w, d, e in zip(params, before, steps, expected):
        assert torch.allclose(p, e) and torch.allclose(w + d, p)


def test_user_named_pairs_on_custom_attention():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.q, self.k, self.v, self.o = (nn.Linear(4, 4) for _ in range(4))

        def forward(self, x):
            b, n, _ = x.shape
            split = lambda t: t.view(b, n, 2, 2).transpose(1, 2)  # noqa: E731
            att = torch.softmax(split(self.q(x)) @ split(self.k(x)).transpose(-1, -2), -1)
            return self.o((att @ split(self.v(x))).transpose(1, 2).reshape(b, n, 4)).mean((1, 2))

    model = Custom().double()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 3, 4, generator=g).double(), torch.randn(6, generator=g).double()
    geo = GeodesicGeometry(qk_pairs=[("q", "k", 2)], vo_pairs=[("v", "o", 2)])
    other = copy.deepcopy(model)
    A = torch.tensor([[1.5, 0.2], [-0.3, 0.7]], dtype=torch.float64)
    with torch.no_grad():  # head 0 of q/k: (A^T W_q, A^-1 W_k)
        other.q.weight[:2] = A.T @ other.q.weight[:2]
        other.q.bias[:2] = A.T @ other.q.bias[:2]
        other.k.weight[:2] = torch.linalg.solve(A, other.k.weight[:2])
        other.k.bias[:2] = torch.linalg.solve(A, other.k.bias[:2])
    assert torch.allclose(model(x), other(x))
    a = M.worst_case_sharpness(model, mse, (x, y), rho=0.1, geometry=geo, steps=6)
    b = M.worst_case_sharpness(other, mse, (x, y), rho=0.1, geometry=geo, steps=6)
    assert float(a) == pytest.approx(float(b), rel=1e-7)
    assert len(geo.bind(model, list(model.named_parameters())).blocks) == 4
    assert geo.blocks == []  # binding returns a bound copy: the geometry the measures were given is untouched
    with pytest.raises(ValueError, match="qk_pairs"):
        GeodesicGeometry(qk_pairs=[("q", "k")])
    with pytest.raises(ValueError, match="qk_pairs"):
        GeodesicGeometry(qk_pairs=[("q", "nope", 2)]).bind(model, list(model.named_parameters()))


def test_sam_step_with_geodesic_geometry_moves_by_rho():
    model, _, (x, y) = setup()
    geo, params = bound(model)
    mse(model, (x, y)).backward()
    grads = [p.grad.clone() for p in params]
    norm = geo.dual_sq_norm(params, grads).sqrt()
    geo.ascent_(params, grads, 0.05 / norm)
    assert geo.sq_norm(params, grads).sqrt().item() == pytest.approx(0.05, rel=1e-4)
    assert isinstance(geo, AdaptiveGeometry)
