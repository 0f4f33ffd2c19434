"""The diagonal of a symmetric operator: Hutchinson's estimator or exact from unit vectors; ``sum_i sqrt(A_ii)``
from it with an honest confidence interval."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_sharpness.curvature.probes import rademacher
from lightning_sharpness.curvature.protocol import LinearOperator

__all__ = ["diagonal", "DiagonalEstimate", "sqrt_sum"]


@dataclass
class DiagonalEstimate:
    """``value[i]`` estimates ``A_ii``; ``stderr[i]`` its standard error (zeros when exact); ``group_means`` are
    the means of ``v * (A v)`` over disjoint groups of probes, ``(groups, dim)``, for jackknife errors of
    functions of the diagonal (``None`` when exact)."""

    value: Tensor
    stderr: Tensor
    group_means: Tensor | None
    matvecs: int


def diagonal(
    op: LinearOperator,
    matvecs: int = 100,
    exact: bool = False,
    generator: torch.Generator | None = None,
    block: int = 32,
    groups: int = 10,
) -> DiagonalEstimate:
    """``diag(A) ~ mean_i v_i * (A v_i)`` (Bekas et al., 2007) with Rademacher ``v_i``, or exactly from the
    ``dim`` products ``A e_j`` when ``exact=True`` (tiny models only).

    Example::

        diagonal(op, matvecs=300, generator=torch.Generator().manual_seed(0)).value
    """
    if exact:
        diag = torch.empty(op.dim, dtype=torch.float64, device=op.device)
        for start in range(0, op.dim, block):
            idx = torch.arange(start, min(start + block, op.dim), device=op.device)
            E = torch.zeros(op.dim, len(idx), dtype=op.dtype, device=op.device)
            E[idx, torch.arange(len(idx), device=op.device)] = 1
            diag[idx] = (op @ E)[idx, torch.arange(len(idx), device=op.device)].double()
        return DiagonalEstimate(diag, torch.zeros_like(diag), None, op.dim)
    if not (isinstance(matvecs, int) and matvecs >= 2):
        raise ValueError(f"`matvecs` must be an int >= 2, got {matvecs!r}.")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    groups = max(2, min(groups, matvecs))
    bounds = torch.linspace(0, matvecs, groups + 1).round().long().tolist()
    group_sums = torch.zeros(groups, op.dim, dtype=torch.float64, device=op.device)
    total_sq = torch.zeros(op.dim, dtype=torch.float64, device=op.device)
    for g in range(groups):
        for start in range(bounds[g], bounds[g + 1], block):
            V = rademacher(op.dim, min(block, bounds[g + 1] - start), generator, op.dtype, op.device)
            z = (V * (op @ V)).double()
            group_sums[g] += z.sum(1)
            total_sq += z.pow(2).sum(1)
    mean = group_sums.sum(0) / matvecs
    var = (total_sq - matvecs * mean.pow(2)).clamp_min(0) / (matvecs - 1)
    sizes = torch.tensor([bounds[g + 1] - bounds[g] for g in range(groups)], dtype=torch.float64, device=op.device)
    return DiagonalEstimate(mean, (var / matvecs).sqrt(), group_sums / sizes[:, None], matvecs)


# ---------------------------------------------------------------------------------------------- sum of square roots
# The plug-in ``sum_i sqrt(max(x_i, 0))`` of noisy diagonal estimates ``x_i ~ N(d_i, s_i^2)`` is biased: at
# ``d_i = 0`` every noisy coordinate adds about ``0.41 sqrt(s_i)`` (+16% on a sparse diagonal network, 4 standard
# errors). No estimator of ``sqrt`` is unbiased near 0 (sqrt is not analytic there), so instead of hiding the bias
# we bound it: per coordinate it is ``sqrt(s_i) * beta(d_i / s_i)`` with ``beta`` below, a known function; over
# the values of ``d_i`` the probes cannot rule out it spans a known range, whose midpoint corrects the estimate
# and whose half-width widens the interval. Coordinates the probes resolve (``x_i >> s_i``) get a tiny, nearly
# exact correction and no extra width; unresolved ones get an honest, conservative band.

_WINDOW = 3.0  # d_i / s_i is taken to lie within x_i / s_i +- 3 (99.7% per coordinate)
_Z95 = 1.959963984540054
# Student t 97.5% quantiles for 1..30 degrees of freedom: the jackknife over few groups has few of them.
_T975 = tuple(
    float(q)
    for q in "12.706 4.303 3.182 2.776 2.571 2.447 2.365 2.306 2.262 2.228 2.201 2.179 2.160 2.145 2.131 "
    "2.120 2.110 2.101 2.093 2.086 2.080 2.074 2.069 2.064 2.060 2.056 2.052 2.048 2.045 2.042".split()
)


def _t975(dof: int) -> float:
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = _Z95  # Cornish-Fisher expansion, accurate to 1e-4 beyond 30 degrees of freedom
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


@functools.lru_cache(maxsize=1)
def _smoothed_sqrt_table() -> tuple[Tensor, Tensor]:
    """``E sqrt(max(t + Z, 0))``, ``Z ~ N(0, 1)``, on a grid of ``t`` in [-8, 40]: ``int_0^inf 2 r^2 phi(r^2 - t) dr``
    (``u = r^2``), a smooth integrand, so the trapezoid rule on a fine grid is exact to ~1e-9."""
    t = torch.linspace(-8.0, 40.0, 4801, dtype=torch.float64)
    r = torch.linspace(0.0, 7.5, 3001, dtype=torch.float64)
    means = []
    for part in t.split(400):
        phi = torch.exp(-0.5 * (r[None, :] ** 2 - part[:, None]) ** 2) / math.sqrt(2 * math.pi)
        means.append(torch.trapezoid(2 * r[None, :] ** 2 * phi, r, dim=1))
    return t, torch.cat(means)


def _beta(t: Tensor) -> Tensor:
    """The bias ``beta(t) = E sqrt(max(t + Z, 0)) - sqrt(max(t, 0))`` of the plug-in at ``d / s = t`` (in units of
    ``sqrt(s)``). It rises to its maximum 0.411 at ``t = 0``, falls to its minimum -0.099 near ``t = 1`` and then
    rises towards 0 like the delta method's ``-1 / (8 t^1.5)``, which it follows beyond the table."""
    grid, smooth = _smoothed_sqrt_table()
    t = t.double()
    step = float(grid[1] - grid[0])
    pos = ((t.clamp(grid[0], grid[-1]) - grid[0]) / step).clamp(0, len(grid) - 1 - 1e-9)
    i = pos.floor().long()
    f = pos - i
    inside = smooth[i] * (1 - f) + smooth[i + 1] * f - t.clamp_min(0).sqrt()  # interpolate the smooth part only
    beyond = -0.125 * t.clamp_min(1.0).pow(-1.5)
    return torch.where(t > grid[-1], beyond, torch.where(t < grid[0], torch.zeros_like(t), inside))


@functools.lru_cache(maxsize=1)
def _beta_extrema() -> tuple[float, float, float, float]:
    """``(t, beta)`` at the maximum and at the minimum of ``beta``."""
    fine = torch.linspace(-1.0, 3.0, 40001, dtype=torch.float64)
    b = _beta(fine)
    return float(fine[b.argmax()]), float(b.max()), float(fine[b.argmin()]), float(b.min())


def _bias_range(t_lo: Tensor, t_hi: Tensor) -> tuple[Tensor, Tensor]:
    """Smallest and largest ``beta`` over ``[t_lo, t_hi]``: at an end, or at the interior extremum it contains."""
    t_max, b_max, t_min, b_min = _beta_extrema()
    ends_lo, ends_hi = torch.minimum(_beta(t_lo), _beta(t_hi)), torch.maximum(_beta(t_lo), _beta(t_hi))
    low = torch.where((t_lo <= t_min) & (t_min <= t_hi), torch.full_like(ends_lo, b_min), ends_lo)
    high = torch.where((t_lo <= t_max) & (t_max <= t_hi), torch.full_like(ends_hi, b_max), ends_hi)
    return low, high


def sqrt_sum(est: DiagonalEstimate) -> tuple[float, float | None, dict]:
    """``sum_i sqrt(max(A_ii, 0))`` from a diagonal estimate: ``(value, stderr, info)``.

    Exact diagonals give the exact sum (``stderr = None``). For Hutchinson's estimate, ``value +- 1.96 stderr``
    (``info["interval"]``) is a 95% confidence interval: ``value`` is the plug-in sum corrected by the midpoint of
    the square root's possible bias, and ``stderr`` is the jackknife standard error over the probe groups (scaled
    by the Student t quantile of its few degrees of freedom) plus the half-width of that bias range over 1.96.
    ``info`` also holds the plug-in value, the jackknife standard error, the bias bound and the fraction of
    coordinates the probes leave unresolved (``|x_i| < 3 s_i``): where it is large, the interval is conservative
    and more ``matvecs`` (or the exact diagonal) narrow it.
    """

    def plug_in(d: Tensor) -> Tensor:
        return d.clamp_min(0).sqrt().sum(-1)

    x = est.value.double().cpu()  # the bias table lives on the CPU; these are a few vectors of length dim
    if est.group_means is None:
        return float(plug_in(x)), None, {"interval": (float(plug_in(x)),) * 2}
    s = est.stderr.double().cpu()
    noisy = s > 0  # exact where the probes see no noise (a coordinate that interacts with none)
    t = torch.where(noisy, x / torch.where(noisy, s, torch.ones_like(s)), torch.zeros_like(x))
    low, high = _bias_range(t - _WINDOW, t + _WINDOW)
    root_s = torch.where(noisy, s.sqrt(), torch.zeros_like(s))
    bias_mid = float(((low + high) / 2 * root_s).sum())
    bias_half = float(((high - low) / 2 * root_s).sum())
    gm = est.group_means.double().cpu()
    g = gm.shape[0]
    jack = plug_in((gm.sum(0, keepdim=True) - gm) / (g - 1))  # leave-one-group-out estimates
    jack_se = float(((g - 1) / g * (jack - jack.mean()).pow(2).sum()).sqrt())
    plug = float(plug_in(x))
    value = plug - bias_mid
    half_width = _t975(g - 1) * jack_se + bias_half
    info = {
        "interval": (value - half_width, value + half_width),
        "plug_in": plug,
        "jackknife_stderr": jack_se,
        "bias_bound": bias_half,
        "unresolved": float((noisy & (t.abs() < _WINDOW)).double().mean()),
    }
    return value, half_width / _Z95, info
