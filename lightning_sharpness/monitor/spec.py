"""What the monitor measures: the measure specs (names or mappings with options), checked when the callback is
built, and the monitor's own arguments. What the monitor knows about a measure (whether DDP can split it, which
option sets its products, its cost) it reads from the measure's record (:mod:`lightning_sharpness.measures.registry`).

Example::

    >>> [m.tag for m in parse_measures(["hessian_trace", {"name": "hessian_trace", "tag": "t2"}], seed=0)]
    ['hessian_trace', 't2']
    >>> parse_measures([{"name": "hessian_trace", "method": "hutch++", "matvecs": 3}], seed=0)
    Traceback (most recent call last):
    ...
    ValueError: Measure 'hessian_trace': `matvecs` must be an int >= 6, got 3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from lightning_sharpness.measures import registry
from lightning_sharpness.measures.registry import MeasureRecord

__all__ = ["DEFAULT_MEASURES", "Measure", "MeasureSpec", "available_measures", "parse_landscape", "parse_measures"]

MeasureSpec = Union[str, Mapping[str, Any]]

#: What ``SharpnessMonitor()`` measures (the fit-start plan shrinks it where its 5% time budget needs): the top
#: eigenvalue (to 1e-3 relative, gradient-started Lanczos: 5-10 HVPs) and a Hutchinson trace on 10 probe vectors.
#: The vectors are the same at every measurement (seeded), so the curve's changes are far more precise than one
#: estimate's standard error; Hutchinson rather than Hutch++ because it is linear in the loss, so DDP shards it.
DEFAULT_MEASURES: tuple[MeasureSpec, ...] = (
    {"name": "hessian_eigenvalues", "tol": 1e-3},
    {"name": "hessian_trace", "method": "hutchinson", "matvecs": 10},
)
#: The option the monitor fills in with its own ``seed`` when the user does not.
SEED_OPTION = "seed"
PROBE_SOURCES = ("train", "val")
DENSITY_MODES = ("histogram", "image", "both", "none")
LANDSCAPE_KEYS = ("dims", "steps", "span", "seed")


def available_measures() -> list[str]:
    """Names accepted in ``SharpnessMonitor(measures=[...])``: the measure functions that exist."""
    return list(registry.names())


@dataclass
class Measure:
    """One measure of the monitor: its record, the tag it is logged under and the options it was given."""

    tag: str
    record: MeasureRecord
    options: dict[str, Any]
    #: The function called; the record's, unless replaced (a test's spy).
    fn: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if self.fn is None:
            self.fn = self.record.fn

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def defaults(self) -> dict[str, Any]:
        return self.record.defaults

    @property
    def linear(self) -> bool:
        """Whether per-process results on shards combine exactly into the result on the whole probe set."""
        return self.record.mean_over_examples(self.record.with_defaults(self.options))

    def within(self, hvps: int, options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The options with the measure's size capped to ``hvps`` Hessian-vector products; ``None``: cannot fit."""
        options = dict(self.options if options is None else options)
        products = self.record.products(self.record.with_defaults(options))
        if products is None:
            return options
        current = self.record.with_defaults(options)[products.option]
        cap = hvps // products.per_unit
        options[products.option] = cap if current is None else min(current, cap)
        return options if options[products.option] >= products.least else None

    def cost_units(self, options: Mapping[str, Any], dim: int | None = None) -> dict[str, float]:
        """What one run with ``options`` takes, in the units the plan times (see the measure's record)."""
        return self.record.cost(self.record.with_defaults(options), dim)

    def scaled(self, options: Mapping[str, Any], factor: float, dim: int | None = None) -> dict[str, Any]:
        """The options with the measure's size (products, ascent steps, samples) scaled by ``factor`` <= 1, never
        below what the measure needs; the Lanczos count becomes an explicit ``max_iter``, so that the forecast
        bounds it."""
        scaled = dict(options)
        for key, value, least in self.record.sizes(self.record.with_defaults(options), dim):
            scaled[key] = max(least, min(value, math.floor(value * factor)))
        return scaled

    @staticmethod
    def describe(name: str, options: Mapping[str, Any]) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in options.items() if k != SEED_OPTION)
        return f"{name}({shown})"

    def __repr__(self) -> str:
        return f"{self.tag}={self.name}({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"


def parse_measures(measures: Sequence[MeasureSpec], seed: int) -> list[Measure]:
    """The measures of ``SharpnessMonitor(measures=...)``, every option checked by the measure's own validators.

    Raises:
        ValueError: for an unknown measure or option, a missing required option, a bad option value, a bad or
            repeated ``tag``.
    """
    if isinstance(measures, (str, Mapping)):
        measures = [measures]
    if not isinstance(measures, Sequence) or len(measures) == 0:
        raise ValueError(
            f"`measures` must be a non-empty list of measure names or {{name: ..., option: ...}} mappings, got "
            f"{measures!r}. Available: {available_measures()}."
        )
    allowed = available_measures()
    parsed: list[Measure] = []
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
        record = registry.record(name)
        accepted = record.accepted
        unknown = [k for k in options if k not in accepted]
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for measure {name!r}. Allowed options: {accepted} (and `tag`, the "
                "name it is logged under)."
            )
        missing = [k for k in record.required if k not in options]
        if missing:
            raise ValueError(
                f"Measure {name!r} needs option(s) {missing}, e.g. {{name: {name}, {missing[0]}: ...}}. "
                f"Allowed options: {accepted}."
            )
        if SEED_OPTION in accepted and SEED_OPTION not in options:
            options[SEED_OPTION] = seed  # the same random vectors at every measurement: comparable over time
        try:  # bad values fail now, not at the first measurement (after the first epoch)
            record.validate(options)
        except ValueError as err:
            raise ValueError(f"Measure {name!r}: {err}") from None
        parsed.append(Measure(tag=tag, record=record, options=options))
    tags = [m.tag for m in parsed]
    duplicates = sorted({t for t in tags if tags.count(t) > 1})
    if duplicates:
        raise ValueError(
            f"Measures {duplicates} are listed more than once; give each a distinct `tag`, e.g. "
            "{name: worst_case_sharpness, rho: 0.1, tag: worst_case_rho_0.1}."
        )
    return parsed


def positive_int_or_none(name: str, value: Any) -> int | None:
    """Raises: ValueError unless ``value`` is ``None`` or an int >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1 or None, got {value!r}.")
    return value


def positive_float_or_none(name: str, value: Any) -> float | None:
    """Raises: ValueError unless ``value`` is ``None`` or a finite number > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"`{name}` must be a positive finite number or None, got {value!r}.")
    return float(value)


def parse_landscape(landscape: bool | Mapping[str, Any]) -> dict[str, Any] | None:
    """The landscape pictures' configuration: ``None`` (off) or ``{dims, steps, span, seed}``.

    Raises:
        ValueError: for an unknown key or a bad value, naming it.
    """
    if landscape is False or landscape is None:
        return None
    config: dict[str, Any] = {"dims": [1, 2], "steps": 21, "span": 1.0, "seed": 0}
    if landscape is True:
        return config
    if not isinstance(landscape, Mapping):
        raise ValueError(
            f"`landscape` must be a bool or a mapping with keys {list(LANDSCAPE_KEYS)}, got {landscape!r}."
        )
    unknown = [k for k in landscape if k not in LANDSCAPE_KEYS]
    if unknown:
        raise ValueError(f"Unknown `landscape` option(s) {unknown}; allowed: {list(LANDSCAPE_KEYS)}.")
    config.update(landscape)
    dims = config["dims"]
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims or any(d not in (1, 2) for d in dims):
        raise ValueError(f"`landscape.dims` must be a subset of [1, 2], got {config['dims']!r}.")
    config["dims"] = dims
    if isinstance(config["steps"], bool) or not isinstance(config["steps"], int) or config["steps"] < 2:
        raise ValueError(f"`landscape.steps` must be an integer >= 2, got {config['steps']!r}.")
    positive_float_or_none("landscape.span", config["span"])
    return config
