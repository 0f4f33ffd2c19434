"""The SAM step in plain PyTorch: configuration, the ascent move and its exact undo.

Both Lightning faces (the :class:`~lightning_sharpness.sam.callback.SAM` callback and the
:class:`~lightning_sharpness.sam.mixin.SAMMixin`) drive this engine; only *how* a loss is computed and
back-propagated differs between them. Variants plug in here as small pieces: a geometry (standard,
adaptive, geodesic), a parameter filter (all, SAM-ON, a mask), a radius schedule, ``m``-sharpness.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_sharpness.batching import count_examples, split_examples
from lightning_sharpness.geometry import Geometry, resolve_geometry
from lightning_sharpness.sam.rng import RNGState
from lightning_sharpness.sam.schedules import RhoSchedule
from lightning_sharpness.sam.variants import SAMVariant
from lightning_sharpness.sam.vectorized import vectorized_sam_step
from lightning_sharpness.selection import ParameterFilter, select_parameters, validate_filter
from lightning_sharpness.validation import check_choice, check_flag, check_int, check_number, check_rho

__all__ = ["SAMEngine", "SAMStepStats", "accumulate_sam_gradient", "split_batch"]

#: Kept for code that imported it from here; the batch contract lives in :mod:`lightning_sharpness.batching`.
split_batch = split_examples

RhoLike = Union[float, RhoSchedule]
BNUpdate = Literal["first", "both"]
Mode = Literal["local", "global"]


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
        perturb: which parameters move: ``"all"``, ``"norm"`` layers only (SAM-ON), a list of parameter names
            or a predicate ``(name, param) -> bool`` (the measures' ``params=`` vocabulary).
        bn_update: ``"first"``: running statistics of normalization layers are updated by the ordinary pass
            only (standard practice); ``"both"``: SAM's extra passes update them too.
        mode: ``"local"``: each micro-batch on each device is perturbed by its own gradient;
            ``"global"``: one perturbation from the gradient of the whole effective batch.
        eps: added to ``||T g||`` before dividing (a zero gradient gives a zero step), a finite number >= 0.
        same_dropout: replay the random state of the pass at ``w`` in the pass at ``w + e``, so that dropout
            (and any other random op) draws the same mask in both; ``False`` (the default, as in the original
            SAM code and davda54/sam) lets the second pass draw new ones. With replay the random state after
            the step is the one the pass at ``w`` left: the replayed pass does not advance it.
        variant: a :class:`~lightning_sharpness.sam.variants.SAMVariant`, the points where a method of the SAM
            family departs from SAM (its ascent direction, how the two gradients combine, whether a step runs
            the second pass, a correction after the optimizer's step); ``None`` is SAM.
        vectorize: with ``m``, compute the per-chunk passes with ``torch.func.vmap``
            (:mod:`lightning_sharpness.sam.vectorized`: two vectorized passes instead of two per chunk, equal to
            the loop to float rounding) from 8 chunks on; what cannot be vmapped (dropout, ``.item()``,
            data-dependent control flow, DDP/FSDP, a non-element-wise geometry, a SAM-family variant) keeps the
            loop, with one warning naming the reason. Off by default: it pays on small models (the 29k-parameter
            digits CNN: 1-SAM 3.8 plain steps instead of 11.0); on a 1.1M-parameter CNN with batch 128 it is level
            with the loop (m=16: 2.75 against 2.88 plain steps, m=4: 4.36 against 4.10; benchmarks/sam_overhead.py).

    Raises:
        ValueError: an argument out of its range, naming it; ``normalize=False`` with a geometry that has no
            unnormalized step (``supports_unnormalized = False``, e.g. ``LinfAdaptiveGeometry``).

    Which parameters move: those the optimizer steps (its param groups, as they are at each step) that
    require a gradient and that ``perturb`` selects. The set is re-read at every step and re-bound only
    when it changed, so parameters unfrozen during fit (``BackboneFinetuning``) are perturbed from the step
    they become trainable.
    """

    def __init__(
        self,
        rho: RhoLike = 0.05,
        geometry: str | Geometry = "standard",
        normalize: bool = True,
        m: int | None = None,
        perturb: ParameterFilter = "all",
        bn_update: BNUpdate = "first",
        mode: Mode = "local",
        eps: float = 1e-12,
        same_dropout: bool = False,
        variant: SAMVariant | None = None,
        vectorize: bool = False,
    ) -> None:
        if variant is not None and not isinstance(variant, SAMVariant):
            raise ValueError(f"`variant` must be a `SAMVariant` or None, got {type(variant).__name__}.")
        if not isinstance(rho, RhoSchedule):
            rho = check_rho(rho)
        if m is not None:
            check_int(m, "m")
        check_choice(bn_update, "bn_update", get_args(BNUpdate))
        check_choice(mode, "mode", get_args(Mode))
        if mode == "global" and m is not None:
            raise ValueError(
                "`mode='global'` perturbs with the gradient of the whole effective batch and cannot be combined "
                f"with m-sharpness (`m={m}`); use `mode='local'` with `m`, or drop `m`."
            )
        check_flag(normalize, "normalize")
        check_flag(same_dropout, "same_dropout")
        check_number(eps, "eps", minimum=0)
        self.rho = rho
        self.geometry = resolve_geometry(geometry)
        # A geometry whose step is its own normalization (l-inf's sign step) says so; refuse before any step.
        if not normalize and not getattr(self.geometry, "supports_unnormalized", True):
            raise ValueError(
                f"`normalize=False` cannot be used with the geometry {self.geometry!r}: its steps have no "
                "unnormalized form. Use `normalize=True` (the default) or another geometry."
            )
        self._bound_geometry = self.geometry
        self.normalize = normalize
        self.m = m
        self.perturb_filter = validate_filter(perturb)
        self.bn_update = bn_update
        self.mode = mode
        self.eps = float(eps)
        self.same_dropout = same_dropout
        self.variant = variant if variant is not None else SAMVariant()
        self.vectorize = check_flag(vectorize, "vectorize")
        self._module: nn.Module | None = None  # the module followed: vectorized m-SAM calls it functionally
        self._params: list[nn.Parameter] = []
        self._trainable: list[nn.Parameter] = []
        self._norm_layers: list[nn.Module] = []
        self._moved: list[Tensor] = []
        self._saved: list[Tensor] = []
        self._binding: tuple | None = None
        self._warned_empty = False

    # ---------------------------------------------------------------- which parameters
    def check_filter(self, module: nn.Module) -> None:
        """Raise before training if ``perturb`` selects no parameter of ``module`` at all (frozen ones count:
        they may be unfrozen later), so that a typo cannot silently turn SAM into plain training."""
        select_parameters(module, self.perturb_filter, trainable_only=False)

    def follow(self, module: nn.Module, optimizer: torch.optim.Optimizer, grads_of: str = "module") -> None:
        """Bind to the parameters ``optimizer`` steps that require a gradient, re-binding only when that set
        changed since the last call (a tuple comparison per step).

        ``grads_of``: whose gradients the step sets aside and sums, ``"module"`` (every trainable parameter of
        the module: the callback, where Lightning's backward reaches all of them) or ``"optimizer"`` (its own
        parameters only: the mixin, where each optimizer's step must leave the others' gradients alone).
        """
        self._module = module
        follow_optimizer = getattr(self.rho, "follow_optimizer", None)
        if follow_optimizer is not None:  # a radius that reads the optimizer (GSAM's follows its learning rate)
            follow_optimizer(optimizer)
        stepped = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        key = (tuple(map(id, stepped)),)
        if grads_of == "module":
            key += (tuple(id(p) for p in module.parameters() if p.requires_grad),)
        if key == self._binding:
            return
        self._binding = key
        allowed = {id(p) for p in stepped}
        named = select_parameters(module, self.perturb_filter, trainable_only=False)
        named = [(n, p) for n, p in named if id(p) in allowed]
        if not named and not self._warned_empty:
            self._warned_empty = True
            rank_zero_warn(
                f"SAM: no parameter is trainable, held by the optimizer and selected by `perturb="
                f"{self.perturb_filter!r}` now; until one is, SAM's step is a plain gradient step."
            )
        # The geometry bound to these parameters takes the steps (a geometry with structure, the geodesic
        # one, records the attention heads there); ``None`` from an older geometry means it bound itself.
        self._bound_geometry = self.geometry.bind(module, named) or self.geometry
        self._params = [p for _, p in named]
        self._trainable = stepped if grads_of == "optimizer" else [p for p in module.parameters() if p.requires_grad]
        self._norm_layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
        self.variant.bind(self._trainable)

    def rho_at(self, step: int) -> float:
        """The radius at ``step``, counted from the first step SAM runs (0 at that step)."""
        rho = self.rho(step) if isinstance(self.rho, RhoSchedule) else self.rho
        return check_rho(rho, f"rho (schedule value at step {step})")

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
        grad_norm = self._bound_geometry.normalized_step_(
            params, grads, rho, self.normalize, self.eps, grad_divisor=grad_divisor, reduce_sq_norm=reduce_sq_norm
        )
        if grad_norm is None:
            return None
        with torch.no_grad():
            self._saved = [p.detach().clone() for p in params]
            self._bound_geometry.retract_(params, grads)
        for p in self._trainable:
            p.grad = None
        self._moved = params
        return grad_norm

    @property
    def perturbed(self) -> bool:
        """Whether the weights are at ``w + e`` now (between :meth:`perturb` and :meth:`restore`)."""
        return bool(self._moved)

    def restore(self) -> None:
        """Write the weights saved by :meth:`perturb` back (bitwise) and free the copy; a no-op when nothing
        is moved, so that every exit path can call it."""
        with torch.no_grad():
            for p, w in zip(self._moved, self._saved):
                p.copy_(w)
        self._moved, self._saved = [], []

    # ---------------------------------------------------------------- helpers the faces share
    def current_grads(self) -> list[Tensor | None]:
        """The gradients of all trainable parameters, as they are (no copy)."""
        return [p.grad for p in self._trainable]

    def gradient_copies(self) -> list[Tensor | None]:
        """Copies of the gradients of all trainable parameters (a variant that combines keeps ``g_w``)."""
        return [None if p.grad is None else p.grad.detach().clone() for p in self._trainable]

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
        return split_examples(batch, self.m)

    def rng_state(self) -> RNGState | None:
        """The random state to replay in a perturbed pass (``same_dropout``), or ``None``."""
        if not self.same_dropout:
            return None
        return RNGState.capture(self._params[0].device if self._params else torch.device("cpu"))


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
    first_pass_rng: RNGState | None = None,
) -> SAMStepStats:
    """Add the SAM gradient of ``batch`` to ``stash`` and leave the sum in ``.grad``; the weights end bitwise as
    they started, on every exit path (an exception or a ``KeyboardInterrupt`` in a perturbed pass included).

    For each chunk of ``engine.m`` examples (the whole batch when ``m`` is None): its gradient ``g`` at ``w``
    (already in ``.grad`` when ``first_grad_ready`` and there is one chunk), the move to ``w + e(g)``, the
    backward of ``|chunk| / |batch| * L(w + e)`` onto the running sum, and the exact undo. ``backward`` must
    scale like the pass that produced ``g`` (``grad_divisor`` is that scale). A non-finite ``g`` is kept in the
    sum, so the step is skipped downstream, but the perturbed pass still runs at ``w`` so that every process of
    a DDP job joins the same all-reduce. ``before_last_perturbed_pass`` lets the caller enable gradient sync;
    ``perturbed_pass_context`` wraps each pass at ``w + e`` (the mixin mutes the module's logging there);
    ``first_pass_rng`` is the random state the caller's own pass at ``w`` started from (``same_dropout``).
    """
    if engine.vectorize and engine._module is not None and type(engine.variant) is SAMVariant:
        # m-SAM's per-chunk passes as two vmapped passes; None (nothing touched) where the loop must run.
        vectorized = vectorized_sam_step(
            engine,
            engine._module,
            batch,
            loss_of,
            backward,
            rho,
            grad_divisor,
            stash,
            first_grad_ready,
            pass_context=perturbed_pass_context,
        )
        if vectorized is not None:
            return vectorized
    chunks = engine.chunks(batch)
    stats = SAMStepStats(rho=rho)
    variant = engine.variant
    for i, (chunk, weight) in enumerate(chunks):
        rng = first_pass_rng
        if not (first_grad_ready and len(chunks) == 1):
            engine.take_grads()  # a whole-batch gradient from the caller's pass is not this chunk's
            rng = engine.rng_state()
            with engine.frozen_norm_stats() if first_grad_ready else nullcontext(), _explain_tiny_chunk(chunk, batch):
                loss = loss_of(chunk)
                backward(loss)
            stats.loss = _add(stats.loss, loss.detach() * weight)
        # A variant that combines the two gradients keeps g_w and receives this chunk's g_p alone.
        first = engine.gradient_copies() if variant.combines else None
        variant.ascent_(engine.current_grads(), grad_divisor, weight)
        grad_norm = engine.perturb(rho, grad_divisor, reduce_sq_norm)
        try:
            if grad_norm is None:
                stash = _sum_grads(stash, engine.take_grads())
            else:
                stats.grad_norm = grad_norm
            engine.put_grads(stash if first is None else [None] * len(stash))
            if i == len(chunks) - 1:
                before_last_perturbed_pass()
            with engine.frozen_norm_stats(), perturbed_pass_context(), RNGState.replaying(rng):
                perturbed = loss_of(chunk)
                backward(perturbed * weight if first is None else perturbed)
        finally:
            engine.restore()
        if first is None:
            stash = engine.take_grads()
        else:
            own = engine.take_grads()
            variant.combine_(first, own, grad_divisor, weight)
            stash = _sum_grads(stash, [None if g is None else g * weight if weight != 1.0 else g for g in own])
        stats.perturbed_loss = _add(stats.perturbed_loss, perturbed.detach() * weight)
    variant.count_micro_batch()
    engine.put_grads(stash)
    return stats


@contextmanager
def _explain_tiny_chunk(chunk: Any, batch: Any) -> Iterator[None]:
    """Turn torch's BatchNorm error on a one-example chunk into one that says where the chunk came from."""
    try:
        yield
    except ValueError as err:
        if "Expected more than 1 value per channel" not in str(err):
            raise
        raise ValueError(
            f"m-sharpness gave a chunk of {_examples(chunk)} example out of a batch of {_examples(batch)}, and "
            "BatchNorm in training mode cannot normalize one value per channel. Choose `m` >= 2 that divides the "
            "batch size (a last, shorter chunk of 1 comes from a batch size that leaves a remainder of 1: set "
            "`drop_last=True` or change the batch size), or use a normalization without batch statistics."
        ) from err


def _examples(batch: Any) -> int | str:
    try:
        return count_examples(batch)
    except ValueError:
        return "?"


def _add(total: Tensor | None, value: Tensor) -> Tensor:
    return value if total is None else total + value


def _sum_grads(a: list[Tensor | None], b: list[Tensor | None]) -> list[Tensor | None]:
    return [x if y is None else y if x is None else x + y for x, y in zip(a, b)]


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
