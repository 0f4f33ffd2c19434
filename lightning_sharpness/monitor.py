"""SharpnessMonitor: measure sharpness on a fixed probe set while training, log it to the Trainer's loggers.

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

import inspect
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_sharpness import measures as measures_module
from lightning_sharpness._lightning import quiet
from lightning_sharpness.batching import Batches, batch_size, first_examples, move_to_device
from lightning_sharpness.measures import _check_positive_int, _check_rho

__all__ = ["SharpnessMonitor", "MeasureSpec"]

MeasureSpec = Union[str, Mapping[str, Any]]
LossFn = Callable[[nn.Module, Any], Tensor]

#: What ``SharpnessMonitor()`` measures (the fit-start plan shrinks it where its 5% time budget needs): the top
#: eigenvalue (to 1e-3 relative, gradient-started Lanczos: 5-10 HVPs) and a Hutchinson trace on 10 probe vectors.
#: The vectors are the same at every measurement (seeded), so the curve's changes are far more precise than one
#: estimate's standard error; Hutchinson rather than Hutch++ because it is linear in the loss, so DDP shards it.
DEFAULT_MEASURES: tuple[MeasureSpec, ...] = (
    {"name": "hessian_eigenvalues", "tol": 1e-3},
    {"name": "hessian_trace", "method": "hutchinson", "matvecs": 10},
)
#: Estimates linear in the loss, with the same random vectors on every process: under DDP, each process
#: measures its share and the results are averaged weighted by size, which gives exactly the result on the
#: whole probe set. Also ``hessian_trace`` with ``method="hutchinson"`` and ``worst_case_sharpness`` with ``m``,
#: from any start (each chunk draws its random starts from its own generator, seeded by ``seed`` and the chunk's
#: place in its batch, so a chunk gets the same starts on whichever process measures it).
_LINEAR_MEASURES = {"hessian_diagonal", "average_case_sharpness"}
#: Options of the measure functions that the monitor fills in when the user does not.
_SEED_OPTION = "seed"
_PROBE_SOURCES = ("train", "val")
_DENSITY_MODES = ("histogram", "image", "both", "none")
_LANDSCAPE_KEYS = ("dims", "steps", "span", "seed")
#: ``max_overhead="auto"``: this budget for the default schedule, none for an explicit one.
AUTO_MAX_OVERHEAD = 0.05
#: Under a budget, the plan sizes a measurement so that this many of them (fewer on a shorter schedule) fit.
_PLANNED_POINTS = 8
#: Under a budget, the probe set is halved down to this many examples before the products are cut.
_MIN_EXAMPLES = 8
#: The end-of-training measurement of the plan is skipped only when it would bring the time spent measuring over
#: this multiple of ``max_overhead`` (the plan reserved room for it, but its forecasts may be off by this much).
_END_SLACK = 2.0


def available_measures() -> list[str]:
    """Names accepted in ``SharpnessMonitor(measures=[...])``: the measure functions that exist."""
    return list(measures_module.MEASURE_NAMES)


@dataclass
class _Measure:
    name: str
    tag: str
    fn: Callable[..., Any]
    options: dict[str, Any]
    linear: bool
    defaults: dict[str, Any] = field(default_factory=dict)

    def option(self, key: str, options: Mapping[str, Any] | None = None) -> Any:
        options = self.options if options is None else options
        return options.get(key, self.defaults.get(key))

    def within(self, hvps: int, options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The options with the measure's size capped to ``hvps`` Hessian-vector products; ``None``: cannot fit."""
        base = self.options if options is None else options
        options = dict(base)
        if "matvecs" in self.defaults and not (self.name == "renyi_sharpness" and self.option("alpha", base) != 2):
            least = 6 if self.name == "hessian_trace" and self.option("method", base) == "hutch++" else 2
            options["matvecs"] = min(self.option("matvecs", base), hvps)
            return options if options["matvecs"] >= least else None
        if "max_iter" in self.defaults:
            current = self.option("max_iter", base)
            options["max_iter"] = hvps if current is None else min(current, hvps)
            return options if options["max_iter"] >= max(self.option("k", base) or 1, 2) else None
        if "steps" in self.defaults and "probes" in self.defaults:
            options["steps"] = min(self.option("steps", base), hvps // self.option("probes", base))
            return options if options["steps"] >= 2 else None
        return options

    # ------------------------------------------------------------------ cost model of the fit-start plan
    def _lanczos_products(self, options: Mapping[str, Any], dim: int | None = None) -> int:
        """The products Lanczos is expected to take: 2k + 13 to ``tol=1e-3`` from the gradient start (5-10 for
        k=1 on trained networks, about 20 at initialization), about 5 more per decade of a tighter ``tol``; at
        most ``max_iter``."""
        k, tol, max_iter = self.option("k", options), self.option("tol", options), self.option("max_iter", options)
        expected = 2 * k + 13 + max(0, math.ceil(5 * math.log10(1e-3 / tol)))
        cap = max(2 * k + 40, 100) if max_iter is None else max_iter
        if dim is not None:
            cap = min(cap, dim)
        return max(1, min(expected, cap))

    def _renyi_frobenius(self, options: Mapping[str, Any]) -> bool:
        method = self.option("method", options)
        return method == "frobenius" or (method is None and self.option("alpha", options) == 2)

    def cost_units(self, options: Mapping[str, Any], dim: int | None = None) -> dict[str, float]:
        """What one run with ``options`` takes, in the units the plan times: gradient-graph builds (``build``),
        Hessian-vector products (``hvp``), gradients (``grad``) and forward passes (``forward``) of the probe set."""
        o = lambda key: self.option(key, options)  # noqa: E731
        name = self.name
        if name == "hessian_eigenvalues":
            return {"build": 1, "hvp": self._lanczos_products(options, dim)}
        if name == "hessian_trace":
            return {"build": 1, "hvp": o("matvecs")}
        if name in ("hessian_diagonal", "diag_sqrt_trace"):
            return {"build": 1, "hvp": (dim or o("matvecs")) if o("exact") else o("matvecs")}
        if name == "spectral_density":
            return {"build": 1, "hvp": o("probes") * o("steps")}
        if name == "renyi_sharpness":
            return {"build": 1, "hvp": o("matvecs") if self._renyi_frobenius(options) else o("probes") * o("steps")}
        if name == "worst_case_sharpness":  # each start scouts steps // 5 ascent steps, the best climbs steps more
            starts, steps = (o("restarts") if "restarts" in self.defaults else 1), o("steps")
            return {"grad": steps + (starts * (steps // 5) if starts > 1 else 0), "forward": 1}
        if name == "average_case_sharpness":
            return {"forward": o("samples") + 1}
        return {"build": 1, "hvp": 10}  # pragma: no cover - every measure is listed above

    def scaled(self, options: Mapping[str, Any], factor: float, dim: int | None = None) -> dict[str, Any]:
        """The options with the measure's products (or ascent steps, or samples) scaled by ``factor`` <= 1, never
        below what the measure needs; the Lanczos count becomes an explicit ``max_iter``, so that the forecast
        bounds it."""
        scaled = dict(options)
        o = lambda key: self.option(key, options)  # noqa: E731

        def cut(key: str, value: int, least: int) -> None:
            scaled[key] = max(least, min(value, math.floor(value * factor)))

        name = self.name
        if name == "hessian_eigenvalues":
            cut("max_iter", self._lanczos_products(options, dim), max(o("k"), 2))
        elif name == "hessian_trace":
            cut("matvecs", o("matvecs"), 6 if o("method") == "hutch++" else 2)
        elif name in ("hessian_diagonal", "diag_sqrt_trace"):
            if not o("exact"):
                cut("matvecs", o("matvecs"), 2)
        elif name == "spectral_density":
            cut("steps", o("steps"), 2)
        elif name == "renyi_sharpness":
            if self._renyi_frobenius(options):
                cut("matvecs", o("matvecs"), 2)
            else:
                cut("steps", o("steps"), 2)
        elif name == "worst_case_sharpness":
            cut("steps", o("steps"), 1)
            if "restarts" in self.defaults:
                cut("restarts", o("restarts"), 1)
        elif name == "average_case_sharpness":
            cut("samples", o("samples"), 2)
        return scaled

    @staticmethod
    def describe(name: str, options: Mapping[str, Any]) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in options.items() if k != _SEED_OPTION)
        return f"{name}({shown})"

    def __repr__(self) -> str:
        return f"{self.tag}={self.name}({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"


def _parse_measures(measures: Sequence[MeasureSpec], seed: int) -> list[_Measure]:
    if isinstance(measures, (str, Mapping)):
        measures = [measures]
    if not isinstance(measures, Sequence) or len(measures) == 0:
        raise ValueError(
            f"`measures` must be a non-empty list of measure names or {{name: ..., option: ...}} mappings, got "
            f"{measures!r}. Available: {available_measures()}."
        )
    allowed = available_measures()
    parsed: list[_Measure] = []
    for spec in measures:
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise ValueError(
                f"Each entry of `measures` must be a measure name or a mapping with a `name` key, got {spec!r}. "
                f"Available: {allowed}."
            )
        options = dict(spec)
        name = options.pop("name")
        tag = options.pop("tag", name)
        if name not in allowed:
            raise ValueError(f"Unknown measure {name!r} in `measures`. Available: {allowed}.")
        if not isinstance(tag, str) or not tag or any(c.isspace() for c in tag):
            raise ValueError(f"`tag` of measure {name!r} must be a non-empty string without spaces, got {tag!r}.")
        fn = getattr(measures_module, name)
        params = list(inspect.signature(fn).parameters.values())[3:]  # after model, loss_fn, batches
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [k for k in options if k not in accepted]
        if unknown and not takes_any:
            raise ValueError(
                f"Unknown option(s) {unknown} for measure {name!r}. Allowed options: {accepted} (and `tag`, the "
                "name it is logged under)."
            )
        required = [p.name for p in params if p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD]
        missing = [k for k in required if k not in options]
        if missing:
            raise ValueError(
                f"Measure {name!r} needs option(s) {missing}, e.g. {{name: {name}, {missing[0]}: ...}}. "
                f"Allowed options: {accepted}."
            )
        if _SEED_OPTION in accepted and _SEED_OPTION not in options:
            options[_SEED_OPTION] = seed  # the same random vectors at every measurement: comparable over time
        linear = _is_linear(name, options)
        defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        _check_values(name, {**defaults, **options}, given=options)
        parsed.append(_Measure(name=name, tag=tag, fn=fn, options=options, linear=linear, defaults=defaults))
    tags = [m.tag for m in parsed]
    duplicates = sorted({t for t in tags if tags.count(t) > 1})
    if duplicates:
        raise ValueError(
            f"Measures {duplicates} are listed more than once; give each a distinct `tag`, e.g. "
            "{name: worst_case_sharpness, rho: 0.1, tag: worst_case_rho_0.1}."
        )
    return parsed


def _check_values(name: str, options: Mapping[str, Any], given: Mapping[str, Any]) -> None:
    """Bad values of the options the user gave fail when the callback is built, with the validators the measures
    themselves apply (at the first measurement, that would be after the first epoch)."""
    try:
        if "rho" in given:
            _check_rho(given["rho"])
        if "k" in given:
            _check_positive_int(given["k"], "k")
        if given.get("max_iter") is not None:
            _check_positive_int(given["max_iter"], "max_iter", options.get("k", 1))
        if "matvecs" in given:
            least = 6 if name == "hessian_trace" and options.get("method") == "hutch++" else 2
            _check_positive_int(given["matvecs"], "matvecs", least)
        for key in ("steps", "probes", "m", "restarts"):
            if given.get(key) is not None:
                _check_positive_int(given[key], key)
        if "samples" in given:
            _check_positive_int(given["samples"], "samples", 2)
        for key in ("tol", "alpha"):
            if key in given:
                _positive_float_or_none(key, given[key])
    except ValueError as err:
        raise ValueError(f"Measure {name!r}: {err}") from None


def _is_linear(name: str, options: Mapping[str, Any]) -> bool:
    """Whether per-process results on shards combine exactly into the result on the whole probe set."""
    if name == "hessian_trace":
        return options.get("method") == "hutchinson"  # Hutch++ projects on a sketch: not linear in H
    if name == "worst_case_sharpness":  # m-sharpness, a mean over chunks, each from its own seeded starts
        return options.get("m") is not None
    return name in _LINEAR_MEASURES


def _positive_int_or_none(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1 or None, got {value!r}.")
    return value


def _positive_float_or_none(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"`{name}` must be a positive finite number or None, got {value!r}.")
    return float(value)


def _extract_loss(output: Any, hook: str) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    raise ValueError(
        f"SharpnessMonitor uses the module's `{hook}` loss, but `{hook}` returned {type(output).__name__}, not a "
        "loss tensor or a dict with a `loss` tensor. Pass `loss_fn=lambda model, batch: ...` to the monitor."
    )


def _step_loss(hook: str) -> LossFn:
    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        return _extract_loss(getattr(model, hook)(batch, 0), hook)

    loss_fn.__name__ = f"{hook}_loss"
    return loss_fn


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def _float32(module: nn.Module) -> Iterator[None]:
    """Parameters and buffers of half types cast to fp32 in place, and cast back bitwise afterwards."""
    tensors = [
        t for t in list(module.parameters()) + list(module.buffers()) if t.dtype in (torch.float16, torch.bfloat16)
    ]
    if not tensors:
        yield
        return
    saved = [(t, t.data, None if not isinstance(t, nn.Parameter) or t.grad is None else t.grad) for t in tensors]
    for t in tensors:
        t.data = t.data.float()
        if isinstance(t, nn.Parameter):
            t.grad = None
    try:
        yield
    finally:
        for t, data, grad in saved:
            t.data = data
            if isinstance(t, nn.Parameter):
                t.grad = grad


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


class _MeasurementFailed(Exception):
    """A measurement failed on some process; ``error`` is this process's error (or one naming the other's)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class _Plan:
    """What the monitor measures in this run, decided at fit start from a forecast of the cost (see ``plan``)."""

    examples: int  # the first ``examples`` of the probe set are measured
    probe_examples: int
    options: dict[str, dict[str, Any]]  # per measure tag
    at_start: bool  # measure at fit start
    at_end: bool  # room reserved for the end of training
    forecast_seconds: float  # one measurement
    hvp_seconds: float  # one Hessian-vector product on the measured examples
    build_seconds: float  # one gradient with its graph on the measured examples
    train_seconds: float | None  # forecast training time of the run (None: unbounded or not known)
    budget: float | None  # max_overhead in force
    timing_seconds: float = 0.0  # what the forecast itself took
    reason: str = ""
    scheduled: int | None = None  # measurements the schedule asks for in this fit (None: not known)

    @property
    def measurements(self) -> int:
        """Measurements the plan reserved room for (fit start and end of training)."""
        return int(self.at_start) + int(self.at_end)


@dataclass
class _ProbeSet:
    """The probe batches: ``indices[b]`` are the dataset indices of batch ``b`` (``None``: the first batches)."""

    indices: list[list[int]] | None
    dataset_len: int | None
    batches: list[Any] = field(default_factory=list)


def _select_probe(loader: DataLoader, n_batches: int, seed: int, indices: list[list[int]] | None) -> _ProbeSet:
    dataset = loader.dataset
    batch_size = loader.batch_size
    map_style = not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__") and batch_size is not None
    if not map_style:
        batches: list[Any] = []
        for batch in loader:
            batches.append(batch)
            if len(batches) == n_batches:
                break
        if not batches:
            raise ValueError("The probe dataloader yields no batch; SharpnessMonitor has nothing to measure on.")
        return _ProbeSet(indices=None, dataset_len=None, batches=batches)
    n = len(dataset)
    if indices is None or any(i >= n for chunk in indices for i in chunk):
        take = min(n, n_batches * batch_size)
        if take == 0:
            raise ValueError("The probe dataset is empty; SharpnessMonitor has nothing to measure on.")
        if take < n_batches * batch_size:
            rank_zero_warn(
                f"SharpnessMonitor: the probe dataset has {n} examples, fewer than probe_batches * batch_size = "
                f"{n_batches} * {batch_size}; measuring on all {n}."
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:take].tolist()
        indices = [perm[i : i + batch_size] for i in range(0, take, batch_size)]
    collate = loader.collate_fn
    batches = [collate([dataset[i] for i in chunk]) for chunk in indices]
    return _ProbeSet(indices=indices, dataset_len=n, batches=batches)


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
    """

    def __init__(
        self,
        measures: Sequence[MeasureSpec] = DEFAULT_MEASURES,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        on_train_end: bool = True,
        on_validate: bool = True,
        probe: str | DataLoader = "train",
        probe_batches: int = 2,
        loss_fn: LossFn | None = None,
        seed: int = 0,
        max_seconds: float | None = None,
        max_hvps: int | None = None,
        max_overhead: float | str | None = "auto",
        fp32: bool = True,
        density: str = "histogram",
        landscape: bool | Mapping[str, Any] = False,
        progress_bar: str | None = None,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an integer, got {seed!r}.")
        self.measures = _parse_measures(measures, seed)
        self.every_n_steps = _positive_int_or_none("every_n_steps", every_n_steps)
        self.every_n_epochs = _positive_int_or_none("every_n_epochs", every_n_epochs)
        self._default_schedule = every_n_epochs is None and every_n_steps is None
        if self._default_schedule:
            self.every_n_epochs = 1
        if not (isinstance(probe, DataLoader) or probe in _PROBE_SOURCES):
            raise ValueError(f"`probe` must be one of {list(_PROBE_SOURCES)} or a torch DataLoader, got {probe!r}.")
        if isinstance(probe_batches, bool) or not isinstance(probe_batches, int) or probe_batches < 1:
            raise ValueError(
                f"`probe_batches` must be an integer >= 1 (batches in the probe set), got {probe_batches!r}."
            )
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"`loss_fn` must be a callable (module, batch) -> loss or None, got {loss_fn!r}.")
        self.max_seconds = _positive_float_or_none("max_seconds", max_seconds)
        self.max_hvps = _positive_int_or_none("max_hvps", max_hvps)
        if isinstance(max_overhead, str) and max_overhead != "auto":
            raise ValueError(f"`max_overhead` must be 'auto', a positive number or None, got {max_overhead!r}.")
        if max_overhead != "auto":
            max_overhead = _positive_float_or_none("max_overhead", max_overhead)
        self.max_overhead = max_overhead
        if density not in _DENSITY_MODES:
            raise ValueError(f"`density` must be one of {list(_DENSITY_MODES)}, got {density!r}.")
        self.landscape = self._parse_landscape(landscape)
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
        self._probe: _ProbeSet | None = None
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
        self._plan: _Plan | None = None
        self._plan_restored = False
        self._errors = 0
        self._saved_log_step: int | None = None
        #: ``(global step, {tag: value})`` of every measurement, on every process.
        self.history: list[tuple[int, dict[str, float]]] = []

    # ------------------------------------------------------------------ config
    @staticmethod
    def _parse_landscape(landscape: bool | Mapping[str, Any]) -> dict[str, Any] | None:
        if landscape is False or landscape is None:
            return None
        config: dict[str, Any] = {"dims": [1, 2], "steps": 21, "span": 1.0, "seed": 0}
        if landscape is True:
            return config
        if not isinstance(landscape, Mapping):
            raise ValueError(
                f"`landscape` must be a bool or a mapping with keys {list(_LANDSCAPE_KEYS)}, got {landscape!r}."
            )
        unknown = [k for k in landscape if k not in _LANDSCAPE_KEYS]
        if unknown:
            raise ValueError(f"Unknown `landscape` option(s) {unknown}; allowed: {list(_LANDSCAPE_KEYS)}.")
        config.update(landscape)
        dims = config["dims"]
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not dims or any(d not in (1, 2) for d in dims):
            raise ValueError(f"`landscape.dims` must be a subset of [1, 2], got {config['dims']!r}.")
        config["dims"] = dims
        if isinstance(config["steps"], bool) or not isinstance(config["steps"], int) or config["steps"] < 2:
            raise ValueError(f"`landscape.steps` must be an integer >= 2, got {config['steps']!r}.")
        _positive_float_or_none("landscape.span", config["span"])
        return config

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
        self._plan = None if plan is None else _Plan(**plan)
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

    def _final_step(self, trainer: pl.Trainer) -> bool:
        """Whether this is the last optimizer step of the fit, which the end-of-training measurement covers."""
        try:
            total = _finite(trainer.estimated_stepping_batches)
        except Exception:  # noqa: BLE001 - a loader without a length, a strategy without the estimate
            total = None
        return total is not None and trainer.global_step >= total

    def _deferred_to_end(self, trainer: pl.Trainer) -> bool:
        # Under a budget, the last step's periodic measurement is the end-of-training one (which has its room).
        return self.budget is not None and self.on_train_end_ and self._final_step(trainer)

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
        return self.loss_fn or _step_loss(self._hook())

    def _probe_loader(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> DataLoader:
        if isinstance(self.probe, DataLoader):
            return self.probe
        if self.probe == "train":
            loader = trainer.train_dataloader
            if loader is None:  # trainer.validate(): the train dataloader was never loaded
                source = trainer.datamodule if trainer.datamodule is not None else pl_module
                try:
                    loader = source.train_dataloader()
                except Exception as err:
                    raise ValueError(
                        "SharpnessMonitor(probe='train') found no train dataloader (this run only validates and "
                        f"{type(source).__name__}.train_dataloader() failed: {err}). Pass probe='val' or a DataLoader."
                    ) from err
        else:
            loader = trainer.val_dataloaders
            if loader is None or (isinstance(loader, (list, tuple, Mapping)) and len(loader) == 0):
                loader = self._val_source(trainer, pl_module)
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        if isinstance(loader, Mapping):
            loader = next(iter(loader.values()))
        if not isinstance(loader, DataLoader):
            raise ValueError(f"SharpnessMonitor needs a torch DataLoader as probe source, got {type(loader).__name__}.")
        return loader

    def _val_source(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """The validation dataloader before the loop has loaded it (at fit start, when there is no sanity check):
        the one given to ``fit`` / ``validate``, or the datamodule's or module's ``val_dataloader()``."""
        loop = trainer.validate_loop if trainer.state.fn == "validate" else trainer.fit_loop.epoch_loop.val_loop
        source = getattr(loop, "_data_source", None)
        loader = None
        if source is not None and source.is_defined():
            loader = source.dataloader()
        elif source is None:  # another Lightning: the hooks themselves
            for owner in (trainer.datamodule, pl_module):
                if owner is not None and is_overridden("val_dataloader", owner):
                    loader = owner.val_dataloader()
                    break
        if loader is None or (isinstance(loader, (list, tuple, Mapping)) and len(loader) == 0):
            raise ValueError(
                "SharpnessMonitor(probe='val') measures on the validation dataloader, and this run has none: pass "
                "one (`trainer.fit(model, train_loader, val_loader)`, or `val_dataloader()` in the module or "
                "datamodule), or set the monitor's `probe` to 'train' or a DataLoader of its own."
            )
        return loader

    def _probe_set(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> _ProbeSet:
        if self._probe is None:
            loader = self._probe_loader(trainer, pl_module)
            self._probe = _select_probe(loader, self.probe_batches, self.seed, self._restored_indices)
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
            with self._measuring_context(trainer, pl_module):
                self._probe_set(trainer, pl_module)  # a missing or empty probe source fails here
                if plan is None:
                    plan = self._make_plan(trainer, pl_module, start)
        except Exception as err:  # noqa: BLE001 - agreed between the processes, then raised
            error = err
        error = self._failure(trainer, pl_module, error)
        if error is not None:
            raise error
        if trainer.world_size > 1:
            plan = trainer.strategy.broadcast(plan, src=0)
        seconds = self._max_over_processes(trainer, pl_module, time.perf_counter() - start)
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
        """Seconds of one forward and backward pass of the loss on one batch, about a training step's work (timed
        after the products, which warmed the kernels up)."""
        params = [p for p in pl_module.parameters() if p.requires_grad]
        with measures_module._measuring(pl_module), torch.enable_grad():
            _sync(pl_module.device)
            start = time.perf_counter()
            torch.autograd.grad(self._loss()(pl_module, batch), params, allow_unused=True)
            _sync(pl_module.device)
            return time.perf_counter() - start

    def _time_products(
        self, pl_module: pl.LightningModule, batches: Sequence[Any], warm_up: bool = False
    ) -> tuple[float, float]:
        """Seconds of building the gradient graphs of ``batches`` and of one Hessian-vector product through them,
        by the operator the measures use (the same backend choice; a model it cannot handle fails here). With
        ``warm_up``, the faster of two of each: the first of a process pays for warming the kernels up (twice the
        time on a CPU ResNet-18)."""
        build = hvp = math.inf
        with measures_module._measuring(pl_module):
            op = measures_module.hessian_operator(pl_module, self._loss(), Batches(batches))
            v = torch.ones(op.dim, dtype=op.dtype, device=op.device)
            for _ in range(2 if warm_up else 1):
                op.release()
                _sync(op.device)
                start = time.perf_counter()
                op.gradient()
                _sync(op.device)
                build = min(build, time.perf_counter() - start)
                start = time.perf_counter()
                op @ v
                _sync(op.device)
                hvp = min(hvp, time.perf_counter() - start)
            op.release()
        return build, hvp

    def _forecast_training(self, trainer: pl.Trainer, step_seconds: float, probe_batch_size: int) -> float | None:
        """Training seconds left in this fit: the batches to train times the timed forward-backward pass, scaled
        from the probe batch to the training batch size (``None`` when the run has no known length)."""
        try:
            steps = _finite(trainer.estimated_stepping_batches)
        except Exception:  # noqa: BLE001
            steps = None
        if steps is None:
            return None
        steps = max(steps - trainer.global_step, 1)
        train_batch = getattr(trainer.train_dataloader, "batch_size", None)
        scale = train_batch / probe_batch_size if isinstance(train_batch, int) and train_batch > 0 else 1.0
        return steps * trainer.accumulate_grad_batches * step_seconds * scale

    def _scheduled_points(self, trainer: pl.Trainer) -> int:
        """Measurements the schedule asks for in this fit: at fit start, the periodic ones, at the end."""
        try:
            steps = _finite(trainer.estimated_stepping_batches)
            per_epoch = _finite(trainer.num_training_batches)
        except Exception:  # noqa: BLE001
            steps = per_epoch = None
        if steps is None:
            return _PLANNED_POINTS
        steps = int(steps)
        periodic, last_covered = 0, False
        if self.every_n_steps:
            periodic += steps // self.every_n_steps
            last_covered = steps % self.every_n_steps == 0
        if self.every_n_epochs and per_epoch is not None:
            epochs = math.ceil(steps / max(1, math.ceil(per_epoch / trainer.accumulate_grad_batches)))
            periodic += epochs // self.every_n_epochs
            last_covered = last_covered or epochs % self.every_n_epochs == 0
        return 1 + periodic + int(self.on_train_end_ and not last_covered)

    def _make_plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, start: float) -> _Plan:
        """Time one gradient and one Hessian-vector product, count the products of each measure, and size the
        measurement to the budget: first fewer probe examples (halving down to ``_MIN_EXAMPLES``), then fewer
        products, then only one measurement (the end of training), else none."""
        probe = self._probe_set(trainer, pl_module)
        batches = self._device_batches(trainer, pl_module, probe.batches)
        total = sum(batch_size(b) for b in batches)
        dim = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        budget = self.budget
        full = {m.tag: dict(m.options) for m in self.measures}
        timings: dict[int, tuple[float, float]] = {}

        def timed(n: int) -> tuple[float, float]:
            if n not in timings:
                timings[n] = self._time_products(pl_module, first_examples(batches, n), warm_up=not timings)
            return timings[n]

        def cost(n: int, options: Mapping[str, dict[str, Any]]) -> float:
            build, hvp = timed(n)
            units = {"build": 0.0, "hvp": 0.0, "grad": 0.0, "forward": 0.0}
            for m in self.measures:
                for kind, count in m.cost_units(options[m.tag], dim).items():
                    units[kind] += count
            return (units["build"] + units["grad"] + units["forward"] / 3) * build + units["hvp"] * hvp

        points = max(1, self._scheduled_points(trainer))

        def plan(n: int, options: dict, count: int = 2, reason: str = "") -> _Plan:
            build, hvp = timed(n)
            return _Plan(
                examples=n,
                probe_examples=total,
                options=options,
                at_start=count >= 2 or (count == 1 and not self.on_train_end_),
                at_end=self.on_train_end_ and count >= 1,
                forecast_seconds=cost(n, options),
                hvp_seconds=hvp,
                build_seconds=build,
                train_seconds=train,
                budget=budget,
                reason=reason,
                scheduled=points,
            )

        rungs = [total]
        while rungs[-1] // 2 >= _MIN_EXAMPLES:
            rungs.append(rungs[-1] // 2)
        rungs.reverse()  # ascending: each timing costs little next to the measurements the next one may allow
        sizing = budget is not None and self._forecast_training(trainer, 1.0, 1) is not None
        timed(rungs[0] if sizing else total)  # first: it warms the kernels up for the gradient's timing
        train = self._forecast_training(trainer, self._time_gradient(pl_module, batches[0]), batch_size(batches[0]))
        if not sizing or train is None:
            return plan(total, full)
        # Under a budget the Lanczos count is capped at its forecast, so that the forecast bounds the cost.
        sized = {m.tag: m.scaled(full[m.tag], 1.0, dim) for m in self.measures}
        pair = min(points, 2)

        def left() -> float:  # the budget, less what the forecast has taken so far
            return budget * train - (time.perf_counter() - start)

        chosen = None
        for n in rungs:
            if cost(n, sized) > left() / min(points, _PLANNED_POINTS):
                break
            chosen = n
        if chosen is not None:
            return plan(chosen, sized)
        smallest = rungs[0]
        if cost(smallest, sized) <= left() / pair:
            return plan(smallest, sized)
        for count in (pair, 1) if pair == 2 else (1,):
            target = left() / count
            options = self._fit_products(sized, target, lambda o: cost(smallest, o), dim)
            if options is not None:
                reason = "" if count == pair else "only one measurement fits in the budget"
                return plan(smallest, options, count=count, reason=reason)
        least = {m.tag: m.scaled(sized[m.tag], 0.0, dim) for m in self.measures}
        forecast = cost(smallest, least)
        return plan(
            smallest,
            least,
            count=0,
            reason=(
                f"no measurement fits in the budget: at its smallest ({smallest} examples, fewest products) one is "
                f"forecast at {forecast:.3g} s, more than max_overhead={budget} of the forecast training time "
                f"{train:.3g} s; it measures only where the training turns out slower than forecast. Pass "
                "max_overhead=None (or a larger one) to measure anyway, or measure the saved checkpoint with "
                "trainer.validate"
            ),
        )

    def _fit_products(
        self, options: Mapping[str, dict[str, Any]], target: float, cost: Callable[[dict], float], dim: int
    ) -> dict[str, dict[str, Any]] | None:
        """The options with every measure's products scaled by the largest common factor that fits ``target``."""

        def at(factor: float) -> dict[str, dict[str, Any]]:
            return {m.tag: m.scaled(options[m.tag], factor, dim) for m in self.measures}

        if cost(at(0.0)) > target:
            return None
        low, high = 0.0, 1.0
        for _ in range(20):
            mid = (low + high) / 2
            low, high = (mid, high) if cost(at(mid)) <= target else (low, mid)
        return at(low)

    def _plan_line(self, plan: _Plan) -> str:
        what = ", ".join(_Measure.describe(m.name, plan.options.get(m.tag, m.options)) for m in self.measures)
        examples = f"{plan.examples} probe examples"
        if plan.examples < plan.probe_examples:
            examples += f" (of {plan.probe_examples})"
        when = []
        if plan.at_start:
            when.append("at fit start")
        if self.every_n_steps:
            when.append(f"every {self.every_n_steps} steps")
        if self.every_n_epochs:
            when.append("every epoch" if self.every_n_epochs == 1 else f"every {self.every_n_epochs} epochs")
        if self.on_train_end_:
            when.append("at the end of training")
        if plan.budget is not None and len(when) > int(plan.at_start) + int(plan.at_end):
            when[-1] += f" (periodic ones{'' if plan.at_end else ' and the end one'} while within the budget)"
        line = f"SharpnessMonitor plan: {what} on {examples}, {', '.join(when) or 'never'}; forecast "
        line += f"{plan.forecast_seconds:.3g} s per measurement (one HVP {plan.hvp_seconds:.3g} s)"
        if plan.train_seconds is not None and plan.budget is None and plan.scheduled:
            total = plan.scheduled * plan.forecast_seconds
            line += (
                f", {total:.3g} s for the {plan.scheduled} scheduled = {total / plan.train_seconds:.1%} of the "
                f"forecast training time {plan.train_seconds:.3g} s"
            )
        elif plan.train_seconds is not None and plan.measurements:
            reserved = plan.measurements * plan.forecast_seconds
            line += (
                f", {reserved:.3g} s for {'start and end' if plan.measurements == 2 else 'one'} = "
                f"{reserved / plan.train_seconds:.1%} of the forecast training time {plan.train_seconds:.3g} s"
            )
        line += "; no time budget" if plan.budget is None else f"; budget max_overhead={plan.budget}"
        if plan.reason:
            line += f"; {plan.reason}"
        return line + "."

    # ------------------------------------------------------------------ measuring
    def _agree(self, trainer: pl.Trainer, decision: bool) -> bool:
        """Rank zero's decision on every process (decisions that depend on a clock may differ)."""
        if trainer.world_size > 1:
            return bool(trainer.strategy.broadcast(decision, src=0))
        return decision

    def _failure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, error: BaseException | None
    ) -> BaseException | None:
        """This process's error, or one naming another process's: every process learns whether any failed, so
        that all of them skip (or raise) together and none waits in a collective the others left."""
        if trainer.world_size <= 1:
            return error
        failed = trainer.strategy.reduce(
            torch.tensor(float(error is not None), device=pl_module.device), reduce_op="max"
        )
        if float(failed) == 0:
            return None
        messages: list[Any] = [None] * trainer.world_size
        mine = None if error is None else f"{type(error).__name__}: {error}"
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_gather_object(messages, mine)
        if error is None:
            others = "; ".join(f"process {r}: {m}" for r, m in enumerate(messages) if m is not None)
            error = RuntimeError(f"SharpnessMonitor: the measurement failed on another process ({others or '?'}).")
        return error

    def _max_over_processes(self, trainer: pl.Trainer, pl_module: pl.LightningModule, seconds: float) -> float:
        if trainer.world_size > 1:
            seconds = float(trainer.strategy.reduce(torch.tensor(seconds, device=pl_module.device), reduce_op="max"))
        return seconds

    @contextmanager
    def _measuring_context(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
        with ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(quiet(pl_module))
            stack.enter_context(_eval_mode(pl_module))
            if self.fp32:
                stack.enter_context(torch.autocast(pl_module.device.type, enabled=False))
                stack.enter_context(_float32(pl_module))
            else:
                stack.enter_context(trainer.precision_plugin.forward_context())
            yield

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
        # end-of-training one, when the plan reserved its room, only yields to forecasts off by _END_SLACK.
        end = end and plan is not None and plan.at_end
        limit = budget * (_END_SLACK if end else 1.0)
        over = self._seconds_measuring + cost > limit * self._train_seconds()
        if not self._agree(trainer, over):
            return False
        if not self._warned_skip:
            rank_zero_warn(
                f"SharpnessMonitor skips the measurement at step {step}: measuring has taken "
                f"{self._seconds_measuring:.1f}s and one more takes about {cost:.1f}s, more than "
                f"max_overhead={budget}{f' (x{_END_SLACK:g} at the end)' if end else ''} of the training time so far "
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
            with self._measuring_context(trainer, pl_module):
                values, results = self._run_measures(trainer, pl_module, start)
                images = {}
                if self.landscape is not None:
                    images = self._guarded(trainer, pl_module, lambda: self._landscape_images(trainer, pl_module))
        except _MeasurementFailed as failed:
            error = failed.error
            del failed
            self._seconds_measuring += time.perf_counter() - start
            if not guarded:
                raise error from None
            self._failed(trainer, pl_module, step, error)
            return None
        seconds = self._max_over_processes(trainer, pl_module, time.perf_counter() - start)
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

    def _guarded(self, trainer: pl.Trainer, pl_module: pl.LightningModule, fn: Callable[[], Any]) -> Any:
        """``fn()`` on every process; if it raised on any, every process raises ``_MeasurementFailed`` together."""
        try:
            out, error = fn(), None
        except Exception as err:  # noqa: BLE001 - any error of a measurement is reported, then skipped or raised
            out, error = None, err
        error = self._failure(trainer, pl_module, error)
        if error is not None:
            raise _MeasurementFailed(error)
        return out

    def _run_measures(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, start: float
    ) -> tuple[dict[str, float], dict[str, Any]]:
        plan = self._plan

        def prepare() -> list[Any]:
            probe = self._probe_set(trainer, pl_module)
            return self._device_batches(trainer, pl_module, first_examples(probe.batches, plan.examples if plan else None))

        batches = self._guarded(trainer, pl_module, prepare)
        device = pl_module.device
        world, rank = trainer.world_size, trainer.global_rank
        shard = batches[rank::world]
        shard_size = sum(batch_size(b) for b in shard)
        loss_fn = self._loss()
        values: dict[str, float] = {}
        results: dict[str, Any] = {}
        hvps_left = self.max_hvps
        for m in self.measures:
            if self.max_seconds is not None and values:  # the first measure always runs
                late = time.perf_counter() - start > self.max_seconds
                if self._agree(trainer, late):
                    rank_zero_warn(f"SharpnessMonitor: max_seconds={self.max_seconds} spent; skipping {m.tag}.")
                    continue
            base = plan.options.get(m.tag, m.options) if plan is not None else m.options
            options = base if hvps_left is None else m.within(hvps_left, base)
            if options is None:
                rank_zero_warn(f"SharpnessMonitor: max_hvps={self.max_hvps} spent; skipping {m.tag}.")
                continue
            if world > 1 and m.linear:
                # Each process measures its share; mean of means weighted by the number of examples.
                def local(m: _Measure = m, options: dict = options) -> Any:
                    return m.fn(pl_module, loss_fn, Batches(shard), **options) if shard else None

                result = self._guarded(trainer, pl_module, local)
                local_value = 0.0 if result is None else float(result)
                total = trainer.strategy.reduce(
                    torch.tensor([local_value * shard_size, float(shard_size)], dtype=torch.float64, device=device),
                    reduce_op="sum",
                )
                values[m.tag] = float(total[0] / total[1])
                results[m.tag] = result
                if hvps_left is not None:  # the most any process used
                    used = getattr(result, "matvecs", 0) if result is not None else 0
                    hvps_left -= int(trainer.strategy.reduce(torch.tensor(used, device=device), reduce_op="max"))
            else:
                result = self._guarded(
                    trainer,
                    pl_module,
                    lambda m=m, options=options: m.fn(pl_module, loss_fn, Batches(batches), **options),
                )
                values[m.tag] = float(result)
                results[m.tag] = result
                for key, value in self._extra_scalars(result).items():
                    values[f"{m.tag}/{key}"] = value
                if hvps_left is not None:
                    hvps_left -= int(getattr(result, "matvecs", 0) or 0)
        if world > 1:  # whole-set measures ran on every process; float noise aside they agree: take rank 0's
            values = trainer.strategy.broadcast(values, src=0)
        return values, results

    @staticmethod
    def _extra_scalars(result: Any) -> dict[str, float]:
        """Further scalars of a result worth a curve: each of several eigenvalues, the standard error."""
        extra: dict[str, float] = {}
        eigenvalues = getattr(result, "eigenvalues", None)
        if isinstance(eigenvalues, Tensor) and eigenvalues.numel() > 1:
            for i, v in enumerate(eigenvalues.flatten().tolist()):
                extra[f"eigenvalue_{i}"] = float(v)
        stderr = getattr(result, "stderr", None)
        if isinstance(stderr, (int, float, Tensor)) and (not isinstance(stderr, Tensor) or stderr.numel() == 1):
            extra["stderr"] = float(stderr)
        return extra

    def _landscape_images(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        if not trainer.is_global_zero or not any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers):
            return {}
        from lightning_sharpness import landscape

        assert self.landscape is not None and self._probe is not None
        batches = [move_to_device(b, pl_module.device) for b in self._probe.batches]
        loss_fn = self.loss_fn or _step_loss(self._hook())
        cfg = self.landscape
        images = {}
        if 1 in cfg["dims"]:
            curve = landscape.loss_landscape_1d(
                pl_module, loss_fn, batches, steps=cfg["steps"], span=cfg["span"], seed=cfg["seed"]
            )
            images["landscape_1d"] = landscape.plot_landscape_1d(curve)
        if 2 in cfg["dims"]:
            surface = landscape.loss_landscape_2d(
                pl_module, loss_fn, batches, steps=cfg["steps"], span=cfg["span"], seed=cfg["seed"]
            )
            images["landscape_2d"] = landscape.plot_landscape_2d(surface)
        return images

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
        if not trainer.is_global_zero:
            return
        if scalars:  # (trainer.validate logs them through the module instead)
            metrics = {f"sharpness/{k}": v for k, v in values.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        for logger in tensorboards:
            writer = logger.experiment
            for tag, image in images.items():
                writer.add_image(f"sharpness/{tag}", image, global_step=step, dataformats="HWC")
            for m in self.measures:
                if m.name == "spectral_density" and results.get(m.tag) is not None and self.density != "none":
                    self._log_density(writer, f"sharpness/{m.tag}", results[m.tag], step)
            writer.flush()

    def _log_density(self, writer: Any, tag: str, result: Any, step: int) -> None:
        from lightning_sharpness import landscape

        landscape.log_density(writer, tag, result, step, mode=self.density)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(measures={self.measures}, every_n_steps={self.every_n_steps}, "
            f"every_n_epochs={self.every_n_epochs}, probe={self.probe!r}, probe_batches={self.probe_batches})"
        )
