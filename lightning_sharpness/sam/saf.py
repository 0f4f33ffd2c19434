"""SAF and MESA (Du et al., *Sharpness-Aware Training for Free*, NeurIPS 2022): sharpness-aware training with no
second pass, by an extra loss term.

* :class:`SAF` adds the trajectory loss ``lmbda / |B| * sum_i KL(softmax(y_i^old / tau) || softmax(f_w(x_i) / tau))``,
  where ``y_i^old`` are the logits the model gave example ``i`` ``epochs_back`` epochs earlier (kept per example);
* :class:`MESA` replaces the stored logits by those of an exponential moving average of the weights (the teacher,
  one forward without backward per step, no per-example memory).

How the term enters Lightning's pass: at fit start the callback shadows the module's ``training_step`` with a
wrapper (an instance attribute, removed at fit end) that adds the term to the loss ``training_step`` returns.
Lightning then scales (AMP), divides (accumulation), back-propagates (one backward, one DDP all-reduce) and steps
exactly as for the user's own loss; a SAM callback's perturbed pass, which goes through ``training_step`` too,
sees the same term. The contract, checked at the first step:

* SAF: ``training_step`` returns ``{"loss": loss, "logits": logits, "index": index}``; ``index`` holds each
  example's position in the dataset, which :class:`WithIndex` adds to any map-style dataset;
* MESA: ``training_step`` returns ``{"loss": loss, "logits": logits}``; the teacher sees ``inputs_of(batch)``
  (``batch[0]`` by default) through the module's ``forward``.

Logged under ``sam/``: ``saf_kl`` / ``mesa_kl`` (the KL term before ``lmbda``) and, for SAF, ``saf_coverage`` (the
fraction of the batch that had stored logits). Manual optimization is refused at setup (its ``training_step``
return value is not a loss that Lightning back-propagates).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import Dataset

from lightning_sharpness.validation import check_choice, check_int, check_number

__all__ = ["MESA", "SAF", "WithIndex", "trajectory_kl"]

_NEVER = -(2**31)  # the stamp of a row never written: no epoch minus epochs_back can equal it


class WithIndex(Dataset):
    """A map-style dataset whose items carry their index: a tuple item ``(x, y)`` becomes ``(x, y, i)``, a dict
    gains ``"index": i``, anything else becomes ``(item, i)``.

    Example::

        loader = DataLoader(WithIndex(TensorDataset(x, y)), batch_size=128, shuffle=True)
        # training_step: x, y, index = batch; ...; return {"loss": loss, "logits": logits, "index": index}
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, tuple):
            return (*item, index)
        if isinstance(item, dict):
            return {**item, "index": index}
        return item, index


def trajectory_kl(logits: Tensor, target_logits: Tensor, tau: float) -> Tensor:
    """Per-example ``KL(softmax(target / tau) || softmax(logits / tau))`` in fp32 (``target`` is a constant)."""
    target = F.log_softmax(target_logits.detach().float() / tau, dim=-1)
    current = F.log_softmax(logits.float() / tau, dim=-1)
    return (target.exp() * (target - current)).sum(-1)


def _wrap_training_step(pl_module: pl.LightningModule, add_term: Callable[[Any, tuple], Any]) -> Callable[[], None]:
    """Shadow ``pl_module.training_step`` by ``add_term(output, args)`` of its output; returns the undo."""
    original = pl_module.training_step

    @functools.wraps(original)  # keeps the signature Lightning and SAM inspect (batch_idx or not)
    def training_step(*args: Any, **kwargs: Any) -> Any:
        return add_term(original(*args, **kwargs), args)

    pl_module.training_step = training_step  # type: ignore[method-assign]

    def undo() -> None:
        if pl_module.__dict__.get("training_step") is training_step:
            del pl_module.__dict__["training_step"]

    return undo


def _output_part(output: Any, key: str, who: str, contract: str) -> Tensor:
    if not isinstance(output, dict) or not isinstance(output.get(key), Tensor):
        raise RuntimeError(
            f"{who} needs `training_step` to return {contract}; got "
            f"{type(output).__name__}{' with keys ' + str(sorted(output)) if isinstance(output, dict) else ''}."
        )
    return output[key]


class _ExtraLoss(Callback):
    """Adds ``lmbda * term`` to the loss of every ``training_step`` of a fit (see the module docstring)."""

    who = "extra loss"
    contract = '{"loss": ..., "logits": ...}'

    def __init__(self, lmbda: float, tau: float, start_epoch: int, log_diagnostics: bool) -> None:
        self.lmbda = check_number(lmbda, "lmbda", minimum=0)
        self.tau = check_number(tau, "tau", minimum=0, strict=True)
        self.start_epoch = check_int(start_epoch, "start_epoch", least=0)
        self.log_diagnostics = log_diagnostics
        self._undo: Callable[[], None] | None = None
        self._kl: Tensor | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not pl_module.automatic_optimization:
            raise ValueError(
                f"{type(self).__name__} adds its loss to what `training_step` returns, which needs automatic "
                f"optimization; {type(pl_module).__name__}.automatic_optimization is False."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._undo = _wrap_training_step(pl_module, lambda out, args: self._add(trainer, pl_module, out, args))

    def _add(self, trainer: pl.Trainer, pl_module: pl.LightningModule, output: Any, args: tuple) -> Any:
        loss = _output_part(output, "loss", type(self).__name__, self.contract)
        logits = _output_part(output, "logits", type(self).__name__, self.contract)
        per_example = self._term(trainer, pl_module, output, logits, args[0] if args else None)
        if per_example is None or trainer.current_epoch < self.start_epoch:
            return output
        kl = per_example.sum() / logits.shape[0]
        if self._kl is None:
            self._kl = kl.detach()
        return {**output, "loss": loss + self.lmbda * kl.to(loss.dtype)}

    def _term(self, trainer, pl_module, output, logits, batch) -> Tensor | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._kl = None  # the first pass of the batch is Lightning's own; SAM's perturbed pass comes after

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, Any]) -> None:
        if self.log_diagnostics and trainer._logger_connector.should_update_logs:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def _remove(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove()


class SAF(_ExtraLoss):
    """Sharpness-Aware Training for Free (Du et al., 2022): a KL term towards the model's own logits on the same
    example ``epochs_back`` epochs earlier; no second forward or backward.

    The logits of every example seen in epoch ``e`` are stored (``epochs_back`` slots of ``N x C``, grown as
    indices appear; under DDP every process stores every example, gathered at each step) and used in epoch
    ``e + epochs_back``; an example without logits from exactly then adds 0 (the mean still divides by the batch
    size, as in the paper's ``1 / |B|``). Memory: ``epochs_back * N * C * bytes(store_dtype)`` on ``store_device``,
    also saved in checkpoints (CIFAR-100, 50k x 100, 3 epochs back, fp32: 60 MB; ImageNet-1k: 15.4 GB, where
    :class:`MESA` is the choice).

    Args:
        lmbda: weight of the KL term (the paper's lambda), >= 0.
        tau: softmax temperature, > 0.
        epochs_back: how many epochs back the stored logits are (the paper's E tilde), >= 1.
        start_epoch: no term before this epoch (the logits are stored from the start).
        store_dtype: ``"float32"`` or ``"float16"`` (halves the memory).
        store_device: ``"device"`` (the logits' device) or ``"cpu"``.
        log_diagnostics: log ``sam/saf_kl`` and ``sam/saf_coverage``.

    Raises:
        ValueError: for a negative ``lmbda``, a non-positive ``tau`` or ``epochs_back``, or an unknown choice.

    Example::

        trainer = Trainer(callbacks=[SAF(lmbda=0.3, tau=5.0, epochs_back=3)])
    """

    contract = '{"loss": ..., "logits": ..., "index": ...} (wrap the dataset in WithIndex)'

    def __init__(
        self,
        lmbda: float = 0.3,
        tau: float = 5.0,
        epochs_back: int = 3,
        start_epoch: int = 0,
        store_dtype: Literal["float32", "float16"] = "float32",
        store_device: Literal["device", "cpu"] = "device",
        log_diagnostics: bool = True,
    ) -> None:
        super().__init__(lmbda, tau, start_epoch, log_diagnostics)
        self.epochs_back = check_int(epochs_back, "epochs_back")
        self.store_dtype = getattr(torch, check_choice(store_dtype, "store_dtype", ("float32", "float16")))
        self.store_device = check_choice(store_device, "store_device", ("device", "cpu"))
        self.outputs: Tensor | None = None  # [epochs_back, N, C]
        self.stamps: Tensor | None = None  # [epochs_back, N]: the epoch each stored row comes from, or _NEVER
        self._seen: tuple[Tensor, Tensor] | None = None
        self._coverage = 0.0
        self._expected: int | None = None

    @property
    def stored_bytes(self) -> int:
        """Bytes held by the stored logits (and their epoch stamps)."""
        if self.outputs is None:
            return 0
        return self.outputs.numel() * self.outputs.element_size() + self.stamps.numel() * self.stamps.element_size()

    def _term(self, trainer, pl_module, output, logits, batch) -> Tensor | None:
        index = _output_part(output, "index", "SAF", self.contract).reshape(-1).long()
        if index.numel() != logits.shape[0]:
            raise RuntimeError(f"SAF: `index` has {index.numel()} entries for {logits.shape[0]} rows of logits.")
        if self._seen is None:  # Lightning's own pass of this batch: these logits are stored at its end
            self._seen = (index.detach(), logits.detach())
        epoch, slot = trainer.current_epoch, trainer.current_epoch % self.epochs_back
        if self.outputs is None or int(index.max()) >= self.outputs.shape[1]:
            self._coverage = 0.0
            return None
        rows = index.to(self.outputs.device)
        valid = (self.stamps[slot, rows] == epoch - self.epochs_back).to(logits.device)
        self._coverage = float(valid.float().mean())
        if not bool(valid.any()):
            return None
        targets = self.outputs[slot, rows].to(logits.device)
        return torch.where(valid, trajectory_kl(logits, targets, self.tau), torch.zeros((), device=logits.device))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._seen = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._seen is None:
            return
        index, logits = self._seen
        self._seen = None
        if trainer.world_size > 1:  # every process keeps every example: it may see it on another process later
            index = trainer.strategy.all_gather(index).reshape(-1)
            logits = trainer.strategy.all_gather(logits).reshape(-1, logits.shape[-1])
        self._store(trainer.current_epoch, index, logits)
        if self._kl is not None:
            self._log(trainer, pl_module, {"sam/saf_kl": self._kl.float(), "sam/saf_coverage": self._coverage})

    def _store(self, epoch: int, index: Tensor, logits: Tensor) -> None:
        device = logits.device if self.store_device == "device" else torch.device("cpu")
        needed = int(index.max()) + 1
        if self.outputs is None or needed > self.outputs.shape[1] or logits.shape[-1] != self.outputs.shape[2]:
            # the dataset's length when the loader tells it (one allocation), else doubling as indices appear
            size = max(needed, self._expected or 2 * (self.outputs.shape[1] if self.outputs is not None else 0))
            outputs = torch.zeros(self.epochs_back, size, logits.shape[-1], dtype=self.store_dtype, device=device)
            stamps = torch.full((self.epochs_back, size), _NEVER, dtype=torch.int32, device=device)
            if self.outputs is not None and logits.shape[-1] == self.outputs.shape[2]:
                outputs[:, : self.outputs.shape[1]] = self.outputs
                stamps[:, : self.stamps.shape[1]] = self.stamps
            self.outputs, self.stamps = outputs, stamps
        slot, rows = epoch % self.epochs_back, index.to(device)
        self.outputs[slot, rows] = logits.detach().to(device=device, dtype=self.store_dtype)
        self.stamps[slot, rows] = epoch

    def state_dict(self) -> dict[str, Any]:
        if self.outputs is None:
            return {}
        return {"outputs": self.outputs.cpu(), "stamps": self.stamps.cpu()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            self._expected: int | None = len(trainer.train_dataloader.dataset)
        except (AttributeError, TypeError):
            self._expected = None
        pending = self.__dict__.pop("_pending", None)
        if pending:
            device = pl_module.device if self.store_device == "device" else torch.device("cpu")
            self.outputs = pending["outputs"].to(device)
            self.stamps = pending["stamps"].to(device)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.outputs = self.stamps = None  # a new fit starts empty unless a checkpoint restores the store


class MESA(_ExtraLoss):
    """Memory-Efficient Sharpness-Aware training (Du et al., 2022): a KL term towards the logits of an
    exponential moving average of the weights, ``v <- decay * v + (1 - decay) * w`` after every optimizer step.

    The teacher is a copy of the module (parameters and float buffers averaged, other buffers copied), run in eval
    mode without gradient on ``inputs_of(batch)`` through ``forward``, inside Lightning's precision context (autocast
    applies). Costs one forward per micro-batch and one copy of the model; the copy is saved in checkpoints.

    Args:
        lmbda: weight of the KL term, >= 0.
        tau: softmax temperature, > 0.
        decay: the EMA's decay, in [0, 1).
        start_epoch: no term before this epoch (the average is kept from the start).
        inputs_of: what the teacher's ``forward`` takes from a batch; default ``batch[0]`` for a tuple or list,
            the batch itself otherwise.
        log_diagnostics: log ``sam/mesa_kl``.

    Raises:
        ValueError: for a negative ``lmbda``, a non-positive ``tau`` or a ``decay`` outside [0, 1).

    Example::

        trainer = Trainer(callbacks=[MESA(lmbda=0.8, tau=1.0, decay=0.9995, start_epoch=5)])
    """

    def __init__(
        self,
        lmbda: float = 0.8,
        tau: float = 1.0,
        decay: float = 0.9995,
        start_epoch: int = 0,
        inputs_of: Callable[[Any], Any] | None = None,
        log_diagnostics: bool = True,
    ) -> None:
        super().__init__(lmbda, tau, start_epoch, log_diagnostics)
        self.decay = check_number(decay, "decay", minimum=0)
        if not self.decay < 1:
            raise ValueError(f"`decay` must be in [0, 1), got {decay!r}.")
        self.inputs_of = inputs_of or (lambda batch: batch[0] if isinstance(batch, (tuple, list)) else batch)
        self.teacher: pl.LightningModule | None = None
        self._teacher_state: dict[str, Tensor] | None = None
        self._last_step = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Copy before the wrapper is installed, and without the trainer (the memo maps it to None).
        self.teacher = copy.deepcopy(pl_module, memo={id(trainer): None})
        self.teacher.eval().requires_grad_(False)
        if self._teacher_state is not None:
            self.teacher.load_state_dict(self._teacher_state)
            self._teacher_state = None
        self._last_step = trainer.global_step
        super().on_fit_start(trainer, pl_module)

    def _term(self, trainer, pl_module, output, logits, batch) -> Tensor | None:
        if trainer.current_epoch < self.start_epoch:
            return None
        with torch.no_grad():
            target = self.teacher(self.inputs_of(batch))
        return trajectory_kl(logits, target, self.tau)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._last_step:
            return  # an accumulating micro-batch: no step yet
        self._last_step = trainer.global_step
        with torch.no_grad():
            student = pl_module.state_dict()
            for name, avg in self.teacher.state_dict().items():
                new = student[name].detach()
                if avg.is_floating_point():
                    avg.mul_(self.decay).add_(new.to(avg.dtype), alpha=1 - self.decay)
                else:
                    avg.copy_(new)
        if self._kl is not None:
            self._log(trainer, pl_module, {"sam/mesa_kl": self._kl.float()})

    def state_dict(self) -> dict[str, Any]:
        if self.teacher is None:
            return {}
        return {"teacher": {k: v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._teacher_state = state_dict.get("teacher")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._teacher_state = None  # a checkpoint's teacher, if any, is loaded after this
