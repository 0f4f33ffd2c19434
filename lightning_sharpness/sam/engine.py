"""The SAM step in plain PyTorch: configuration, the ascent move and its exact undo.

Both Lightning faces (the :class:`~lightning_sharpness.sam.callback.SAM` callback and the
:class:`~lightning_sharpness.sam.mixin.SAMMixin`) drive this engine; only *how* a loss is computed and
back-propagated differs between them. Variants plug in here as small pieces: a geometry (standard,
adaptive, geodesic), a parameter filter (all, SAM-ON, a mask), a radius schedule, ``m``-sharpness.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Union

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_sharpness.geometry import Geometry, resolve_geometry
from lightning_sharpness.sam.schedules import RhoSchedule, validate_rho
from lightning_sharpness.selection import ParameterFilter, select_parameters, validate_filter

__all__ = ["SAMEngine", "SAMStepStats", "accumulate_sam_gradient", "split_batch"]

RhoLike = Union[float, RhoSchedule]
_BN_UPDATES = ("first", "both")
_MODES = ("local", "global")


@dataclass
class SAMStepStats:
    """What one SAM step observed, summed over micro-batches (divide by their count for means)."""

    loss: Tensor | None = None  # L(w), the loss Lightning's own pass computed
    perturbed_loss: Tensor | None = None  # L(w + e)
    grad_norm: Tensor | None = None  # ||T g|| of the gradient the ascent used
    rho: float = 0.0


class SAMEngine:
    """Configuration and mechanics of the ascent step ``w -> w + e(w)`` shared by the callback and the mixin.

    Args:
        rho: radius of the perturbation, a number or a :class:`RhoSchedule` of the global step.
        geometry: ``"standard"`` (SAM), ``"adaptive"`` (ASAM) or a :class:`Geometry`.
        normalize: ``True`` for ``e = rho T^2 g / ||T g||``; ``False`` for unnormalized SAM, ``e = rho T^2 g``.
        m: chunk size for m-sharpness (each chunk of ``m`` examples is perturbed by its own gradient);
            ``None`` perturbs the whole (micro-)batch at once.
        perturb: which parameters move: ``"all"`` trainable ones, ``"norm"`` layers only (SAM-ON) or a
            predicate ``(name, param) -> bool``.
        bn_update: ``"first"``: running statistics of normalization layers are updated by the ordinary pass
            only (standard practice); ``"both"``: SAM's extra passes update them too.
        mode: ``"local"``: each micro-batch on each device is perturbed by its own gradient;
            ``"global"``: one perturbation from the gradient of the whole effective batch.
    """

    def __init__(
        self,
        rho: RhoLike = 0.05,
        geometry: str | Geometry = "standard",
        normalize: bool = True,
        m: int | None = None,
        perturb: ParameterFilter = "all",
        bn_update: str = "first",
        mode: str = "local",
        eps: float = 1e-12,
    ) -> None:
        if not isinstance(rho, RhoSchedule):
            rho = validate_rho(rho)
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"`m` must be a positive integer or None, got {m!r}.")
        if bn_update not in _BN_UPDATES:
            raise ValueError(f"`bn_update` must be one of {list(_BN_UPDATES)}, got {bn_update!r}.")
        if mode not in _MODES:
            raise ValueError(f"`mode` must be one of {list(_MODES)}, got {mode!r}.")
        if mode == "global" and m is not None:
            raise ValueError(
                "`mode='global'` perturbs with the gradient of the whole effective batch and cannot be combined "
                f"with m-sharpness (`m={m}`); use `mode='local'` with `m`, or drop `m`."
            )
        if not isinstance(normalize, bool):
            raise ValueError(f"`normalize` must be True or False, got {normalize!r}.")
        self.rho = rho
        self.geometry = resolve_geometry(geometry)
        self.normalize = normalize
        self.m = m
        self.perturb_filter = validate_filter(perturb)
        self.bn_update = bn_update
        self.mode = mode
        self.eps = eps
        self._params: list[nn.Parameter] = []
        self._trainable: list[nn.Parameter] = []
        self._norm_layers: list[nn.Module] = []
        self._moved: list[Tensor] = []
        self._saved: list[Tensor] = []

    # ---------------------------------------------------------------- setup
    def bind(self, module: nn.Module, only: Iterable[Tensor] | None = None) -> None:
        """Choose the perturbed parameters of ``module`` (raises if the filter selects none).

        ``only`` restricts everything to the given parameters (those of one optimizer, for the mixin).
        """
        allowed = None if only is None else {id(p) for p in only}
        named = select_parameters(module, self.perturb_filter)
        named = [(n, p) for n, p in named if allowed is None or id(p) in allowed]
        if not named:
            raise ValueError(
                f"`perturb={self.perturb_filter!r}` selects none of the optimizer's parameters; nothing would be "
                "perturbed. Use 'all', 'norm' (normalization layers) or a predicate that matches."
            )
        self.geometry.bind(module, named)
        self._params = [p for _, p in named]
        # Gradients are set aside and released for every trainable parameter, perturbed or not.
        self._trainable = [p for p in module.parameters() if p.requires_grad and (allowed is None or id(p) in allowed)]
        self._norm_layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]

    @property
    def params(self) -> list[nn.Parameter]:
        return self._params

    def rho_at(self, step: int) -> float:
        rho = self.rho(step) if isinstance(self.rho, RhoSchedule) else self.rho
        return validate_rho(rho, f"rho (schedule value at step {step})")

    # ---------------------------------------------------------------- the move and its undo
    def perturb(
        self, rho: float, grad_divisor: float = 1.0, reduce_sq_norm: Callable[[Tensor], Tensor] | None = None
    ) -> Tensor | None:
        """Move the weights to ``w + e`` using their current ``.grad`` as ``grad_divisor * g``.

        The gradient buffers are consumed (turned into ``e`` in place, then released), so the move costs one
        copy of the perturbed parameters: the saved weights that :meth:`restore` writes back bitwise.
        Returns ``||T g||``, or ``None`` (and leaves everything untouched) when the gradient is not finite.
        ``reduce_sq_norm`` sums the squared norm across processes when parameters are sharded (FSDP).
        """
        params = [p for p in self._params if p.grad is not None]
        grads = [p.grad for p in params]
        sq_norm = self.geometry.dual_sq_norm(params, grads)
        if reduce_sq_norm is not None:
            sq_norm = reduce_sq_norm(sq_norm)
        grad_norm = sq_norm.sqrt() / grad_divisor
        if not bool(torch.isfinite(grad_norm)):
            return None
        coefficient = (rho / (grad_norm + self.eps) if self.normalize else rho) / grad_divisor
        with torch.no_grad():
            self._saved = [p.detach().clone() for p in params]
            self.geometry.ascent_(params, grads, coefficient)
            self.geometry.retract_(params, grads)
        for p in self._trainable:
            p.grad = None
        self._moved = params
        return grad_norm

    def restore(self) -> None:
        """Write the weights saved by :meth:`perturb` back (bitwise) and free the copy."""
        with torch.no_grad():
            for p, w in zip(self._moved, self._saved):
                p.copy_(w)
        self._moved, self._saved = [], []

    # ---------------------------------------------------------------- helpers the faces share
    def take_grads(self) -> list[Tensor | None]:
        """Detach the gradients of all trainable parameters (a pointer move, no copy) and leave ``None``."""
        grads = [p.grad for p in self._trainable]
        for p in self._trainable:
            p.grad = None
        return grads

    def put_grads(self, grads: list[Tensor | None]) -> None:
        """Reinstall gradients taken by :meth:`take_grads`; backward then accumulates onto them."""
        for p, g in zip(self._trainable, grads):
            p.grad = g

    @contextmanager
    def frozen_norm_stats(self) -> Iterator[None]:
        """Undo what SAM's extra passes do to running statistics, unless ``bn_update='both'``."""
        if self.bn_update == "both" or not self._norm_layers:
            yield
            return
        snapshot = [[b.clone() for b in m.buffers(recurse=False)] for m in self._norm_layers]
        try:
            yield
        finally:
            with torch.no_grad():
                for m, saved in zip(self._norm_layers, snapshot):
                    for b, s in zip(m.buffers(recurse=False), saved):
                        b.copy_(s)

    def chunks(self, batch: Any) -> list[tuple[Any, float]]:
        """Split ``batch`` into chunks of ``m`` examples with their weights ``|chunk| / |batch|``."""
        return split_batch(batch, self.m)


def accumulate_sam_gradient(
    engine: SAMEngine,
    batch: Any,
    loss_of: Callable[[Any], Tensor],
    backward: Callable[[Tensor], None],
    rho: float,
    grad_divisor: float,
    stash: list[Tensor | None],
    first_grad_ready: bool,
    before_last_perturbed_pass: Callable[[], None] = lambda: None,
    reduce_sq_norm: Callable[[Tensor], Tensor] | None = None,
    perturbed_pass_context: Callable[[], AbstractContextManager] = nullcontext,
) -> SAMStepStats:
    """Add the SAM gradient of ``batch`` to ``stash`` and leave the sum in ``.grad``; the weights end bitwise as
    they started.

    For each chunk of ``engine.m`` examples (the whole batch when ``m`` is None): its gradient ``g`` at ``w``
    (already in ``.grad`` when ``first_grad_ready`` and there is one chunk), the move to ``w + e(g)``, the
    backward of ``|chunk| / |batch| * L(w + e)`` onto the running sum, and the exact undo. ``backward`` must
    scale like the pass that produced ``g`` (``grad_divisor`` is that scale). A non-finite ``g`` is kept in the
    sum, so the step is skipped downstream, but the perturbed pass still runs at ``w`` so that every process of
    a DDP job joins the same all-reduce. ``before_last_perturbed_pass`` lets the caller enable gradient sync;
    ``perturbed_pass_context`` wraps each pass at ``w + e`` (the mixin mutes the module's logging there).
    """
    chunks = engine.chunks(batch)
    stats = SAMStepStats(rho=rho)
    for i, (chunk, weight) in enumerate(chunks):
        if not (first_grad_ready and len(chunks) == 1):
            engine.take_grads()  # a whole-batch gradient from the caller's pass is not this chunk's
            with engine.frozen_norm_stats() if first_grad_ready else nullcontext():
                loss = loss_of(chunk)
                backward(loss)
            stats.loss = _add(stats.loss, loss.detach() * weight)
        grad_norm = engine.perturb(rho, grad_divisor, reduce_sq_norm)
        if grad_norm is None:
            stash = _sum_grads(stash, engine.take_grads())
        else:
            stats.grad_norm = grad_norm
        engine.put_grads(stash)
        if i == len(chunks) - 1:
            before_last_perturbed_pass()
        with engine.frozen_norm_stats(), perturbed_pass_context():
            perturbed = loss_of(chunk)
            backward(perturbed * weight)
        if grad_norm is not None:
            engine.restore()
        stash = engine.take_grads()
        stats.perturbed_loss = _add(stats.perturbed_loss, perturbed.detach() * weight)
    engine.put_grads(stash)
    return stats


def _add(total: Tensor | None, value: Tensor) -> Tensor:
    return value if total is None else total + value


def _sum_grads(a: list[Tensor | None], b: list[Tensor | None]) -> list[Tensor | None]:
    return [x if y is None else y if x is None else x + y for x, y in zip(a, b)]


def _batch_size(batch: Any) -> int:
    sizes = set()
    apply_to_collection(batch, Tensor, lambda t: sizes.add(t.shape[0]) if t.dim() > 0 else None)
    if len(sizes) != 1:
        raise ValueError(
            f"m-sharpness splits a batch along dim 0, but the batch's tensors have first dimensions {sorted(sizes)}; "
            "all tensors of a batch must share their first dimension."
        )
    return sizes.pop()


def split_batch(batch: Any, m: int | None) -> list[tuple[Any, float]]:
    """Chunks of ``m`` examples along dim 0 of every tensor in ``batch``, with weights ``|chunk| / |batch|``.

    When ``m`` does not divide the batch (the last batch of an epoch), the last chunk is smaller and weighs
    proportionally less, so the chunk losses still average to the batch mean. ``m=None`` or ``m >= |batch|``
    gives the batch itself.
    """
    if m is None:
        return [(batch, 1.0)]
    n = _batch_size(batch)
    if m >= n:
        return [(batch, 1.0)]
    starts = range(0, n, m)
    return [
        (apply_to_collection(batch, Tensor, lambda t, s=s: t[s : s + m] if t.dim() > 0 else t), min(m, n - s) / n)
        for s in starts
    ]


def loss_scale(precision_plugin: Any) -> float:
    """The GradScaler's current scale when the precision plugin has an enabled one, else 1."""
    scaler = getattr(precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of every tensor is finite (one reduction per tensor, one host sync)."""
    if not tensors:
        return True
    peaks = [t.detach().abs().amax().float() for t in tensors if t.numel()]
    return not peaks or bool(torch.stack(peaks).isfinite().all())
