"""m-sharpness without a Python loop over chunks: the per-chunk passes of m-SAM vectorized with ``torch.func``.

m-SAM perturbs each chunk ``c_i`` of ``m`` examples by its own gradient. The engine's loop
(:func:`~lightning_sharpness.sam.engine.accumulate_sam_gradient`) runs, per chunk, a forward-backward at
``w`` for ``g_i``, the move to ``w + e_i`` with ``e_i = rho T^2 g_i / (||T g_i|| + eps)``, a forward-backward
of ``|c_i| / n * L_i(w + e_i)`` and the undo: ``2 n / m`` small passes per step, dominated by per-pass
overhead when ``m`` is small. Here the same quantities come from two vectorized passes per slice of chunks:

1. the loss vmapped over the chunks and over ``w`` expanded along a chunk dimension, and ``autograd.grad`` of the
   sum with respect to that expanded leaf: every ``g_i`` at once (no ``.grad`` touched);
2. the perturbed weights ``W_i = w + e_i`` stacked along a chunk dimension, ``vmap`` of the loss over
   ``(W_i, c_i)`` and ONE real backward of ``sum_i |c_i| / n * L_i(W_i)`` through the caller's ``backward``
   (precision plugin, GradScaler, ``manual_backward``). Since ``W_i = w + e_i`` with ``e_i`` detached, the
   backward of the broadcast add sums the per-chunk gradients into ``w.grad``: exactly the loop's sum, in
   the loop's scale, accumulated onto whatever ``.grad`` held (the caller's stash).

Equal to the loop (to float rounding) when the geometry is element-wise (``T`` depends on one weight: the
standard and adaptive geometries; anything that overrides more than :meth:`Geometry.scale` falls back).
BatchNorm in training mode normalizes each chunk by its own batch statistics, as in the loop. Its running
statistics stay bitwise unchanged where the loop's passes leave them so (the callback with
``bn_update="first"``); where the loop's passes update them chunk by chunk (the mixin's passes at ``w``,
``bn_update="both"``), the same updates are replayed afterwards in the loop's order, from the per-chunk batch
statistics the vmapped passes record (equal to float rounding; ``num_batches_tracked`` exactly).

What cannot be vmapped runs the loop instead: :func:`vectorized_msam_gradient` returns ``None`` and warns once
per module, naming it and the reason. That covers data-dependent control flow, ``.item()``, in-place updates of
buffers, random ops (dropout: the loop's random stream cannot be reproduced inside ``vmap``), batches with
fields that are not tensors, losses that are not one number, and a non-element-wise geometry. A
``training_step`` that logs or updates torchmetrics metrics does vectorize when the loss runs under
:func:`lightning_sharpness._lightning.quiet` (the callback's loss does): logging is a no-op there, torchmetrics
assigns its states (no in-place update) and ``quiet`` puts them back. Anything else the loss stores on the module
(``self.last_logits = ...``) would be a tensor of ``vmap``'s, meaningless outside it: ``pass_context`` must undo
such side effects, as ``quiet`` does for logging and metrics.

Under an initialized process group (DDP, FSDP) it always returns ``None``: its passes call the module
functionally, never through the DDP wrapper's ``forward``, so DDP's reducer would not expect the backward's
gradient hooks and would silently skip the all-reduce. The engine keeps the loop there.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.func import functional_call, vmap

from lightning_sharpness.batching import count_examples
from lightning_sharpness.geometry import Geometry
from lightning_sharpness.validation import check_choice, check_flag, check_int, check_number

if TYPE_CHECKING:
    from lightning_sharpness.sam.engine import SAMEngine, SAMStepStats

__all__ = [
    "ChunkStats",
    "DEFAULT_MAX_MEMORY",
    "DEFAULT_MIN_CHUNKS",
    "vectorizable_geometry",
    "vectorized_msam_gradient",
    "vectorized_sam_step",
]

#: Bytes of per-chunk parameter-sized tensors one slice of chunks may hold (see ``max_memory``).
DEFAULT_MAX_MEMORY = 1 << 30

#: Fewer chunks than this run the loop (see ``min_chunks``).
DEFAULT_MIN_CHUNKS = 8

#: Which of the loop's passes update BatchNorm running statistics (see ``norm_stats``).
NormStats = Literal["frozen", "at_w", "both"]

#: Per recorded BatchNorm call, in call order: the layers, the batch means and variances ([chunks, channels]).
_BatchStats = tuple[list[nn.Module], list[Tensor], list[Tensor]]

#: The methods a geometry may not override to be vectorized: all its vector operations are then the base
#: class's element-wise ones, parametrized by :meth:`Geometry.scale` only.
_ELEMENTWISE_METHODS = ("bind", "dual_sq_norm", "ascent_", "normalized_step_", "retract_")


@dataclass
class ChunkStats:
    """Per-chunk values of one vectorized m-SAM step, in chunk order (the short last chunk last).

    ``losses``: ``L_i(w)``; ``perturbed_losses``: ``L_i(w + e_i)``; ``grad_norms``: ``||T g_i||`` (unscaled:
    ``grad_divisor`` is divided out); ``weights``: ``|c_i| / n``.
    """

    losses: Tensor
    perturbed_losses: Tensor
    grad_norms: Tensor
    weights: Tensor

    @property
    def loss(self) -> Tensor:
        """``sum_i |c_i| / n * L_i(w)``: the batch loss at ``w``, as the loop's ``SAMStepStats.loss``."""
        return (self.losses * self.weights).sum()

    @property
    def perturbed_loss(self) -> Tensor:
        """``sum_i |c_i| / n * L_i(w + e_i)``, as the loop's ``SAMStepStats.perturbed_loss``."""
        return (self.perturbed_losses * self.weights).sum()

    @property
    def grad_norm(self) -> Tensor:
        """The last chunk's ``||T g||``: what the loop's ``SAMStepStats.grad_norm`` holds after its last chunk."""
        return self.grad_norms[-1]


class _CannotVectorize(Exception):
    """A reason, found before any gradient was written, to run the loop instead."""


def vectorizable_geometry(geometry: Geometry) -> bool:
    """Whether ``geometry`` is element-wise: it overrides none of the vector methods, only ``scale``."""
    cls = type(geometry)
    return all(getattr(cls, name) is getattr(Geometry, name) for name in _ELEMENTWISE_METHODS)


def vectorized_msam_gradient(
    module: nn.Module,
    loss_of_chunk: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    m: int,
    rho: float,
    geometry: Geometry,
    params: Sequence[nn.Parameter],
    backward: Callable[[Tensor], None],
    normalize: bool = True,
    eps: float = 1e-12,
    grad_divisor: float = 1.0,
    norm_stats: NormStats = "frozen",
    max_memory: int = DEFAULT_MAX_MEMORY,
    pass_context: Callable[[], AbstractContextManager] = nullcontext,
    min_chunks: int = DEFAULT_MIN_CHUNKS,
) -> ChunkStats | None:
    """Add the m-SAM gradient of ``batch`` to ``.grad`` with two vectorized passes per slice of chunks, or return
    ``None``, having written nothing, when the loop must do it.

    Adds ``grad_divisor * sum_i |c_i| / n * grad L_i(w + e_i)`` to the ``.grad`` of every parameter the loss
    reaches (``backward`` accumulates, as in the loop), where ``c_i`` are the chunks of ``m`` consecutive
    examples (a last, shorter chunk weighs less) and ``e_i = rho T^2 g_i / (||T g_i|| + eps)``
    (``normalize=False``: ``rho T^2 g_i``) moves ``params`` only. The weights are never modified.

    Args:
        module: the module whose parameters the loss uses (the LightningModule in the callback).
        loss_of_chunk: ``(module, chunk) -> 0-dim loss``. It may ignore its first argument and reach the
            module another way (``trainer.strategy.training_step``): the parameters are swapped on the module
            object itself for the duration of each pass.
        batch: the batch, a nest of dicts, tuples and lists whose per-example fields are tensors.
        m: chunk size, an int >= 1.
        rho: the radius; ``geometry``, ``normalize``, ``eps``: the engine's (its bound geometry).
        params: the perturbed parameters (``SAMEngine._params``), parameters of ``module``.
        backward: back-propagates a loss as the loop's ``backward`` does: ``.grad += grad_divisor * dloss/dw``.
        grad_divisor: the scale of ``backward`` (a GradScaler's scale over the accumulation steps): the pass at
            ``w`` is scaled the same way, so fp16 gradients underflow exactly where the loop's would.
        norm_stats: which of the loop's passes update BatchNorm running statistics, replayed here in the loop's
            order (chunk by chunk, each from its chunk's batch statistics): ``"frozen"`` none (the callback with
            ``bn_update="first"``: they stay bitwise unchanged), ``"at_w"`` the passes at ``w`` (the mixin with
            ``bn_update="first"``), ``"both"`` every pass (``bn_update="both"``).
        max_memory: bytes of per-chunk parameter-sized tensors (gradient and step, perturbed weights, their
            gradient, autograd's buffers: about four copies of ``params`` per chunk) held at once; chunks are
            processed in slices that fit. Activations of a slice are those of at most one batch, as in a plain
            step (the vmapped kernels add some working memory of their own).
        min_chunks: below this many chunks the loop is as fast (measured on CPU: the digits CNN, 4 chunks
            take the loop's time, 8 chunks 0.77 of it, 64 chunks a third): return ``None``, silently.
        pass_context: entered around every vectorized pass, and must undo what the loss does to the module
            (:func:`~lightning_sharpness._lightning.quiet`: logging muted, metrics put back). Unlike the loop,
            which mutes the passes at ``w + e`` only, the passes at ``w`` are inside ``vmap`` too.

    Returns:
        The per-chunk statistics, or ``None`` when the step must run the loop (warned once per module
        and reason, except a non-finite gradient, which is a property of the step rather than of the module).

    Raises:
        ValueError: naming the argument, for ``m``, ``max_memory`` or ``min_chunks`` not an int >= 1, ``rho`` or
            ``eps`` not a finite number >= 0, ``grad_divisor`` not a finite number > 0, ``normalize`` not a
            bool, ``norm_stats`` not one of its choices; and ``count_examples``'s error for a batch whose per-example
            fields disagree in length (the loop would raise it too).
    """
    check_int(m, "m")
    check_number(rho, "rho", minimum=0)
    check_number(eps, "eps", minimum=0)
    check_number(grad_divisor, "grad_divisor", minimum=0, strict=True)
    check_flag(normalize, "normalize")
    check_choice(norm_stats, "norm_stats", get_args(NormStats))
    check_int(max_memory, "max_memory")
    check_int(min_chunks, "min_chunks")
    if -(-count_examples(batch) // m) < min_chunks:
        return None
    try:
        plan = _plan(module, loss_of_chunk, batch, m, geometry, params)
    except _CannotVectorize as why:
        _refuse(module, str(why))
        return None
    if plan.signature in _refused_signatures(module):
        return None
    slices = list(plan.slices(max_memory))
    # One slice: its pass at w runs before anything is written. Several: the gradients are copied first (one
    # copy of the trainable parameters), so that a failure in a later slice can still hand the step, untouched,
    # to the loop.
    saved = _save_grads(module) if len(slices) > 1 else None
    results, updates = [], []
    with _batch_statistics_only(module) as layers:
        plan.record = layers if norm_stats != "frozen" else []
        for chunks, weights in slices:
            try:
                g, losses, norms, at_w = _first_pass(plan, chunks, grad_divisor, pass_context)
                steps = _ascent_steps(plan, g, norms, rho, normalize, eps, grad_divisor)
                total, perturbed, at_moved = _perturbed_losses(plan, chunks, steps, weights, pass_context)
            except _NonFinite:
                _restore_grads(saved)
                return None  # the loop handles an overflowing step (a GradScaler backs off): nothing to remember
            except Exception as err:  # noqa: BLE001 - a failure under vmap means: run the loop (it raises real errors)
                _restore_grads(saved)
                _refused_signatures(module).add(plan.signature)
                _refuse(module, f"{type(err).__name__}: {_first_line(err)}")
                return None
            del g, steps
            backward(total)
            del total
            results.append((losses, perturbed, norms, weights))
            updates.append((at_w, at_moved if norm_stats == "both" else None))
    for at_w, at_moved in updates:  # only now: a slice that failed above leaves the statistics untouched
        _replay_running_stats(at_w, at_moved)
    losses, perturbed, norms, weights = (torch.cat(column) for column in zip(*results))
    return ChunkStats(losses=losses, perturbed_losses=perturbed, grad_norms=norms, weights=weights.to(losses))


def _save_grads(module: nn.Module) -> list[tuple[nn.Parameter, Tensor | None]]:
    return [(p, None if p.grad is None else p.grad.clone()) for p in module.parameters() if p.requires_grad]


def _restore_grads(saved: list[tuple[nn.Parameter, Tensor | None]] | None) -> None:
    for p, g in saved or []:
        p.grad = g


def vectorized_sam_step(
    engine: SAMEngine,
    module: nn.Module,
    batch: Any,
    loss_of: Callable[[Any], Tensor],
    backward: Callable[[Tensor], None],
    rho: float,
    grad_divisor: float,
    stash: list[Tensor | None],
    first_grad_ready: bool,
    pass_context: Callable[[], AbstractContextManager] = nullcontext,
    max_memory: int = DEFAULT_MAX_MEMORY,
    min_chunks: int = DEFAULT_MIN_CHUNKS,
) -> SAMStepStats | None:
    """:func:`~lightning_sharpness.sam.engine.accumulate_sam_gradient`'s contract for ``engine.m`` chunks,
    vectorized: the SAM gradient of ``batch`` added to ``stash`` and left in ``.grad``, and the loop's statistics.

    The arguments are ``accumulate_sam_gradient``'s (``module``: the one ``engine`` follows;
    ``pass_context``: its ``perturbed_pass_context``, entered around every vectorized pass). Returns ``None``,
    with ``.grad`` and ``stash`` as they came, when the loop must run: no ``m`` or one chunk (the loop reuses
    the caller's gradient there), or whatever :func:`vectorized_msam_gradient` refuses.
    """
    from lightning_sharpness.sam.engine import SAMStepStats  # the engine imports this module

    if engine.m is None or count_examples(batch) <= engine.m:
        return None
    held = engine.take_grads()  # with first_grad_ready, the caller's whole-batch gradient: not a chunk's
    engine.put_grads(stash)
    chunks = vectorized_msam_gradient(
        module,
        lambda _module, chunk: loss_of(chunk),
        batch,
        engine.m,
        rho,
        engine._bound_geometry,
        engine._params,
        backward,
        normalize=engine.normalize,
        eps=engine.eps,
        grad_divisor=grad_divisor,
        norm_stats="both" if engine.bn_update == "both" else "frozen" if first_grad_ready else "at_w",
        max_memory=max_memory,
        pass_context=pass_context,
        min_chunks=min_chunks,
    )
    if chunks is None:
        engine.take_grads()  # the stash, untouched
        engine.put_grads(held)
        return None
    return SAMStepStats(loss=chunks.loss, perturbed_loss=chunks.perturbed_loss, grad_norm=chunks.grad_norm, rho=rho)


# ---------------------------------------------------------------- what is vectorized, and how it is cut
class _Plan:
    """The chunks of one batch stacked along a leading chunk dimension, and the functional loss of one chunk."""

    def __init__(self, module, loss_of_chunk, leaves, rebuild, n, m, geometry, names, params) -> None:
        self.call = _ChunkLoss(module, loss_of_chunk, rebuild)
        self.names = ["module." + name for name in names]  # as the wrapper _ChunkLoss names them
        self.params = list(params)
        self.scales = [geometry.scale(p) for p in self.params]
        self.full = n // m
        self.m = m
        self.n = n
        short = n - self.full * m
        # Full chunks: a view [K, m, ...] of each per-example field; a short last chunk is its own group [1, r, ...].
        self.groups = []
        if self.full:
            self.groups.append([leaf[: self.full * m].reshape(self.full, m, *leaf.shape[1:]) for leaf in leaves])
        if short:
            self.groups.append([leaf[self.full * m :].unsqueeze(0) for leaf in leaves])
        shapes = tuple(tuple(leaf.shape) for group in self.groups for leaf in group)
        self.signature = (shapes, tuple(self.names))
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.params)
        self.record: list[nn.Module] = []  # the BatchNorm layers whose batch statistics the passes return

    def slices(self, max_memory: int):
        """``(chunks, weights)`` per slice: at most ``max_memory // (4 * param bytes)`` chunks, one group each."""
        per_slice = max(1, max_memory // max(1, 4 * self.param_bytes))
        for group in self.groups:
            count, size = group[0].shape[0], group[0].shape[1]
            for start in range(0, count, per_slice):
                stop = min(start + per_slice, count)
                weights = torch.full((stop - start,), size / self.n)
                yield [leaf[start:stop] for leaf in group], weights


class _ChunkLoss(nn.Module):
    """``forward(chunk leaves) = loss_of_chunk(module, chunk)``: a module so that ``functional_call`` swaps
    ``module``'s parameters (on the module object itself) for the duration of the call."""

    def __init__(self, module: nn.Module, loss_of_chunk: Callable, rebuild: Callable) -> None:
        super().__init__()
        self.module = module
        self._loss_of_chunk = loss_of_chunk
        self._rebuild = rebuild

    def forward(self, leaves: list[Tensor]) -> Tensor:
        loss = self._loss_of_chunk(self.module, self._rebuild(leaves))
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise _CannotVectorize(f"the loss of a chunk is {_describe(loss)}, not a single number")
        return loss.reshape(())


def _plan(module, loss_of_chunk, batch, m, geometry, params) -> _Plan:
    """Everything that can be checked before a pass: raises ``_CannotVectorize`` with the reason."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Even with one process: a DDP wrapper's reducer must see its forward before the backward it reduces.
        raise _CannotVectorize(
            "a process group is initialized (DDP/FSDP): the vectorized passes bypass the DDP wrapper's forward, "
            "so its reducer would not all-reduce their gradient"
        )
    if not vectorizable_geometry(geometry):
        raise _CannotVectorize(f"the geometry {geometry!r} is not element-wise")
    others = [
        name
        for name, layer in module.named_modules()
        if isinstance(layer, nn.modules.batchnorm._NormBase)
        and not isinstance(layer, nn.modules.batchnorm._BatchNorm)
        and layer.training
        and layer.track_running_stats
    ]
    if others:
        raise _CannotVectorize(f"normalization layer {others[0]!r} tracks running statistics in training mode")
    named = {id(p): name for name, p in module.named_parameters()}
    missing = [p for p in params if id(p) not in named]
    if missing:
        raise _CannotVectorize("a perturbed parameter is not a parameter of the module")
    if not params:
        raise _CannotVectorize("no parameter is perturbed")
    leaves, rebuild = _tensor_leaves(batch)
    n = count_examples(batch)
    return _Plan(module, loss_of_chunk, leaves, rebuild, n, m, geometry, [named[id(p)] for p in params], params)


def _tracks_stats(layer: nn.Module) -> bool:
    return isinstance(layer, nn.modules.batchnorm._NormBase) and layer.training and layer.track_running_stats


def _tensor_leaves(batch: Any, path: str = "batch") -> tuple[list[Tensor], Callable[[list], Any]]:
    """The per-example tensors of ``batch`` and a function that rebuilds the batch from replacements of them.

    0-dim tensors and values that are not sequences are kept as they are (shared by every chunk, as in
    :func:`~lightning_sharpness.batching.split_examples`); any other per-example field cannot be vmapped.
    """
    if isinstance(batch, Tensor):
        if batch.ndim == 0:
            return [], lambda leaves: batch
        return [batch], lambda leaves: leaves[0]
    if isinstance(batch, Mapping):
        if type(batch) is not dict and not _rebuilds_from_dict(batch):
            raise _CannotVectorize(f"{path} is a {type(batch).__name__}, which cannot be rebuilt from a dict")
        parts = [(key, *_tensor_leaves(value, f"{path}[{key!r}]")) for key, value in batch.items()]
        kind = type(batch)
        return _join(parts, lambda items: kind(dict(items)) if kind is not dict else dict(items))
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        parts = [(i, *_tensor_leaves(value, f"{path}[{i}]")) for i, value in enumerate(batch)]
        kind = type(batch)
        return _join(parts, lambda items: kind(*(v for _, v in items)))
    if isinstance(batch, (list, tuple)):
        if batch and not any(isinstance(item, (Tensor, Mapping, list, tuple)) for item in batch):
            raise _CannotVectorize(f"{path} is a list of {type(batch[0]).__name__} values, not a tensor")
        parts = [(i, *_tensor_leaves(value, f"{path}[{i}]")) for i, value in enumerate(batch)]
        kind = type(batch)
        return _join(parts, lambda items: kind(v for _, v in items))
    if hasattr(batch, "__len__") and hasattr(batch, "shape"):  # a NumPy array or another array type
        raise _CannotVectorize(f"{path} is a {type(batch).__name__}, not a tensor")
    return [], lambda leaves: batch


def _join(parts, build):
    """Concatenate the leaves of ``parts`` ``(key, leaves, rebuild)`` and rebuild each part from its share."""
    counts = [len(leaves) for _, leaves, _ in parts]
    leaves = [leaf for _, part_leaves, _ in parts for leaf in part_leaves]

    def rebuild(new_leaves: list) -> Any:
        items, start = [], 0
        for (key, _, part_rebuild), count in zip(parts, counts):
            items.append((key, part_rebuild(new_leaves[start : start + count])))
            start += count
        return build(items)

    return leaves, rebuild


def _rebuilds_from_dict(mapping: Mapping) -> bool:
    try:
        return type(mapping)(dict(mapping)) is not None
    except TypeError:
        return False


# ---------------------------------------------------------------- the passes
class _NonFinite(Exception):
    """A chunk's ``||T g||`` is not finite: the loop keeps that gradient in the sum; leave the step to it."""


def _first_pass(plan: _Plan, chunks: list[Tensor], grad_divisor: float, pass_context: Callable):
    """Per-chunk gradients at ``w`` of the perturbed parameters (scaled by ``grad_divisor``), losses, norms.

    The weights enter as ``w`` expanded along the chunk dimension, a leaf of the graph: the gradient of the sum of
    the chunk losses with respect to it holds every chunk's gradient in its rows (chunk ``i``'s loss depends on
    row ``i`` only). On CPU this is faster than ``vmap(grad(...))``, whose nested transforms cost more per op.
    """
    count = chunks[0].shape[0]
    with torch.enable_grad(), pass_context():
        stacked = [p.detach().unsqueeze(0).expand(count, *p.shape).requires_grad_() for p in plan.params]
        losses, at_w = _chunk_losses(plan, dict(zip(plan.names, stacked)), chunks)
        # allow_unused: a parameter the loss does not reach has no gradient, and the loop leaves it unmoved
        g = list(torch.autograd.grad(losses.sum() * grad_divisor, stacked, allow_unused=True))
    if all(gi is None for gi in g):
        raise _CannotVectorize("the loss reaches no perturbed parameter")
    sq_norm = sum(_per_chunk_sq(gi, t) for gi, t in zip(g, plan.scales) if gi is not None)
    norms = sq_norm.sqrt() / grad_divisor
    if not bool(torch.isfinite(norms).all()):
        raise _NonFinite
    return g, losses.detach(), norms, at_w


def _chunk_losses(plan: _Plan, weights: dict[str, Tensor], chunks: list[Tensor]) -> tuple[Tensor, _BatchStats]:
    """``L_i(W_i)`` for every chunk ``i``: the loss vmapped over the rows of the weights and of the chunks; and the
    batch statistics each recorded BatchNorm call normalized by, one row per chunk, in call order."""
    order: list[nn.Module] = []

    def chunk_loss(params: dict[str, Tensor], leaves: list[Tensor]):
        seen: list[tuple[nn.Module, Tensor, Tensor]] = []
        hooks = [layer.register_forward_pre_hook(partial(_record_batch_stats, seen)) for layer in plan.record]
        try:
            loss = functional_call(plan.call, params, (leaves,))
        finally:
            for hook in hooks:
                hook.remove()
        order[:] = [layer for layer, _, _ in seen]  # Python objects: kept out of vmap's outputs
        return loss, [mean for _, mean, _ in seen], [var for _, _, var in seen]

    losses, means, variances = vmap(chunk_loss, in_dims=(0, 0), randomness="error")(weights, chunks)
    return losses, (order, means, variances)


def _record_batch_stats(seen: list, layer: nn.Module, args: tuple) -> None:
    """What BatchNorm's kernel folds into its running statistics: the batch mean and unbiased variance of each
    channel of its input (over all dimensions but the channels')."""
    x = args[0].detach().float()
    dims = [0, *range(2, x.ndim)]
    seen.append((layer, x.mean(dims), x.var(dims, correction=1)))


def _replay_running_stats(at_w: _BatchStats, at_moved: _BatchStats | None) -> None:
    """The loop's running-statistics updates, in its order: chunk by chunk, the pass at ``w`` before the pass at
    ``w + e`` (``at_moved``, when those update too), each BatchNorm call in the order the forward made it."""
    layers, means, _ = at_w
    if not layers:
        return
    with torch.no_grad():
        for i in range(means[0].shape[0]):
            for record in (at_w, at_moved):
                for layer, mean, variance in zip(*(record or ([], [], []))):
                    _update_running_stats(layer, mean[i], variance[i])


def _update_running_stats(layer: nn.Module, mean: Tensor, variance: Tensor) -> None:
    """One BatchNorm update of ``layer``, as its ``forward`` does in training mode (the kernel mixes in double)."""
    layer.num_batches_tracked.add_(1)
    factor = 1.0 / float(layer.num_batches_tracked) if layer.momentum is None else layer.momentum
    for running, batch in ((layer.running_mean, mean), (layer.running_var, variance)):
        running.copy_(factor * batch.double() + (1 - factor) * running.double())


def _per_chunk_sq(g: Tensor, scale: Tensor | None) -> Tensor:
    """``||T g_i||^2`` per chunk, in fp32 like :meth:`Geometry.dual_sq_norm` (one reduction kernel per tensor)."""
    tg = g if scale is None else g * scale
    if tg.dtype == torch.float64:  # the loop's .float() narrows it; vector_norm's dtype= refuses to
        tg = tg.float()
    if tg.ndim == 1:  # a 0-dim parameter: one number per chunk (an empty ``dim`` would reduce over the chunks)
        return tg.float().square()
    dims = tuple(range(1, tg.ndim))  # not flatten(1): autograd's per-chunk gradients may not be contiguous
    return torch.linalg.vector_norm(tg, dim=dims, dtype=torch.float32).square()


def _ascent_steps(plan, g, norms, rho, normalize, eps, grad_divisor) -> tuple[list[Tensor], Tensor]:
    """``T^2 g_i`` (in place on ``g``) and the coefficients of the loop's ``normalized_step_``, one per chunk:
    ``e_i = coefficient_i T^2 g_i``. The product is left to the retraction, one fused kernel."""
    coefficient = (rho / (norms + eps) if normalize else torch.full_like(norms, rho)) / grad_divisor
    for gi, t in zip(g, plan.scales):
        if t is not None and gi is not None:
            gi.mul_(t).mul_(t)
    return g, coefficient


def _perturbed_losses(plan, chunks, steps, weights, pass_context) -> tuple[Tensor, Tensor]:
    """``sum_i weight_i L_i(w + e_i)`` with its graph, and the ``L_i(w + e_i)``. Its backward sums the
    per-chunk gradients into ``w.grad`` (the broadcast ``w + e_i`` sums over the chunk dimension)."""
    directions, coefficient = steps
    with torch.enable_grad(), pass_context():
        moved = {
            name: torch.addcmul(p.unsqueeze(0), d, coefficient.to(d.dtype).view(-1, *([1] * (d.ndim - 1))))
            for name, p, d in zip(plan.names, plan.params, directions)
            if d is not None
        }
        losses, at_moved = _chunk_losses(plan, moved, chunks)
        total = (losses * weights.to(losses)).sum()
    return total, losses.detach(), at_moved


@contextmanager
def _batch_statistics_only(module: nn.Module):
    """BatchNorm in training mode normalizes by the batch (here: each chunk's) statistics and leaves its running
    statistics and counter untouched while ``track_running_stats`` is off (no in-place buffer update, which vmap
    refuses); put the flag back afterwards. Yields the layers: those whose updates may need a replay."""
    layers = [layer for layer in module.modules() if _tracks_stats(layer)]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield layers
    finally:
        for layer in layers:
            layer.track_running_stats = True


# ---------------------------------------------------------------- falling back, said once
_REFUSED: weakref.WeakKeyDictionary[nn.Module, set] = weakref.WeakKeyDictionary()
_WARNED: weakref.WeakKeyDictionary[nn.Module, set] = weakref.WeakKeyDictionary()


def _refused_signatures(module: nn.Module) -> set:
    """Batch layouts that failed under ``vmap`` for ``module``: not tried again (a failure costs a pass)."""
    return _REFUSED.setdefault(module, set())


def _refuse(module: nn.Module, reason: str) -> None:
    warned = _WARNED.setdefault(module, set())
    if reason in warned:
        return
    warned.add(reason)
    rank_zero_warn(
        f"m-SAM runs the per-chunk passes of {type(module).__name__} one chunk at a time: they cannot be "
        f"vectorized ({reason})."
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else "no message"


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
