"""Sparse SAM (Mi et al., *Make Sharpness-Aware Minimization Stronger: A Sparse Perturbation Approach*, NeurIPS
2022): SAM whose perturbation moves only a fraction ``1 - sparsity`` of the weights, chosen element by element.

The perturbation is SAM's in the :class:`~lightning_sharpness.geometry_variants.MaskedGeometry`,
``e = rho M g / ||M g||``; the two callbacks differ only in how they choose the binary mask ``M``:

* :class:`SSAMF` (Fisher): every ``update_freq`` steps, the empirical Fisher diagonal ``sum_i (d l_i / d w)^2`` over
  ``num_samples`` examples of the batch at hand; the ``1 - sparsity`` fraction of elements with the largest Fisher
  values are perturbed (one global ranking over all perturbed parameters, as in the paper);
* :class:`SSAMD` (dynamic): a random mask at the first step; every ``update_freq`` steps, ``drop_rate`` of the
  perturbed elements with the smallest gradient magnitude ``|g|`` (the flattest) are dropped and as many are grown
  back uniformly at random among the others (the sparsity stays fixed).

Everything else (rho schedules, m-sharpness, modes, precision, DDP, accumulation) is the SAM callback's. Under DDP
the Fisher values (SSAM-F) and ``|g|`` (SSAM-D) are summed over processes before ranking, and SSAM-D's random
draws come from one seeded generator, so every process holds the same mask. Masks, the refresh step and the
generator are saved in checkpoints (bitwise resume). Logged: ``sam/sparsity`` (fraction of perturbed-parameter
elements held fixed) next to SAM's diagnostics.

For the mixin, ``SAMEngine(geometry=MaskedGeometry())`` takes masks set by hand
(:meth:`~lightning_sharpness.geometry_variants.MaskedGeometry.set_masks`), e.g. from :func:`fisher_mask`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_sharpness._lightning import quiet
from lightning_sharpness.batching import split_examples
from lightning_sharpness.geometry import Geometry
from lightning_sharpness.geometry_variants import MaskedGeometry
from lightning_sharpness.sam.callback import SAM
from lightning_sharpness.sam.engine import RhoLike
from lightning_sharpness.validation import check_int, check_number

__all__ = ["SSAMD", "SSAMF", "drop_grow_mask", "fisher_mask", "top_fraction_mask"]


# ---------------------------------------------------------------------------------------------- masks, plain torch
def top_fraction_mask(scores: Sequence[Tensor], sparsity: float) -> list[Tensor]:
    """Boolean masks keeping the ``1 - sparsity`` fraction of elements with the largest ``scores``, ranked over
    all tensors together (``torch.topk`` on the concatenation)."""
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores])
    keep = round((1.0 - sparsity) * flat.numel())
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if keep:
        mask[torch.topk(flat, keep).indices] = True
    return _unflatten(mask, scores)


def fisher_mask(
    loss_of: Callable[[Any], Tensor],
    params: Sequence[Tensor],
    examples: Any,
    sparsity: float,
    chunk: int = 1,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> list[Tensor]:
    """SSAM-F's mask: the empirical Fisher diagonal ``sum_c (d loss_of(c) / d w)^2`` over the chunks of ``chunk``
    examples of ``examples``, then :func:`top_fraction_mask`. ``reduce`` sums the Fisher values over processes."""
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for part, _ in split_examples(examples, chunk):
        grads = torch.autograd.grad(loss_of(part), list(params), allow_unused=True)
        for f, g in zip(fisher, grads):
            if g is not None:
                f.add_(g.detach().float().pow(2))
    if reduce is not None:
        flat = reduce(torch.cat([f.reshape(-1) for f in fisher]))
        fisher = _unflatten(flat, fisher)
    return top_fraction_mask(fisher, sparsity)


def drop_grow_mask(
    masks: Sequence[Tensor], grads: Sequence[Tensor], drop_rate: float, generator: torch.Generator
) -> list[Tensor]:
    """SSAM-D's update: drop ``round(drop_rate * active)`` perturbed elements with the smallest ``|g|`` and grow as
    many among the elements that were not perturbed, uniformly at random (``torch.randperm`` of ``generator``)."""
    mask = torch.cat([m.reshape(-1) for m in masks]).clone()
    score = torch.cat([g.detach().reshape(-1).float().abs() for g in grads]).to(mask.device)
    active = mask.nonzero().squeeze(1)
    inactive = (~mask).nonzero().squeeze(1)
    k = min(round(drop_rate * active.numel()), inactive.numel())
    if k:
        dropped = active[torch.topk(score[active], k, largest=False).indices]
        grown = inactive[torch.randperm(inactive.numel(), generator=generator)[:k].to(inactive.device)]
        mask[dropped] = False
        mask[grown] = True
    return _unflatten(mask, masks)


def random_mask(params: Sequence[Tensor], sparsity: float, generator: torch.Generator) -> list[Tensor]:
    """SSAM-D's first mask: ``1 - sparsity`` of all elements, uniformly at random."""
    total = sum(p.numel() for p in params)
    keep = round((1.0 - sparsity) * total)
    mask = torch.zeros(total, dtype=torch.bool)
    mask[torch.randperm(total, generator=generator)[:keep]] = True
    return _unflatten(mask.to(params[0].device) if params else mask, params)


def _unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for t in like:
        out.append(flat[start : start + t.numel()].reshape(t.shape))
        start += t.numel()
    return out


# ---------------------------------------------------------------------------------------------- the callbacks
class _SparseSAM(SAM):
    """SAM in a :class:`MaskedGeometry` whose mask a subclass refreshes every ``update_freq`` optimizer steps."""

    def __init__(self, rho: RhoLike, sparsity: float, update_freq: int, base: Geometry | None, **kwargs: Any) -> None:
        if "geometry" in kwargs:
            raise ValueError(
                f"{type(self).__name__} perturbs in a masked geometry; pass its element-wise scale as `base=` "
                "(e.g. `base=AdaptiveGeometry()` for a sparse ASAM), not `geometry=`."
            )
        self.sparsity = check_number(sparsity, "sparsity", minimum=0)
        if not self.sparsity < 1:
            raise ValueError(
                f"`sparsity` must be in [0, 1) (the fraction of weights left unperturbed), got {sparsity!r}."
            )
        self.update_freq = check_int(update_freq, "update_freq")
        self.masked = MaskedGeometry(base)
        super().__init__(rho=rho, geometry=self.masked, **kwargs)
        self._mask_step: int | None = None  # global step of the last refresh

    def _reset_fit(self) -> None:
        super()._reset_fit()
        self._mask_step = None
        if hasattr(self, "masked"):
            self.masked.masks = {}

    def _refresh_due(self, trainer: pl.Trainer) -> bool:
        return self._sam_is_on(trainer) and (
            self._mask_step is None or trainer.global_step - self._mask_step >= self.update_freq
        )

    def _named_params(self, pl_module: pl.LightningModule) -> tuple[list[str], list[Tensor]]:
        lookup = dict(pl_module.named_parameters())
        names = self.masked.names
        return names, [lookup[n] for n in names]

    @staticmethod
    def _sum_over_processes(trainer: pl.Trainer) -> Callable[[Tensor], Tensor] | None:
        if trainer.world_size <= 1:
            return None
        return lambda t: trainer.strategy.reduce(t.to(trainer.strategy.root_device), reduce_op="sum")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        logged = self._active and self.log_diagnostics and trainer._logger_connector.should_update_logs
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if logged:
            pl_module.log("sam/sparsity", self.masked.sparsity(), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["masks"] = {n: m.detach().cpu().clone() for n, m in self.masked.masks.items()}
        state["mask_step"] = self._mask_step
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.masked.masks = dict(state_dict.get("masks", {}))
        self._mask_step = state_dict.get("mask_step")


class SSAMF(_SparseSAM):
    """SSAM-F (Mi et al., 2022): SAM perturbing only the weights of largest empirical Fisher information.

    Every ``update_freq`` optimizer steps (and at the first), before Lightning's pass, the callback computes the
    Fisher diagonal ``sum_i (d l_i / d w)^2`` over the first ``num_samples`` examples of the batch (one gradient per
    chunk of ``fisher_chunk`` examples, through the module's own ``training_step``, without autocast and with
    normalization statistics left as they were) and perturbs the ``1 - sparsity`` fraction of largest values.

    Args:
        rho: perturbation radius (or schedule).
        sparsity: fraction of the perturbed parameters' elements held fixed, in [0, 1).
        num_samples: examples the Fisher sums over (at most the batch size); costs one extra backward per chunk.
        update_freq: optimizer steps between mask refreshes.
        fisher_chunk: examples per Fisher gradient; 1 gives the per-example Fisher of the paper, >= 2 is needed
            with BatchNorm in training mode.
        base: the element-wise geometry the mask multiplies (standard; ``AdaptiveGeometry()`` for sparse ASAM).
        **kwargs: the :class:`~lightning_sharpness.SAM` callback's other options.

    Raises:
        ValueError: for a sparsity outside [0, 1), a non-positive ``num_samples``/``update_freq``/``fisher_chunk``,
            or a ``geometry=`` argument.

    Example::

        trainer = Trainer(callbacks=[SSAMF(rho=0.1, sparsity=0.5, num_samples=16, update_freq=100)])
    """

    def __init__(
        self,
        rho: RhoLike = 0.05,
        sparsity: float = 0.5,
        num_samples: int = 16,
        update_freq: int = 100,
        fisher_chunk: int = 1,
        base: Geometry | None = None,
        **kwargs: Any,
    ) -> None:
        self.num_samples = check_int(num_samples, "num_samples")
        self.fisher_chunk = check_int(fisher_chunk, "fisher_chunk")
        super().__init__(rho, sparsity, update_freq, base, **kwargs)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        first_micro_batch = self._micro_count == 0
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if first_micro_batch and self._refresh_due(trainer):
            self._refresh(trainer, pl_module, batch, batch_idx)

    def _refresh(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        names, params = self._named_params(pl_module)
        if not params:
            return
        examples = split_examples(batch, self.num_samples)[0][0]
        takes_idx = self._step_takes_batch_idx

        def loss_of(part: Any) -> Tensor:
            with quiet(pl_module), torch.enable_grad():
                output = pl_module.training_step(*((part, batch_idx) if takes_idx else (part,)))
            return output["loss"] if isinstance(output, dict) else output

        with self.engine.frozen_norm_stats():
            masks = fisher_mask(
                loss_of, params, examples, self.sparsity, self.fisher_chunk, self._sum_over_processes(trainer)
            )
        self.masked.set_masks(dict(zip(names, masks)))
        self._mask_step = trainer.global_step


class SSAMD(_SparseSAM):
    """SSAM-D (Mi et al., 2022): SAM with a dynamic sparse mask, dropped and regrown as training goes.

    At the first SAM step the mask is random (``1 - sparsity`` of the elements, from a generator seeded with
    ``seed``). Every ``update_freq`` steps after that, on the gradient ``g`` of Lightning's pass (summed over
    processes under DDP), ``round(drop_rate * active)`` perturbed elements of smallest ``|g|`` are dropped and as
    many unperturbed ones are grown uniformly at random; no extra forward or backward pass.

    Args:
        rho: perturbation radius (or schedule).
        sparsity: fraction of the perturbed parameters' elements held fixed, in [0, 1).
        drop_rate: fraction of the perturbed elements replaced at each update, in [0, 1] (constant; the paper's
            schedules for it are not reproduced).
        update_freq: optimizer steps between mask updates.
        seed: seed of the random draws (initial mask and growth).
        base: the element-wise geometry the mask multiplies.
        **kwargs: the :class:`~lightning_sharpness.SAM` callback's other options.

    Raises:
        ValueError: for a sparsity outside [0, 1), a drop rate outside [0, 1], a non-positive ``update_freq``, or a
            ``geometry=`` argument.

    Example::

        trainer = Trainer(callbacks=[SSAMD(rho=0.1, sparsity=0.5, drop_rate=0.5, update_freq=100)])
    """

    def __init__(
        self,
        rho: RhoLike = 0.05,
        sparsity: float = 0.5,
        drop_rate: float = 0.5,
        update_freq: int = 100,
        seed: int = 0,
        base: Geometry | None = None,
        **kwargs: Any,
    ) -> None:
        self.drop_rate = check_number(drop_rate, "drop_rate", minimum=0)
        if self.drop_rate > 1:
            raise ValueError(f"`drop_rate` must be in [0, 1], got {drop_rate!r}.")
        self.seed = check_int(seed, "seed", least=0)
        self.generator = torch.Generator().manual_seed(seed)
        super().__init__(rho, sparsity, update_freq, base, **kwargs)

    def _reset_fit(self) -> None:
        super()._reset_fit()
        if hasattr(self, "generator"):
            self.generator.manual_seed(self.seed)

    # torch.multiprocessing cannot send a torch.Generator to a spawned process (ddp_spawn pickles the callbacks
    # with it and the child dies rebuilding it): it travels as the bytes of its state.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["generator"] = bytes(self.generator.get_state().numpy())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator_state = state.pop("generator")
        self.__dict__.update(state)
        self.generator = torch.Generator()
        self.generator.set_state(torch.frombuffer(bytearray(generator_state), dtype=torch.uint8))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        first_micro_batch = self._micro_count == 0
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        # The drop/grow reads the gradient the ascent uses: in global mode that is the whole step's, complete only
        # after the step's last micro-batch, so later updates wait for it; the first mask needs no gradient.
        update_at = (
            self._stepping if self.engine.mode == "global" and self._mask_step is not None else first_micro_batch
        )
        self._update_now = update_at and self._refresh_due(trainer)
        if self._update_now and self._mask_step is None:  # the first mask: random, no gradient needed
            names, params = self._named_params(pl_module)
            if params:
                self.masked.set_masks(dict(zip(names, random_mask(params, self.sparsity, self.generator))))
            self._mask_step = trainer.global_step
            self._update_now = False

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(self, "_update_now", False):
            self._update_now = False
            names, params = self._named_params(pl_module)
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            reduce = self._sum_over_processes(trainer)
            with torch.no_grad():
                flat = torch.cat([g.detach().reshape(-1).float().abs() for g in grads]) if grads else None
                if flat is not None and reduce is not None:
                    flat = reduce(flat)
            if flat is not None and bool(torch.isfinite(flat).all()):  # an fp16 overflow keeps the old mask
                masks = [self.masked.masks.get(n, torch.ones_like(p, dtype=torch.bool)) for n, p in zip(names, params)]
                new = drop_grow_mask(masks, _unflatten(flat, params), self.drop_rate, self.generator)
                self.masked.set_masks(dict(zip(names, new)))
                self._mask_step = trainer.global_step
        super().on_after_backward(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "generator" in state_dict:
            self.generator.set_state(state_dict["generator"])
