"""SAF and MESA (Du et al., *Sharpness-Aware Training for Free*, NeurIPS 2022): sharpness-aware training with no
second pass, by an extra loss term.

* :class:`SAF` adds the trajectory loss
  ``lmbda / |B| * sum_i tau^2 KL(softmax(y_i^old / tau) || softmax(f_w(x_i) / tau))`` (``tau^2`` as in the
  authors' code, :func:`trajectory_kl`), where ``y_i^old`` are the logits the model gave example ``i``
  ``epochs_back`` epochs earlier (kept per example);
* :class:`MESA` replaces the stored logits by those of an exponential moving average of the weights (the teacher,
  one forward without backward per step, no per-example memory).

How the term enters the loss, in one code path for both forms of optimization:

* automatic optimization: at fit start the callback shadows the module's ``training_step`` with a wrapper (an
  instance attribute, removed at fit end) that adds the term to the loss ``training_step`` returns. Lightning then
  scales (AMP), divides (accumulation), back-propagates (one backward, one DDP all-reduce) and steps exactly as for
  the user's own loss; a SAM callback's perturbed pass, which goes through ``training_step`` too, sees the same term.
* manual optimization (GANs, several optimizers, ``SAMMixin.sam_step``): nothing is wrapped; ``training_step`` (or
  the ``loss_fn`` it gives ``sam_step``, so that the term is part of the loss at ``w`` and at ``w + e``) calls
  :meth:`SAF.regularized_loss` / :meth:`MESA.regularized_loss` with the same dict and back-propagates what it
  returns. The callback stays in the Trainer: its batch-end hook stores SAF's logits and updates MESA's average
  (after a batch in which an optimizer stepped: ``trainer.global_step`` counts ``optimizer.step()`` calls there).
  A first training batch that never calls ``regularized_loss`` raises a ``RuntimeError`` at its end.

The contract, checked at the first step:

* SAF: ``{"loss": loss, "logits": logits, "index": index}``; ``index`` holds each example's position in the
  dataset, which :class:`WithIndex` adds to any map-style dataset;
* MESA: ``{"loss": loss, "logits": logits}``; the teacher sees ``inputs_of(batch)`` (``batch[0]`` by default)
  through the module's ``forward``.

Logged under ``sam/``: ``saf_kl`` / ``mesa_kl`` (the ``tau^2``-scaled KL term of the batch's first pass, before
``lmbda``) and, for SAF, ``saf_coverage`` (the fraction of that pass's examples that had stored logits).
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_sharpness._lightning import shadow_method
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
    """Per-example ``tau^2 KL(softmax(target / tau) || softmax(logits / tau))`` in fp32 (``target`` is a constant).

    The ``tau^2`` is distillation's scaling (the gradient of the softened KL shrinks as ``1 / tau^2``), as in the
    authors' SAF and MESA code (github.com/AngusDujw/SAF): with it their hyperparameters (lambda 0.3, tau 5) mean
    here what they meant in their runs.
    """
    target = F.log_softmax(target_logits.detach().float() / tau, dim=-1)
    current = F.log_softmax(logits.float() / tau, dim=-1)
    return tau**2 * (target.exp() * (target - current)).sum(-1)


def _wrap_training_step(pl_module: pl.LightningModule, add_term: Callable[[Any, Any], Any]) -> Callable[[], None]:
    """Shadow ``pl_module.training_step`` by ``add_term(output, batch)`` of its output; returns the undo."""

    def training_step(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return add_term(original(*args, **kwargs), args[0] if args else kwargs.get("batch"))

    return shadow_method(pl_module, "training_step", training_step)


def _output_part(output: Any, key: str, who: str, contract: str) -> Tensor:
    if not isinstance(output, dict) or not isinstance(output.get(key), Tensor):
        raise RuntimeError(
            f"{who} needs `training_step` to return {contract} (under manual optimization: to pass it to "
            f"`{who}.regularized_loss`); got "
            f"{type(output).__name__}{' with keys ' + str(sorted(output)) if isinstance(output, dict) else ''}."
        )
    return output[key]


class _ExtraLoss(Callback):
    """Adds ``lmbda * term`` to the loss of every training pass of a fit (see the module docstring)."""

    contract = '{"loss": ..., "logits": ...}'

    def __init__(self, lmbda: float, tau: float, start_epoch: int, log_diagnostics: bool) -> None:
        self.lmbda = check_number(lmbda, "lmbda", minimum=0)
        self.tau = check_number(tau, "tau", minimum=0, strict=True)
        self.start_epoch = check_int(start_epoch, "start_epoch", least=0)
        self.log_diagnostics = log_diagnostics
        self._trainer: pl.Trainer | None = None  # the fit in progress
        self._undo: Callable[[], None] | None = None
        self._kl: Tensor | None = None
        self._calls = 0  # passes of this training batch that went through the term
        self._first_batch = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer, self._first_batch = trainer, True
        if pl_module.automatic_optimization:  # under manual optimization training_step calls regularized_loss
            self._undo = _wrap_training_step(pl_module, lambda output, batch: self._add_to(output, batch))

    def regularized_loss(self, output: dict[str, Any], batch: Any = None) -> Tensor:
        """The loss with the term added, for ``training_step`` under manual optimization: back-propagate it
        instead of ``output["loss"]``. The same code as the automatic form: same term, same logits stored (SAF:
        each example's first pass of the batch), same diagnostics. Call it in every pass of the batch that should
        carry the term (with ``SAMMixin.sam_step``, in the ``loss_fn``: the pass at ``w`` and the one at ``w + e``).

        Args:
            output: ``{"loss": loss, "logits": logits}``, plus ``"index"`` for SAF (see the module docstring).
            batch: the batch (or the part of it) these logits come from; MESA's teacher reads
                ``inputs_of(batch)``, SAF does not need it.

        Returns:
            ``output["loss"] + lmbda * term`` (``output["loss"]`` alone before ``start_epoch`` or while no stored
            logits reach back far enough).

        Raises:
            RuntimeError: outside the training step of a fit that has this callback in its ``callbacks``, under
                automatic optimization (the wrapper adds the term already), or for an ``output`` off the contract.

        Example::

            saf = SAF()


            class Model(LightningModule):
                def __init__(self):
                    super().__init__()
                    self.automatic_optimization = False
                    ...

                def training_step(self, batch, batch_idx):
                    x, y, index = batch
                    logits = self(x)
                    output = {"loss": F.cross_entropy(logits, y), "logits": logits, "index": index}
                    loss = saf.regularized_loss(output, batch)
                    opt = self.optimizers()
                    opt.zero_grad()
                    self.manual_backward(loss)
                    opt.step()


            Trainer(callbacks=[saf]).fit(Model(), DataLoader(WithIndex(dataset), batch_size=128))

            # with SAMMixin.sam_step, training_step gives it a loss function that calls regularized_loss: the
            # term is then part of the loss at w and at w + e
            def loss_fn(b):
                x, y, index = b
                logits = self(x)
                return saf.regularized_loss({"loss": F.cross_entropy(logits, y), "logits": logits, "index": index}, b)

            self.sam_step(self.optimizers(), loss_fn, batch)
        """
        name = type(self).__name__
        if self._trainer is None or not self._trainer.training:
            raise RuntimeError(
                f"`{name}.regularized_loss` is for the training step of a `Trainer.fit` that has this {name} in "
                "its `callbacks`."
            )
        if self._trainer.lightning_module.automatic_optimization:
            raise RuntimeError(
                f"Under automatic optimization {name} adds its term to the loss `training_step` returns: return "
                f"{self.contract} instead of calling `{name}.regularized_loss` (the term would count twice)."
            )
        return self._regularized(output, batch)

    def _add_to(self, output: Any, batch: Any) -> dict[str, Any]:
        loss = self._regularized(output, batch)
        return {**output, "loss": loss}

    def _regularized(self, output: Any, batch: Any) -> Tensor:
        """``output["loss"] + lmbda * term``: the one path of the automatic wrapper and of regularized_loss."""
        name, trainer = type(self).__name__, self._trainer
        loss = _output_part(output, "loss", name, self.contract)
        logits = _output_part(output, "logits", name, self.contract)
        self._calls += 1
        per_example = self._term(trainer, trainer.lightning_module, output, logits, batch)
        if per_example is None or trainer.current_epoch < self.start_epoch:
            return loss
        kl = per_example.sum() / logits.shape[0]
        if self._kl is None:
            self._kl = kl.detach()
        return loss + self.lmbda * kl.to(loss.dtype)

    def _term(self, trainer, pl_module, output, logits, batch) -> Tensor | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._kl = None  # the first pass of the batch is the one at w; SAM's perturbed pass comes after
        self._calls = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Silently training without the term is the failure to avoid: a manual module must call the method.
        if self._first_batch and self._calls == 0 and not pl_module.automatic_optimization:
            name = type(self).__name__
            raise RuntimeError(
                f"{name} is in the Trainer's callbacks, but the first training batch never called "
                f"`{name}.regularized_loss`. Under manual optimization nothing is added by itself: compute the loss "
                f"to back-propagate as `{name.lower()}.regularized_loss(output, batch)` with output = "
                f"{self.contract}, in training_step or in the loss_fn given to `sam_step`."
            )
        self._first_batch = False

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, Any]) -> None:
        if self.log_diagnostics and trainer._logger_connector.should_update_logs:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def _remove(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None
        self._trainer = None

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
    :class:`MESA` is the choice). Under manual optimization the loss comes from :meth:`regularized_loss`.

    The defaults are the authors' (github.com/AngusDujw/SAF): lambda 0.3 (README, and their ImageNet ``run.sh``;
    ``SAF_train.py``'s own default is 0.16), temperature 5, 3 epochs back (``SAF_train.py``; README "2/3", ``run.sh``
    2), with the KL multiplied by ``tau ** 2`` as in their code (:func:`trajectory_kl`). They start the term after
    epoch 5 (``kl_start_epoch``), which is ``start_epoch=6`` here.

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
        if logits.dim() != 2:
            raise RuntimeError(
                f"SAF stores one row of logits per example, `logits` of shape (batch, classes); got shape "
                f"{tuple(logits.shape)}. For per-token outputs (a language model) use MESA, which keeps no per-example "
                "store, or return one row of logits per example."
            )
        if index.numel() != logits.shape[0]:
            raise RuntimeError(f"SAF: `index` has {index.numel()} entries for {logits.shape[0]} rows of logits.")
        self._remember(index.detach(), logits.detach())
        epoch, slot = trainer.current_epoch, trainer.current_epoch % self.epochs_back
        if self.outputs is None or int(index.max()) >= self.outputs.shape[1]:
            self._record_coverage(0.0)
            return None
        rows = index.to(self.outputs.device)
        valid = (self.stamps[slot, rows] == epoch - self.epochs_back).to(logits.device)
        self._record_coverage(float(valid.float().mean()))
        if not bool(valid.any()):
            return None
        targets = self.outputs[slot, rows].to(logits.device)
        return torch.where(valid, trajectory_kl(logits, targets, self.tau), torch.zeros((), device=logits.device))

    def _remember(self, index: Tensor, logits: Tensor) -> None:
        """Keep each example's logits from its first pass of the batch, stored at the batch's end: the pass at
        ``w``, not SAM's at ``w + e``; with the mixin's m-SAM, each chunk's own pass at ``w``."""
        if self._seen is None:
            self._seen = (index, logits)
            return
        seen_index, seen_logits = self._seen
        new = ~torch.isin(index, seen_index)
        if bool(new.any()):
            self._seen = (torch.cat([seen_index, index[new]]), torch.cat([seen_logits, logits[new]]))

    def _record_coverage(self, coverage: float) -> None:
        if self._calls == 1:  # the batch's first pass, like the KL that is logged
            self._coverage = coverage

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._seen = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
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


def _first_field(batch: Any) -> Any:
    """What MESA's teacher reads by default: ``batch[0]`` of a tuple or list, the batch itself otherwise."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _state_of(module: nn.Module) -> dict[str, Tensor]:
    """The module's parameters and buffers by name (tied ones once), what its teacher averages."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _tensors_in(batch: Any) -> list[Tensor]:
    """The tensors of a (nested) tuple, list or mapping batch, in order."""
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        return [t for item in batch for t in _tensors_in(item)]
    return []


class MESA(_ExtraLoss):
    """Memory-Efficient Sharpness-Aware training (Du et al., 2022): a KL term towards the logits of an
    exponential moving average of the weights, ``v <- decay * v + (1 - decay) * w`` after every optimizer step.

    The teacher is the average of the module's parameters and floating buffers (other buffers copied), run in
    eval mode without gradient on ``inputs_of(batch)`` through the module's own ``forward`` with the averaged tensors
    in place (``torch.func.functional_call``): one copy of the parameters and buffers, not of the module and what
    it holds (data, metrics, a SAM engine's state). Its logits are computed at the start of each (micro-)batch,
    before the student's forward, so that its temporaries never stack on the student's activations, inside
    Lightning's precision context (autocast applies), and serve every pass of that batch (a SAM callback's
    perturbed pass, its global mode's replay of the step's micro-batches); a pass on anything else (m-SAM's chunks
    under the mixin) runs the teacher on it then. Costs one forward per micro-batch; the average is saved in
    checkpoints (``state_dict()["teacher"]``) and is :attr:`average` by parameter name. Under manual optimization
    the loss comes from :meth:`regularized_loss`.

    Defaults: lambda 0.8 and temperature 5 as the authors' ``run.sh`` (github.com/AngusDujw/SAF), with the KL
    multiplied by ``tau ** 2`` as in their code (:func:`trajectory_kl`); decay 0.9998 as their MESA runs, timm's
    ``ModelEmaV2`` at its default ``--model-ema-decay``, which ``run.sh`` leaves. They start the term after epoch 5
    (``kl_start_epoch``), which is ``start_epoch=6`` here.

    Args:
        lmbda: weight of the KL term, >= 0.
        tau: softmax temperature, > 0.
        decay: the EMA's decay, in [0, 1).
        start_epoch: no term (and no teacher forward) before this epoch; the average is kept from the start.
        inputs_of: what the teacher's ``forward`` takes from a batch; default ``batch[0]`` for a tuple or list,
            the batch itself otherwise.
        log_diagnostics: log ``sam/mesa_kl``.

    Raises:
        ValueError: for a negative ``lmbda``, a non-positive ``tau`` or a ``decay`` outside [0, 1).

    Example::

        trainer = Trainer(callbacks=[MESA(lmbda=0.8, tau=5.0, decay=0.9998, start_epoch=6)])
    """

    def __init__(
        self,
        lmbda: float = 0.8,
        tau: float = 5.0,
        decay: float = 0.9998,
        start_epoch: int = 0,
        inputs_of: Callable[[Any], Any] | None = None,
        log_diagnostics: bool = True,
    ) -> None:
        super().__init__(lmbda, tau, start_epoch, log_diagnostics)
        self.decay = check_number(decay, "decay", minimum=0)
        if not self.decay < 1:
            raise ValueError(f"`decay` must be in [0, 1), got {decay!r}.")
        self.inputs_of = inputs_of or _first_field  # a module-level default: ddp_spawn pickles callbacks
        self.average: dict[str, Tensor] | None = None  # the teacher: the module's tensors averaged, by name
        self._pending: dict[str, Tensor] | None = None  # a checkpoint's average, put in place at fit start
        self._targets: deque[tuple[list[weakref.ref], Tensor]] = deque()
        self._last_step = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            self.average = {name: t.detach().clone() for name, t in _state_of(pl_module).items()}
            if self._pending is not None:
                unknown = sorted(set(self._pending) - set(self.average))
                if unknown:
                    raise RuntimeError(f"MESA: the checkpoint's teacher has tensors the module lacks: {unknown}.")
                for name, value in self._pending.items():
                    self.average[name].copy_(value)
                self._pending = None
        # The teacher's logits of every micro-batch of a step: SAM's global mode replays them all at its end.
        self._targets = deque(maxlen=trainer.accumulate_grad_batches)
        self._last_step = trainer.global_step
        super().on_fit_start(trainer, pl_module)

    def _teacher(self, pl_module: pl.LightningModule, batch: Any) -> Tensor:
        """The average's logits on ``inputs_of(batch)``: the module's forward with the averaged tensors in place of
        its parameters and buffers, in eval mode, without gradient; the module's modes are put back after."""
        modes = [(m, m.training) for m in pl_module.modules()]
        pl_module.eval()
        try:
            with torch.no_grad():
                return torch.func.functional_call(pl_module, self.average, (self.inputs_of(batch),))
        finally:
            for m, training in modes:
                m.training = training

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if trainer.current_epoch < self.start_epoch:
            return
        # Here, not in training_step: there the teacher's forward temporaries stacked on the student's live
        # activations (15.7 parameter copies of extra peak on the benchmark CNN, against 1 for the average).
        with trainer.precision_plugin.forward_context():
            target = self._teacher(pl_module, batch)
        # Known by the batch's tensors (weakly, not to keep them alive): DDP may rebuild the containers around them.
        self._targets.append(([weakref.ref(t) for t in _tensors_in(batch)], target))

    def _target_of(self, batch: Any) -> Tensor | None:
        tensors = _tensors_in(batch)
        for refs, target in self._targets:
            if tensors and len(refs) == len(tensors) and all(r() is t for r, t in zip(refs, tensors)):
                return target
        return None

    def _term(self, trainer, pl_module, output, logits, batch) -> Tensor | None:
        if trainer.current_epoch < self.start_epoch:
            return None
        target = self._target_of(batch)
        if target is None:  # not a batch the hook saw (a chunk of m-SAM): the teacher's pass on it now
            target = self._teacher(pl_module, batch)
        return trajectory_kl(logits, target, self.tau)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        if trainer.global_step == self._last_step:
            return  # an accumulating micro-batch: no step yet
        self._last_step = trainer.global_step
        with torch.no_grad():
            for name, new in _state_of(pl_module).items():
                avg = self.average[name]
                if avg.is_floating_point():
                    avg.mul_(self.decay).add_(new.detach().to(avg.dtype), alpha=1 - self.decay)
                else:
                    avg.copy_(new)
        if self._kl is not None:
            self._log(trainer, pl_module, {"sam/mesa_kl": self._kl.float()})

    def state_dict(self) -> dict[str, Any]:
        if self.average is None:
            return {}
        return {"teacher": {k: v.detach().cpu().clone() for k, v in self.average.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("teacher")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._pending = None  # a checkpoint's teacher, if any, is loaded after this
