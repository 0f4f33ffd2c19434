"""XTrace (Epperly, Tropp & Webber, "XTrace: making the most of every sample in stochastic trace estimation",
SIAM J. Matrix Anal. Appl. 45(1), 2024): Hutch++'s split (the trace of a captured subspace exactly, Hutchinson on
the rest), with every probe used for both parts by leaving it out of its own subspace.

With ``s`` Gaussian probes ``w_1..w_s`` and ``Y = A W = QR``, let ``P_i`` project onto the span of ``Y`` without
its column ``i``. Then ``t_i = tr(P_i A P_i) + (n - r_i) u_i^T A u_i / |u_i|^2`` with ``u_i = (I - P_i) w_i`` and
``r_i = rank P_i`` is unbiased: ``P_i`` does not depend on ``w_i``, and ``u_i / |u_i|`` is uniform on the unit
sphere of the complement, so the scaled quadratic form has expectation ``tr((I - P_i) A (I - P_i))`` (the paper's
"improved" normalization, exact when ``A`` is a multiple of the identity there). ``XTrace = mean_i t_i``.

Everything about ``P_i`` lives in the ``s``-dimensional coordinates of ``Q``: ``Y_{-i} = Q R_{-i}``, so
``P_i = Q M_i Q^T`` with ``M_i`` the projector onto the range of ``R_{-i}``, and with ``H = Q^T A Q``,
``W = Q^T [w_1..w_s]`` and, for a symmetric ``A``, ``Q^T A w_i = R e_i`` (no product beyond ``A W`` and ``A Q``):

* ``tr(P_i A P_i) = tr(M_i H)``,
* ``u_i^T A u_i = w_i^T A w_i - 2 (R e_i)^T M_i W e_i + (M_i W e_i)^T H (M_i W e_i)``, with
  ``w_i^T A w_i = (W e_i)^T (R e_i)``,
* ``|u_i|^2 = |w_i|^2 - (W e_i)^T M_i (W e_i)``.

When ``R`` is invertible ``M_i = I - z_i z_i^T`` with ``z_i`` the normalized column ``i`` of ``R^{-T}`` (the
paper's downdating, all ``i`` at once); when it is numerically singular (``A`` of low rank) ``M_i`` comes from an
SVD of each ``R_{-i}``, which keeps the estimate exact on low-rank matrices instead of dividing by zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_sharpness.curvature.protocol import LinearOperator
from lightning_sharpness.curvature.trace import TraceEstimate, _block, _check_budget, _products, _products_into

__all__ = ["xtrace"]


def _gaussian_rows(k: int, dim: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``k`` standard Gaussian probes as the rows of a ``(k, dim)`` block (drawn on the CPU generator)."""
    return torch.randn(k, dim, generator=generator, dtype=torch.float32).to(dtype=dtype, device=device)


def _rank_tolerance(dtype: torch.dtype, s: int) -> float:
    """Singular values of ``R`` below this fraction of its largest are rounding noise of the products (``Y`` is
    computed in ``dtype``): a few units of rounding per entry, summed over ``s`` columns."""
    return 10.0 * s * torch.finfo(dtype).eps


def _downdated(R: Tensor, W: Tensor, H: Tensor, norms2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For an invertible ``R``: per probe ``tr(M_i H)``, ``u_i^T A u_i``, ``|u_i|^2`` and ``rank M_i`` with
    ``M_i = I - z_i z_i^T``, for all ``i`` at once (``(s,)`` float64 each)."""
    s = R.shape[0]
    eye = torch.eye(s, dtype=R.dtype)
    Z = torch.linalg.solve_triangular(R.T, eye, upper=False)  # R^{-T}: column i is orthogonal to R_{-i}
    Z = Z / Z.norm(dim=0, keepdim=True)
    c = (Z * W).sum(0)  # z_i^T W e_i
    D = W - Z * c  # M_i W e_i, column by column
    trace_part = torch.diagonal(H).sum() - (Z * (H @ Z)).sum(0)
    quad = (W * R).sum(0) - 2 * (R * D).sum(0) + (D * (H @ D)).sum(0)
    left = norms2 - (W * W).sum(0) + c * c
    return trace_part, quad, left, torch.full((s,), s - 1, dtype=R.dtype)


def _by_svd(R: Tensor, W: Tensor, H: Tensor, norms2: Tensor, tol: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The same as :func:`_downdated` for any ``R``: ``M_i`` projects onto the singular vectors of ``R_{-i}`` above
    ``tol`` times its largest singular value (relative to ``R_{-i}``'s own, so ``M_i`` depends on the other probes
    only: the estimate stays unbiased)."""
    s = R.shape[0]
    out = torch.empty(4, s, dtype=R.dtype)
    for i in range(s):
        others = torch.cat([R[:, :i], R[:, i + 1 :]], dim=1)
        U, sigma, _ = torch.linalg.svd(others, full_matrices=False)
        B = U[:, sigma > tol * sigma[0]] if sigma.numel() and sigma[0] > 0 else U[:, :0]
        w, r = W[:, i], R[:, i]
        d = B @ (B.T @ w)
        out[0, i] = torch.trace(B.T @ H @ B)
        out[1, i] = w @ r - 2 * (r @ d) + d @ (H @ d)
        out[2, i] = norms2[i] - w @ d
        out[3, i] = B.shape[1]
    return out[0], out[1], out[2], out[3]


def xtrace(op: LinearOperator, matvecs: int = 50, generator: torch.Generator | None = None) -> TraceEstimate:
    """``tr(A)`` by XTrace with ``matvecs // 2`` Gaussian probes (``A W``, then ``A Q`` on its orthonormal basis).

    Unbiased for any symmetric ``A``; exact (to rounding) when ``A`` has rank below ``matvecs // 2``; on spectra
    dominated by a few eigenvalues its error falls like ``1/matvecs`` (Hutch++'s rate) with a smaller constant, and
    where they do not dominate it stays close to Hutchinson's with the same products. ``stderr`` is the standard
    error of the mean of the ``s`` leave-one-out estimates ``samples`` (the paper's error estimate; they are
    exchangeable, not independent). An operator of at most ``matvecs`` dimensions is traced exactly from ``dim``
    unit vectors.

    Memory beyond the operator's: the ``(s, dim)`` probes, their products and the products' orthonormal basis while
    the QR runs, then the basis and one block of ``op.chunk_size`` products. (Drawing the probes again from the
    generator's state instead of keeping them saves one ``(s, dim)`` block but costs a second Gaussian draw, about a
    fifth of the time outside the products on the 200k-parameter MLP.)

    Raises:
        ValueError: ``matvecs`` is not an int >= 4.

    Example::

        xtrace(op, matvecs=50, generator=torch.Generator().manual_seed(0)).value
    """
    _check_budget(matvecs, 4)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    n = op.dim
    if n <= matvecs:  # as many products as the dimension: the trace itself, exactly
        eye = torch.eye(n, dtype=op.dtype, device=op.device)
        value = float(torch.diagonal(_products(op, eye)).double().sum())
        return TraceEstimate(value, 0.0, n, torch.full((1,), value, dtype=torch.float64))
    s = matvecs // 2
    block = _block(op)
    work = torch.promote_types(op.dtype, torch.float32)  # QR needs float32 at least (no half-precision LAPACK)
    probes = torch.empty(s, n, dtype=op.dtype, device=op.device)
    Y = torch.empty(s, n, dtype=work, device=op.device)
    for start in range(0, s, block):
        rows = slice(start, min(s, start + block))
        probes[rows] = _gaussian_rows(rows.stop - start, n, generator, op.dtype, op.device)
        _products_into(op, probes[rows], Y[rows])
    # |w_i|^2 in the working dtype (BLAS dot products): a float64 copy of the probes took longer than the QR
    norms2 = torch.linalg.vecdot(probes.to(work), probes.to(work)).double().cpu()
    Q, R = torch.linalg.qr(Y.T)  # Y.T is (n, s) column-major: no copy
    del Y
    QT = Q.T.contiguous()  # the basis as rows, the layout of the products (a no-op for LAPACK's column-major Q)
    del Q
    W = (QT @ probes.to(work).T).double().cpu()
    del probes
    H = torch.empty(s, s, dtype=torch.float64)
    Z = torch.empty(min(block, s), n, dtype=work, device=op.device)  # rows of (A Q)^T, one buffer for all blocks
    for start in range(0, s, block):
        rows = QT[start : start + block]
        _products_into(op, rows.to(op.dtype), Z[: rows.shape[0]])
        H[start : start + rows.shape[0]] = (Z[: rows.shape[0]] @ QT.T).double().cpu()
    del QT, Z
    H = (H + H.T) / 2  # symmetric up to the products' rounding
    R = R.double().cpu()
    sigma = torch.linalg.svdvals(R)
    tol = _rank_tolerance(work, s)
    if sigma[-1] > tol * sigma[0]:
        trace_part, quad, left, rank = _downdated(R, W, H, norms2)
    else:
        trace_part, quad, left, rank = _by_svd(R, W, H, norms2, tol)
    residual = torch.where(left > 0, (n - rank) * quad / left.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    samples = trace_part + residual
    return TraceEstimate(float(samples.mean()), float(samples.std() / s**0.5), 2 * s, samples)
