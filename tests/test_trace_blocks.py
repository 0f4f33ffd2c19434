"""Hutchinson and Hutch++ a block of probes at a time: the probes, the row products, and the exact per-probe values
against a dense Hessian."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sharpness.curvature import DenseOperator, HessianOperator, hutchinson, hutchpp
from lightning_sharpness.curvature.probes import rademacher, rademacher_rows


def mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]  # unequal batches: weights 5/12 and 7/12
    return model, batches


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rademacher_rows(dtype):
    g = torch.Generator().manual_seed(0)
    V = rademacher_rows(7, 1001, g, dtype, torch.device("cpu"))
    assert V.shape == (7, 1001) and V.dtype == dtype and V.is_contiguous()
    assert set(V.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(V.double().mean())) < 4 / (7 * 1001) ** 0.5
    # blocks of rows drawn one after another are the rows of one draw (when each block is a whole number of bytes)
    whole = rademacher_rows(16, 100, torch.Generator().manual_seed(3), dtype, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    parts = [rademacher_rows(8, 100, g, dtype, torch.device("cpu")) for _ in range(2)]
    assert torch.equal(torch.cat(parts), whole)


def test_rademacher_keeps_its_stream():
    """``rademacher`` draws straight into the dtype now (no int64 buffer): the same signs as before."""
    g = torch.Generator().manual_seed(5)
    old = torch.randint(0, 2, (50, 9), generator=torch.Generator().manual_seed(5)).to(torch.float32) * 2 - 1
    assert torch.equal(rademacher(50, 9, g, torch.float32, torch.device("cpu")), old)


@pytest.mark.parametrize("backend", ["autograd", "vmap"])
def test_matmat_rows_matches_matmat(backend):
    model, batches = mlp_problem()
    op = HessianOperator(model, ce, batches, backend=backend, chunk_size=3)
    V = torch.randn(7, op.dim, dtype=torch.float64)
    expected = (op @ V.T).T
    assert torch.allclose(op.matmat_rows(V), expected, atol=1e-12, rtol=0)
    parts = op.matmat_rows(V, flat=False)
    assert [p.shape for p in parts] == [(7, *p.shape) for p in op.params]
    assert torch.allclose(torch.cat([p.reshape(7, -1) for p in parts], 1), expected, atol=1e-12, rtol=0)
    assert op.matvecs == 21
    with pytest.raises(ValueError, match="`V`"):
        op.matmat_rows(V.T)


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_hutchinson_samples_are_exact_quadratic_forms(chunk_size):
    model, batches = mlp_problem()
    op = HessianOperator(model, ce, batches, chunk_size=chunk_size)
    H = op.dense()
    est = hutchinson(op, 37, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    V = torch.cat(
        [rademacher_rows(min(chunk_size, 37 - s), op.dim, g, op.dtype, op.device) for s in range(0, 37, chunk_size)]
    )
    assert torch.allclose(est.samples, ((V @ H) * V).sum(1), rtol=1e-12, atol=1e-12)
    assert est.matvecs == 37 and op.matvecs == op.dim + 37
    if chunk_size == 16:  # the generic operator path draws blocks of 16 too: the same probes
        dense = hutchinson(DenseOperator(H), 37, torch.Generator().manual_seed(2))
        assert torch.allclose(dense.samples, est.samples, rtol=1e-12, atol=1e-12)


def test_hutchpp_on_operator_matches_dense_operator():
    model, batches = mlp_problem()
    op = HessianOperator(model, ce, batches, chunk_size=16)
    H = op.dense()
    a = hutchpp(op, 30, torch.Generator().manual_seed(4))
    b = hutchpp(DenseOperator(H), 30, torch.Generator().manual_seed(4))
    assert a.value == pytest.approx(b.value, rel=1e-10) and a.stderr == pytest.approx(b.stderr, rel=1e-8)


def test_hutchinson_float32_against_float64():
    """Float32 products, the sums in float64: the estimate is that of the float64 Hessian within float32 rounding
    of the products themselves."""
    model, batches = mlp_problem()
    a = hutchinson(HessianOperator(model, ce, batches), 50, torch.Generator().manual_seed(0))
    op32 = HessianOperator(model.float(), ce, [(x.float(), y) for x, y in batches])
    b = hutchinson(op32, 50, torch.Generator().manual_seed(0))
    assert abs(a.value - b.value) < 1e-5 * a.samples.abs().max()


def _slq_preallocated(A: torch.Tensor, probes: int, steps: int, seed: int):
    """The former ``slq``: a ``(steps, dim, probes)`` basis allocated up front, two Gram-Schmidt passes every step
    (a plain reference for the streamed one)."""
    n = A.shape[0]
    q = rademacher(n, probes, torch.Generator().manual_seed(seed), A.dtype, A.device) / n**0.5
    Q = torch.zeros(steps, n, probes, dtype=A.dtype)
    alpha = torch.zeros(steps, probes, dtype=torch.float64)
    beta = torch.zeros(steps, probes, dtype=torch.float64)
    for j in range(steps):
        Q[j] = q
        w = A @ q
        a = (q * w).sum(0)
        w = w - a * q
        if j > 0:
            w = w - beta[j - 1] * Q[j - 1]
        for _ in range(2):
            w = w - torch.einsum("jnp,jp->np", Q[: j + 1], torch.einsum("jnp,np->jp", Q[: j + 1], w))
        alpha[j], beta[j] = a, w.norm(dim=0)
        q = w / w.norm(dim=0)
    T = torch.diag_embed(alpha.T) + torch.diag_embed(beta[:-1].T, 1) + torch.diag_embed(beta[:-1].T, -1)
    theta, S = torch.linalg.eigh(T)
    return theta, S[:, 0, :].pow(2) / probes


def test_slq_streamed_basis_equals_the_preallocated_one():
    """The basis grows in chunks of 8 steps (19 steps: three chunks, the last partly filled); the quadrature is the
    former one's, from the same probes."""
    from lightning_sharpness.curvature import slq

    g = torch.Generator().manual_seed(2)
    U = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64)).Q
    A = U @ torch.diag(torch.linspace(-1.0, 4.0, 60, dtype=torch.float64) ** 3) @ U.T
    dens = slq(DenseOperator(A), probes=3, steps=19, generator=torch.Generator().manual_seed(5))
    theta, weights = _slq_preallocated(A, 3, 19, 5)
    assert torch.allclose(dens.nodes, theta, atol=1e-9, rtol=0)
    assert torch.allclose(dens.weights, weights, atol=1e-9, rtol=0)
    # 12 steps on a matrix with 12 distinct eigenvalues: each probe's quadrature is exact, q^T A^2 q for its probe q
    B = U @ torch.diag(torch.arange(12, dtype=torch.float64).repeat_interleave(5)) @ U.T
    full = slq(DenseOperator(B), probes=2, steps=12, generator=torch.Generator().manual_seed(0))
    q = rademacher(60, 2, torch.Generator().manual_seed(0), torch.float64, torch.device("cpu")) / 60**0.5
    assert torch.allclose(full.per_probe(lambda x: x**2), ((B @ q) * (B @ q)).sum(0), atol=1e-9, rtol=0)
    assert float(full.weights.sum()) == pytest.approx(1.0, abs=1e-12)
