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
from dataclasses import dataclass, field
from typing import Any, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_sharpness import measures as measures_module
from lightning_sharpness._lightning import quiet

__all__ = ["SharpnessMonitor", "MeasureSpec"]

MeasureSpec = Union[str, Mapping[str, Any]]
LossFn = Callable[[nn.Module, Any], Tensor]

#: What ``SharpnessMonitor()`` measures, sized to fit its 5% time budget on short jobs: the top eigenvalue (to
#: 1e-3 relative, gradient-started Lanczos: 5-10 HVPs) and a Hutchinson trace on 10 probe vectors. The vectors
#: are the same at every measurement (seeded), so the curve's changes are far more precise than one estimate's
#: standard error; Hutchinson rather than Hutch++ because it is linear in the loss, so DDP shards it.
DEFAULT_MEASURES: tuple[MeasureSpec, ...] = (
    {"name": "hessian_eigenvalues", "tol": 1e-3},
    {"name": "hessian_trace", "method": "hutchinson", "matvecs": 10},
)
#: Estimates linear in the loss, with the same random vectors on every process: under DDP, each process
#: measures its share and the results are averaged weighted by size, which gives exactly the result on the
#: whole probe set. Also ``hessian_trace`` with ``method="hutchinson"`` and ``worst_case_sharpness`` with ``m``
#: and ``init="zero"`` (a random start draws from one generator chunk after chunk, so shards would differ).
_LINEAR_MEASURES = {"hessian_diagonal", "average_case_sharpness"}
#: Options of the measure functions that the monitor fills in when the user does not.
_SEED_OPTION = "seed"
_PROBE_SOURCES = ("train", "val")
_DENSITY_MODES = ("histogram", "image", "both", "none")
_LANDSCAPE_KEYS = ("dims", "steps", "span", "seed")


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

    def option(self, key: str) -> Any:
        return self.options.get(key, self.defaults.get(key))

    def within(self, hvps: int) -> dict[str, Any] | None:
        """The options with the measure's size capped to ``hvps`` Hessian-vector products; ``None``: cannot fit."""
        options = dict(self.options)
        if "matvecs" in self.defaults and not (self.name == "renyi_sharpness" and self.option("alpha") != 2):
            least = 6 if self.name == "hessian_trace" and self.option("method") == "hutch++" else 2
            options["matvecs"] = min(self.option("matvecs"), hvps)
            return options if options["matvecs"] >= least else None
        if "max_iter" in self.defaults:
            current = self.option("max_iter")
            options["max_iter"] = hvps if current is None else min(current, hvps)
            return options if options["max_iter"] >= max(self.option("k") or 1, 2) else None
        if "steps" in self.defaults and "probes" in self.defaults:
            options["steps"] = min(self.option("steps"), hvps // self.option("probes"))
            return options if options["steps"] >= 2 else None
        return options

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
        parsed.append(_Measure(name=name, tag=tag, fn=fn, options=options, linear=linear, defaults=defaults))
    tags = [m.tag for m in parsed]
    duplicates = sorted({t for t in tags if tags.count(t) > 1})
    if duplicates:
        raise ValueError(
            f"Measures {duplicates} are listed more than once; give each a distinct `tag`, e.g. "
            "{name: worst_case_sharpness, rho: 0.1, tag: worst_case_rho_0.1}."
        )
    return parsed


def _is_linear(name: str, options: Mapping[str, Any]) -> bool:
    """Whether per-process results on shards combine exactly into the result on the whole probe set."""
    if name == "hessian_trace":
        return options.get("method") == "hutchinson"  # Hutch++ projects on a sketch: not linear in H
    if name == "worst_case_sharpness":  # m-sharpness, a mean over chunks, each from the same start
        return options.get("m") is not None and options.get("init") == "zero"
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


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, (Tensor, list, tuple, Mapping)):
                return _batch_size(item)
    raise ValueError(f"Cannot find a batched tensor in a probe batch of type {type(batch).__name__}.")


class _Batches:
    """A sequence of batches that ``measures`` never mistakes for one batch (it is not a ``list``)."""

    def __init__(self, batches: Sequence[Any]) -> None:
        self._batches = list(batches)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


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


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: _move(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_move(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(v, device) for v in batch)
    return batch


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
        max_overhead: after the first measurement of a run, a scheduled one (periodic or at train end) is
            skipped, with a warning, when it would bring the time spent measuring (its cost estimated by the last
            one's) above this fraction of the training time: the overhead stays under ``max_overhead`` plus one
            measurement. Measurements of ``trainer.validate`` are never skipped. ``None``: measure every time.
        fp32: measure in float32 also when training in bf16 / fp16 (autocast off, half weights cast to fp32 for
            the measurement and back bitwise). ``False``: measure in the training precision.
        density: how the ``spectral_density`` measure is drawn in TensorBoard: ``"histogram"``, ``"image"``,
            ``"both"`` or ``"none"``.
        landscape: ``True`` or a mapping ``{dims: [1, 2], steps: 21, span: 1.0, seed: 0}``: also log 1-D and 2-D
            loss-landscape pictures along filter-normalized random directions (TensorBoard only).
        progress_bar: the tag of one measure to show in the progress bar.

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
        max_overhead: float | None = 0.05,
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
        if every_n_epochs is None and every_n_steps is None:
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
        self.max_overhead = _positive_float_or_none("max_overhead", max_overhead)
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
        self._seconds_at_start = 0.0
        self._last_cost: float | None = None
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
    def state_dict(self) -> dict[str, Any]:
        """What a resume needs: the probe set's indices, the last measured step and the time accounting."""
        return {
            "probe_indices": None if self._probe is None else self._probe.indices,
            "last_step": self._last_step,
            "seconds_measuring": self._seconds_measuring,
            "last_cost": self._last_cost,
            "train_seconds": self._train_seconds(),
            "history": [(s, dict(v)) for s, v in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_indices = state_dict.get("probe_indices")
        self._probe = None
        self._last_step = int(state_dict.get("last_step", -1))
        self._seconds_measuring = float(state_dict.get("seconds_measuring", 0.0))
        self._last_cost = state_dict.get("last_cost")
        self._train_seconds_before = float(state_dict.get("train_seconds", 0.0))
        self.history = [(int(s), dict(v)) for s, v in state_dict.get("history", [])]

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

    def _train_seconds(self) -> float:
        if self._train_start is None:
            return self._train_seconds_before
        spent_here = self._seconds_measuring - self._seconds_at_start
        return self._train_seconds_before + time.perf_counter() - self._train_start - spent_here

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
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
            self._measure(trainer, pl_module, guarded=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_train_end_ and trainer.global_step != self._last_step:
            self._measure(trainer, pl_module, guarded=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_validate_ and trainer.state.fn == "validate" and not trainer.sanity_checking:
            step = self._ckpt_step if self._ckpt_step is not None else trainer.global_step
            self._measure(trainer, pl_module, guarded=False, step=step)

    # ------------------------------------------------------------------ probe set
    def _hook(self) -> str:
        return "validation_step" if self.probe == "val" else "training_step"

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
            if loader is None:
                source = trainer.datamodule if trainer.datamodule is not None else pl_module
                loader = source.val_dataloader()
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        if isinstance(loader, Mapping):
            loader = next(iter(loader.values()))
        if not isinstance(loader, DataLoader):
            raise ValueError(f"SharpnessMonitor needs a torch DataLoader as probe source, got {type(loader).__name__}.")
        return loader

    def _probe_set(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> _ProbeSet:
        if self._probe is None:
            loader = self._probe_loader(trainer, pl_module)
            self._probe = _select_probe(loader, self.probe_batches, self.seed, self._restored_indices)
        return self._probe

    # ------------------------------------------------------------------ measuring
    def _agree(self, trainer: pl.Trainer, decision: bool) -> bool:
        """Rank zero's decision on every process (decisions that depend on a clock may differ)."""
        if trainer.world_size > 1:
            return bool(trainer.strategy.broadcast(decision, src=0))
        return decision

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

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, guarded: bool, step: int | None = None
    ) -> None:
        step = trainer.global_step if step is None else step
        if guarded and self.max_overhead is not None and self._last_cost is not None:
            # Predictive: would this measurement, costing about as much as the last one, push the time spent
            # measuring over max_overhead of the training time?
            over = self._seconds_measuring + self._last_cost > self.max_overhead * self._train_seconds()
            if self._agree(trainer, over):
                if not self._warned_skip:
                    rank_zero_warn(
                        f"SharpnessMonitor skips the measurement at step {step}: measuring has taken "
                        f"{self._seconds_measuring:.1f}s and one more takes about {self._last_cost:.1f}s, more than "
                        f"max_overhead={self.max_overhead} of the training time. Measure less often, on fewer "
                        "probe_batches, or pass max_overhead=None to measure at every scheduled point."
                    )
                    self._warned_skip = True
                return
        start = time.perf_counter()
        with self._measuring_context(trainer, pl_module):
            values, results = self._run_measures(trainer, pl_module, start)
            images = self._landscape_images(trainer, pl_module) if self.landscape is not None else {}
        seconds = time.perf_counter() - start
        if trainer.world_size > 1:
            seconds = float(trainer.strategy.reduce(torch.tensor(seconds, device=pl_module.device), reduce_op="max"))
        self._seconds_measuring += seconds
        self._last_cost = seconds
        self._last_step = trainer.global_step
        values["seconds"] = seconds
        self.history.append((step, {k: v for k, v in values.items()}))
        self._log(trainer, step, values, results, images)

    def _run_measures(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, start: float
    ) -> tuple[dict[str, float], dict[str, Any]]:
        probe = self._probe_set(trainer, pl_module)
        device = pl_module.device
        batches = [_move(b, device) for b in probe.batches]
        if not self.fp32:
            batches = [trainer.precision_plugin.convert_input(b) for b in batches]
        world, rank = trainer.world_size, trainer.global_rank
        shard = batches[rank::world]
        shard_size = sum(_batch_size(b) for b in shard)
        loss_fn = self.loss_fn or _step_loss(self._hook())
        values: dict[str, float] = {}
        results: dict[str, Any] = {}
        hvps_left = self.max_hvps
        for m in self.measures:
            if self.max_seconds is not None and values:  # the first measure always runs
                late = time.perf_counter() - start > self.max_seconds
                if self._agree(trainer, late):
                    rank_zero_warn(f"SharpnessMonitor: max_seconds={self.max_seconds} spent; skipping {m.tag}.")
                    continue
            options = m.options if hvps_left is None else m.within(hvps_left)
            if options is None:
                rank_zero_warn(f"SharpnessMonitor: max_hvps={self.max_hvps} spent; skipping {m.tag}.")
                continue
            if world > 1 and m.linear:
                # Each process measures its share; mean of means weighted by the number of examples.
                if shard:
                    result = m.fn(pl_module, loss_fn, _Batches(shard), **options)
                    local = float(result)
                else:
                    result, local = None, 0.0
                total = trainer.strategy.reduce(
                    torch.tensor([local * shard_size, float(shard_size)], dtype=torch.float64, device=device),
                    reduce_op="sum",
                )
                values[m.tag] = float(total[0] / total[1])
                results[m.tag] = result
                if hvps_left is not None:  # the most any process used
                    used = getattr(result, "matvecs", 0) if result is not None else 0
                    hvps_left -= int(trainer.strategy.reduce(torch.tensor(used, device=device), reduce_op="max"))
            else:
                result = m.fn(pl_module, loss_fn, _Batches(batches), **options)
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
        batches = [_move(b, pl_module.device) for b in self._probe.batches]
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
        self, trainer: pl.Trainer, step: int, values: dict[str, float], results: dict[str, Any], images: dict[str, Any]
    ) -> None:
        if not trainer.is_global_zero:
            return
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
