"""Perturbation measures: how much the loss rises when the weights move within a ball of radius ``rho`` of a
geometry, at worst (an APGD-style projected ascent, Croce & Hein 2020) or on average (Monte Carlo).

The geometry (:mod:`lightning_sharpness.geometry`) defines the ball, the normalized step and the retraction; the
same object gives SAM's ascent step, so every geometry is a SAM variant and a measure at once.

Example: on ``L(w) = |w|^2 / 2`` at ``w = 0`` the worst point of the ``rho``-ball is on its sphere, ``rho^2 / 2``
above, and a first-order ascent from a random start reaches it::

    >>> import torch
    >>> model = torch.nn.Linear(2, 1, bias=False)
    >>> _ = torch.nn.init.zeros_(model.weight)
    >>> bowl = lambda m, x: 0.5 * m.weight.pow(2).sum() + 0 * x.sum()
    >>> round(float(worst_case_sharpness(model, bowl, torch.zeros(1, 2), rho=0.1)), 6)
    0.005
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_sharpness.batching import split_batch
from lightning_sharpness.curvature.operator import HessianOperator, ParamSelection, select_named_parameters
from lightning_sharpness.curvature.probes import make_generator
from lightning_sharpness.geometry import Geometry, GeometryName, Norm, resolve_geometry
from lightning_sharpness.measures.base import LossFn, PerturbationResult, finite_loss, measuring
from lightning_sharpness.measures.registry import register
from lightning_sharpness.validation import check_choice, check_int, check_rho

__all__ = ["average_case_sharpness", "worst_case_sharpness"]


def _perturbed_setup(
    model: nn.Module, loss_fn: LossFn, batches: Any, rho: Any, geometry: str | Geometry, norm: str, params
) -> tuple[HessianOperator, Geometry, list[Tensor], float]:
    rho = check_rho(rho)
    geo = resolve_geometry(geometry)
    if not isinstance(norm, str):
        raise ValueError(f"`norm` must be 'l2' or 'linf', got {norm!r}.")
    geo.check_norm(norm)
    op = HessianOperator(model, loss_fn, batches, params=params)
    named = select_named_parameters(model, params)
    geo = geo.bind(model, named) or geo  # the geometry bound to these parameters (``None``: an older one bound itself)
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
        return finite_loss(float(v), f"at a perturbed point (rho={rho})"), [t.detach() for t in g]

    base = finite_loss(float(op.loss_at(base_vals, chunk)), "at the model's weights")
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
        else:  # the normalized step SAM takes too: size T^2 g / ||T g||
            dual = geo.normalized_step_(params, d, size, eps=0.0)
            if dual is None or float(dual) == 0:
                return [t.clone() for t in x]
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


@register(
    # m-sharpness is a mean over chunks, each from its own seeded starts: shards add up to the whole set
    mean_over_examples=lambda o: o["m"] is not None,
    sizes=lambda o, dim: [("steps", o["steps"], 1), ("restarts", o["restarts"], 1)],
    # each start scouts steps // 5 ascent steps, the best climbs steps more
    cost=lambda o, dim: {
        "grad": o["steps"] + (o["restarts"] * (o["steps"] // 5) if o["restarts"] > 1 else 0),
        "forward": 1,
    },
)
def worst_case_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    rho: float,
    geometry: GeometryName | Geometry = "standard",
    norm: Norm = "l2",
    m: int | None = None,
    steps: int = 20,
    step_size: float | None = None,
    init: Literal["random", "zero"] = "random",
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

    Raises:
        ValueError: for a negative ``rho``, a ``norm`` the geometry does not define, another ``init``, ``steps``,
            ``restarts`` or ``m`` below 1, ``m`` not dividing a batch, or ``step_size <= 0``.
        NonFiniteLossError: when the loss is NaN or infinite, naming the measure and the batch.
    """
    check_choice(init, "init", ("random", "zero"))
    check_int(steps, "steps")
    check_int(restarts, "restarts")
    if m is not None:
        check_int(m, "m")
    with measuring(model):
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


@register(
    mean_over_examples=True,
    sizes=lambda o, dim: [("samples", o["samples"], 2)],
    cost=lambda o, dim: {"forward": o["samples"] + 1},
)
def average_case_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    rho: float,
    geometry: GeometryName | Geometry = "adaptive",
    norm: Norm = "l2",
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

    Raises:
        ValueError: for a negative ``rho``, a ``norm`` the geometry does not define, or ``samples < 2``.
        NonFiniteLossError: when the loss is NaN or infinite, naming the measure and the batch.
    """
    check_int(samples, "samples", 2)
    with measuring(model):
        op, geo, params, rho = _perturbed_setup(model, loss_fn, batches, rho, geometry, norm, params)
        generator = make_generator(seed)
        joint = _Joint(op, list(zip(op.batches, op.weights)))
        base = finite_loss(float(joint.loss_at([p.detach() for p in params], None)), "at the model's weights")
        values = []
        for _ in range(samples):
            xi = [t.mul_(rho) for t in geo.sample(params, generator, norm)]
            perturbed = float(joint.loss_at(geo.retract(params, xi), None))
            values.append(finite_loss(perturbed, f"at a perturbed point (rho={rho})") - base)
    per = torch.tensor(values, dtype=torch.float64)
    return PerturbationResult(
        float(per.mean()),
        float(per.std() / samples**0.5),
        0,
        {"geometry": geo.name, "norm": norm, "rho": rho},
        per_chunk=per,
        base_loss=base,
    )
