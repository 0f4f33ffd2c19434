"""Pictures for TensorBoard: loss landscapes and Hessian eigenvalue densities.

Pictures are drawn on matplotlib Agg canvases (no pyplot, no global backend switch) into ``(H, W, 3)``
``uint8`` arrays, ready for ``SummaryWriter.add_image(tag, image, step, dataformats="HWC")``; densities are
also written as TensorBoard histograms (:func:`log_density`). matplotlib is needed for the images only
(``pip install lightning-sharpness[plots]``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from lightning_sharpness.landscape import Landscape1D, Landscape2D

__all__ = [
    "density_histogram",
    "density_nodes_weights",
    "log_density",
    "plot_density",
    "plot_landscape_1d",
    "plot_landscape_2d",
]


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


def log_density(
    writer: Any, tag: str, result: Any, step: int, mode: Literal["histogram", "image", "both", "none"] = "histogram"
) -> None:
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
