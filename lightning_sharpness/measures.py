"""Sharpness measures of a model's mean loss over some batches: one function per measure, no side effects.

Every function has the shape ``measure(model, loss_fn, batches, **options)``: ``loss_fn(model, batch)`` returns
the mean loss of a batch; ``batches`` is one batch (a tensor, a tuple / dict of tensors, or a DataLoader-style
list ``[x, y]``), a list of batches, a DataLoader, or ``Batches([x1, x2])`` for several single-tensor batches (see
:mod:`lightning_sharpness.curvature.batches`), and the measure is of the mean loss over all their examples. A NaN or
infinite loss raises :class:`NonFiniteLossError`, naming the measure.
The model is measured in eval mode (BatchNorm uses its running statistics) and is left bitwise as it was, with
the global RNG states; randomness comes from a local generator seeded by ``seed``. Each returns a result that
``float()`` turns into the estimate and that carries ``stderr`` where the estimate is stochastic.

==========================  ===================================================================================
``hessian_eigenvalues``     top / bottom ``k`` eigenvalues (Lanczos, full reorthogonalization)
``hessian_trace``           ``tr(H)``: Hutch++ (default) or Hutchinson
``hessian_diagonal``        ``diag(H)``: Hutchinson or exact
``diag_sqrt_trace``         ``tr(diag(H)^1/2)``, the sharpness Adam reduces (beside ``tr(H)``, SGD's)
``spectral_density``        eigenvalue density by stochastic Lanczos quadrature
``renyi_sharpness``         negative Renyi entropy of the normalized spectrum
``worst_case_sharpness``    ``max_{||delta|| <= rho} L(w + delta) - L(w)`` (APGD, m-sharpness, any geometry)
``average_case_sharpness``  ``E L(w + delta) - L(w)`` for Gaussian / uniform ``delta``
``layerwise``               per-module or per-parameter trace and top eigenvalue
==========================  ===================================================================================
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sharpness._state import preserved
from lightning_sharpness.curvature.batches import Batches, split_batch
from lightning_sharpness.curvature.density import SpectralDensity, slq
from lightning_sharpness.curvature.diagonal import diagonal as _diagonal
from lightning_sharpness.curvature.diagonal import sqrt_sum
from lightning_sharpness.curvature.lanczos import lanczos_eigs
from lightning_sharpness.curvature.operator import (
    HessianOperator,
    NonFiniteLossError,
    ParamSelection,
    select_named_parameters,
)
from lightning_sharpness.curvature.probes import make_generator, rademacher
from lightning_sharpness.curvature.trace import hutchinson, hutchpp
from lightning_sharpness.geometry import Geometry, resolve_geometry

__all__ = [
    "Batches",
    "NonFiniteLossError",
    "Estimate",
    "EigenResult",
    "DiagonalResult",
    "DensityResult",
    "PerturbationResult",
    "hessian_operator",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_diagonal",
    "diag_sqrt_trace",
    "spectral_density",
    "renyi_sharpness",
    "worst_case_sharpness",
    "average_case_sharpness",
    "layerwise",
]

LossFn = Callable[[nn.Module, Any], Tensor]

#: The measure functions, by the names ``SharpnessMonitor(measures=[...])`` accepts, in the order the docs list them.
MEASURE_NAMES = (
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_diagonal",
    "diag_sqrt_trace",
    "spectral_density",
    "renyi_sharpness",
    "worst_case_sharpness",
    "average_case_sharpness",
)


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Estimate:
    """A scalar estimate: ``float(result)`` is ``value``; ``stderr`` is ``None`` when it is deterministic."""

    value: float
    stderr: float | None = None
    matvecs: int = 0
    info: dict = field(default_factory=dict)

    def __float__(self) -> float:
        return float(self.value)


@dataclass
class EigenResult(Estimate):
    """``eigenvalues`` (descending for largest, ascending for smallest); ``value`` is the first of them;
    ``eigenvectors[i]`` is a list of per-parameter tensors when requested."""

    eigenvalues: Tensor = None
    eigenvectors: list[list[Tensor]] | None = None
    residuals: Tensor = None
    converged: bool = True


@dataclass
class DiagonalResult(Estimate):
    """``diagonal`` maps parameter names to tensors shaped like them; ``value`` is their sum (``tr(H)``)."""

    diagonal: dict[str, Tensor] = None
    diagonal_stderr: dict[str, Tensor] = None


@dataclass
class DensityResult(Estimate):
    """The SLQ density (``density.histogram()``, ``density.smooth()``, ``density.moment()``); ``value`` is the
    implied ``tr(H)`` (``dim * first moment``)."""

    density: SpectralDensity = None


@dataclass
class PerturbationResult(Estimate):
    """``value`` is the mean loss increase; ``per_chunk`` holds one value per chunk of ``m`` examples;
    ``base_loss`` the unperturbed loss."""

    per_chunk: Tensor = None
    base_loss: float = 0.0


# ---------------------------------------------------------------------------------------------- helpers
@contextmanager
def _measuring(model: nn.Module) -> Iterator[None]:
    with preserved(model):
        model.eval()
        with torch.no_grad():
            try:
                yield
            except NonFiniteLossError as err:
                _name_measure(err)
                raise


def _name_measure(err: NonFiniteLossError) -> None:
    """Prefix the error with the measure it left (the first measure function of this module on its traceback),
    so that every measure names itself without passing its name down to the operator."""
    if err.measure is not None:
        return
    for frame, _ in traceback.walk_tb(err.__traceback__):
        name = frame.f_code.co_name
        if frame.f_globals.get("__name__") == __name__ and (name in MEASURE_NAMES or name == "layerwise"):
            err.measure = name
            err.args = (f"{name}: {err.args[0]}", *err.args[1:])
            return


def _finite(value: float, where: str) -> float:
    """``value``, a loss the perturbation measures computed, if finite; else :class:`NonFiniteLossError`."""
    if not math.isfinite(value):
        hint = (
            "a smaller rho keeps the perturbed weights where the loss is defined"
            if "perturbed" in where
            else "check the model's outputs and the batch (NaN or inf in inputs or weights, log of 0, an overflow)"
        )
        raise NonFiniteLossError(f"the loss {where} is not a finite number ({value}): {hint}.")
    return value


def _check_positive_int(value: Any, name: str, least: int = 1) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
        raise ValueError(f"`{name}` must be an int >= {least}, got {value!r}.")
    return value


def _check_rho(rho: Any) -> float:
    if not (isinstance(rho, (int, float)) and not isinstance(rho, bool) and math.isfinite(rho) and rho >= 0):
        raise ValueError(f"`rho` must be a finite number >= 0, got {rho!r}.")
    return float(rho)


def hessian_operator(
    model: nn.Module, loss_fn: LossFn, batches: Any, params: ParamSelection = None, backend: str = "auto"
) -> HessianOperator:
    """The Hessian operator of the mean loss (for custom algorithms). Call ``model.eval()`` first.

    Example::

        op = hessian_operator(model.eval(), loss_fn, (x, y))
        op @ torch.ones(op.dim)
    """
    return HessianOperator(model, loss_fn, batches, params=params, backend=backend)


# ---------------------------------------------------------------------------------------------- spectrum
def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    k: int = 1,
    which: str = "largest",
    return_vectors: bool = False,
    tol: float = 1e-5,
    max_iter: int | None = None,
    params: ParamSelection = None,
    seed: int = 0,
    backend: str = "auto",
    start: str = "auto",
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
    """
    if which not in ("largest", "smallest"):
        raise ValueError(f"`which` must be 'largest' or 'smallest', got {which!r}.")
    if start not in ("auto", "gradient", "random"):
        raise ValueError(f"`start` must be 'auto', 'gradient' or 'random', got {start!r}.")
    if start == "auto":
        start = "random"
    with _measuring(model):
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


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    matvecs: int = 99,
    method: str = "hutch++",
    params: ParamSelection = None,
    seed: int = 0,
    backend: str = "auto",
) -> Estimate:
    """``tr(H)`` by Hutch++ (default: lower variance for the decaying spectra of networks) or Hutchinson.

    Example::

        t = hessian_trace(model, loss_fn, loader, matvecs=99)
        float(t), t.stderr
    """
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"`method` must be 'hutch++' or 'hutchinson', got {method!r}.")
    with _measuring(model):
        op = HessianOperator(model, loss_fn, batches, params=params, backend=backend)
        est = (hutchpp if method == "hutch++" else hutchinson)(op, matvecs, make_generator(seed))
    return Estimate(est.value, est.stderr, est.matvecs, {"method": method})


def hessian_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    matvecs: int = 100,
    exact: bool = False,
    params: ParamSelection = None,
    seed: int = 0,
    backend: str = "auto",
) -> DiagonalResult:
    """``diag(H)`` per parameter: Hutchinson's ``E[v * Hv]`` or, with ``exact=True``, one HVP per parameter.

    Example::

        d = hessian_diagonal(model, loss_fn, (x, y), exact=True)
        d.diagonal["0.weight"]
    """
    with _measuring(model):
        op = HessianOperator(model, loss_fn, batches, params=params, backend=backend)
        est = _diagonal(op, matvecs, exact, make_generator(seed))
    diag = {n: t.to(op.dtype) for n, t in zip(op.names, op.unflatten(est.value))}
    err = {n: t.to(op.dtype) for n, t in zip(op.names, op.unflatten(est.stderr))}
    trace_err = None if exact else float(est.group_means.sum(1).std() / est.group_means.shape[0] ** 0.5)
    return DiagonalResult(float(est.value.sum()), trace_err, est.matvecs, {}, diagonal=diag, diagonal_stderr=err)


def diag_sqrt_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    matvecs: int = 100,
    exact: bool = False,
    params: ParamSelection = None,
    seed: int = 0,
    backend: str = "auto",
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
    """
    with _measuring(model):
        op = HessianOperator(model, loss_fn, batches, params=params, backend=backend)
        est = _diagonal(op, matvecs, exact, make_generator(seed))
    value, stderr, info = sqrt_sum(est)
    return Estimate(value, stderr, est.matvecs, {"trace": float(est.value.sum()), **info})


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    probes: int = 8,
    steps: int = 80,
    params: ParamSelection = None,
    seed: int = 0,
    backend: str = "auto",
) -> DensityResult:
    """The Hessian eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al., 2019).

    Example::

        d = spectral_density(model, loss_fn, (x, y), probes=4, steps=60)
        edges, mass = d.density.histogram(bins=60)
    """
    with _measuring(model):
        op = HessianOperator(model, loss_fn, batches, params=params, backend=backend)
        dens = slq(op, probes, steps, make_generator(seed))
    per_probe = dens.per_probe(lambda x: x) * dens.dim
    stderr = float(per_probe.std() / probes**0.5) if probes > 1 else None
    return DensityResult(dens.moment(1) * dens.dim, stderr, probes * dens.nodes.shape[1], {}, density=dens)


def _renyi_from_sums(power_sum: Tensor, total: Tensor, alpha: float) -> Tensor:
    """``log(sum_i p_i^alpha) / (alpha - 1)`` with ``p_i = lambda_i / total`` and ``power_sum = sum lambda^alpha``."""
    return (power_sum.log() - alpha * total.log()) / (alpha - 1)


def renyi_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    alpha: float = 2.0,
    method: str | None = None,
    probes: int = 8,
    steps: int = 80,
    matvecs: int = 100,
    params: ParamSelection = None,
    seed: int = 0,
    backend: str = "auto",
) -> Estimate:
    """Renyi sharpness (Zhang et al., 2024): the negative Renyi entropy ``-H_alpha(p)`` of the normalized spectrum
    ``p_i = lambda_i / sum_j lambda_j``, i.e. ``log(sum_i p_i^alpha) / (alpha - 1)`` (``sum p log p`` at
    ``alpha = 1``). Higher means a more uneven, sharper spectrum; it lies in ``[-log dim, 0]``.

    ``method="slq"`` (default for ``alpha != 2``) integrates the positive part of the SLQ density;
    ``method="frobenius"`` (default for ``alpha = 2``) uses ``log(||H||_F^2 / tr(H)^2)`` from ``matvecs``
    shared Hutchinson probes (exact for positive semi-definite ``H``). Jackknife standard errors over probes.

    Example::

        float(renyi_sharpness(model, loss_fn, (x, y), alpha=2))
    """
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"`alpha` must be a finite number > 0, got {alpha!r}.")
    alpha = float(alpha)
    method = method or ("frobenius" if alpha == 2 else "slq")
    if method not in ("slq", "frobenius"):
        raise ValueError(f"`method` must be 'slq' or 'frobenius', got {method!r}.")
    if method == "frobenius" and alpha != 2:
        raise ValueError(f"`method='frobenius'` needs alpha=2, got alpha={alpha!r}; use method='slq'.")
    with _measuring(model):
        op = HessianOperator(model, loss_fn, batches, params=params, backend=backend)
        if method == "frobenius":
            _check_positive_int(matvecs, "matvecs", 2)
            V = rademacher(op.dim, matvecs, make_generator(seed), op.dtype, op.device)
            HV = op @ V
            a = (V * HV).double().sum(0)  # estimates of tr(H)
            b = HV.double().pow(2).sum(0)  # estimates of tr(H^2)
            used = matvecs
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


# ---------------------------------------------------------------------------------------------- perturbations
def _perturbed_setup(
    model: nn.Module, loss_fn: LossFn, batches: Any, rho: Any, geometry: str | Geometry, norm: str, params
) -> tuple[HessianOperator, Geometry, list[Tensor], float]:
    rho = _check_rho(rho)
    geo = resolve_geometry(geometry)
    if not isinstance(norm, str):
        raise ValueError(f"`norm` must be 'l2' or 'linf', got {norm!r}.")
    geo.check_norm(norm)
    op = HessianOperator(model, loss_fn, batches, params=params)
    named = select_named_parameters(model, params)
    geo.bind(model, named)
    return op, geo, [p for _, p in named], rho


def _apgd_checkpoints(steps: int) -> set[int]:
    """Iterations where APGD (Croce & Hein, 2020) may halve its step: at fractions 0, .22, then growing gaps."""
    fractions, p_prev, p = [0.0, 0.22], 0.0, 0.22
    while True:
        p, p_prev = p + max(p - p_prev - 0.03, 0.06), p
        if p > 1:
            break
        fractions.append(p)
    return {math.ceil(f * steps) for f in fractions[1:]}


def _maximize(
    op: HessianOperator,
    geo: Geometry,
    params: list[Tensor],
    chunk: Any,
    rho: float,
    norm: str,
    steps: int,
    step_size: float,
    start: list[Tensor],
    momentum: float = 0.75,
) -> tuple[float, float, list[Tensor]]:
    """APGD-style projected ascent on ``xi -> L(retract(w, xi))`` over the ball from ``start`` (projected onto
    it); returns the best loss, the base loss and the best point."""
    base_vals = [p.detach() for p in params]

    def value_and_grad(xi: list[Tensor]) -> tuple[float, list[Tensor]]:
        def f(x: tuple[Tensor, ...]) -> Tensor:
            return op.loss_at(geo.retract(params, list(x)), chunk)

        g, v = torch.func.grad_and_value(f)(tuple(xi))
        return _finite(float(v), f"at a perturbed point (rho={rho})"), [t.detach() for t in g]

    base = _finite(float(op.loss_at(base_vals, chunk)), "at the model's weights")
    if rho == 0:
        return base, base, [torch.zeros_like(p) for p in base_vals]
    xi = [t.clone() for t in start]
    geo.project_(params, xi, rho, norm)
    f_x, g_x = value_and_grad(xi)
    best, f_best, g_best = [t.clone() for t in xi], f_x, g_x
    eta = step_size
    checkpoints = _apgd_checkpoints(steps)
    last_cp, successes, eta_at_cp, best_at_cp = 0, 0, eta, f_best
    x_prev = [t.clone() for t in xi]

    def step_from(x: list[Tensor], g: list[Tensor], size: float) -> list[Tensor]:
        d = [t.clone() for t in g]
        if norm == "linf":
            geo.linf_ascent_(params, d, size)
        else:
            dual = float(geo.dual_sq_norm(params, d)) ** 0.5
            if dual == 0:
                return [t.clone() for t in x]
            geo.ascent_(params, d, size / dual)
        z = [a + b for a, b in zip(x, d)]
        geo.project_(params, z, rho, norm)
        return z

    for k in range(1, steps + 1):
        z = step_from(xi, g_x, eta)
        if k == 1:
            new = z
        else:
            new = [x + momentum * (zz - x) + (1 - momentum) * (x - xp) for x, zz, xp in zip(xi, z, x_prev)]
            geo.project_(params, new, rho, norm)
        x_prev, xi = xi, new
        f_new, g_new = value_and_grad(xi)
        if f_new > f_x:
            successes += 1
        f_x, g_x = f_new, g_new
        if f_x > f_best:
            best, f_best, g_best = [t.clone() for t in xi], f_x, g_x
        if k in checkpoints:
            stalled = successes < 0.75 * (k - last_cp) or (eta == eta_at_cp and f_best == best_at_cp)
            eta_at_cp, best_at_cp = eta, f_best
            if stalled:
                eta /= 2
                xi, f_x, g_x = [t.clone() for t in best], f_best, g_best
                x_prev = [t.clone() for t in xi]
            last_cp, successes = k, 0
    return f_best, base, best


def _starts(
    geo: Geometry, params: list[Tensor], rho: float, norm: str, init: str, restarts: int, generator: torch.Generator
) -> Iterator[list[Tensor]]:
    """The ascent's starting points: ``delta = 0`` first for ``init="zero"``, then independent random draws
    (``rho / 2`` times the geometry's draw; mirrored pairs ``+-d`` were tried and do no better than one draw where
    the loss is even in ``delta``, as at the origin of a tanh network)."""
    for r in range(restarts):
        if r == 0 and init == "zero":
            yield [torch.zeros_like(p) for p in params]
        else:
            yield [t.mul_(0.5 * rho) for t in geo.sample(params, generator, norm)]


def _best_ascent(
    target: Any,
    geo: Geometry,
    params: list[Tensor],
    chunk: Any,
    rho: float,
    norm: str,
    steps: int,
    step_size: float,
    init: str,
    restarts: int,
    generator: torch.Generator,
) -> tuple[float, float]:
    """(best, base) loss over ``restarts`` starts. Each start first climbs ``steps // 5`` steps (a scout: the
    first steps decide which local maximum an ascent reaches), then the best point found climbs ``steps`` more:
    ``restarts * steps / 5 + steps`` gradients, where running every start in full would cost ``restarts * steps``
    (on the tests' tanh networks the two found the maximum equally often)."""
    starts = _starts(geo, params, rho, norm, init, restarts, generator)
    if restarts == 1:
        return _maximize(target, geo, params, chunk, rho, norm, steps, step_size, next(starts))[:2]
    scouts = [_maximize(target, geo, params, chunk, rho, norm, max(1, steps // 5), step_size, xi) for xi in starts]
    scouted, base, point = max(scouts, key=lambda run: run[0])
    climbed = _maximize(target, geo, params, chunk, rho, norm, steps, step_size, point)[0]
    return max(scouted, climbed), base


def _chunk_generator(seed: int | torch.Generator, index: int) -> torch.Generator:
    """The random starts of chunk ``index`` (its position in its batch): a generator of its own, seeded from
    ``seed`` and ``index`` alone, so that a chunk gets the same starts whichever other batches are measured with
    it (under DDP each process measures whole batches of the probe set: the shards add up to the whole set)."""
    base = make_generator(seed).initial_seed()
    return torch.Generator().manual_seed((base * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) % (2**63 - 1))


def worst_case_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    rho: float,
    geometry: str | Geometry = "standard",
    norm: str = "l2",
    m: int | None = None,
    steps: int = 20,
    step_size: float | None = None,
    init: str = "random",
    restarts: int = 10,
    params: ParamSelection = None,
    seed: int = 0,
) -> PerturbationResult:
    """``max_{||delta||_geometry <= rho} L(w + delta) - L(w)`` by projected ascent in the style of APGD (Croce &
    Hein, 2020): ``steps`` normalized (l2) or sign (l-inf) steps from ``step_size = 2 rho``, momentum 0.75, step
    halving at checkpoints when progress stalls (restarting from the best point), best iterate kept; the best of
    ``restarts`` starts, as in the code of Andriushchenko et al. (2023). One start climbs to a local maximum of a
    non-concave loss: on small tanh networks at a minimum, where brute force gives the maximum, one start found it
    on 43-53% of 100 seeds (l2 and l-inf alike; 56% at a stationary point, l-inf), the default 10 in all 720 runs
    tried (9 networks x 40 seeds x 2 norms; all 10 starts miss with probability about ``0.5^10 = 0.1%``). Each
    start climbs ``steps // 5`` steps, then the best point found climbs ``steps`` more: ``3 * steps`` gradients
    at the defaults, against ``steps`` for ``restarts=1``.

    ``init="random"``: the starts are independent random draws, ``rho / 2`` times the geometry's (``T * U(-1, 1)``
    per element for l-inf, ``T * N(0, 1)`` for l2) projected onto the ball. ``init="zero"``: the first start is
    ``delta = 0``, the others random; alone (``restarts=1``) it is deterministic, but at a stationary point it
    returns exactly 0 (the gradient there is 0, so the ascent never moves). Each chunk draws its starts from a
    generator seeded by ``seed`` and the chunk's position in its batch, whatever else is measured with it:
    m-sharpness measured on shards of whole batches (DDP) adds up to the value on all of them.

    ``geometry``: ``"standard"`` (``||delta||``), ``"adaptive"`` (``||delta / (|w| + eta)||``, scale-invariant,
    Kwon et al. 2021 / Andriushchenko et al. 2023), ``"geodesic"`` (symmetry-aware for attention, l2 only) or a
    :class:`~lightning_sharpness.geometry.Geometry`. With ``m``, every batch is cut into chunks of ``m`` examples,
    each gets its own worst perturbation, and the result is their mean (m-sharpness, Andriushchenko & Flammarion,
    2022) with the standard error over chunks.

    Example::

        s = worst_case_sharpness(model, loss_fn, (x, y), rho=0.05, geometry="adaptive", m=16)
        float(s), s.stderr
    """
    if init not in ("random", "zero"):
        raise ValueError(f"`init` must be 'random' or 'zero', got {init!r}.")
    _check_positive_int(steps, "steps")
    _check_positive_int(restarts, "restarts")
    if m is not None:
        _check_positive_int(m, "m")
    with _measuring(model):
        op, geo, params, rho = _perturbed_setup(model, loss_fn, batches, rho, geometry, norm, params)
        size = 2 * rho if step_size is None else float(step_size)
        if not size > 0 and rho > 0:
            raise ValueError(f"`step_size` must be > 0, got {step_size!r}.")
        if m is None:  # one perturbation for the mean loss over all batches
            targets = [(_Joint(op, list(zip(op.batches, op.weights))), None, 0)]
        else:
            targets = [(op, c, i) for b in op.batches for i, c in enumerate(split_batch(b, m))]
        values, bases = [], []
        for target, chunk, index in targets:
            generator = _chunk_generator(seed, index)
            best, base = _best_ascent(target, geo, params, chunk, rho, norm, steps, size, init, restarts, generator)
            values.append(best - base)
            bases.append(base)
    per_chunk = torch.tensor(values, dtype=torch.float64)
    stderr = float(per_chunk.std() / len(values) ** 0.5) if len(values) > 1 else None
    return PerturbationResult(
        float(per_chunk.mean()),
        stderr,
        0,
        {"geometry": geo.name, "norm": norm, "rho": rho, "restarts": restarts},
        per_chunk=per_chunk,
        base_loss=float(torch.tensor(bases, dtype=torch.float64).mean()),  # the losses are float64 Python floats
    )


class _Joint:
    """The weighted mean loss over several batches, with the ``loss_at(params, _)`` shape of an operator."""

    def __init__(self, op: HessianOperator, jobs: list[tuple[Any, float]]) -> None:
        self.op, self.jobs = op, jobs

    def loss_at(self, params: Sequence[Tensor], _: Any) -> Tensor:
        return sum(w * self.op.loss_at(params, b) for b, w in self.jobs)


def average_case_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    rho: float,
    geometry: str | Geometry = "adaptive",
    norm: str = "l2",
    samples: int = 100,
    params: ParamSelection = None,
    seed: int = 0,
) -> PerturbationResult:
    """``E_delta L(w + delta) - L(w)`` with ``delta = rho * T * z``: ``z`` standard Gaussian (l2) or uniform on
    ``[-1, 1]`` (l-inf) per element, ``T = |w| + eta`` for the adaptive geometry (default), 1 for the standard
    one, and the metric's Gaussian on attention head pairs for the geodesic one. Monte Carlo over ``samples``
    draws, with its standard error.

    Example::

        s = average_case_sharpness(model, loss_fn, (x, y), rho=0.01, samples=200)
        float(s), s.stderr
    """
    _check_positive_int(samples, "samples", 2)
    with _measuring(model):
        op, geo, params, rho = _perturbed_setup(model, loss_fn, batches, rho, geometry, norm, params)
        generator = make_generator(seed)
        joint = _Joint(op, list(zip(op.batches, op.weights)))
        base = _finite(float(joint.loss_at([p.detach() for p in params], None)), "at the model's weights")
        values = []
        for _ in range(samples):
            xi = [t.mul_(rho) for t in geo.sample(params, generator, norm)]
            perturbed = float(joint.loss_at(geo.retract(params, xi), None))
            values.append(_finite(perturbed, f"at a perturbed point (rho={rho})") - base)
    per = torch.tensor(values, dtype=torch.float64)
    return PerturbationResult(
        float(per.mean()),
        float(per.std() / samples**0.5),
        0,
        {"geometry": geo.name, "norm": norm, "rho": rho},
        per_chunk=per,
        base_loss=base,
    )


# ---------------------------------------------------------------------------------------------- per layer
def _groups(model: nn.Module, by: str | Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    names = [n for n, _ in select_named_parameters(model)]
    if isinstance(by, Mapping):
        return {k: list(v) for k, v in by.items()}
    if by == "parameter":
        return {n: [n] for n in names}
    if by == "module":
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(n.rpartition(".")[0], []).append(n)
        return groups
    raise ValueError(f"`by` must be 'module', 'parameter' or a dict of group -> parameter names, got {by!r}.")


def layerwise(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    measure: str = "trace",
    by: str | Mapping[str, Sequence[str]] = "module",
    matvecs: int = 99,
    tol: float = 1e-5,
    seed: int = 0,
    backend: str = "auto",
) -> dict[str, Estimate]:
    """Per-module (or per-parameter, or user-grouped) curvature: ``measure="trace"`` gives ``tr(H_gg)`` of each
    diagonal block (they sum to ``tr(H)``), from the same Hutchinson probes for all groups; ``"eigenvalue"`` the
    top eigenvalue of each block ``H_gg`` (Lanczos on the block).

    Example::

        layerwise(model, loss_fn, (x, y), measure="eigenvalue", by="module")   # {"0": Estimate, "2": ...}
    """
    if measure not in ("trace", "eigenvalue"):
        raise ValueError(f"`measure` must be 'trace' or 'eigenvalue', got {measure!r}.")
    groups = _groups(model, by)
    out: dict[str, Estimate] = {}
    if measure == "eigenvalue":
        for name, members in groups.items():
            res = hessian_eigenvalues(model, loss_fn, batches, k=1, tol=tol, params=members, seed=seed, backend=backend)
            out[name] = res
        return out
    _check_positive_int(matvecs, "matvecs", 2)
    with _measuring(model):
        op = HessianOperator(model, loss_fn, batches, backend=backend)
        for name, members in groups.items():
            unknown = [n for n in members if n not in op.names]
            if unknown:
                raise ValueError(f"`by`: group {name!r} names unknown or frozen parameters {unknown}.")
        V = rademacher(op.dim, matvecs, make_generator(seed), op.dtype, op.device)
        prod = (V * (op @ V)).double()  # (dim, matvecs): per-coordinate contributions
        offsets, start = {}, 0
        for n, size in zip(op.names, op.numels):
            offsets[n] = (start, start + size)
            start += size
        for name, members in groups.items():
            samples = sum(prod[offsets[n][0] : offsets[n][1]].sum(0) for n in members)
            out[name] = Estimate(float(samples.mean()), float(samples.std() / matvecs**0.5), matvecs, {})
    return out
