"""Loss-landscape pictures around the current weights (Li et al., 2018), as image arrays for TensorBoard.

The loss is evaluated on ``w + a d1`` (1-D) or ``w + a d1 + b d2`` (2-D) for random directions ``d1, d2``
that are *filter-normalized*: each filter (output row of a weight) of a direction has the norm of the matching
filter of the weights, so that pictures of differently scaled networks are comparable. Directions of 1-D
parameters (biases, normalization layers) are zero, as in the paper's ``ignore='biasbn'`` setting.

Everything here is side-effect free: the weights are restored bitwise (they are copied back, not subtracted),
buffers too, the global random state is untouched (directions come from a private generator) and modes
are unchanged (evaluate in eval mode by calling ``model.eval()`` first, as the monitor does).
Pictures are drawn on matplotlib Agg canvases (no pyplot, no global backend switch) into ``(H, W, 3)``
``uint8`` arrays, ready for ``SummaryWriter.add_image(tag, image, step, dataformats="HWC")``.

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


def _as_list(batches: Any) -> list[Any]:
    if isinstance(batches, (Tensor, tuple, dict)):
        return [batches]
    if isinstance(batches, list) and batches and all(isinstance(b, Tensor) for b in batches):
        return [batches]  # a collated [x, y]
    return list(batches)


def _mean_loss(model: nn.Module, loss_fn: LossFn, batches: list[Any]) -> float:
    total, count = 0.0, 0
    for batch in batches:
        n = _leading(batch)
        total += float(loss_fn(model, batch)) * n
        count += n
    return total / count


def _leading(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    items = batch.values() if isinstance(batch, dict) else batch
    for item in items:
        if isinstance(item, (Tensor, list, tuple, dict)):
            return _leading(item)
    return 1


def _grid(steps: int, span: float) -> np.ndarray:
    if not (isinstance(steps, int) and steps >= 2):
        raise ValueError(f"`steps` must be an integer >= 2, got {steps!r}.")
    if not span > 0:
        raise ValueError(f"`span` must be positive, got {span!r}.")
    return np.linspace(-span, span, steps)


def _evaluate(
    model: nn.Module, loss_fn: LossFn, batches: Any, coords: list[tuple[float, ...]], seed: int
) -> np.ndarray:
    batches = _as_list(batches)
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


# ---------------------------------------------------------------------------------------------- pictures
def _new_figure(size: tuple[float, float] = (4.0, 3.0)) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _to_array(fig: Any) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def plot_landscape_1d(curve: Landscape1D, title: str = "loss along a filter-normalized direction") -> np.ndarray:
    """The curve as an ``(H, W, 3)`` uint8 image."""
    fig, ax = _new_figure()
    ax.plot(curve.alphas, curve.losses, marker="o", markersize=3)
    ax.axvline(0.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("alpha")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _to_array(fig)


def plot_landscape_2d(
    surface: Landscape2D, title: str = "loss on a filter-normalized plane", levels: int = 20
) -> np.ndarray:
    """Contour lines of the surface as an ``(H, W, 3)`` uint8 image."""
    fig, ax = _new_figure((4.0, 3.5))
    b, a = np.meshgrid(surface.betas, surface.alphas)
    contour = ax.contourf(a, b, surface.losses, levels=levels, cmap="viridis")
    ax.contour(a, b, surface.losses, levels=levels, colors="k", linewidths=0.3)
    fig.colorbar(contour, ax=ax)
    ax.plot([0.0], [0.0], "r+")
    ax.set_xlabel("alpha")
    ax.set_ylabel("beta")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _to_array(fig)


# ---------------------------------------------------------------------------------------------- densities
def density_nodes_weights(result: Any) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes and weights (flat, weights summing to 1) of a ``spectral_density`` result."""
    for obj in (result, getattr(result, "density", None)):
        if obj is not None and hasattr(obj, "nodes") and hasattr(obj, "weights"):
            nodes = torch.as_tensor(obj.nodes).detach().double().flatten().cpu().numpy()
            weights = torch.as_tensor(obj.weights).detach().double().flatten().cpu().numpy()
            return nodes, weights
    raise TypeError(f"Cannot read quadrature nodes and weights from a {type(result).__name__}.")


def density_histogram(nodes: np.ndarray, weights: np.ndarray, bins: int = 60, count: float = 1000.0) -> dict[str, Any]:
    """Arguments of ``SummaryWriter.add_histogram_raw`` for a spectral density: ``count`` units of mass.

    Example::

        writer.add_histogram_raw("sharpness/density", global_step=step, **density_histogram(nodes, weights))
    """
    nodes = np.asarray(nodes, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    lo, hi = float(nodes.min()), float(nodes.max())
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    mass, _ = np.histogram(nodes, bins=edges, weights=weights)
    counts = mass * count / max(weights.sum(), 1e-300)
    total = float(counts.sum())
    mean_mass = weights / max(weights.sum(), 1e-300) * count
    return {
        "min": lo,
        "max": float(nodes.max()),
        "num": total,
        "sum": float((mean_mass * nodes).sum()),
        "sum_squares": float((mean_mass * nodes**2).sum()),
        "bucket_limits": edges[1:].tolist(),
        "bucket_counts": counts.tolist(),
    }


def log_density(writer: Any, tag: str, result: Any, step: int, mode: str = "histogram") -> None:
    """Draw a ``spectral_density`` result in TensorBoard as the monitor does: ``<tag>/histogram`` (the
    Histograms and Distributions tabs) and/or ``<tag>/image`` (the smoothed log-density plot).

    Example::

        d = measures.spectral_density(model, loss_fn, batches, probes=2, steps=30)
        log_density(trainer.logger.experiment, "sharpness/spectral_density", d, trainer.global_step)
    """
    if mode not in ("histogram", "image", "both"):
        raise ValueError(f"`mode` must be 'histogram', 'image' or 'both', got {mode!r}.")
    nodes, weights = density_nodes_weights(result)
    if mode in ("histogram", "both"):
        writer.add_histogram_raw(f"{tag}/histogram", global_step=step, **density_histogram(nodes, weights))
    if mode in ("image", "both"):
        writer.add_image(f"{tag}/image", plot_density(nodes, weights), global_step=step, dataformats="HWC")


def plot_density(nodes: np.ndarray, weights: np.ndarray, sigma: float | None = None, points: int = 400) -> np.ndarray:
    """The Gaussian-smoothed eigenvalue density on a log scale (as in PyHessian's figures), an image array."""
    nodes = np.asarray(nodes, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    lo, hi = float(nodes.min()), float(nodes.max())
    width = max(hi - lo, 1e-12)
    sigma = sigma if sigma is not None else width / 100
    grid = np.linspace(lo - 0.05 * width, hi + 0.05 * width, points)
    density = (np.exp(-0.5 * ((grid[:, None] - nodes[None, :]) / sigma) ** 2) @ weights) / (sigma * np.sqrt(2 * np.pi))
    fig, ax = _new_figure()
    ax.semilogy(grid, density + 1e-12)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title("Hessian eigenvalue density (SLQ)", fontsize=9)
    fig.tight_layout()
    return _to_array(fig)
