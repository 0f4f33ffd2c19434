"""Bayesian SAM (Moellenhoff & Khan, *SAM as an Optimal Relaxation of Bayes*, ICLR 2023): an optimizer of its own
(:class:`BSAMOptimizer`) whose three phases a callback (:class:`BSAM`) or the mixin drives through Lightning's own
passes.

One step of the paper's algorithm (``algorithm="paper"``, the default; ``s`` starts at 1, ``m`` at 0):

1. noise: ``w_n = w + n``, ``n ~ N(0, 1 / (num_data s))`` (variance), drawn from the optimizer's own generator;
2. the noisy gradient ``g_n`` at ``w_n`` (Lightning's own pass), then the ascent from the mean:
   ``w + e``, ``e = rho g_n / s`` (``rho w^2 g_n / s`` when ``adaptive``);
3. the gradient ``g`` there (the perturbed pass), the weights back at the mean ``w``, and the update
   ``m <- lerp(m, g + wd w, 1 - beta1)``, ``s <- lerp(s, sqrt(s) |g_n| + wd + damping, 1 - beta2)``,
   ``w <- w - lr m / s``.

``algorithm="pytorch-optimizer"`` is that library's ``BSAM`` (4.1) exactly, which departs from the paper in four
places: its noise has standard deviation ``1 / (N s)`` (not variance), its ascent and update start from the noisy
weights (which are never restored), its momentum follows ``wd * g`` (not ``g + wd w``: with ``wd = 1e-4`` the step is
10^4 times smaller than the paper's), and ``s`` follows ``(sqrt(s) |g| + wd + damping)^2`` of the perturbed
gradient. The square overflows: on the 1.1M-parameter benchmark CNN (lr 0.01) ``s`` reached inf, then NaN, within 20
steps. The paper's form is read off its Algorithm 1 and agrees with two independent implementations of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor

from lightning_sharpness._lightning import quiet
from lightning_sharpness.sam.engine import all_finite, loss_scale
from lightning_sharpness.sam.rng import RNGState
from lightning_sharpness.sam.stepping import skip_if_not_finite
from lightning_sharpness.validation import check_choice, check_flag, check_int, check_number

__all__ = ["BSAM", "BSAMOptimizer", "frozen_norm_statistics"]


@contextmanager
def frozen_norm_statistics(module: torch.nn.Module) -> Iterator[None]:
    """Put the running statistics of ``module``'s normalization layers back as they were after the block: the
    perturbed pass must not update them (SAM's ``bn_update="first"``)."""
    layers = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
    snapshot = [[b.clone() for b in m.buffers(recurse=False)] for m in layers]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, saved in zip(layers, snapshot):
                for b, s in zip(m.buffers(recurse=False), saved):
                    b.copy_(s)


class BSAMOptimizer(torch.optim.Optimizer):
    """pytorch-optimizer's ``BSAM`` as a ``torch.optim.Optimizer`` whose phases can be called one by one.

    Args:
        params: parameters or param groups.
        num_data: number of training examples (the noise's scale), an int >= 1.
        lr, betas, weight_decay, rho, adaptive, damping: as pytorch-optimizer's ``BSAM`` (the paper's alpha,
            beta1 and beta2, delta, rho, gamma).
        seed: seed of the generator the noise is drawn from (on the parameters' device). The same on every
            process, so that DDP's replicas add the same noise; its state is saved with the optimizer's.
        algorithm: ``"paper"`` (Algorithm 1 of the paper) or ``"pytorch-optimizer"`` (that library's ``BSAM``,
            equal to it; see the module docstring for how the two differ).

    ``step(closure)`` runs the three phases like pytorch-optimizer (the closure recomputes loss and gradients).
    A driver that runs :meth:`add_noise_` and :meth:`ascend_` around passes of its own (the :class:`BSAM`
    callback, the mixin) sets :attr:`driven`; ``step`` then evaluates a closure once, as any torch optimizer
    (Lightning's closure runs its own pass), and runs phase 3.

    Raises:
        ValueError: an argument out of its range, naming it.
    """

    def __init__(
        self,
        params: Any,
        num_data: int,
        lr: float = 0.5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-4,
        rho: float = 0.05,
        adaptive: bool = False,
        damping: float = 0.1,
        seed: int = 0,
        algorithm: Literal["paper", "pytorch-optimizer"] = "paper",
    ) -> None:
        check_int(num_data, "num_data")
        check_number(lr, "lr", minimum=0.0)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"`betas` must be two numbers in [0, 1), got {betas!r}.")
        check_number(weight_decay, "weight_decay", minimum=0.0)
        check_number(rho, "rho", minimum=0.0)
        check_flag(adaptive, "adaptive")
        check_number(damping, "damping", minimum=0.0)
        check_int(seed, "seed", least=0)
        self.algorithm = check_choice(algorithm, "algorithm", ("paper", "pytorch-optimizer"))
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, rho=rho, adaptive=adaptive)
        super().__init__(params, defaults)
        self.num_data, self.damping, self.seed = num_data, float(damping), seed
        self._generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None
        self.driven = False

    def _params(self) -> list[tuple[dict, torch.nn.Parameter]]:
        return [(g, p) for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _state(self, p: torch.nn.Parameter) -> dict[str, Tensor]:
        state = self.state[p]
        if "s" not in state:
            state["s"] = torch.ones_like(p)
            state["momentum"] = torch.zeros_like(p)
        return state

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
                self._generator_state = None
        return self._generator

    # ---------------------------------------------------------------- the three phases
    @property
    def _paper(self) -> bool:
        return self.algorithm == "paper"

    @torch.no_grad()
    def add_noise_(self) -> None:
        """Phase 1: ``w <- w + n``, ``n ~ N(0, 1 / (num_data s))`` (the paper: variance; pytorch-optimizer:
        standard deviation); the paper's form keeps the mean ``w`` to come back to. Counts the step."""
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
        for _, p in self._params():
            state = self._state(p)
            std = 1.0 / (self.num_data * state["s"])
            if self._paper:
                std = std.sqrt()
                state["mean"] = p.detach().clone()
            p.add_(torch.normal(0.0, std, generator=self.generator(p.device)))

    @torch.no_grad()
    def ascend_(self, grad_divisor: float = 1.0) -> bool:
        """Phase 2: ``w <- w + rho g / s`` from where the weights are, with ``.grad = grad_divisor * g``;
        the gradients are released. Returns ``False`` (and moves nothing) when ``g`` is not finite."""
        pairs = [(g, p) for g, p in self._params() if p.grad is not None]
        if not all_finite([p.grad for _, p in pairs]):
            return False
        for group, p in pairs:
            state = self._state(p)
            if self._paper:  # the ascent from the mean; |g_n| is what s follows
                state["noisy_abs"] = p.grad.abs() / grad_divisor
                p.copy_(state["mean"])
            e = p.grad * (group["rho"] / grad_divisor) / state["s"]
            p.add_(e * p.pow(2) if group["adaptive"] else e)
        for _, p in self._params():
            p.grad = None
        return True

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """With a closure: the three phases (as pytorch-optimizer's ``BSAM.step``); without: phase 3 only."""
        loss = None
        if closure is not None and self.driven:
            with torch.enable_grad():
                loss = closure()
        elif closure is not None:
            self.add_noise_()
            with torch.enable_grad():
                closure()
            self.ascend_()
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            decay = group["weight_decay"]
            for p in group["params"]:
                state = self.state[p]
                mean, noisy_abs = state.pop("mean", None), state.pop("noisy_abs", None)
                if mean is not None:  # the paper's update is of the mean, also on a step without gradient
                    p.copy_(mean)
                if p.grad is None:
                    continue
                state = self._state(p)
                if self._paper:
                    if noisy_abs is None:  # a gradient without the noisy pass (a param that joined mid-step)
                        continue
                    state["momentum"].lerp_(p.grad + decay * p, 1.0 - beta1)
                    state["s"].lerp_(state["s"].sqrt() * noisy_abs + (decay + self.damping), 1.0 - beta2)
                else:
                    state["momentum"].lerp_(p.grad * decay, 1.0 - beta1)
                    variance = (state["s"].sqrt() * p.grad.abs() + (decay + self.damping)).pow(2)
                    state["s"].lerp_(variance, 1.0 - beta2)
                p.add_(state["momentum"] / state["s"], alpha=-group["lr"])
        return loss

    # ---------------------------------------------------------------- checkpointing (the noise generator too)
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._generator is not None:
            state["generator_state"] = self._generator.get_state()
        elif self._generator_state is not None:
            state["generator_state"] = self._generator_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        generator_state = state_dict.pop("generator_state", None)
        super().load_state_dict(state_dict)
        if generator_state is not None:
            if self._generator is not None:
                self._generator.set_state(generator_state)
            else:
                self._generator_state = generator_state


class BSAM(Callback):
    """Drives a :class:`BSAMOptimizer` (the module's only optimizer) through Lightning's own passes: noise before
    the step's first micro-batch, Lightning's passes give ``g`` at the noisy weights (all-reduced under DDP),
    the ascent, the perturbed passes over the step's micro-batches (all-reduced at the last), then Lightning's
    optimizer step (phase 3). Logs ``sam/noisy_loss``, ``sam/perturbed_loss`` and ``sam/skipped_steps``.

    Args:
        log_diagnostics: log the values above on the steps the Trainer logs.

    BSAM's ascent starts from the noisy weights of the whole step, so it has one mode (SAM's ``mode='global'``:
    the gradient of the effective batch, over all devices). It refuses fp16 with a GradScaler: a step the scaler
    skips would still leave the noise and the ascent in the weights. Use fp32 or bf16.

    Example::

        def configure_optimizers(self):
            return BSAMOptimizer(self.parameters(), num_data=50_000, lr=0.5, rho=0.05)

        trainer = Trainer(callbacks=[BSAM()])
    """

    def __init__(self, log_diagnostics: bool = True) -> None:
        self.log_diagnostics = check_flag(log_diagnostics, "log_diagnostics")
        self.skipped_steps = 0
        self._reset_step()

    def _reset_step(self) -> None:
        self._micro_batches: list[tuple[Any, int, RNGState]] = []
        self._noisy_loss: Tensor | None = None
        self._perturbed_loss: Tensor | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.skipped_steps = 0
        self._reset_step()
        if not pl_module.automatic_optimization:
            raise ValueError(
                "The BSAM callback needs automatic optimization; with manual optimization, mix "
                "`lightning_sharpness.SAMMixin` into the module and call `self.sam_step(bsam_optimizer, ...)`."
            )
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                "BSAM cannot run under fp16 with a GradScaler: the noise and the ascent stay in the weights, so a "
                "step the scaler skips would still move them. Use precision='bf16-mixed' or 32."
            )
        if trainer.strategy.handles_gradient_accumulation:
            raise ValueError(f"BSAM cannot run under {type(trainer.strategy).__name__}; use DDP.")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = [getattr(o, "optimizer", o) for o in trainer.optimizers]
        if len(optimizers) != 1 or not isinstance(optimizers[0], BSAMOptimizer):
            names = [type(o).__name__ for o in optimizers]
            raise ValueError(
                "The BSAM callback drives a `lightning_sharpness.BSAMOptimizer`, which must be the module's only "
                f"optimizer; configure_optimizers returned {names}."
            )
        optimizers[0].driven = True
        self._step_takes_batch_idx = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)

    def _optimizer(self, trainer: pl.Trainer) -> BSAMOptimizer:
        return getattr(trainer.optimizers[0], "optimizer", trainer.optimizers[0])

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._micro_batches:
            self._optimizer(trainer).add_noise_()
        self._stepping = not trainer.fit_loop._should_accumulate()
        device = next(pl_module.parameters()).device
        self._micro_batches.append((batch, batch_idx, RNGState.capture(device)))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._noisy_loss = _add(self._noisy_loss, loss.detach() / loss_scale(trainer.precision_plugin))

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._stepping:
            return
        optimizer = self._optimizer(trainer)
        scale, k = loss_scale(trainer.precision_plugin), trainer.accumulate_grad_batches
        if not optimizer.ascend_(grad_divisor=scale):
            return  # a non-finite gradient: it stays, and the step is skipped
        parallel = isinstance(trainer.strategy, ParallelStrategy)
        with frozen_norm_statistics(pl_module):
            for i, (batch, batch_idx, _) in enumerate(self._micro_batches):
                with ExitStack() as no_sync:
                    if parallel and i < len(self._micro_batches) - 1:
                        no_sync.enter_context(trainer.strategy.block_backward_sync())
                    args = (batch, batch_idx) if self._step_takes_batch_idx else (batch,)
                    with quiet(pl_module):
                        output = trainer.strategy.training_step(*args)
                    loss = output["loss"] if isinstance(output, dict) else output
                    trainer.precision_plugin.backward(loss / k, pl_module, trainer.optimizers[0])
                self._perturbed_loss = _add(self._perturbed_loss, loss.detach() / k)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if skip_if_not_finite(optimizer, trainer.precision_plugin):
            self.skipped_steps += 1
        if self.log_diagnostics and trainer._logger_connector.should_update_logs:
            metrics: dict[str, Any] = {"sam/skipped_steps": float(self.skipped_steps)}
            if self._noisy_loss is not None:
                metrics["sam/noisy_loss"] = self._noisy_loss.float()
            if self._perturbed_loss is not None:
                metrics["sam/perturbed_loss"] = self._perturbed_loss.float()
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self._reset_step()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._reset_step()

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = state_dict.get("skipped_steps", 0)


def _add(total: Tensor | None, value: Tensor) -> Tensor:
    return value if total is None else total + value
