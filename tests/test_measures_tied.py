"""Tied weights: one parameter used in two places, by the same attribute (``self.b.weight = self.a.weight``, tied
embedding and output layers) or by one submodule used twice. Every measure must see every use: ground truth is
double backward through the model as it is called, and the same function written out without aliasing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sharpness import measures as M
from lightning_sharpness.curvature import HessianOperator, select_named_parameters
from lightning_sharpness.geometry import AdaptiveGeometry, GeodesicGeometry
from tests.helpers import double_backward_hessian


# ---------------------------------------------------------------------------------------------- models
class TiedNet(nn.Module):
    """Two tanh layers sharing one weight through the attribute: ``self.b.weight = self.a.weight``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.b.weight = self.a.weight
        self.double()

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


class SharedNet(nn.Module):
    """One submodule registered under two names and used twice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.c = nn.Linear(4, 4), nn.Linear(4, 3)
        self.b = self.a
        self.double()

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


class TiedLM(nn.Module):
    """A tiny language model: tied embedding and output layer (``head.weight = embed.weight``) around one
    self-attention module registered twice and applied twice (as ALBERT shares its layers)."""

    def __init__(self, vocab: int = 3, width: int = 4, heads: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.attn = nn.MultiheadAttention(width, heads, bias=False, batch_first=True)
        self.attn2 = self.attn
        self.head = nn.Linear(width, vocab)
        self.head.weight = self.embed.weight
        self.double()

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.attn(h, h, h)[0]
        h = h + self.attn2(h, h, h)[0]
        return self.head(h.mean(1))


class _Bias(nn.Module):
    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())


class WrittenOutNet(nn.Module):
    """TiedNet with the second use written out (``F.linear(h, self.a.weight, ...)``): no aliasing, same
    parameters in the same order."""

    def __init__(self, tied: TiedNet) -> None:
        super().__init__()
        self.a, self.b, self.c = copy.deepcopy(tied.a), _Bias(tied.b.bias), copy.deepcopy(tied.c)

    def forward(self, x):
        return self.c(torch.tanh(F.linear(torch.tanh(self.a(x)), self.a.weight, self.b.bias)))


class WrittenOutSharedNet(nn.Module):
    def __init__(self, shared: SharedNet) -> None:
        super().__init__()
        self.a, self.c = copy.deepcopy(shared.a), copy.deepcopy(shared.c)

    def forward(self, x):
        return self.c(torch.tanh(self.a(torch.tanh(self.a(x)))))


class WrittenOutLM(nn.Module):
    def __init__(self, tied: TiedLM) -> None:
        super().__init__()
        self.embed, self.attn, self.head = copy.deepcopy(tied.embed), copy.deepcopy(tied.attn), _Bias(tied.head.bias)

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.attn(h, h, h)[0]
        h = h + self.attn(h, h, h)[0]
        return F.linear(h.mean(1), self.embed.weight, self.head.bias)


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def vector_data(n: int = 12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def token_data(n: int = 6, length: int = 4, vocab: int = 3):
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, vocab, (n, length), generator=g), torch.randint(0, vocab, (n,), generator=g)


CASES = {
    "attribute": (TiedNet, WrittenOutNet, vector_data),
    "submodule": (SharedNet, WrittenOutSharedNet, vector_data),
    "lm": (TiedLM, WrittenOutLM, token_data),
}


def case(kind: str):
    make, written_out, data = CASES[kind]
    model = make().eval()
    return model, written_out(model).eval(), data()


# ---------------------------------------------------------------------------------------------- the operator
@pytest.mark.parametrize(
    "kind,backend",
    [(k, b) for k in ("attribute", "submodule") for b in ("autograd", "vmap", "jvp")] + [("lm", "autograd")],
)
def test_operator_hessian_equals_double_backward_on_tied_models(kind, backend):
    model, _, batch = case(kind)
    truth = double_backward_hessian(model, ce, batch)
    before = dict(model.named_parameters(remove_duplicate=False))
    op = HessianOperator(model, ce, batch, backend=backend)
    assert op.dim == truth.shape[0] == sum(p.numel() for p in model.parameters())
    assert torch.allclose(op.dense(), truth, rtol=1e-9, atol=1e-12)
    after = dict(model.named_parameters(remove_duplicate=False))
    assert before.keys() == after.keys() and all(after[n] is p for n, p in before.items())  # the model's own tensors
    grad = torch.autograd.grad(ce(model, batch), list(model.parameters()))
    assert torch.allclose(op.gradient(), torch.cat([g.reshape(-1) for g in grad]), rtol=1e-10, atol=1e-13)


def test_issue_example_tied_trace():
    """The issue's 2-layer tanh net: tr(H) from the operator equals double backward's (it was 10% off)."""
    model, _, batch = case("attribute")
    truth = double_backward_hessian(model, ce, batch).trace().item()
    op = HessianOperator(model, ce, batch)
    assert float(M.hessian_trace(model, ce, batch, matvecs=3 * op.dim, method="hutch++")) == pytest.approx(
        truth, rel=1e-9
    )


# ---------------------------------------------------------------------------------------------- every measure
@pytest.mark.parametrize("kind", ["attribute", "submodule"])
def test_every_hessian_measure_agrees_with_the_dense_hessian(kind):
    model, _, batch = case(kind)
    H = double_backward_hessian(model, ce, batch)
    dim = H.shape[0]
    eigs = torch.linalg.eigvalsh(H)
    top = M.hessian_eigenvalues(model, ce, batch, k=2, tol=1e-10)
    assert torch.allclose(top.eigenvalues, eigs.flip(0)[:2], rtol=1e-7, atol=1e-10)
    bottom = M.hessian_eigenvalues(model, ce, batch, k=1, which="smallest", tol=1e-10)
    assert float(bottom) == pytest.approx(eigs[0].item(), rel=1e-6, abs=1e-9)
    # Hutch++ with a sketch as wide as the space is exact
    assert float(M.hessian_trace(model, ce, batch, matvecs=3 * dim, method="hutch++")) == pytest.approx(
        H.trace().item(), rel=1e-9
    )
    diag = M.hessian_diagonal(model, ce, batch, exact=True)
    flat = torch.cat([diag.diagonal[n].reshape(-1) for n, _ in model.named_parameters()])
    assert torch.allclose(flat, H.diagonal(), rtol=1e-9, atol=1e-13)
    root = M.diag_sqrt_trace(model, ce, batch, exact=True)
    assert float(root) == pytest.approx(H.diagonal().clamp_min(0).sqrt().sum().item(), rel=1e-9)
    # Lanczos run to the dimension: the quadrature nodes of every probe reach the extreme eigenvalues
    dens = M.spectral_density(model, ce, batch, probes=2, steps=dim).density
    assert dens.nodes.max().item() == pytest.approx(eigs[-1].item(), rel=1e-6)
    assert dens.nodes.min().item() == pytest.approx(eigs[0].item(), rel=1e-6, abs=1e-8)
    renyi = M.renyi_sharpness(model, ce, batch, alpha=2, matvecs=400)
    truth = torch.log(H.pow(2).sum() / H.trace() ** 2).item()
    assert abs(float(renyi) - truth) < 4 * renyi.stderr
    # per-parameter blocks
    offsets, start = {}, 0
    for n, p in model.named_parameters():
        offsets[n] = slice(start, start + p.numel())
        start += p.numel()
    blocks = M.layerwise(model, ce, batch, measure="eigenvalue", by="parameter", tol=1e-10)
    assert set(blocks) == set(offsets)
    for n, sl in offsets.items():
        assert float(blocks[n]) == pytest.approx(torch.linalg.eigvalsh(H[sl, sl])[-1].item(), rel=1e-6, abs=1e-10)


# ---------------------------------------------------------------------------------------------- perturbations
PERTURBATIONS = [
    ("worst_case_sharpness", {"rho": 0.1, "steps": 8, "restarts": 2}),
    ("worst_case_sharpness", {"rho": 0.1, "steps": 8, "restarts": 2, "m": 4}),
    ("worst_case_sharpness", {"rho": 0.1, "steps": 8, "restarts": 2, "geometry": "adaptive"}),
    ("worst_case_sharpness", {"rho": 0.05, "steps": 8, "restarts": 2, "geometry": "adaptive", "norm": "linf"}),
    ("average_case_sharpness", {"rho": 0.1, "samples": 20}),
    ("average_case_sharpness", {"rho": 0.1, "samples": 20, "geometry": "standard", "norm": "linf"}),
]


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("name,options", PERTURBATIONS)
def test_perturbation_measures_on_tied_models_equal_the_written_out_model(kind, name, options):
    model, written_out, batch = case(kind)
    fn = getattr(M, name)
    if options.get("m") and kind == "lm":
        options = {**options, "m": 3}
    tied, reference = fn(model, ce, batch, **options), fn(written_out, ce, batch, **options)
    assert float(reference) != 0
    assert float(tied) == pytest.approx(float(reference), rel=1e-9)
    assert torch.allclose(tied.per_chunk, reference.per_chunk, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("measure", ["worst_case_sharpness", "average_case_sharpness"])
def test_geodesic_geometry_on_a_tied_language_model_equals_the_written_out_model(measure):
    model, written_out, batch = case("lm")
    geometries = (GeodesicGeometry(), GeodesicGeometry())
    options = (
        {"rho": 0.1, "steps": 6, "restarts": 2} if measure == "worst_case_sharpness" else {"rho": 0.1, "samples": 20}
    )
    fn = getattr(M, measure)
    tied = fn(model, ce, batch, geometry=geometries[0], **options)
    reference = fn(written_out, ce, batch, geometry=geometries[1], **options)
    bound = [g.bind(m, list(m.named_parameters())) for g, m in zip(geometries, (model, written_out))]
    assert len(bound[0].blocks) == len(bound[1].blocks) == 4  # 2 heads x (query/key, value/output)
    assert float(reference) > 0
    assert float(tied) == pytest.approx(float(reference), rel=1e-9)


def test_worst_case_on_a_tied_model_matches_its_second_order_expansion():
    """Independent of any reference model: for a small ball, ``max_{||d|| <= rho} L(w + d) - L(w)`` is
    ``rho ||T g|| + rho^2 / 2 u^T (T H T) u`` (``u = T g / ||T g||``) up to O(rho^3), with ``g`` and ``H`` from
    double backward through the tied model (the tied gradient has both uses; one use alone is far off)."""
    model, _, batch = case("attribute")
    H = double_backward_hessian(model, ce, batch)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(ce(model, batch), list(model.parameters()))])
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    rho = 1e-3
    for geometry, scale in (("standard", torch.ones_like(w)), (AdaptiveGeometry(eta=0.1), w.abs() + 0.1)):
        u = scale * g / (scale * g).norm()
        expected = rho * (scale * g).norm() + 0.5 * rho**2 * (u * scale) @ H @ (u * scale)
        res = M.worst_case_sharpness(model, ce, batch, rho=rho, geometry=geometry, steps=30)
        assert float(res) == pytest.approx(expected.item(), rel=1e-4)


# ---------------------------------------------------------------------------------------------- selection
def test_a_tied_parameter_is_one_parameter_selectable_by_any_of_its_names():
    model = TiedNet()
    names = [n for n, _ in select_named_parameters(model)]
    assert names == ["a.weight", "a.bias", "b.bias", "c.weight", "c.bias"]
    by_alias = select_named_parameters(model, ["b.weight", "c.bias"])
    assert [n for n, _ in by_alias] == ["a.weight", "c.bias"] and by_alias[0][1] is model.a.weight
    assert [n for n, _ in select_named_parameters(model, ["a.weight", "b.weight"])] == ["a.weight"]
    batch = vector_data()
    H = double_backward_hessian(model, ce, batch)
    block = H[:16, :16]
    t = M.hessian_trace(model, ce, batch, params=["b.weight"], matvecs=60, method="hutch++")
    assert float(t) == pytest.approx(block.trace().item(), rel=1e-9)
    with pytest.raises(ValueError, match="unknown or frozen"):
        select_named_parameters(model, ["b.nothing"])
