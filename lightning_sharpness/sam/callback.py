"""SAM for modules with automatic optimization: one callback, every Lightning feature kept.

Where the work happens, and why there:

* ``on_before_backward`` sees Lightning's loss ``L(w)``; in local mode the gradients accumulated by earlier
  micro-batches are set aside, so the backward that follows yields this micro-batch's ``g`` alone.
* ``on_after_backward`` holds ``g`` (still multiplied by the GradScaler's scale under fp16). The callback moves
  to ``w + e(g)``, recomputes the same batch through ``strategy.training_step`` (autocast and DDP forward
  redirection apply), back-propagates the perturbed loss through the precision plugin (scaled by the same
  scale) onto the set-aside gradients, and restores ``w`` bitwise. Lightning then unscales once, runs
  ``on_before_optimizer_step``, clips (``gradient_clip_val`` applies to the SAM gradient) and steps. An fp16
  overflow in either pass leaves an inf in the gradient, so the scaler skips the step and backs off exactly
  as in plain GradScaler training.
* Under DDP in local mode the ordinary pass runs under ``no_sync`` and only the perturbed pass all-reduces:
  one gradient all-reduce per step, as in plain DDP training.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy, ParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor

from lightning_sharpness._lightning import quiet, shadow_method
from lightning_sharpness.batching import count_examples
from lightning_sharpness.geometry import AdaptiveGeometry, Geometry
from lightning_sharpness.sam.engine import (
    BNUpdate,
    Mode,
    RhoLike,
    SAMEngine,
    SAMStepStats,
    _add,
    accumulate_sam_gradient,
    loss_scale,
)
from lightning_sharpness.sam.rng import RNGState
from lightning_sharpness.sam.stepping import (
    average_over_processes,
    diagnostics,
    refuse_closure_optimizer,
    skip_if_not_finite,
)
from lightning_sharpness.sam.variants import SAMVariant
from lightning_sharpness.selection import ParameterFilter
from lightning_sharpness.validation import check_flag, check_int

__all__ = ["ASAM", "SAM", "USAM"]


class SAM(Callback):
    r"""Sharpness-aware minimization (Foret et al., 2021) for any LightningModule with automatic optimization.

    At every optimizer step the gradient ``g`` at ``w`` comes from Lightning's own pass; the callback adds the
    gradient at ``w + e`` with ``e = rho T^2 g / ||T g||`` (``T = 1`` in the standard geometry), restores ``w``
    exactly and lets the optimizer step with the perturbed gradient.

    Args:
        rho: perturbation radius, a number or a schedule (:class:`~lightning_sharpness.LinearRho`, ...).
        geometry: ``"standard"``, ``"adaptive"`` (ASAM, see :class:`ASAM`) or a :class:`Geometry`.
        normalize: ``False`` gives unnormalized SAM, ``e = rho T^2 g`` (see :class:`USAM`).
        m: m-sharpness: each chunk of ``m`` examples of a device batch is perturbed by its own gradient and
            the perturbed gradients are averaged weighted by chunk size (a last, smaller chunk weighs less).
            Every chunk's gradient at ``w`` is recomputed, so the backward of Lightning's whole-batch pass is
            skipped (its forward runs and logs as usual). ``None``: n-SAM.
        perturb: ``"all"`` parameters, ``"norm"`` layers only (SAM-ON), a list of names, or ``(name, param) -> bool``.
        start_step: ERM until this global step, SAM from it on.
        start_epoch: ERM until this epoch, SAM from it on (both conditions must hold).
        mode: ``"local"`` (default): each micro-batch on each device is perturbed by its own gradient, as in
            the original SAM code; ``"global"``: one perturbation from the gradient accumulated over all
            micro-batches and all-reduced over devices, then all micro-batches recomputed at ``w + e``.
        bn_update: ``"first"``: normalization running statistics follow Lightning's pass only; ``"both"``.
        same_dropout: replay the pass at ``w``'s random state in the pass at ``w + e`` (the same dropout masks);
            ``False`` (default, as in the original code) draws new ones.
        eps: added to ``||T g||`` before dividing.
        vectorize: with ``m``, run the per-chunk passes vectorized (``torch.func.vmap``, equal to the loop to
            float rounding) where the module allows it, else the loop with one warning saying why. Off by
            default: faster on small models only (see :class:`~lightning_sharpness.SAMEngine`).
        log_diagnostics: log ``sam/rho``, ``sam/grad_norm``, ``sam/perturbed_loss``, ``sam/sharpness_gap``
            (``L(w + e) - L(w)``) and ``sam/skipped_steps`` on the steps the Trainer logs
            (``Trainer(log_every_n_steps=...)``, 50 by default: a run shorter than that logs nothing).
        prog_bar: also show ``sam/sharpness_gap`` in the progress bar.
        variant: a :class:`~lightning_sharpness.sam.variants.SAMVariant` (the classes :class:`GSAM`,
            :class:`WSAM`, :class:`FriendlySAM` and :class:`LookSAM` set it); ``None`` is SAM.

    The parameters perturbed are those the optimizer steps, that require a gradient and that ``perturb``
    selects, re-read at every step (parameters unfrozen during fit join from the step they are trainable).
    A rho schedule counts steps from the first step SAM runs (``start_step`` / ``start_epoch``), not from 0.
    ``skipped_steps`` counts the steps of this training run whose gradient was not finite; it is saved in
    checkpoints (a resumed run continues the count) and starts at 0 in a new ``fit`` without a checkpoint.

    Example::

        trainer = Trainer(callbacks=[SAM(rho=0.05)])
    """

    def __init__(
        self,
        rho: RhoLike = 0.05,
        geometry: str | Geometry = "standard",
        normalize: bool = True,
        m: int | None = None,
        perturb: ParameterFilter = "all",
        start_step: int = 0,
        start_epoch: int = 0,
        mode: Mode = "local",
        bn_update: BNUpdate = "first",
        same_dropout: bool = False,
        eps: float = 1e-12,
        log_diagnostics: bool = True,
        prog_bar: bool = False,
        variant: SAMVariant | None = None,
        vectorize: bool = False,
    ) -> None:
        check_int(start_step, "start_step", least=0)
        check_int(start_epoch, "start_epoch", least=0)
        check_flag(log_diagnostics, "log_diagnostics")
        check_flag(prog_bar, "prog_bar")
        self.engine = SAMEngine(
            rho=rho,
            geometry=geometry,
            normalize=normalize,
            m=m,
            perturb=perturb,
            bn_update=bn_update,
            mode=mode,
            eps=eps,
            same_dropout=same_dropout,
            variant=variant,
            vectorize=vectorize,
        )
        self.start_step = start_step
        self.start_epoch = start_epoch
        self.log_diagnostics = log_diagnostics
        self.prog_bar = prog_bar
        self._sync_blocker = ExitStack()
        self._reset_fit()

    def _reset_fit(self) -> None:
        """Per-fit state: nothing of an earlier (perhaps interrupted) fit may leak into the next one."""
        self.skipped_steps = 0
        self._sam_start: int | None = None  # the global step SAM first ran at; rho schedules count from it
        self._sync_blocker.close()
        self.engine.restore()
        self._reset_step()
        self._micro_count = 0
        self._shadows: list[Callable[[], None]] = []  # undoes what this fit shadowed on the module (shadow_on)
        self._skips_backward = False  # m-SAM's backward shadow is installed for this fit

    def _reset_step(self) -> None:
        self._active = False
        self._stats = SAMStepStats()
        self._stash: list[Tensor | None] = []
        self._micro_batches: list[tuple[Any, int, Any]] = []
        self._rng = None
        self._one_pass = False  # a step of a variant without the second pass (LookSAM between full steps)
        self._own_sync = False  # DDP local mode with a variant that averages over processes itself
        self._skipped: bool | None = None  # whether this step's optimizer step was skipped (set before it)
        self._chunked = False  # m-SAM with more than one chunk in this micro-batch
        self._skip_backward = False  # the next backward is Lightning's whole-batch one, which m-SAM replaces

    # ---------------------------------------------------------------- validation before any step
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._reset_fit()  # before Lightning restores a checkpoint's state into this callback
        if not pl_module.automatic_optimization:
            raise ValueError(
                "The SAM callback needs automatic optimization, but "
                f"{type(pl_module).__name__}.automatic_optimization is False. For manual optimization, mix "
                "`lightning_sharpness.SAMMixin` into the module and call `self.sam_step(...)` in training_step."
            )
        if trainer.strategy.handles_gradient_accumulation:
            raise ValueError(
                f"The SAM callback cannot run under {type(trainer.strategy).__name__}, which accumulates and steps "
                "gradients itself; use DDP or FSDP."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            refuse_closure_optimizer(optimizer, "The SAM callback")
        self.engine.check_filter(pl_module)
        # Bind now, so that what binding checks (attention heads for the geodesic geometry) fails before step 0.
        self.engine.follow(pl_module, trainer.optimizers[0])
        self._step_takes_batch_idx = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)
        if self.engine.m is not None and not isinstance(trainer.strategy, FSDPStrategy):
            # (FSDP's backward hooks reshard what its forward gathered: its backward is never skipped)
            self.shadow_on(pl_module, "backward", self._lightning_backward)
            self._skips_backward = True
        if isinstance(trainer.strategy, FSDPStrategy) and self.engine.mode == "local":
            rank_zero_warn(
                "Under FSDP every backward reduces gradients across processes, so SAM perturbs with the global "
                "gradient (the semantics of `mode='global'`) and its norm is summed over shards."
            )

    # ---------------------------------------------------------------- the step
    def _sam_is_on(self, trainer: pl.Trainer) -> bool:
        return trainer.global_step >= self.start_step and trainer.current_epoch >= self.start_epoch

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        first_micro_batch = self._micro_count == 0
        if first_micro_batch:
            self._reset_step()
        self._active = self._sam_is_on(trainer)
        self._micro_count += 1
        self._stepping = not trainer.fit_loop._should_accumulate()  # private, but the one source of truth
        if not self._active:
            return
        if self._sam_start is None:
            self._sam_start = trainer.global_step
        variant = self.engine.variant
        if first_micro_batch:
            # What the optimizer steps may have changed (a BackboneFinetuning unfreeze): re-bind if so.
            self.engine.follow(pl_module, trainer.optimizers[0])
            variant.begin_step(trainer.global_step - self._sam_start)
        self._one_pass = not variant.runs_second_pass()
        self._own_sync = (
            variant.syncs_itself and self.engine.mode == "local" and isinstance(trainer.strategy, ParallelStrategy)
        )
        self._stats.rho = self.engine.rho_at(trainer.global_step - self._sam_start)
        if self._one_pass:
            return  # an ordinary pass, all-reduced as usual; the variant turns its gradient at the step
        self._rng = self.engine.rng_state()
        if self.engine.mode == "global":
            self._micro_batches.append((batch, batch_idx, self._rng))
        elif self._stepping and isinstance(trainer.strategy, ParallelStrategy):
            # Local mode: Lightning's pass must not all-reduce; the perturbed pass of this micro-batch will.
            self._sync_blocker.enter_context(trainer.strategy.block_backward_sync())
        self._batch, self._batch_idx = batch, batch_idx
        self._chunked = self._skips_backward and count_examples(batch) > self.engine.m

    def _lightning_backward(self, original: Callable[..., None], loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """The module's ``backward`` during a fit with m-SAM: the backward of Lightning's whole-batch loss is
        skipped where m-SAM recomputes every chunk's gradient at w (that gradient would be thrown away: about two
        thirds of a plain step saved); its forward, the user's ``training_step``, ran and logged as usual. SAM's
        own passes back-propagate through here too, unskipped."""
        if self._skip_backward:
            self._skip_backward = False
            return
        original(loss, *args, **kwargs)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if not self._active:
            return
        self._stats.loss = _add(self._stats.loss, loss.detach() / _loss_scale(trainer))
        # Again here, not only at batch start: training_step, or a callback after this one, may have unfrozen
        # parameters since; their gradient must be set aside and perturbed like the others'.
        self.engine.follow(pl_module, trainer.optimizers[0])
        if self.engine.mode == "local" and not self._one_pass:
            self._stash = self.engine.take_grads()
            self._skip_backward = self._chunked

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        if self._one_pass:
            if self._stepping:  # the whole step's gradient (scaled: the variant's turn is homogeneous in it)
                self.engine.variant.one_pass_(self.engine.current_grads())
            return
        if self.engine.mode == "local":
            self._local_sam_pass(trainer, pl_module)
        elif self._stepping:
            self._global_sam_pass(trainer, pl_module)

    def _local_sam_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        k, scale = trainer.accumulate_grad_batches, _loss_scale(trainer)
        stats = accumulate_sam_gradient(
            self.engine,
            self._batch,
            loss_of=lambda batch: self._loss(trainer, pl_module, batch),
            backward=lambda loss: self._backward(trainer, pl_module, loss, k / scale),
            rho=self._stats.rho,
            grad_divisor=scale / k,
            stash=self._stash,
            first_grad_ready=True,
            # Local mode under DDP: everything so far ran under no_sync; the last perturbed pass all-reduces
            # (a variant that syncs itself averages the combined gradient once the step is done instead).
            before_last_perturbed_pass=(lambda: None) if self._own_sync else self._sync_blocker.close,
            reduce_sq_norm=self._sq_norm_reduction(trainer),
            first_pass_rng=self._rng,
        )
        self._stash = []
        self._record(stats.perturbed_loss / k, stats.grad_norm)
        if self._stepping:
            if self._own_sync:
                self._sync_blocker.close()
                variant = self.engine.variant
                variant.step_sums = average_over_processes(self.engine.current_grads(), variant.step_sums)
            self.engine.variant.finish_step()

    def _global_sam_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        engine, k, scale = self.engine, trainer.accumulate_grad_batches, _loss_scale(trainer)
        variant = engine.variant
        first = engine.gradient_copies() if variant.combines else None
        variant.ascent_(engine.current_grads(), scale, 1.0)
        grad_norm = self._perturb(trainer, grad_divisor=scale)
        if grad_norm is None:
            return  # the non-finite gradient stays; the step is skipped
        parallel = isinstance(trainer.strategy, ParallelStrategy)
        try:
            with engine.frozen_norm_stats():
                for i, (batch, batch_idx, rng) in enumerate(self._micro_batches):
                    with ExitStack() as no_sync, RNGState.replaying(rng):
                        if parallel and i < len(self._micro_batches) - 1:
                            no_sync.enter_context(trainer.strategy.block_backward_sync())
                        perturbed = self._loss(trainer, pl_module, batch, batch_idx)
                        self._backward(trainer, pl_module, perturbed, k / scale)
                    self._record(perturbed.detach() / k, None)
        finally:
            engine.restore()
        self._stats.grad_norm = grad_norm
        if first is not None:
            variant.combine_(first, engine.current_grads(), scale, 1.0)
        variant.count_micro_batch()
        variant.finish_step()

    def _perturb(self, trainer: pl.Trainer, grad_divisor: float) -> Tensor | None:
        reduce = self._sq_norm_reduction(trainer)
        return self.engine.perturb(self._stats.rho, grad_divisor=grad_divisor, reduce_sq_norm=reduce)

    @staticmethod
    def _sq_norm_reduction(trainer: pl.Trainer) -> Callable[[Tensor], Tensor] | None:
        if not isinstance(trainer.strategy, FSDPStrategy):
            return None

        # Sharded parameters: each process holds a slice of g, so the squared norm is a sum over processes.
        def reduce(sq: Tensor) -> Tensor:
            return trainer.strategy.reduce(sq.to(trainer.strategy.root_device), reduce_op="sum")

        return reduce

    def _record(self, perturbed_loss: Tensor, grad_norm: Tensor | None) -> None:
        self._stats.perturbed_loss = _add(self._stats.perturbed_loss, perturbed_loss)
        if grad_norm is not None:
            self._stats.grad_norm = grad_norm

    def _loss(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int | None = None
    ) -> Tensor:
        """The training loss of ``batch`` through the strategy's own path, with the module's logging muted."""
        batch_idx = self._batch_idx if batch_idx is None else batch_idx
        args = (batch, batch_idx) if self._step_takes_batch_idx else (batch,)
        with quiet(pl_module):
            output = trainer.strategy.training_step(*args)
        loss = output["loss"] if isinstance(output, dict) else output
        if not isinstance(loss, Tensor):
            raise RuntimeError(
                "SAM recomputed `training_step` at the perturbed weights and it returned no loss "
                f"(got {type(output).__name__}); training_step must return a loss whenever it did at w."
            )
        return loss

    def _backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor, divisor: float) -> None:
        """Back-propagate ``loss / divisor`` as Lightning's closure would, without firing the backward hooks."""
        loss = loss * (1.0 / divisor) if divisor != 1.0 else loss
        trainer.precision_plugin.backward(loss, pl_module, trainer.optimizers[0])

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self._active:
            self._micro_count = 0
            return
        self._skipped = skip_if_not_finite(optimizer, trainer.precision_plugin)
        if self._skipped:
            self.skipped_steps += 1
        self.engine.variant.before_optimizer_step(optimizer)
        # Like LearningRateMonitor: build the metrics only on steps the loggers write (log_dict is not free);
        # the progress bar, when asked for, shows the sharpness gap at every step.
        to_loggers = trainer._logger_connector.should_update_logs
        if self.log_diagnostics and (to_loggers or self.prog_bar):
            self._log(pl_module, to_loggers)
        self._micro_count = 0

    def _log(self, pl_module: pl.LightningModule, to_loggers: bool) -> None:
        metrics = diagnostics(self._stats, self.skipped_steps)
        metrics.update({f"sam/{k}": v for k, v in self.engine.variant.diagnostics().items()})
        gap = metrics.pop("sam/sharpness_gap", None)
        if gap is not None and self.prog_bar:
            pl_module.log("sam/sharpness_gap", gap, on_step=True, on_epoch=False, prog_bar=True)
        elif gap is not None:
            metrics["sam/sharpness_gap"] = gap
        if to_loggers:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._sync_blocker.close()  # in case training_step returned None and no backward ran
        if self._skipped is not None:  # the optimizer stepped in this batch: a variant's correction after it
            self.engine.variant.after_optimizer_step(self._skipped)
            self._skipped = None

    def shadow_on(self, pl_module: pl.LightningModule, name: str, replacement: Callable[..., Any]) -> None:
        """Shadow ``pl_module.name`` for this fit (:func:`shadow_method`); undone at fit end or on an exception."""
        self._shadows.append(shadow_method(pl_module, name, replacement))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_shadows()

    def _remove_shadows(self) -> None:
        while self._shadows:  # the latest first: shadows of one method stack
            self._shadows.pop()()
        self._skips_backward = self._skip_backward = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # The weights are already back at w (every perturbed pass restores on its way out); drop the rest of
        # the interrupted step so that a later fit with this callback starts clean.
        self._remove_shadows()
        self.engine.restore()
        self._sync_blocker.close()
        self._reset_step()
        self._micro_count = 0

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        state = {"skipped_steps": self.skipped_steps, "sam_start": self._sam_start}
        variant_state = self.engine.variant.state_dict()
        if variant_state:
            state["variant"] = variant_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = state_dict["skipped_steps"]
        # Checkpoints of version 0.1 have no "sam_start": their schedules counted from step 0, and keep doing so.
        self._sam_start = state_dict.get("sam_start", 0)
        self.engine.variant.load_state_dict(state_dict.get("variant", {}))


class ASAM(SAM):
    """Adaptive SAM (Kwon et al., 2021): the adaptive geometry ``T = |w| + eta``, ``e = rho T^2 g / ||T g||``.

    ``eta=0.0`` gives the element-wise form of the most used PyTorch implementation.

    Example::

        trainer = Trainer(callbacks=[ASAM(rho=0.5, eta=0.01)])
    """

    def __init__(self, rho: RhoLike = 0.5, eta: float = 0.01, **kwargs: Any) -> None:
        super().__init__(rho=rho, geometry=AdaptiveGeometry(eta), **kwargs)


class USAM(SAM):
    """Unnormalized SAM: ``e = rho g`` (Andriushchenko & Flammarion, 2022; the seed talk's USAM).

    Example::

        trainer = Trainer(callbacks=[USAM(rho=0.05)])
    """

    def __init__(self, rho: RhoLike = 0.05, **kwargs: Any) -> None:
        super().__init__(rho=rho, normalize=False, **kwargs)


def _loss_scale(trainer: pl.Trainer) -> float:
    return loss_scale(trainer.precision_plugin)
