"""Spectral measures: functions of the Hessian's eigenvalues (the top ones, the trace, the diagonal, the density,
the Renyi sharpness of the normalized spectrum), each a thin call of an algorithm of
:mod:`lightning_sharpness.curvature` on the Hessian operator of the mean loss.

Example: on ``L(w) = w^T A w / 2`` with ``A = diag(3, 1)`` the Hessian is ``A``, and the measures are exact where
their algorithm is (Lanczos on a 2-dimensional space, Hutchinson on a diagonal matrix)::

    >>> import torch
    >>> model = torch.nn.Linear(2, 1, bias=False)
    >>> quadratic = lambda m, x: 0.5 * (m.weight.pow(2) * torch.tensor([3.0, 1.0])).sum() + 0 * x.sum()
    >>> round(float(hessian_eigenvalues(model, quadratic, torch.zeros(1, 2))), 6)
    3.0
    >>> float(hessian_trace(model, quadratic, torch.zeros(1, 2), method="hutchinson", matvecs=4))
    4.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_sharpness.curvature.density import slq
from lightning_sharpness.curvature.diagonal import diagonal as _diagonal
from lightning_sharpness.curvature.diagonal import sqrt_sum
from lightning_sharpness.curvature.lanczos import lanczos_eigs
from lightning_sharpness.curvature.operator import HessianOperator, ParamSelection
from lightning_sharpness.curvature.probes import make_generator
from lightning_sharpness.curvature.trace import hutchinson, hutchpp
from lightning_sharpness.curvature.xtrace import xtrace
from lightning_sharpness.measures.base import (
    Backend,
    DensityResult,
    DiagonalResult,
    EigenResult,
    Estimate,
    LossFn,
    ProductsSeen,
    measuring,
)
from lightning_sharpness.measures.registry import Products, register
from lightning_sharpness.validation import check_choice, check_int, check_number

__all__ = [
    "diag_sqrt_trace",
    "hessian_diagonal",
    "hessian_eigenvalues",
    "hessian_trace",
    "lanczos_products",
    "renyi_sharpness",
    "spectral_density",
]


def lanczos_products(options: Mapping[str, Any], dim: int | None = None) -> int:
    """The products Lanczos is expected to take with ``options`` (``k``, ``tol``, ``max_iter``): 2k + 13 to
    ``tol=1e-3`` (5-10 for k=1 on trained networks, about 20 at initialization), about 5 more per decade of a
    tighter ``tol``; at most ``max_iter`` and the dimension."""
    k, tol, max_iter = options["k"], options["tol"], options["max_iter"]
    expected = 2 * k + 13 + max(0, math.ceil(5 * math.log10(1e-3 / tol)))
    cap = max(2 * k + 40, 100) if max_iter is None else max_iter
    if dim is not None:
        cap = min(cap, dim)
    return max(1, min(expected, cap))


def _trace_least(options: Mapping[str, Any]) -> int:
    """Hutch++ needs a third of its budget for each of its three parts, XTrace two probes of two products each."""
    return {"hutch++": 6, "xtrace": 4}.get(options.get("method"), 2)


#: The trace estimators by name. Hutchinson is the default: on the benchmark's 200k MLP and 1M ResNet-like CNN
#: (flat, indefinite spectra) it needs the fewest products for a given error (products x RMS^2: 0.20 and 233,
#: against 0.52 and 620 for Hutch++ and 0.41 and 337 for XTrace), the least memory (one block of probes) and is
#: linear in H, so DDP can split it; Hutch++ wins on the 4k CNN (0.17 against 0.36). See docs/measures.md.
_TRACE_METHODS = {"hutchinson": hutchinson, "hutch++": hutchpp, "xtrace": xtrace}


def _frobenius(options: Mapping[str, Any]) -> bool:
    """Whether ``renyi_sharpness`` takes its Frobenius form (Hutchinson products) rather than SLQ."""
    method = options.get("method")
    return method == "frobenius" or (method is None and options.get("alpha") == 2)


@register(
    products=lambda o: Products("max_iter", 1, max(o["k"] or 1, 2)),
    sizes=lambda o, dim: [("max_iter", lanczos_products(o, dim), max(o["k"], 2))],
    cost=lambda o, dim: {"build": 1, "hvp": lanczos_products(o, dim)},
)
def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    k: int = 1,
    which: Literal["largest", "smallest"] = "largest",
    return_vectors: bool = False,
    tol: float = 1e-5,
    max_iter: int | None = None,
    params: ParamSelection = None,
    seed: int = 0,
    backend: Backend = "auto",
    start: Literal["auto", "gradient", "random"] = "auto",
    delta: float = 1e-2,
) -> EigenResult:
    """The ``k`` largest (or smallest, algebraically) Hessian eigenvalues by Lanczos with full reorthogonalization.

    ``converged=True`` means: every returned value is within ``tol`` (relative to the largest Ritz value) of an
    eigenvalue, and, except with probability at most ``delta`` over the random start, no eigenvalue more than
    ``tol`` beyond the extreme returned one (or between the returned ones) was missed, so the extreme value's
    relative error is at most ``tol`` (see :func:`~lightning_sharpness.curvature.lanczos_eigs`). The error is
    usually far smaller (about ``tol^2`` over the relative gap). ``start``: ``"random"`` (the default) starts
    Lanczos from a uniformly random unit vector; ``"gradient"`` adds three times the normalized loss gradient,
    which lies mostly in the top Hessian subspace (Gur-Ari et al., 2018) but can as well be aligned with the
    second eigenvector of a close pair: a small residual then comes first for the wrong eigenvalue, and the
    certificate that rules this out needs more products from a biased start (on the benchmark CNN about 17
    against 13 for ``tol=0.04``), so the gradient start is no longer the default.

    Example::

        top = hessian_eigenvalues(model, loss_fn, (x, y), k=3)
        float(top), top.eigenvalues

    Raises:
        ValueError: for ``which``, ``start`` or ``k`` out of range (``1 <= k <=`` the parameter count), or batches
            outside the contract (:mod:`lightning_sharpness.batching`).
        NonFiniteLossError: when the loss is NaN or infinite, naming the measure and the batch.
    """
    check_choice(which, "which", ("largest", "smallest"))
    check_choice(start, "start", ("auto", "gradient", "random"))
    if start == "auto":
        start = "random"
    with measuring(model):
        op = HessianOperator(model, loss_fn, batches, params=params, backend=backend)
        if not (isinstance(k, int) and 1 <= k <= op.dim):
            raise ValueError(f"`k` must be an int between 1 and the parameter count {op.dim}, got {k!r}.")
        generator = make_generator(seed)
        v0 = None
        if start == "gradient":
            g = op.gradient()
            g_norm = float(g.norm())
            if math.isfinite(g_norm) and g_norm > 0:
                v0 = 3.0 * g / g_norm  # added to the random unit start: three times its weight
        res = lanczos_eigs(op, k, which, max_iter, tol, generator, return_vectors, v0=v0, delta=delta)
        op.release()
    vectors = None if res.eigenvectors is None else [op.unflatten(v) for v in res.eigenvectors]
    return EigenResult(
        float(res.eigenvalues[0]),
        None,
        res.matvecs,
        {"backend": op.backend, "miss_probability": res.miss_probability},
        eigenvalues=res.eigenvalues,
        eigenvectors=vectors,
        residuals=res.residuals,
        converged=res.converged,
    )


@register(
    mean_over_examples=lambda o: o["method"] == "hutchinson",  # Hutch++, XTrace project on a sketch: not linear
    products=lambda o: Products("matvecs", 1, _trace_least(o)),
    sizes=lambda o, dim: [("matvecs", o["matvecs"], _trace_least(o))],
    cost=lambda o, dim: {"build": 1, "hvp": o["matvecs"]},
    validators={"matvecs": lambda v, o, name: check_int(v, name, _trace_least(o))},
)
def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    matvecs: int = 100,
    method: Literal["hutchinson", "hutch++", "xtrace"] = "hutchinson",
    params: ParamSelection = None,
    seed: int = 0,
    backend: Backend = "auto",
) -> Estimate:
    """``tr(H)`` by Hutchinson (default), Hutch++ or XTrace (Epperly, Tropp & Webber, 2024).

    Hutchinson needs the fewest products for a given error on networks whose spectrum is not dominated by a few
    eigenvalues (measured: ``benchmarks/measures.py``); Hutch++ and XTrace win when a few eigenvalues dominate.

    Example::

        t = hessian_trace(model, loss_fn, loader, matvecs=100)
        float(t), t.stderr

    Raises:
        ValueError: for another ``method``, too few ``matvecs`` (2 for Hutchinson, 6 for Hutch++), or batches
            outside the contract.
        NonFiniteLossError: when the loss is NaN or infinite, naming the measure and the batch.
    """
    check_choice(method, "method", tuple(_TRACE_METHODS))
    with measuring(model):
        op = HessianOperator(model, loss_fn, batches, params=params, backend=backend)
        est = _TRACE_METHODS[method](op, matvecs, make_generator(seed))
    return Estimate(est.value, est.stderr, est.matvecs, {"method": method})


#: The two measures read from one diagonal estimate: exact costs one product per parameter.
_DIAGONAL_RECORD = dict(
    products=lambda o: Products("matvecs", 1, 2),
    sizes=lambda o, dim: [] if o["exact"] else [("matvecs", o["matvecs"], 2)],
    cost=lambda o, dim: {"build": 1, "hvp": (dim or o["matvecs"]) if o["exact"] else o["matvecs"]},
)


@register(mean_over_examples=True, **_DIAGONAL_RECORD)
def hessian_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    matvecs: int = 100,
    exact: bool = False,
    params: ParamSelection = None,
    seed: int = 0,
    backend: Backend = "auto",
) -> DiagonalResult:
    """``diag(H)`` per parameter: Hutchinson's ``E[v * Hv]`` or, with ``exact=True``, one HVP per parameter.

    Example::

        d = hessian_diagonal(model, loss_fn, (x, y), exact=True)
        d.diagonal["0.weight"]

    Raises:
        ValueError: for ``matvecs < 2`` (stochastic), or batches outside the contract.
        NonFiniteLossError: when the loss is NaN or infinite, naming the measure and the batch.
    """
    with measuring(model):
        op = HessianOperator(model, loss_fn, batches, params=params, backend=backend)
        est = _diagonal(op, matvecs, exact, make_generator(seed))
    diag = {n: t.to(op.dtype) for n, t in zip(op.names, op.unflatten(est.value))}
    err = {n: t.to(op.dtype) for n, t in zip(op.names, op.unflatten(est.stderr))}
    trace_err = None if exact else float(est.group_means.sum(1).std() / est.group_means.shape[0] ** 0.5)
    return DiagonalResult(float(est.value.sum()), trace_err, est.matvecs, {}, diagonal=diag, diagonal_stderr=err)


@register(mean_over_examples=False, **_DIAGONAL_RECORD)  # a square root of a mean is not a mean of square roots
def diag_sqrt_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    matvecs: int = 100,
    exact: bool = False,
    params: ParamSelection = None,
    seed: int = 0,
    backend: Backend = "auto",
) -> Estimate:
    """``tr(diag(H)^1/2) = sum_i sqrt(H_ii)``, the sharpness Adam minimizes near the minimizer manifold
    (Adam reduces a unique form of sharpness); negative diagonal entries count as 0. ``info["trace"]`` holds
    ``tr(H)`` from the same products, the sharpness SGD with label noise minimizes.

    The square root of a noisy diagonal estimate is biased (up by about ``0.41 sqrt(s_i)`` where ``H_ii`` is 0
    and its estimate has standard error ``s_i``), so the stochastic estimate is the plug-in corrected by the middle
    of its possible bias, and ``value +- 1.96 stderr`` (``info["interval"]``) is a 95% confidence interval that
    includes the bias bound (see :func:`~lightning_sharpness.curvature.diagonal.sqrt_sum`). Where many entries are
    below their noise (``info["unresolved"]``), the interval is conservative: raise ``matvecs``, or pass
    ``exact=True``, which costs one product per parameter and is the cheaper choice when the parameter count is at
    most ``matvecs``.

    Example::

        r = diag_sqrt_trace(model, loss_fn, (x, y), matvecs=200)
        float(r), r.info["interval"], r.info["trace"]

    Raises:
        ValueError: for ``matvecs < 2`` (stochastic), or batches outside the contract.
        NonFiniteLossError: when the loss is NaN or infinite, naming the measure and the batch.
    """
    with measuring(model):
        op = HessianOperator(model, loss_fn, batches, params=params, backend=backend)
        est = _diagonal(op, matvecs, exact, make_generator(seed))
    value, stderr, info = sqrt_sum(est)
    return Estimate(value, stderr, est.matvecs, {"trace": float(est.value.sum()), **info})


@register(
    products=lambda o: Products("steps", o["probes"], 2),
    sizes=lambda o, dim: [("steps", o["steps"], 2)],
    cost=lambda o, dim: {"build": 1, "hvp": o["probes"] * o["steps"]},
)
def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    probes: int = 8,
    steps: int = 80,
    params: ParamSelection = None,
    seed: int = 0,
    backend: Backend = "auto",
) -> DensityResult:
    """The Hessian eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al., 2019).

    Example::

        d = spectral_density(model, loss_fn, (x, y), probes=4, steps=60)
        edges, mass = d.density.histogram(bins=60)

    Raises:
        ValueError: for ``probes`` or ``steps`` below 1, or batches outside the contract.
        NonFiniteLossError: when the loss is NaN or infinite, naming the measure and the batch.
    """
    with measuring(model):
        op = HessianOperator(model, loss_fn, batches, params=params, backend=backend)
        dens = slq(op, probes, steps, make_generator(seed))
    per_probe = dens.per_probe(lambda x: x) * dens.dim
    stderr = float(per_probe.std() / probes**0.5) if probes > 1 else None
    return DensityResult(dens.moment(1) * dens.dim, stderr, probes * dens.nodes.shape[1], {}, density=dens)


def _renyi_from_sums(power_sum: Tensor, total: Tensor, alpha: float) -> Tensor:
    """``log(sum_i p_i^alpha) / (alpha - 1)`` with ``p_i = lambda_i / total`` and ``power_sum = sum lambda^alpha``."""
    return (power_sum.log() - alpha * total.log()) / (alpha - 1)


@register(
    products=lambda o: Products("matvecs", 1, 2) if _frobenius(o) else Products("steps", o["probes"], 2),
    sizes=lambda o, dim: [("matvecs", o["matvecs"], 2)] if _frobenius(o) else [("steps", o["steps"], 2)],
    cost=lambda o, dim: {"build": 1, "hvp": o["matvecs"] if _frobenius(o) else o["probes"] * o["steps"]},
)
def renyi_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    alpha: float = 2.0,
    method: Literal["slq", "frobenius"] | None = None,
    probes: int = 8,
    steps: int = 80,
    matvecs: int = 100,
    params: ParamSelection = None,
    seed: int = 0,
    backend: Backend = "auto",
) -> Estimate:
    """Renyi sharpness (Zhang et al., 2024): the negative Renyi entropy ``-H_alpha(p)`` of the normalized spectrum
    ``p_i = lambda_i / sum_j lambda_j``, i.e. ``log(sum_i p_i^alpha) / (alpha - 1)`` (``sum p log p`` at
    ``alpha = 1``). Higher means a more uneven, sharper spectrum; it lies in ``[-log dim, 0]``.

    ``method="slq"`` (default for ``alpha != 2``) integrates the positive part of the SLQ density;
    ``method="frobenius"`` (default for ``alpha = 2``) uses ``log(||H||_F^2 / tr(H)^2)`` from ``matvecs``
    shared Hutchinson probes (exact for positive semi-definite ``H``). Jackknife standard errors over probes.

    Example::

        float(renyi_sharpness(model, loss_fn, (x, y), alpha=2))

    Raises:
        ValueError: for ``alpha <= 0``, another ``method``, ``method='frobenius'`` with ``alpha != 2``, too few
            ``matvecs``, or a spectrum with no positive mass to normalize.
        NonFiniteLossError: when the loss is NaN or infinite, naming the measure and the batch.
    """
    alpha = check_number(alpha, "alpha", minimum=0, strict=True)
    method = method or ("frobenius" if alpha == 2 else "slq")
    check_choice(method, "method", ("slq", "frobenius"))
    if method == "frobenius" and alpha != 2:
        raise ValueError(f"`method='frobenius'` needs alpha=2, got alpha={alpha!r}; use method='slq'.")
    with measuring(model):
        op = HessianOperator(model, loss_fn, batches, params=params, backend=backend)
        if method == "frobenius":
            check_int(matvecs, "matvecs", 2)
            # Hutchinson's v^T H v estimate tr(H); the same products give ||H v||^2, estimates of tr(H^2).
            squares: list[Tensor] = []
            seen = ProductsSeen(op, lambda V, HV: squares.append(HV.double().pow(2).sum(0).cpu()))
            est = hutchinson(seen, matvecs, make_generator(seed))
            a, b = est.samples, torch.cat(squares)
            used = est.matvecs
        else:
            dens = slq(op, probes, steps, make_generator(seed))
            # Per-probe estimates of sum_i lambda_i+ and sum_i f(lambda_i+) over the whole spectrum.
            a = dens.per_probe(lambda x: x.clamp_min(0)) * dens.dim
            if alpha == 1:
                b = dens.per_probe(lambda x: torch.where(x > 0, x * x.clamp_min(1e-300).log(), torch.zeros_like(x)))
            else:
                b = dens.per_probe(lambda x: x.clamp_min(0).pow(alpha))
            b = b * dens.dim
            used = probes * dens.nodes.shape[1]

    def stat(sa: Tensor, sb: Tensor) -> Tensor:
        if alpha == 1:  # sum p log p = sum(l log l) / S - log S (per-dim normalization cancels)
            return sb / sa - sa.log()
        return _renyi_from_sums(sb, sa, alpha)

    n = a.numel()
    value = float(stat(a.mean(), b.mean()))
    if not math.isfinite(value):
        raise ValueError("renyi_sharpness: the estimated positive spectral mass is not positive; nothing to normalize.")
    stderr = None
    if n > 1:
        jack = stat((a.sum() - a) / (n - 1), (b.sum() - b) / (n - 1))
        stderr = float(((n - 1) / n * (jack - jack.mean()).pow(2).sum()).sqrt())
    return Estimate(value, stderr, used, {"alpha": alpha, "method": method})
