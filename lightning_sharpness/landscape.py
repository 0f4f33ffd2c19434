"""Loss-landscape pictures around the current weights (Li et al., 2018), as image arrays for TensorBoard.

The loss is evaluated on ``w + a d1`` (1-D) or ``w + a d1 + b d2`` (2-D) for random directions ``d1, d2``
that are *filter-normalized*: each filter (output row of a weight) of a direction has the norm of the matching
filter of the weights, so that pictures of differently scaled networks are comparable. Directions of 1-D
parameters (biases, normalization layers) are zero, as in the paper's ``ignore='biasbn'`` setting.

Everything here is side-effect free: the weights are restored bitwise (they are copied back, not subtracted),
buffers too, the global random state is untouched (directions come from a private generator) and modes
are unchanged (evaluate in eval mode by calling ``model.eval()`` first, as the monitor does).
The pictures of these landscapes are drawn by :mod:`lightning_sharpness.plotting`.

Example::

    curve = loss_landscape_1d(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), [(x, y)], steps=21)
    writer.add_image("landscape", plot_landscape_1d(curve), 0, dataformats="HWC")
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_sharpness.batching import as_list, batch_size

__all__ = [
    "Landscape1D",
    "Landscape2D",
    "filter_normalized_direction",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "plot_landscape_1d",
    "plot_landscape_2d",
    "plot_density",
    "density_histogram",
    "density_nodes_weights",
    "log_density",
]

LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass
class Landscape1D:
    """``losses[i]`` is the mean loss at ``w + alphas[i] * d``."""

    alphas: np.ndarray
    losses: np.ndarray


@dataclass
class Landscape2D:
    """``losses[i, j]`` is the mean loss at ``w + alphas[i] * d1 + betas[j] * d2``."""

    alphas: np.ndarray
    betas: np.ndarray
    losses: np.ndarray


def _params(model: nn.Module) -> list[Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"`model` ({type(model).__name__}) has no trainable parameter to move along.")
    return params


def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> list[Tensor]:
    """A Gaussian direction, one tensor per trainable parameter, rescaled filter by filter to the weights' norms.

    Example::

        d = filter_normalized_direction(model, torch.Generator().manual_seed(0))
    """
    direction = []
    for p in _params(model):
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        if p.dim() <= 1:
            d.zero_()
        else:
            w = p.detach().reshape(p.shape[0], -1)
            flat = d.reshape(p.shape[0], -1)
            flat.mul_(w.norm(dim=1, keepdim=True) / (flat.norm(dim=1, keepdim=True) + 1e-10))
        direction.append(d)
    return direction


@contextmanager
def _restored(model: nn.Module, params: Sequence[Tensor]) -> Iterator[list[Tensor]]:
    """Parameters and buffers (BatchNorm statistics of a model in train mode) copied back bitwise on exit."""
    saved = [p.detach().clone() for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
            for b, s in buffers:
                b.copy_(s)


def _mean_loss(model: nn.Module, loss_fn: LossFn, batches: list[Any]) -> float:
    total, count = 0.0, 0
    for batch in batches:
        n = batch_size(batch)
        total += float(loss_fn(model, batch)) * n
        count += n
    return total / count


def _grid(steps: int, span: float) -> np.ndarray:
    if not (isinstance(steps, int) and steps >= 2):
        raise ValueError(f"`steps` must be an integer >= 2, got {steps!r}.")
    if not span > 0:
        raise ValueError(f"`span` must be positive, got {span!r}.")
    return np.linspace(-span, span, steps)


def _evaluate(
    model: nn.Module, loss_fn: LossFn, batches: Any, coords: list[tuple[float, ...]], seed: int
) -> np.ndarray:
    batches = as_list(batches)
    if not batches:
        raise ValueError("`batches` is empty.")
    params = _params(model)
    generator = torch.Generator().manual_seed(seed)
    dims = len(coords[0])
    directions = [filter_normalized_direction(model, generator) for _ in range(dims)]
    out = np.empty(len(coords))
    with torch.no_grad(), _restored(model, params) as origin:
        for i, c in enumerate(coords):
            for j, p in enumerate(params):
                moved = origin[j].clone()
                for k in range(dims):
                    moved.add_(directions[k][j], alpha=c[k])
                p.copy_(moved)
            out[i] = _mean_loss(model, loss_fn, batches)
    return out


def loss_landscape_1d(
    model: nn.Module, loss_fn: LossFn, batches: Any, steps: int = 21, span: float = 1.0, seed: int = 0
) -> Landscape1D:
    """Mean loss along one filter-normalized random direction, at ``steps`` points of ``[-span, span]``.

    Example::

        curve = loss_landscape_1d(model, loss_fn, [(x, y)], steps=11, span=0.5)
        curve.losses[5]  # the loss at the current weights
    """
    alphas = _grid(steps, span)
    return Landscape1D(alphas, _evaluate(model, loss_fn, batches, [(float(a),) for a in alphas], seed))


def loss_landscape_2d(
    model: nn.Module, loss_fn: LossFn, batches: Any, steps: int = 21, span: float = 1.0, seed: int = 0
) -> Landscape2D:
    """Mean loss on the plane of two filter-normalized random directions, a ``steps x steps`` grid.

    Example::

        surface = loss_landscape_2d(model, loss_fn, [(x, y)], steps=11)
        surface.losses.shape  # (11, 11)
    """
    grid = _grid(steps, span)
    coords = [(float(a), float(b)) for a in grid for b in grid]
    losses = _evaluate(model, loss_fn, batches, coords, seed).reshape(steps, steps)
    return Landscape2D(grid, grid.copy(), losses)


# The pictures and the density logging live in :mod:`lightning_sharpness.plotting`; these names stay importable
# from here, where they were first.
from lightning_sharpness.plotting import (  # noqa: E402
    density_histogram,
    density_nodes_weights,
    log_density,
    plot_density,
    plot_landscape_1d,
    plot_landscape_2d,
)
