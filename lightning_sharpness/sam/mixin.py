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
from lightning_sharpness.sam.engine import SAMEngine, accumulate_sam_gradient, loss_scale
from lightning_sharpness.sam.stepping import diagnostics, refuse_closure_optimizer, skip_if_not_finite

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
        engine = self._sam_engine_for(optimizer, sam)
        trainer = self.trainer
        scale = loss_scale(trainer.precision_plugin)
        rho = engine.rho_at(self.global_step)  # the mixin runs SAM from the first step: counted from 0
        with ExitStack() as no_sync:
            if engine.mode == "local" and isinstance(trainer.strategy, ParallelStrategy):
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
                before_last_perturbed_pass=no_sync.close,
                # what the loss function logs or counts in metrics at w + e must not reach the user's logs
                perturbed_pass_context=lambda: quiet(self),
            )
        if skip_if_not_finite(optimizer, trainer.precision_plugin):
            self._sam_skipped_steps = getattr(self, "_sam_skipped_steps", 0) + 1
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if log_prefix is not None and trainer._logger_connector.should_update_logs:
            metrics = diagnostics(stats, getattr(self, "_sam_skipped_steps", 0), log_prefix)
            self.log_dict(metrics, on_step=True, on_epoch=False)
        return stats.loss

    # ---------------------------------------------------------------- checkpointing, like the callback's state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sam_mixin"] = {"skipped_steps": getattr(self, "_sam_skipped_steps", 0)}
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._sam_skipped_steps = checkpoint.get("sam_mixin", {}).get("skipped_steps", 0)
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
        engine = held[1]
        engine.follow(self, inner, grads_of="optimizer")
        return engine
