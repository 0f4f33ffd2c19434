"""SAM for modules that optimize by hand (``automatic_optimization = False``): GANs, several optimizers,
custom loops. One call in ``training_step`` does both passes through ``manual_backward`` and steps through
Lightning's optimizer wrapper, so precision plugins, ``global_step``, DDP and loggers behave as for any
manual module."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ParallelStrategy
from torch import Tensor

from lightning_sharpness._lightning import quiet
from lightning_sharpness.sam.bsam import BSAMOptimizer, frozen_norm_statistics
from lightning_sharpness.sam.engine import SAMEngine, SAMStepStats, accumulate_sam_gradient, loss_scale
from lightning_sharpness.sam.stepping import (
    average_over_processes,
    diagnostics,
    refuse_closure_optimizer,
    skip_if_not_finite,
)
from lightning_sharpness.sam.variants import SAMVariant

__all__ = ["SAMMixin"]


class SAMMixin:
    """Mix into a ``LightningModule`` with manual optimization and call :meth:`sam_step` in ``training_step``.

    The SAM variant is a :class:`~lightning_sharpness.SAMEngine` (every option of the ``SAM`` callback: rho or
    a schedule, geometry, normalize, m, perturb, bn_update, mode), passed to ``sam_step`` or stored as
    ``self.sam``; the default is ``SAMEngine(rho=0.05)``.

    Example::

        class GAN(SAMMixin, LightningModule):
            def __init__(self):
                super().__init__()
                self.automatic_optimization = False
                self.sam = SAMEngine(rho=0.05)

            def training_step(self, batch, batch_idx):
                d_opt, g_opt = self.optimizers()
                self.toggle_optimizer(d_opt)
                self.sam_step(d_opt, self.discriminator_loss, batch, log_prefix="sam/d/")
                self.untoggle_optimizer(d_opt)
                ...
    """

    def sam_step(
        self,
        optimizer: LightningOptimizer,
        loss_fn: Callable[[Any], Tensor],
        batch: Any,
        sam: SAMEngine | None = None,
        log_prefix: str | None = "sam/",
    ) -> Tensor:
        """Compute the SAM gradient of ``loss_fn(batch)`` for ``optimizer``'s parameters and take the step.

        Gradients already in ``.grad`` are kept and the SAM gradient is added to them; after the step the
        optimizer's gradients are zeroed. Under DDP in ``mode="local"`` the pass at ``w`` runs under
        ``no_sync``: one gradient all-reduce per step. A non-finite gradient never reaches the weights: the
        GradScaler skips the step (and backs off), or, without one, the step runs with no gradients.

        Returns:
            The loss at ``w`` (detached), for logging.
        """
        if self.automatic_optimization:
            raise ValueError(
                f"`{type(self).__name__}.sam_step` is for manual optimization, but automatic_optimization is True. "
                "Either set `self.automatic_optimization = False`, or drop the mixin and add the "
                "`lightning_sharpness.SAM` callback to the Trainer."
            )
        inner = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        if isinstance(inner, BSAMOptimizer):
            return self._bsam_step(optimizer, inner, loss_fn, batch, log_prefix)
        engine = self._sam_engine_for(optimizer, sam)
        trainer = self.trainer
        scale = loss_scale(trainer.precision_plugin)
        variant = engine.variant
        variant.begin_step(self.global_step)  # the mixin runs SAM from the first step: counted from 0
        rho = engine.rho_at(self.global_step)
        parallel = isinstance(trainer.strategy, ParallelStrategy)
        if parallel and getattr(variant, "double_backward", False):
            raise ValueError(
                f"The SAM variant {type(variant).__name__} differentiates through the gradient (double backward), "
                "which torch's DistributedDataParallel does not support; run it on one device per model."
            )
        user_loss_fn, losses_at_w = loss_fn, []

        def loss_fn(batch: Any) -> Tensor:  # what each pass back-propagates: the variant's objective (RSAM's)
            with variant.pass_context(engine.perturbed):
                loss = user_loss_fn(batch)
            if not engine.perturbed:
                losses_at_w.append(loss.detach())
            return variant.objective(loss, engine._trainable, engine.perturbed, scale)

        if not variant.runs_second_pass():
            stats = self._one_pass_gradient(engine, loss_fn, batch, rho)
        else:
            own_sync = variant.syncs_itself and engine.mode == "local" and parallel
            with ExitStack() as no_sync:
                if engine.mode == "local" and parallel:
                    no_sync.enter_context(trainer.strategy.block_backward_sync())
                stats = accumulate_sam_gradient(
                    engine,
                    batch,
                    loss_of=loss_fn,
                    backward=self.manual_backward,
                    rho=rho,
                    grad_divisor=scale,
                    stash=engine.take_grads(),
                    first_grad_ready=False,
                    # a variant that syncs itself averages once, after the step's passes
                    before_last_perturbed_pass=(lambda: None) if own_sync else no_sync.close,
                    # what the loss function logs or counts in metrics at w + e must not reach the user's logs
                    perturbed_pass_context=lambda: quiet(self),
                )
            regularized = type(variant).objective is not SAMVariant.objective
            if regularized and len(losses_at_w) == len(chunks := engine.chunks(batch)):
                # the diagnostics are of the training loss, not of an objective a variant back-propagates
                stats.loss = sum(loss * weight for loss, (_, weight) in zip(losses_at_w, chunks))
            if own_sync:
                variant.step_sums = average_over_processes(engine.current_grads(), variant.step_sums)
            variant.finish_step()
        skipped = skip_if_not_finite(optimizer, trainer.precision_plugin)
        if skipped:
            self._sam_skipped_steps = getattr(self, "_sam_skipped_steps", 0) + 1
        variant.before_optimizer_step(optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer)
        optimizer.step()
        variant.after_optimizer_step(skipped)
        optimizer.zero_grad(set_to_none=True)
        if log_prefix is not None and trainer._logger_connector.should_update_logs:
            metrics = diagnostics(stats, getattr(self, "_sam_skipped_steps", 0), log_prefix)
            metrics.update({f"{log_prefix}{k}": v for k, v in variant.diagnostics().items()})
            self.log_dict(metrics, on_step=True, on_epoch=False)
        return stats.loss

    def _bsam_step(
        self,
        optimizer: LightningOptimizer,
        inner: BSAMOptimizer,
        loss_fn: Callable[[Any], Tensor],
        batch: Any,
        log_prefix: str | None,
    ) -> Tensor:
        """BSAM's three phases around two passes of ``loss_fn`` (each all-reduced under DDP: its ascent starts
        from the noisy weights every process shares, so it has only the global mode)."""
        trainer = self.trainer
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                "BSAM cannot run under fp16 with a GradScaler: the noise and the ascent stay in the weights, so a "
                "step the scaler skips would still move them. Use precision='bf16-mixed' or 32."
            )
        inner.driven = True
        inner.add_noise_()
        optimizer.zero_grad(set_to_none=True)
        noisy = loss_fn(batch)
        self.manual_backward(noisy)
        perturbed = None
        if inner.ascend_(grad_divisor=loss_scale(trainer.precision_plugin)):
            with frozen_norm_statistics(self), quiet(self):
                perturbed = loss_fn(batch)
            self.manual_backward(perturbed)
        skipped = skip_if_not_finite(optimizer, trainer.precision_plugin)
        if skipped:
            self._sam_skipped_steps = getattr(self, "_sam_skipped_steps", 0) + 1
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if log_prefix is not None and trainer._logger_connector.should_update_logs:
            metrics = {f"{log_prefix}noisy_loss": noisy.detach().float()}
            metrics[f"{log_prefix}skipped_steps"] = float(getattr(self, "_sam_skipped_steps", 0))
            if perturbed is not None:
                metrics[f"{log_prefix}perturbed_loss"] = perturbed.detach().float()
            self.log_dict(metrics, on_step=True, on_epoch=False)
        return noisy.detach()

    def _one_pass_gradient(self, engine: SAMEngine, loss_fn: Callable[[Any], Tensor], batch: Any, rho: float):
        """A step of a variant without the second pass (LookSAM between its full steps): one ordinary pass
        (all-reduced as usual under DDP), its gradient turned by the variant and added to what was there."""
        stash = engine.take_grads()
        loss = loss_fn(batch)
        self.manual_backward(loss)
        engine.variant.one_pass_(engine.current_grads())
        engine.put_grads([g if s is None else s if g is None else s + g for s, g in zip(stash, engine.take_grads())])
        return SAMStepStats(loss=loss.detach(), rho=rho)

    # ---------------------------------------------------------------- checkpointing, like the callback's state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state: dict[str, Any] = {"skipped_steps": getattr(self, "_sam_skipped_steps", 0)}
        # a variant's state (FriendlySAM's gradient EMA, LookSAM's g_v), per optimizer by its position
        engines = self.__dict__.get("_sam_engines", {})
        variants = {}
        for i, opt in enumerate(self.trainer.optimizers):
            held = engines.get(opt)
            if held is not None and held[1].variant.state_dict():
                variants[i] = held[1].variant.state_dict()
        variants = {**self.__dict__.get("_sam_pending_variants", {}), **variants}
        if variants:
            state["variants"] = variants
        checkpoint["sam_mixin"] = state
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._sam_skipped_steps = checkpoint.get("sam_mixin", {}).get("skipped_steps", 0)
        self._sam_pending_variants = dict(checkpoint.get("sam_mixin", {}).get("variants", {}))
        super().on_load_checkpoint(checkpoint)

    def _sam_engine_for(self, optimizer: LightningOptimizer, sam: SAMEngine | None) -> SAMEngine:
        """The engine that steps ``optimizer``: one per optimizer, held by the module (weakly keyed by the
        optimizer, so a finished fit's optimizers free theirs), re-made only when a different configuration
        is passed, and re-bound whenever the optimizer's trainable parameters change."""
        inner = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        refuse_closure_optimizer(inner, "`sam_step`")
        template = sam if sam is not None else getattr(self, "sam", None)
        if template is not None and not isinstance(template, SAMEngine):
            raise ValueError(f"`sam` must be a `SAMEngine`, got {type(template).__name__}.")
        engines = self.__dict__.setdefault("_sam_engines", weakref.WeakKeyDictionary())
        held = engines.get(inner)
        if held is None or held[0] is not template:
            # A copy per optimizer: one configuration may serve several optimizers, each bound to its own
            # parameters. The default configuration is made once per optimizer, not once per step.
            engine = copy.deepcopy(template) if template is not None else SAMEngine()
            engine.check_filter(self)
            engines[inner] = held = (template, engine)
            pending = self.__dict__.get("_sam_pending_variants", {})
            position = next((i for i, o in enumerate(self.trainer.optimizers) if o is inner), None)
            if position in pending:  # state a checkpoint held for this optimizer's variant
                engine.variant.load_state_dict(pending.pop(position))
        engine = held[1]
        engine.follow(self, inner, grads_of="optimizer")
        return engine
