"""XTrace against its definition (the leave-one-out projectors built one by one in the full space), exactness on
low-rank matrices and on multiples of the identity, unbiasedness over seeds, and a network's Hessian."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sharpness.curvature import DenseOperator, HessianOperator, hutchinson, xtrace


def spectrum_matrix(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``U diag(eigenvalues) U^T`` with a random orthogonal ``U`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    n = eigenvalues.numel()
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    return U @ torch.diag(eigenvalues.double()) @ U.T


def by_definition(A: torch.Tensor, s: int, seed: int) -> torch.Tensor:
    """The ``s`` leave-one-out estimates straight from the paper's definition: for each probe, an orthonormal basis
    of the other probes' products by its own QR, the trace on it, and the normalized quadratic form off it. The
    probes are the same Gaussian rows ``xtrace`` draws from the same seed."""
    n = A.shape[0]
    probes = torch.randn(s, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).double()
    Y = A @ probes.T
    out = []
    for i in range(s):
        Qi = torch.linalg.qr(torch.cat([Y[:, :i], Y[:, i + 1 :]], dim=1)).Q
        P = Qi @ Qi.T
        u = probes[i] - P @ probes[i]
        out.append(torch.trace(P @ A @ P) + (n - (s - 1)) * (u @ A @ u) / (u @ u))
    return torch.stack(out)


@pytest.mark.parametrize("matvecs", [8, 21, 40])
def test_matches_the_definition(matvecs):
    """The downdated formulas (no product beyond ``A W`` and ``A Q``) give each leave-one-out estimate exactly."""
    A = spectrum_matrix(torch.linspace(-1.0, 3.0, 70) ** 3)  # indefinite, full rank
    op = DenseOperator(A)
    est = xtrace(op, matvecs, torch.Generator().manual_seed(4))
    s = matvecs // 2
    expected = by_definition(A, s, 4)
    assert torch.allclose(est.samples, expected, rtol=0, atol=1e-10 * float(A.abs().sum()))
    assert est.value == pytest.approx(float(expected.mean()), abs=1e-10)
    assert est.matvecs == op.matvecs == 2 * s
    assert est.stderr == pytest.approx(float(expected.std() / s**0.5), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_on_low_rank_with_enough_products(dtype):
    """Rank 6 and 7 probes: every leave-one-out subspace is the whole range, so the estimate is the trace; with 6
    probes (5 in each subspace) it is not."""
    eigenvalues = torch.zeros(90, dtype=torch.float64)
    eigenvalues[:6] = torch.tensor([5.0, -3.0, 2.0, 1.5, 1.0, 0.5])
    A = spectrum_matrix(eigenvalues, seed=1)
    truth = float(torch.trace(A))
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for seed in range(3):
        exact = xtrace(DenseOperator(A.to(dtype)), 14, torch.Generator().manual_seed(seed))
        assert exact.value == pytest.approx(truth, abs=tol * float(eigenvalues.abs().sum()))
        short = xtrace(DenseOperator(A.to(dtype)), 12, torch.Generator().manual_seed(seed))
        assert abs(short.value - truth) > 1e-3


def test_exact_on_a_multiple_of_the_identity():
    """The normalization of the residual probe (``n - rank`` over its squared norm) makes ``c I`` exact; the plain
    quadratic form would not be."""
    op = DenseOperator(2.5 * torch.eye(50, dtype=torch.float64))
    est = xtrace(op, 10, torch.Generator().manual_seed(0))
    assert est.value == pytest.approx(125.0, rel=1e-12)
    assert float(est.samples.std()) < 1e-9


def test_unbiased_and_more_accurate_than_hutchinson_on_a_decaying_spectrum():
    """Over 200 seeds the mean error is within four standard errors of 0 on a flat spectrum (where the Hutchinson
    part carries most of the trace), and on a decaying one the RMS error is several times Hutchinson's."""
    flat = spectrum_matrix(torch.linspace(0.5, 1.5, 60), seed=2)
    errors = [
        xtrace(DenseOperator(flat), 10, torch.Generator().manual_seed(s)).value - float(flat.trace())
        for s in range(200)
    ]
    assert abs(statistics.mean(errors)) < 4 * statistics.stdev(errors) / 200**0.5
    assert statistics.stdev(errors) > 0  # a random estimate: the check above is not vacuous

    decaying = spectrum_matrix(1.0 / torch.arange(1, 81, dtype=torch.float64) ** 2, seed=3)
    truth = float(decaying.trace())

    def rms(estimator):
        errs = [
            estimator(DenseOperator(decaying), 20, torch.Generator().manual_seed(s)).value - truth for s in range(40)
        ]
        return (sum(e * e for e in errs) / len(errs)) ** 0.5

    assert rms(xtrace) < rms(hutchinson) / 5


def test_on_a_network_hessian_equals_the_dense_operator():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g)
    op = HessianOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y), chunk_size=4)
    dense = op.dense()
    op.matvecs = 0
    ours = xtrace(op, 30, torch.Generator().manual_seed(7))
    reference_op = DenseOperator(dense)
    reference_op.chunk_size = op.chunk_size  # probes are drawn a block at a time: the same blocks, the same probes
    reference = xtrace(reference_op, 30, torch.Generator().manual_seed(7))
    assert op.matvecs == 30
    assert torch.allclose(ours.samples, reference.samples, rtol=0, atol=1e-9)
    assert ours.value == pytest.approx(float(torch.trace(dense)), rel=0.5)  # 15 probes on 75 dimensions


def test_small_operator_and_budget():
    A = spectrum_matrix(torch.arange(1.0, 7.0))
    est = xtrace(DenseOperator(A), 6, torch.Generator().manual_seed(0))
    assert est.value == pytest.approx(21.0, rel=1e-12) and est.matvecs == 6 and est.stderr == 0.0
    for bad in (3, 10.0, None):
        with pytest.raises(ValueError, match="`matvecs`"):
            xtrace(DenseOperator(A), bad)
