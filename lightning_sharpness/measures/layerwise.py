"""Curvature per layer: the trace or the top eigenvalue of each diagonal block ``H_gg`` of the Hessian, for groups
of parameters (modules, single parameters, or groups the user names).

Example: on ``L = (3 a^2 + b^2) / 2`` for the two parameters ``a`` and ``b`` of two modules, the blocks are
``[3]`` and ``[1]``, and Hutchinson is exact on a diagonal matrix::

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False))
    >>> loss = lambda m, x: 0.5 * (3 * m[0].weight.pow(2) + m[1].weight.pow(2)).sum() + 0 * x.sum()
    >>> {name: float(est) for name, est in layerwise(model, loss, torch.zeros(1, 1), matvecs=4).items()}
    {'0': 3.0, '1': 1.0}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_sharpness.curvature.operator import HessianOperator, select_named_parameters
from lightning_sharpness.curvature.probes import make_generator
from lightning_sharpness.curvature.trace import hutchinson
from lightning_sharpness.measures.base import Backend, Estimate, LossFn, ProductsSeen, measuring
from lightning_sharpness.measures.spectral import hessian_eigenvalues
from lightning_sharpness.validation import check_choice, check_int

__all__ = ["layerwise"]


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
    measure: Literal["trace", "eigenvalue"] = "trace",
    by: Literal["module", "parameter"] | Mapping[str, Sequence[str]] = "module",
    matvecs: int = 99,
    tol: float = 1e-5,
    seed: int = 0,
    backend: Backend = "auto",
) -> dict[str, Estimate]:
    """Per-module (or per-parameter, or user-grouped) curvature: ``measure="trace"`` gives ``tr(H_gg)`` of each
    diagonal block (they sum to ``tr(H)``), from the same Hutchinson probes for all groups (the per-group parts of
    each probe's ``v^T H v``); ``"eigenvalue"`` the top eigenvalue of each block ``H_gg`` (Lanczos on the block).

    Example::

        layerwise(model, loss_fn, (x, y), measure="eigenvalue", by="module")   # {"0": Estimate, "2": ...}

    Raises:
        ValueError: for another ``measure`` or ``by``, a group naming an unknown or frozen parameter, or
            ``matvecs < 2``.
    """
    check_choice(measure, "measure", ("trace", "eigenvalue"))
    groups = _groups(model, by)
    out: dict[str, Estimate] = {}
    if measure == "eigenvalue":
        for name, members in groups.items():
            res = hessian_eigenvalues(model, loss_fn, batches, k=1, tol=tol, params=members, seed=seed, backend=backend)
            out[name] = res
        return out
    check_int(matvecs, "matvecs", 2)
    with measuring(model):
        op = HessianOperator(model, loss_fn, batches, backend=backend)
        for name, members in groups.items():
            unknown = [n for n in members if n not in op.names]
            if unknown:
                raise ValueError(f"`by`: group {name!r} names unknown or frozen parameters {unknown}.")
        offsets, start = {}, 0
        for n, size in zip(op.names, op.numels):
            offsets[n] = (start, start + size)
            start += size
        parts: dict[str, list[Tensor]] = {name: [] for name in groups}

        def see(V: Tensor, HV: Tensor) -> None:  # V: (dim, probes); the per-coordinate parts of v^T H v
            prod = (V * HV).double()
            for name, members in groups.items():
                parts[name].append(sum(prod[offsets[n][0] : offsets[n][1]].sum(0) for n in members).cpu())

        hutchinson(ProductsSeen(op, see), matvecs, make_generator(seed))
        for name in groups:
            samples = torch.cat(parts[name])
            out[name] = Estimate(float(samples.mean()), float(samples.std() / matvecs**0.5), matvecs, {})
    return out
