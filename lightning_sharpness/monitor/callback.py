"""The SharpnessMonitor callback: measure sharpness on a fixed probe set while training, log it to the loggers.

The callback only decides *when* to measure, *on what* data and *where* the numbers go; the measuring itself is
done by the side-effect-free functions of :mod:`lightning_sharpness.measures`, called as
``measure(model, loss_fn, batches, **options)``.

Under DDP each process measures its share of the probe set. Measures of a quantity that is linear in the loss
(the trace and diagonal of the Hessian, average-case sharpness, m-sharpness) are then combined as means of
per-process means weighted by the number of examples; measures that are not linear in the loss (eigenvalues,
spectral density, Rényi sharpness, ``tr(diag(H)^1/2)``, worst-case sharpness of the whole set) are measured on
the whole probe set on every process instead, so that the logged value is that of the probe set and not a mean
of per-shard values, which would be a different (and biased) number.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from lightning_sharpness.batching import batch_size, first_examples, move_to_device
from lightning_sharpness.measures import LossFn
from lightning_sharpness.monitor.context import (
    MeasurementFailed,
    agree,
    failure,
    max_over_processes,
    measuring_context,
    run_together,
)
from lightning_sharpness.monitor.plan import (
    AUTO_MAX_OVERHEAD,
    END_SLACK,
    Plan,
    Schedule,
    final_step,
    forecast_training,
    plan_line,
    scheduled_points,
    size_plan,
    time_gradient,
    time_products,
)
from lightning_sharpness.monitor.probe import ProbeSet, probe_loader, select_probe, step_loss
from lightning_sharpness.monitor.report import landscape_images, log_measurement
from lightning_sharpness.monitor.run import run_measures
from lightning_sharpness.monitor.spec import (
    DEFAULT_MEASURES,
    DENSITY_MODES,
    PROBE_SOURCES,
    MeasureSpec,
    parse_landscape,
    parse_measures,
    positive_float_or_none,
    positive_int_or_none,
)

__all__ = ["SharpnessMonitor"]


class SharpnessMonitor(Callback):
    r"""Measure sharpness periodically on a fixed, seeded probe set and log it under ``sharpness/<name>``.

    Args:
        measures: names of functions of :mod:`lightning_sharpness.measures`, or mappings with a ``name`` and
            that function's options (YAML-friendly), e.g. ``{name: worst_case_sharpness, rho: 0.05,
            geometry: adaptive}``; an optional ``tag`` sets the name it is logged under (needed when one measure
            is listed twice). A measure with a ``seed`` option gets the monitor's ``seed``, so that every
            measurement uses the same random vectors. Default (:data:`DEFAULT_MEASURES`): the top eigenvalue and
            a 10-vector Hutchinson trace, cheap enough for the 5% budget.
        every_n_steps: measure after every n-th optimizer step (``None``: off).
        every_n_epochs: measure at the end of every n-th training epoch. ``None`` means 1 when ``every_n_steps``
            is not given and off when it is.
        on_train_end: measure once more when training ends (unless the last step was just measured).
        on_validate: measure at the end of ``trainer.validate(...)`` (and LightningCLI's ``validate``): a saved
            checkpoint is measured on the same probe set, logged at the checkpoint's global step.
        probe: ``"train"`` or ``"val"`` (batches of that dataloader) or a ``DataLoader``. The examples are drawn
            once from its dataset with ``seed``, collated by its ``collate_fn``, and kept (see :meth:`state_dict`).
        probe_batches: how many batches of the dataloader's batch size make the probe set.
        loss_fn: ``loss_fn(module, batch) -> mean loss``; default: the loss returned by the module's
            ``training_step`` (``validation_step`` when ``probe="val"``), which logs nothing while measuring.
        seed: seeds the probe set and every measure that takes a ``seed``.
        max_seconds: time budget of one measurement; measures that would start after it are skipped.
        max_hvps: Hessian-vector-product budget of one measurement, shared by the measures in order: each one's
            size (``matvecs``, ``max_iter``, SLQ ``steps``) is capped to what is left; a measure that cannot fit
            is skipped.
        max_overhead: the time budget, a fraction of the training time. ``"auto"`` (default): 0.05 for the
            default schedule (every epoch), none when ``every_n_steps`` or ``every_n_epochs`` is given (an
            explicit schedule is measured at every point); a number: that budget, with any schedule; ``None``:
            no budget. Under a budget, the plan made at fit start sizes the measurement so that the fit-start
            and end-of-training measurements fit in the budget of the forecast training time (fewer probe
            examples, then fewer products, then the end of training only, or none; see :attr:`plan`); a periodic
            measurement is skipped, with a warning, when it would bring the time spent measuring above
            ``max_overhead`` of the training time so far (the end one: twice that, when the plan reserved its
            room). Measurements of ``trainer.validate`` are never skipped.
        fp32: measure in float32 also when training in bf16 / fp16 (autocast off, half weights cast to fp32 for
            the measurement and back bitwise). ``False``: measure in the training precision.
        density: how the ``spectral_density`` measure is drawn in TensorBoard: ``"histogram"``, ``"image"``,
            ``"both"`` or ``"none"``.
        landscape: ``True`` or a mapping ``{dims: [1, 2], steps: 21, span: 1.0, seed: 0}``: also log 1-D and 2-D
            loss-landscape pictures along filter-normalized random directions (TensorBoard only).
        progress_bar: the tag of one measure to show in the progress bar.

    At fit start, before any training step, the monitor forecasts its cost: it times one training-loss gradient
    and one Hessian-vector product on the probe set, counts the products each measure needs, sizes the
    measurement to the budget and announces the plan in one line (what, how often, the forecast seconds). It
    then measures once (at step 0: a baseline on the curves, and a check of the configuration: an error there
    stops ``fit`` before any training time is spent). A measurement that fails later in training (an op without
    double backward, out of memory, a bad batch) warns once, with the error, counts in ``sharpness/errors`` and is
    skipped; training goes on (under DDP every process skips it).

    Example::

        from lightning.pytorch import Trainer
        from lightning_sharpness import SharpnessMonitor

        monitor = SharpnessMonitor(
            measures=["hessian_eigenvalues", "hessian_trace", {"name": "worst_case_sharpness", "rho": 0.05}],
            every_n_steps=200,
        )
        trainer = Trainer(callbacks=[monitor])

    Raises:
        ValueError: when the callback is built, for an unknown measure or option, a bad option value (checked by
            the measure's own validators), or a bad schedule, probe, budget, ``density``, ``landscape`` or
            ``progress_bar``, naming the argument and what it allows; at fit start (before any training step),
            when the probe source is missing or empty, or the first measurement fails.
    """

    def __init__(
        self,
        measures: Sequence[MeasureSpec] = DEFAULT_MEASURES,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        on_train_end: bool = True,
        on_validate: bool = True,
        probe: Literal["train", "val"] | DataLoader = "train",
        probe_batches: int = 2,
        loss_fn: LossFn | None = None,
        seed: int = 0,
        max_seconds: float | None = None,
        max_hvps: int | None = None,
        max_overhead: float | Literal["auto"] | None = "auto",
        fp32: bool = True,
        density: Literal["histogram", "image", "both", "none"] = "histogram",
        landscape: bool | Mapping[str, Any] = False,
        progress_bar: str | None = None,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an integer, got {seed!r}.")
        self.measures = parse_measures(measures, seed)
        self.every_n_steps = positive_int_or_none("every_n_steps", every_n_steps)
        self.every_n_epochs = positive_int_or_none("every_n_epochs", every_n_epochs)
        self._default_schedule = every_n_epochs is None and every_n_steps is None
        if self._default_schedule:
            self.every_n_epochs = 1
        if not (isinstance(probe, DataLoader) or probe in PROBE_SOURCES):
            raise ValueError(f"`probe` must be one of {list(PROBE_SOURCES)} or a torch DataLoader, got {probe!r}.")
        if isinstance(probe_batches, bool) or not isinstance(probe_batches, int) or probe_batches < 1:
            raise ValueError(
                f"`probe_batches` must be an integer >= 1 (batches in the probe set), got {probe_batches!r}."
            )
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"`loss_fn` must be a callable (module, batch) -> loss or None, got {loss_fn!r}.")
        self.max_seconds = positive_float_or_none("max_seconds", max_seconds)
        self.max_hvps = positive_int_or_none("max_hvps", max_hvps)
        if isinstance(max_overhead, str) and max_overhead != "auto":
            raise ValueError(f"`max_overhead` must be 'auto', a positive number or None, got {max_overhead!r}.")
        if max_overhead != "auto":
            max_overhead = positive_float_or_none("max_overhead", max_overhead)
        self.max_overhead = max_overhead
        if density not in DENSITY_MODES:
            raise ValueError(f"`density` must be one of {list(DENSITY_MODES)}, got {density!r}.")
        self.landscape = parse_landscape(landscape)
        tags = [m.tag for m in self.measures]
        if progress_bar is not None and progress_bar not in tags:
            raise ValueError(
                f"`progress_bar` must be None or the tag of a monitored measure {tags}, got {progress_bar!r}."
            )
        self.on_train_end_ = bool(on_train_end)
        self.on_validate_ = bool(on_validate)
        self.probe = probe
        self.probe_batches = probe_batches
        self.loss_fn = loss_fn
        self.seed = seed
        self.fp32 = bool(fp32)
        self.density = density
        self.progress_bar = progress_bar
        # state
        self._probe: ProbeSet | None = None
        self._restored_indices: list[list[int]] | None = None
        self._last_step = -1
        self._ckpt_step: int | None = None
        self._seconds_measuring = 0.0
        self._train_start: float | None = None
        self._train_seconds_before = 0.0
        self._warned_skip = False
        self._warned_error = False
        self._seconds_at_start = 0.0
        self._last_cost: float | None = None
        self._plan: Plan | None = None
        self._plan_restored = False
        self._errors = 0
        self._saved_log_step: int | None = None
        #: ``(global step, {tag: value})`` of every measurement, on every process.
        self.history: list[tuple[int, dict[str, float]]] = []

    # ------------------------------------------------------------------ config
    @property
    def state_key(self) -> str:
        probe = self.probe if isinstance(self.probe, str) else "dataloader"
        loss = None if self.loss_fn is None else getattr(self.loss_fn, "__qualname__", type(self.loss_fn).__name__)
        return self._generate_state_key(measures=[m.tag for m in self.measures], probe=probe, loss_fn=loss)

    # ------------------------------------------------------------------ state
    @property
    def budget(self) -> float | None:
        """The ``max_overhead`` in force: ``"auto"`` is 0.05 on the default schedule and none on an explicit one."""
        if self.max_overhead == "auto":
            return AUTO_MAX_OVERHEAD if self._default_schedule else None
        return self.max_overhead

    @property
    def plan(self) -> dict[str, Any] | None:
        """The plan made at fit start (``None`` before it): ``examples`` (how many of the ``probe_examples`` are
        measured: the first ones of the probe set), ``options`` of each measure by tag, ``at_start`` (measure
        at fit start), ``at_end`` (room reserved at the end), ``forecast_seconds`` of one measurement from
        ``hvp_seconds`` and ``build_seconds`` (one Hessian-vector product and one gradient with its graph, timed
        on those examples), ``train_seconds`` (the forecast training time), ``budget``, ``scheduled`` (the
        measurements the schedule asks for), ``timing_seconds`` (what the forecast took), ``reason`` and
        ``line``, the line announced."""
        if self._plan is None:
            return None
        return {**asdict(self._plan), "line": self._plan_line(self._plan)}

    @property
    def seconds_measuring(self) -> float:
        """Seconds the monitor spent in ``fit`` (the forecast and failed measurements included), over resumes."""
        return self._seconds_measuring

    @property
    def errors(self) -> int:
        """How many measurements failed and were skipped (logged as ``sharpness/errors``)."""
        return self._errors

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs: the probe set's indices, the plan, the last measured step and the time accounting."""
        return {
            "probe_indices": None if self._probe is None else self._probe.indices,
            "last_step": self._last_step,
            "seconds_measuring": self._seconds_measuring,
            "last_cost": self._last_cost,
            "train_seconds": self._train_seconds(),
            "history": [(s, dict(v)) for s, v in self.history],
            "plan": None if self._plan is None else asdict(self._plan),
            "errors": self._errors,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_indices = state_dict.get("probe_indices")
        self._probe = None
        self._last_step = int(state_dict.get("last_step", -1))
        self._seconds_measuring = float(state_dict.get("seconds_measuring", 0.0))
        self._last_cost = state_dict.get("last_cost")
        self._train_seconds_before = float(state_dict.get("train_seconds", 0.0))
        self.history = [(int(s), dict(v)) for s, v in state_dict.get("history", [])]
        plan = state_dict.get("plan")
        self._plan = None if plan is None else Plan(**plan)
        self._plan_restored = self._plan is not None
        self._errors = int(state_dict.get("errors", 0))

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._ckpt_step = checkpoint.get("global_step")

    # ------------------------------------------------------------------ schedule
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if (
            self.loss_fn is None
            and stage == "fit"
            and self._hook() == "training_step"
            and not pl_module.automatic_optimization
        ):
            raise ValueError(
                f"{type(pl_module).__name__} optimizes manually, so its training_step returns no loss to measure; "
                "pass `loss_fn=lambda model, batch: ...` or `probe='val'` (validation_step loss) to SharpnessMonitor."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_start = time.perf_counter()
        self._seconds_at_start = self._seconds_measuring
        self._fit_start(trainer, pl_module)

    def _train_seconds(self) -> float:
        if self._train_start is None:
            return self._train_seconds_before
        spent_here = self._seconds_measuring - self._seconds_at_start
        return self._train_seconds_before + time.perf_counter() - self._train_start - spent_here

    def _deferred_to_end(self, trainer: pl.Trainer) -> bool:
        # Under a budget, the last step's periodic measurement is the end-of-training one (which has its room).
        return self.budget is not None and self.on_train_end_ and final_step(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            if not self._deferred_to_end(trainer):
                self._measure(trainer, pl_module, guarded=True)
        if self.progress_bar is not None and self.history:
            value = self.history[-1][1].get(self.progress_bar)
            if value is not None:
                pl_module.log(
                    f"sharpness/{self.progress_bar}", value, prog_bar=True, logger=False, on_step=True, on_epoch=False
                )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs and epoch % self.every_n_epochs == 0 and trainer.global_step != self._last_step:
            if not self._deferred_to_end(trainer):
                self._measure(trainer, pl_module, guarded=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_train_end_ and trainer.global_step != self._last_step:
            self._measure(trainer, pl_module, guarded=True, end=True)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``trainer.validate``: measure, and log through the module so that the numbers are in the returned
        dicts, ``callback_metrics`` and Lightning's table, and on the loggers at the checkpoint's step."""
        if not (self.on_validate_ and trainer.state.fn == "validate" and not trainer.sanity_checking):
            return
        step = self._ckpt_step if self._ckpt_step is not None else trainer.global_step
        values = self._measure(trainer, pl_module, guarded=False, step=step, log_scalars=False)
        if values is None:
            return
        for key, value in values.items():
            pl_module.log(
                f"sharpness/{key}", value, on_step=False, on_epoch=True, logger=True, sync_dist=trainer.world_size > 1
            )
        # Lightning logs the loop's numbers at its own counter of optimizer steps, which a Trainer that only
        # validates keeps at 0: put the checkpoint's step there until the loop has logged (on_validation_end).
        epoch_loop = trainer.fit_loop.epoch_loop
        if hasattr(epoch_loop, "_batches_that_stepped") and epoch_loop._batches_that_stepped != step:
            self._saved_log_step = epoch_loop._batches_that_stepped
            epoch_loop._batches_that_stepped = step

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._saved_log_step is not None:
            trainer.fit_loop.epoch_loop._batches_that_stepped = self._saved_log_step
            self._saved_log_step = None

    # ------------------------------------------------------------------ probe set
    def _hook(self) -> str:
        return "validation_step" if self.probe == "val" else "training_step"

    def _loss(self) -> LossFn:
        return self.loss_fn or step_loss(self._hook())

    def _probe_set(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ProbeSet:
        if self._probe is None:
            loader = probe_loader(self.probe, trainer, pl_module)
            self._probe = select_probe(loader, self.probe_batches, self.seed, self._restored_indices)
        return self._probe

    def _device_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: Sequence[Any]) -> list:
        moved = [move_to_device(b, pl_module.device) for b in batches]
        if not self.fp32:
            moved = [trainer.precision_plugin.convert_input(b) for b in moved]
        return moved

    # ------------------------------------------------------------------ the fit-start plan
    def _fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Forecast, size and announce the measurement; then measure once, before any training step."""
        start = time.perf_counter()
        resumed = self._plan is not None
        plan, error = self._plan, None
        try:
            with measuring_context(trainer, pl_module, self.fp32):
                self._probe_set(trainer, pl_module)  # a missing or empty probe source fails here
                if plan is None:
                    plan = self._make_plan(trainer, pl_module, start)
        except Exception as err:  # noqa: BLE001 - agreed between the processes, then raised
            error = err
        error = failure(trainer, pl_module, error)
        if error is not None:
            raise error
        if trainer.world_size > 1:
            plan = trainer.strategy.broadcast(plan, src=0)
        seconds = max_over_processes(trainer, pl_module, time.perf_counter() - start)
        self._seconds_measuring += seconds
        if not resumed:
            plan.timing_seconds = seconds
        self._plan = plan
        kept = " (kept from the checkpoint)" if self._plan_restored else " (kept from the previous fit)"
        line = self._plan_line(plan)
        rank_zero_info(line[:-1] + kept + "." if resumed else line)
        if not plan.at_start and not plan.at_end:
            rank_zero_warn(f"SharpnessMonitor: {plan.reason}.")
        if plan.at_start and trainer.global_step != self._last_step:
            self._measure(trainer, pl_module, guarded=False)  # an error here stops fit: nothing has trained yet

    def _time_gradient(self, pl_module: pl.LightningModule, batch: Any) -> float:
        return time_gradient(pl_module, self._loss(), batch)

    def _time_products(
        self, pl_module: pl.LightningModule, batches: Sequence[Any], warm_up: bool = False
    ) -> tuple[float, float]:
        return time_products(pl_module, self._loss(), batches, warm_up)

    def _make_plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, start: float) -> Plan:
        """Time one gradient and one Hessian-vector product on the probe set and size the measurement to the
        budget (see :func:`~lightning_sharpness.monitor.plan.size_plan`)."""
        probe = self._probe_set(trainer, pl_module)
        batches = self._device_batches(trainer, pl_module, probe.batches)
        return size_plan(
            self.measures,
            self.budget,
            examples=sum(batch_size(b) for b in batches),
            dim=sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
            points=max(1, scheduled_points(trainer, self._schedule)),
            on_train_end=self.on_train_end_,
            time_products=lambda n, warm_up: self._time_products(pl_module, first_examples(batches, n), warm_up),
            train_seconds=lambda: forecast_training(
                trainer, self._time_gradient(pl_module, batches[0]), batch_size(batches[0])
            ),
            bounded=forecast_training(trainer, 1.0, 1) is not None,
            start=start,
        )

    def _plan_line(self, plan: Plan) -> str:
        return plan_line(plan, self.measures, self._schedule)

    @property
    def _schedule(self) -> Schedule:
        return Schedule(self.every_n_steps, self.every_n_epochs, self.on_train_end_)

    # ------------------------------------------------------------------ measuring
    def _skip(self, trainer: pl.Trainer, step: int, end: bool) -> bool:
        """Whether a scheduled measurement stays out, over the budget."""
        plan = self._plan
        budget = self.budget
        if budget is None:
            return False
        cost = self._last_cost if self._last_cost is not None else (plan.forecast_seconds if plan else None)
        if cost is None:
            return False
        # Periodic measurements keep the time spent measuring within the budget of the training time so far; the
        # end-of-training one, when the plan reserved its room, only yields to forecasts off by END_SLACK.
        end = end and plan is not None and plan.at_end
        limit = budget * (END_SLACK if end else 1.0)
        over = self._seconds_measuring + cost > limit * self._train_seconds()
        if not agree(trainer, over):
            return False
        if not self._warned_skip:
            rank_zero_warn(
                f"SharpnessMonitor skips the measurement at step {step}: measuring has taken "
                f"{self._seconds_measuring:.1f}s and one more takes about {cost:.1f}s, more than "
                f"max_overhead={budget}{f' (x{END_SLACK:g} at the end)' if end else ''} of the training time so far "
                "(further skips are not warned). Measure less often, on fewer probe_batches, or pass "
                "max_overhead=None to measure at every scheduled point."
            )
            self._warned_skip = True
        return True

    def _measure(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        guarded: bool,
        step: int | None = None,
        end: bool = False,
        log_scalars: bool = True,
    ) -> dict[str, float] | None:
        """Measure now (``guarded``: a scheduled measurement in training, which the budget may skip and whose
        failure is skipped; otherwise errors raise). Returns the values, ``None`` when skipped or failed."""
        step = trainer.global_step if step is None else step
        if guarded and self._skip(trainer, step, end):
            return None
        start = time.perf_counter()
        try:
            with measuring_context(trainer, pl_module, self.fp32):
                values, results = self._run_measures(trainer, pl_module, start)
                images = {}
                if self.landscape is not None:
                    images = run_together(trainer, pl_module, lambda: self._landscape_images(trainer, pl_module))
        except MeasurementFailed as failed:
            error = failed.error
            del failed
            self._seconds_measuring += time.perf_counter() - start
            if not guarded:
                raise error from None
            self._failed(trainer, pl_module, step, error)
            return None
        seconds = max_over_processes(trainer, pl_module, time.perf_counter() - start)
        self._seconds_measuring += seconds
        self._last_cost = seconds
        self._last_step = trainer.global_step
        values["seconds"] = seconds
        self.history.append((step, {k: v for k, v in values.items()}))
        self._log(trainer, step, values, results, images, scalars=log_scalars)
        return values

    def _failed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, error: BaseException) -> None:
        """A measurement in training failed (on some process): count it, warn the first time, go on training."""
        self._errors += 1
        self._last_step = trainer.global_step
        if not self._warned_error:
            rank_zero_warn(
                f"SharpnessMonitor: the measurement at step {step} failed and is skipped; training goes on "
                f"(failures are counted in sharpness/errors; later ones are not warned). "
                f"{type(error).__name__}: {error}"
            )
            self._warned_error = True
        del error  # its traceback holds the measurement's tensors
        if pl_module.device.type == "cuda":
            torch.cuda.empty_cache()  # after an out-of-memory error, give the training its memory back
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"sharpness/errors": float(self._errors)}, step=step)

    def _run_measures(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, start: float
    ) -> tuple[dict[str, float], dict[str, Any]]:
        plan = self._plan

        def prepare() -> list[Any]:
            probe = self._probe_set(trainer, pl_module)
            head = first_examples(probe.batches, plan.examples if plan else None)
            return self._device_batches(trainer, pl_module, head)

        batches = run_together(trainer, pl_module, prepare)
        planned = plan.options if plan is not None else {}
        return run_measures(
            trainer, pl_module, self.measures, batches, self._loss(), planned, self.max_seconds, self.max_hvps, start
        )

    def _landscape_images(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        assert self.landscape is not None and self._probe is not None
        return landscape_images(trainer, pl_module, self._loss(), self._probe.batches, self.landscape)

    # ------------------------------------------------------------------ logging
    def _log(
        self,
        trainer: pl.Trainer,
        step: int,
        values: dict[str, float],
        results: dict[str, Any],
        images: dict[str, Any],
        scalars: bool = True,
    ) -> None:
        log_measurement(trainer, step, values, results, images, self.measures, self.density, scalars)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(measures={self.measures}, every_n_steps={self.every_n_steps}, "
            f"every_n_epochs={self.every_n_epochs}, probe={self.probe!r}, probe_batches={self.probe_batches})"
        )
