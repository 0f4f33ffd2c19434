"""Curvature engine and spectral measures against ground truth: known quadratics and dense Hessians."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sharpness import measures as M
from lightning_sharpness.curvature import DenseOperator, HessianOperator, hutchinson, hutchpp, lanczos_eigs
from tests.helpers import QBATCH, Quadratic, quad_loss, rotated


# ---------------------------------------------------------------------------------------------- fixtures
def ce(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3)
    ).double()
    with torch.no_grad():  # non-trivial running statistics, so that eval mode matters
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def data(n: int = 12, image: bool = False, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g) if image else torch.randn(n, 4, generator=g)
    return x.double(), torch.randint(0, 3, (n,), generator=g)


def dense_hessian(model: nn.Module, x, y) -> torch.Tensor:
    """Reference: ``torch.autograd.functional.hessian`` of the eval-mode mean loss, flattened."""
    model.eval()
    names = [n for n, _ in model.named_parameters()]
    ps = tuple(p.detach() for _, p in model.named_parameters())

    def f(*flat):
        out = torch.func.functional_call(model, dict(zip(names, flat)), (x,))
        return F.cross_entropy(out, y)

    blocks = torch.autograd.functional.hessian(f, ps)
    sizes = [p.numel() for p in ps]
    return torch.cat(
        [torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(ps))], 1) for i in range(len(ps))]
    )


# ---------------------------------------------------------------------------------------------- operator
@pytest.mark.parametrize("backend", ["vmap", "jvp", "autograd", "auto"])
@pytest.mark.parametrize("make", [tiny_mlp, tiny_cnn])
def test_operator_matches_dense_hessian(backend, make):
    model = make()
    x, y = data(image=make is tiny_cnn)
    H = dense_hessian(model, x, y)
    # two unequal batches: the operator is of the size-weighted mean loss
    op = HessianOperator(model, ce, [(x[:4], y[:4]), (x[4:], y[4:])], backend=backend, chunk_size=7)
    assert torch.allclose(op.dense(), H, atol=1e-10, rtol=0)
    v = torch.randn(op.dim, dtype=torch.float64)
    assert torch.allclose(op @ v, H @ v, atol=1e-10, rtol=0)


@pytest.mark.parametrize("graph_memory", [0, "one", math.inf])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("affine_batchnorm", [True, False])
def test_double_backward_through_held_graphs_matches_dense_hessian(graph_memory, batched, affine_batchnorm):
    """The gradient graph of each batch is built once and reused for every product (or rebuilt per block when it
    does not fit in ``graph_memory``; "one": only the first of the two batches fits)."""
    model = tiny_cnn()
    x, y = data(image=True)
    H = dense_hessian(model, x, y)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    if graph_memory == "one":
        probe = HessianOperator(model, ce, batches, backend="autograd")
        probe @ torch.zeros(probe.dim, dtype=torch.float64)
        assert probe._graphs[0] and probe._graphs[1] and probe.graph_bytes > 0
        graph_memory = probe._build_graph(batches[0], measure=True)[2]  # fits the first graph only
    op = HessianOperator(
        model,
        ce,
        batches,
        backend="autograd",
        chunk_size=5,
        graph_memory=graph_memory,
        batched=batched,
        affine_batchnorm=affine_batchnorm,
    )
    assert torch.allclose(op.dense(), H, atol=1e-10, rtol=0)
    held = [bool(g) for g in op._graphs]
    expected = {0: [False, False], math.inf: [True, True]}.get(graph_memory, [True, False])
    assert held == expected
    for _ in range(2):  # repeated single products through the same graphs
        v = torch.randn(op.dim, dtype=torch.float64)
        assert torch.allclose(op @ v, H @ v, atol=1e-10, rtol=0)
    V = torch.randn(op.dim, 3, dtype=torch.float64)
    assert torch.allclose(op @ V, H @ V, atol=1e-10, rtol=0)
    assert op.matvecs == op.dim + 5


def test_gradient_from_held_graph_and_release():
    model = tiny_cnn()
    x, y = data(image=True)
    model.eval()
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(ce(model, (x, y)), list(model.parameters()))])
    op = HessianOperator(model, ce, [(x[:5], y[:5]), (x[5:], y[5:])], backend="autograd")
    assert torch.allclose(op.gradient(), expected, atol=1e-12, rtol=0)
    assert all(op._graphs) and op.graph_bytes > 0
    v = torch.randn(op.dim, dtype=torch.float64)
    hv = op @ v
    op.release()
    assert op.graph_bytes == 0 and op._graphs == [None, None]
    assert torch.allclose(op @ v, hv, atol=1e-12, rtol=0)
    vm = HessianOperator(model, ce, [(x[:5], y[:5]), (x[5:], y[5:])], backend="vmap")
    assert torch.allclose(vm.gradient(), expected, atol=1e-12, rtol=0)
    assert all(p.grad is None for p in model.parameters())


def test_eval_batchnorm_as_affine_map_is_the_same_function():
    model = tiny_cnn().eval()
    x, _ = data(image=True)
    op = HessianOperator(model, ce, (x, torch.zeros(len(x), dtype=torch.long)))
    names = [n for n, _ in model.named_parameters()]
    assert op.affine_batchnorm
    with torch.no_grad():
        native = op._module.model(x)
        out = torch.func.functional_call(
            op._module,
            {f"model.{n}": p for n, p in zip(names, op.params)},
            ((x, torch.zeros(len(x), dtype=torch.long)),),
        )
        assert torch.allclose(op.loss_at(op.params, (x, torch.zeros(len(x), dtype=torch.long))), out, atol=1e-14)
    assert native.shape == (len(x), 3)


def test_operator_on_parameter_subset_is_the_diagonal_block():
    model = tiny_mlp()
    x, y = data()
    H = dense_hessian(model, x, y)
    op = HessianOperator(model, ce, (x, y), params=["2.weight", "2.bias"])
    start = 4 * 6 + 6
    assert torch.allclose(op.dense(), H[start:, start:], atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------- Lanczos
def test_lanczos_finds_extremes_with_multiplicity():
    eigs = torch.tensor([5.0, 5.0, 3.0, 2.0] + [1.0] * 40 + [-2.0, -4.0], dtype=torch.float64)
    A = rotated(eigs)
    top = lanczos_eigs(DenseOperator(A), k=3, return_vectors=True)
    assert torch.allclose(top.eigenvalues, torch.tensor([5.0, 5.0, 3.0], dtype=torch.float64), atol=1e-9)
    assert top.converged
    for lam, v in zip(top.eigenvalues, top.eigenvectors):
        assert torch.allclose(A @ v, lam * v, atol=1e-7)
    low = lanczos_eigs(DenseOperator(A), k=2, which="smallest")
    assert torch.allclose(low.eigenvalues, torch.tensor([-4.0, -2.0], dtype=torch.float64), atol=1e-9)


def test_hessian_eigenvalues_of_mlp_match_dense():
    model = tiny_mlp()
    x, y = data()
    exact = torch.linalg.eigvalsh(dense_hessian(model, x, y))
    top = M.hessian_eigenvalues(model, ce, (x, y), k=3, tol=1e-8, return_vectors=True)
    assert torch.allclose(top.eigenvalues, exact.flip(0)[:3], rtol=1e-6, atol=1e-9)
    assert float(top) == pytest.approx(float(exact[-1]), rel=1e-6)
    assert [v.shape for v in top.eigenvectors[0]] == [p.shape for p in model.parameters()]
    low = M.hessian_eigenvalues(model, ce, (x, y), k=2, which="smallest", tol=1e-8)
    assert torch.allclose(low.eigenvalues, exact[:2], rtol=1e-6, atol=1e-8)
    for start in ("gradient", "random"):
        for which, want in (("largest", exact.flip(0)[:3]), ("smallest", exact[:3])):
            res = M.hessian_eigenvalues(model, ce, (x, y), k=3, which=which, tol=1e-8, start=start)
            assert torch.allclose(res.eigenvalues, want, rtol=1e-6, atol=1e-8)


def test_lanczos_start_vector():
    A = rotated(torch.linspace(-1, 4, 20, dtype=torch.float64), seed=1)
    op = DenseOperator(A)
    top = torch.linalg.eigh(A).eigenvectors[:, -1]
    res = lanczos_eigs(op, k=1, v0=top + 1e-3 * torch.ones(20, dtype=torch.float64), tol=1e-6)
    cold = lanczos_eigs(op, k=1, tol=1e-6)
    assert float(res.eigenvalues[0]) == pytest.approx(4.0, abs=1e-9)
    assert float(cold.eigenvalues[0]) == pytest.approx(4.0, abs=1e-9)
    # ``v0`` is added to the random start; a warm start does not let ``converged`` skip the certificate that no
    # eigenvalue beyond was missed (tests/test_lanczos_honest.py), so it is no cheaper than a cold one.
    assert res.converged and cold.converged
    with pytest.raises(ValueError, match="`v0`"):
        lanczos_eigs(op, v0=torch.zeros(20, dtype=torch.float64))
    with pytest.raises(ValueError, match="`v0`"):
        lanczos_eigs(op, v0=torch.ones(3, dtype=torch.float64))


def test_quadratic_eigenvalues_exact():
    eigs = torch.linspace(-1, 4, 30, dtype=torch.float64)
    model = Quadratic(rotated(eigs, seed=3))
    res = M.hessian_eigenvalues(model, quad_loss, QBATCH, k=4, tol=1e-10)
    assert torch.allclose(res.eigenvalues, eigs.flip(0)[:4], atol=1e-8)


# ---------------------------------------------------------------------------------------------- trace
def hutchinson_sd(A: torch.Tensor) -> float:
    """Standard deviation of one Rademacher sample ``v^T A v``: ``sqrt(2 sum_{i != j} A_ij^2)``."""
    return math.sqrt(2 * (A.pow(2).sum() - A.diagonal().pow(2).sum()).item())


def test_hutchinson_is_within_statistical_bounds():
    A = rotated(torch.linspace(0, 3, 60, dtype=torch.float64), seed=1)
    sd = hutchinson_sd(A)
    for seed in range(3):
        est = hutchinson(DenseOperator(A), 300, torch.Generator().manual_seed(seed))
        assert abs(est.value - A.trace().item()) < 4 * sd / math.sqrt(300)
        assert 0.8 < est.stderr / (sd / math.sqrt(300)) < 1.2  # the reported error is the true one


def test_hutchpp_beats_hutchinson_on_decaying_spectrum():
    eigs = torch.cat([torch.tensor([50.0, 30.0, 20.0, 10.0]), torch.full((196,), 0.1)]).double()
    A = rotated(eigs, seed=2)
    truth = eigs.sum().item()
    errs_pp, errs_h = [], []
    for seed in range(5):
        pp = hutchpp(DenseOperator(A), 30, torch.Generator().manual_seed(seed))
        h = hutchinson(DenseOperator(A), 30, torch.Generator().manual_seed(seed))
        assert abs(pp.value - truth) < 4 * pp.stderr + 1e-9
        errs_pp.append(abs(pp.value - truth))
        errs_h.append(abs(h.value - truth))
    assert max(errs_pp) < 0.1 * np.mean(errs_h)
    model = Quadratic(A)
    t = M.hessian_trace(model, quad_loss, QBATCH, matvecs=30, method="hutch++")
    assert t.info["method"] == "hutch++" and abs(float(t) - truth) < 4 * t.stderr


def test_trace_of_mlp_against_dense():
    model = tiny_mlp()
    x, y = data()
    truth = dense_hessian(model, x, y).trace().item()
    # Hutch++ with a sketch as wide as the dimension (51) is exact
    exact = M.hessian_trace(model, ce, (x, y), matvecs=300, method="hutch++")
    assert float(exact) == pytest.approx(truth, rel=1e-9)
    h = M.hessian_trace(model, ce, (x, y), matvecs=200, method="hutchinson")
    assert abs(float(h) - truth) < 4 * h.stderr


# ---------------------------------------------------------------------------------------------- diagonal
def test_exact_diagonal_and_sqrt_trace_of_cnn():
    model = tiny_cnn()
    x, y = data(image=True)
    diag = dense_hessian(model, x, y).diagonal()
    d = M.hessian_diagonal(model, ce, (x, y), exact=True)
    flat = torch.cat([d.diagonal[n].reshape(-1) for n, _ in model.named_parameters()])
    assert torch.allclose(flat, diag, atol=1e-10)
    r = M.diag_sqrt_trace(model, ce, (x, y), exact=True)
    assert float(r) == pytest.approx(diag.clamp_min(0).sqrt().sum().item(), rel=1e-9)
    assert r.stderr is None and r.info["trace"] == pytest.approx(diag.sum().item(), rel=1e-9)


def test_hutchinson_diagonal_and_sqrt_trace_statistics():
    eigs = torch.linspace(0.5, 3, 40, dtype=torch.float64)
    A = rotated(eigs, seed=4)
    model = Quadratic(A)
    d = M.hessian_diagonal(model, quad_loss, QBATCH, matvecs=400)
    # per element, Var(v_i (Av)_i) = sum_{j != i} A_ij^2
    sd = ((A.pow(2).sum(1) - A.diagonal().pow(2)) / 400).sqrt()
    z = (d.diagonal["w"] - A.diagonal()) / sd
    assert z.abs().max() < 4.5
    # calibration: E z_i^2 = 1 (elements share probes, so average over a few seeds)
    z2 = [
        ((M.hessian_diagonal(model, quad_loss, QBATCH, matvecs=400, seed=s).diagonal["w"] - A.diagonal()) / sd)
        .pow(2)
        .mean()
        for s in range(1, 6)
    ]
    assert 0.6 < float(sum(z2)) / 5 < 1.6
    assert torch.allclose(d.diagonal_stderr["w"], sd, rtol=0.25)
    r = M.diag_sqrt_trace(model, quad_loss, QBATCH, matvecs=400)
    truth = A.diagonal().sqrt().sum().item()
    assert abs(float(r) - truth) < 4 * r.stderr
    exact = M.diag_sqrt_trace(model, quad_loss, QBATCH, exact=True)
    assert float(exact) == pytest.approx(truth, rel=1e-12)


# ---------------------------------------------------------------------------------------------- SLQ / Renyi
def test_slq_is_exact_for_diagonal_quadratic():
    # normalized Rademacher probes have v_i^2 = 1/n: on a diagonal matrix every probe gives the exact spectrum
    eigs = torch.tensor([4.0, 4.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    res = M.spectral_density(Quadratic(torch.diag(eigs)), quad_loss, QBATCH, probes=3, steps=8)
    dens = res.density
    assert dens.weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    for p in range(1, 6):
        assert dens.moment(p) * 8 == pytest.approx(eigs.pow(p).sum().item(), rel=1e-9)
    edges, mass = dens.histogram(bins=8, range=(-0.13, 4.27))
    expected = torch.histogram(eigs, bins=8, range=(-0.13, 4.27)).hist.double() / 8
    assert torch.allclose(mass, expected, atol=1e-9)
    assert float(res) == pytest.approx(eigs.sum().item(), rel=1e-9) and res.stderr == pytest.approx(0, abs=1e-9)


def test_slq_moments_statistical_on_rotated_quadratic():
    eigs = torch.linspace(0, 2, 80, dtype=torch.float64)
    res = M.spectral_density(Quadratic(rotated(eigs, seed=5)), quad_loss, QBATCH, probes=20, steps=30)
    assert abs(float(res) - eigs.sum().item()) < 4 * res.stderr
    grid = torch.linspace(-1, 3, 400, dtype=torch.float64)
    smooth = res.density.smooth(grid, 0.1)
    assert torch.trapezoid(smooth, grid).item() == pytest.approx(1.0, abs=1e-3)


def renyi_exact(eigs: torch.Tensor, alpha: float) -> float:
    p = eigs / eigs.sum()
    p = p[p > 0]
    if alpha == 1:
        return (p * p.log()).sum().item()
    return (p.pow(alpha).sum().log() / (alpha - 1)).item()


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 3.0])
def test_renyi_exact_for_diagonal_quadratic(alpha):
    eigs = torch.tensor([5.0, 3.0, 1.0, 1.0, 0.5, 0.25, 0.0, 0.0], dtype=torch.float64)
    model = Quadratic(torch.diag(eigs))
    r = M.renyi_sharpness(model, quad_loss, QBATCH, alpha=alpha, probes=2, steps=8, matvecs=4)
    assert float(r) == pytest.approx(renyi_exact(eigs, alpha), rel=1e-9, abs=1e-12)
    if alpha == 2:
        assert r.info["method"] == "frobenius"
        slq_r = M.renyi_sharpness(model, quad_loss, QBATCH, alpha=2, method="slq", probes=2, steps=8)
        assert float(slq_r) == pytest.approx(renyi_exact(eigs, 2), rel=1e-9)
    # uniform spectra have the lowest sharpness: -log(n)
    flat = M.renyi_sharpness(Quadratic(torch.eye(8, dtype=torch.float64)), quad_loss, QBATCH, alpha=alpha, steps=8)
    assert float(flat) == pytest.approx(-math.log(8), rel=1e-9)


@pytest.mark.parametrize("alpha,method", [(2.0, "frobenius"), (3.0, "slq")])
def test_renyi_statistical_on_rotated_quadratic(alpha, method):
    eigs = torch.cat([torch.tensor([10.0, 6.0, 3.0]), torch.linspace(0.05, 1, 57)]).double()
    r = M.renyi_sharpness(
        Quadratic(rotated(eigs, seed=6)),
        quad_loss,
        QBATCH,
        alpha=alpha,
        method=method,
        probes=16,
        steps=30,
        matvecs=200,
    )
    assert abs(float(r) - renyi_exact(eigs, alpha)) < 4 * r.stderr


# ---------------------------------------------------------------------------------------------- per layer
def test_layerwise_trace_and_eigenvalue_match_dense_blocks():
    model = tiny_mlp()
    x, y = data()
    H = dense_hessian(model, x, y)
    blocks = {"0": slice(0, 30), "2": slice(30, 51)}
    traces = M.layerwise(model, ce, (x, y), measure="trace", matvecs=400)
    assert set(traces) == set(blocks)
    for name, sl in blocks.items():
        Hb = H[sl, sl]
        # shared probes: v_b^T (H v)_b adds the coupling v_b^T H_{b,rest} v_rest, of variance sum H_{b,rest}^2
        cross = H[sl].pow(2).sum() - Hb.pow(2).sum()
        sd = math.sqrt(hutchinson_sd(Hb) ** 2 + cross.item()) / math.sqrt(400)
        assert abs(float(traces[name]) - Hb.trace().item()) < 4 * sd
        assert 0.7 < traces[name].stderr / sd < 1.3
    tops = M.layerwise(model, ce, (x, y), measure="eigenvalue", tol=1e-9)
    for name, sl in blocks.items():
        assert float(tops[name]) == pytest.approx(torch.linalg.eigvalsh(H[sl, sl])[-1].item(), rel=1e-6)
    per_param = M.layerwise(model, ce, (x, y), by="parameter", matvecs=10)
    assert set(per_param) == {"0.weight", "0.bias", "2.weight", "2.bias"}


# ---------------------------------------------------------------------------------------------- no side effects
class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
        self.frozen = nn.Linear(3, 3)
        self.frozen.weight.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.body(x))


def snapshot(model: nn.Module):
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: b.clone() for n, b in model.named_buffers()},
        {n: m.training for n, m in model.named_modules()},
        torch.get_rng_state(),
        random.getstate(),
        np.random.get_state()[1].copy(),
    )


def assert_same(a, b):
    for da, db in zip(a[:5], b[:5]):
        assert da.keys() == db.keys()
        for k in da:
            if isinstance(da[k], torch.Tensor):
                assert torch.equal(da[k], db[k]), k
            else:
                assert da[k] == db[k], k
    assert torch.equal(a[5], b[5]) and a[6] == b[6] and np.array_equal(a[7], b[7])


ALL_MEASURES = [
    (M.hessian_eigenvalues, {"k": 2}),
    (M.hessian_trace, {"matvecs": 12}),
    (M.hessian_diagonal, {"matvecs": 4}),
    (M.diag_sqrt_trace, {"matvecs": 4}),
    (M.spectral_density, {"probes": 2, "steps": 5}),
    (M.renyi_sharpness, {"alpha": 2, "matvecs": 30}),
    (M.renyi_sharpness, {"alpha": 3, "probes": 2, "steps": 5}),
    (M.worst_case_sharpness, {"rho": 0.05, "steps": 3, "m": 4}),
    (M.worst_case_sharpness, {"rho": 0.05, "steps": 3, "geometry": "adaptive", "norm": "linf"}),
    (M.average_case_sharpness, {"rho": 0.05, "samples": 3}),
    (M.layerwise, {"matvecs": 4}),
    (M.layerwise, {"measure": "eigenvalue"}),
]


@pytest.mark.parametrize("fn,kwargs", ALL_MEASURES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_measures_have_no_side_effects(fn, kwargs):
    model = Noisy().train()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()  # grads present, BN stats moved, RNG advanced by dropout
    model.body[4].bias.grad = None  # and one missing grad
    random.seed(3)
    np.random.seed(3)
    before = snapshot(model)
    params = {n: p for n, p in model.named_parameters()}
    result = fn(model, ce, (x, y), **kwargs)
    assert_same(before, snapshot(model))
    assert all(p is params[n] for n, p in model.named_parameters())  # same objects
    values = result.values() if isinstance(result, dict) else [result]
    assert all(math.isfinite(float(v)) for v in values)


def test_training_with_interleaved_measurements_is_bitwise_unchanged():
    def run(measure: bool):
        model = Noisy().train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(123)
        for step in range(6):
            x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if measure and step % 2 == 0:  # between backward and step: grads must survive
                M.hessian_trace(model, ce, (x, y), matvecs=6)
                M.worst_case_sharpness(model, ce, (x, y), rho=0.1, steps=2)
                M.average_case_sharpness(model, ce, (x, y), rho=0.1, samples=2)
            opt.step()
        return [p.detach().clone() for p in model.parameters()] + [b.clone() for b in model.buffers()]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_fail_clearly():
    model = tiny_mlp()
    x, y = data()
    with pytest.raises(ValueError, match="`k`"):
        M.hessian_eigenvalues(model, ce, (x, y), k=52)
    with pytest.raises(ValueError, match="`which`"):
        M.hessian_eigenvalues(model, ce, (x, y), which="biggest")
    with pytest.raises(ValueError, match="`batches` is empty"):
        M.hessian_trace(model, ce, [])
    with pytest.raises(ValueError, match="empty batch"):
        M.hessian_trace(model, ce, (x[:0], y[:0]))
    frozen = tiny_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        M.hessian_trace(frozen, ce, (x, y))
    with pytest.raises(ValueError, match="`method`"):
        M.hessian_trace(model, ce, (x, y), method="exact")
    with pytest.raises(ValueError, match="`alpha`"):
        M.renyi_sharpness(model, ce, (x, y), alpha=-1)
    with pytest.raises(ValueError, match="`backend`"):
        HessianOperator(model, ce, (x, y), backend="fast")
    with pytest.raises(ValueError, match="`graph_memory`"):
        HessianOperator(model, ce, (x, y), graph_memory=-1)
    with pytest.raises(ValueError, match="`start`"):
        M.hessian_eigenvalues(model, ce, (x, y), start="zeros")
    with pytest.raises(ValueError, match="`params`"):
        M.hessian_trace(model, ce, (x, y), params=["nope"])
    with pytest.raises(ValueError, match="`by`"):
        M.layerwise(model, ce, (x, y), by="layer")
