"""What a caller of the measures needs to know about each one, kept with the measure: a small record per measure.

The monitor (and any other scheduler) reads these records instead of special-casing measures by name, as
torchmetrics keeps ``higher_is_better`` and ``full_state_update`` on the metric itself. Adding a measure touches
one file: the function and its :func:`register` decorator.

A record says

* ``fn``: the function ``fn(model, loss_fn, batches, **options)``; its options and defaults (read once, here);
* ``mean_over_examples(options)``: whether the result is a mean over examples whose per-process results on shards
  of the data combine exactly, weighted by size, into the result on all of them (so DDP can split it);
* ``products(options)``: which option sets its Hessian-vector-product count (:class:`Products`), ``None`` when it
  takes no products;
* ``sizes(options, dim)``: the options that set its size, with their current value and the least allowed, which a
  time budget may scale down;
* ``cost(options, dim)``: what one run takes, in gradient-graph builds (``build``), Hessian-vector products
  (``hvp``), gradients (``grad``) and forward passes (``forward``) of its data;
* ``validators``: per option, a check ``(value, options, name) -> None`` that raises ``ValueError`` on a bad value, the
  same the measure applies, so that a scheduler can reject a bad option before training starts.

Example::

    >>> from lightning_sharpness import measures
    >>> rec = record("hessian_trace")
    >>> rec.mean_over_examples(rec.with_defaults({}))  # Hutchinson, the default, is linear in H
    True
    >>> rec.mean_over_examples(rec.with_defaults({"method": "hutch++"}))
    False
    >>> rec.products(rec.with_defaults({"method": "hutch++"}))
    Products(option='matvecs', per_unit=1, least=6)
    >>> rec.validate({"matvecs": 3, "method": "hutch++"})
    Traceback (most recent call last):
    ...
    ValueError: `matvecs` must be an int >= 6, got 3.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning_sharpness.validation import check_int, check_rho

__all__ = ["MeasureRecord", "Products", "names", "record", "register", "COMMON_VALIDATORS"]

#: The arguments every measure takes first, before its options.
_DATA_ARGUMENTS = ("model", "loss_fn", "batches")

Validator = Callable[[Any, Mapping[str, Any]], None]


@dataclass(frozen=True)
class Products:
    """The option that sets a measure's Hessian-vector products: ``per_unit`` products per unit of ``option``
    (the SLQ steps cost one product per probe each), and the least value of ``option`` the measure accepts."""

    option: str
    per_unit: int = 1
    least: int = 2


def _positive_or_none(value: Any, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"`{name}` must be a positive finite number or None, got {value!r}.")


def _int_or_none(least: int = 1) -> Validator:
    def check(value: Any, options: Mapping[str, Any], name: str = "") -> None:
        if value is not None:
            check_int(value, name, least)

    return check


#: The checks of the options several measures share, by option name.
COMMON_VALIDATORS: dict[str, Callable[..., None]] = {
    "rho": lambda v, o, name: check_rho(v, name),
    "k": lambda v, o, name: check_int(v, name),
    "max_iter": lambda v, o, name: v is None or check_int(v, name, o.get("k", 1)),
    "matvecs": lambda v, o, name: check_int(v, name, 2),
    "steps": _int_or_none(),
    "probes": _int_or_none(),
    "m": _int_or_none(),
    "restarts": _int_or_none(),
    "samples": lambda v, o, name: check_int(v, name, 2),
    "tol": lambda v, o, name: _positive_or_none(v, name),
    "alpha": lambda v, o, name: _positive_or_none(v, name),
}


@dataclass(frozen=True)
class MeasureRecord:
    """What a scheduler needs to know about one measure (see the module)."""

    name: str
    fn: Callable[..., Any]
    mean_over_examples: Callable[[Mapping[str, Any]], bool]
    products: Callable[[Mapping[str, Any]], Products | None]
    sizes: Callable[[Mapping[str, Any], int | None], list[tuple[str, int, int]]]
    cost: Callable[[Mapping[str, Any], int | None], dict[str, float]]
    validators: Mapping[str, Callable[..., None]] = field(default_factory=dict)

    def __reduce__(self) -> tuple[Callable[[str], MeasureRecord], tuple[str]]:
        # Pickled by name (``strategy="ddp_spawn"`` pickles the callbacks, the monitor's measures with them): the
        # child process finds the same record in its own registry.
        return _registered, (self.name,)

    @property
    def parameters(self) -> list[inspect.Parameter]:
        """The options of the measure: its parameters after ``model, loss_fn, batches``."""
        return [p for p in inspect.signature(self.fn).parameters.values() if p.name not in _DATA_ARGUMENTS]

    @property
    def accepted(self) -> list[str]:
        return [p.name for p in self.parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    @property
    def required(self) -> list[str]:
        return [p.name for p in self.parameters if p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD]

    @property
    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.parameters if p.default is not inspect.Parameter.empty}

    def with_defaults(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options with the measure's defaults filled in."""
        return {**self.defaults, **options}

    def validate(self, given: Mapping[str, Any]) -> None:
        """Check the values of the options given (the defaults are known to be good).

        Raises:
            ValueError: naming the first bad option and what it allows.
        """
        options = self.with_defaults(given)
        for key, value in given.items():
            check = self.validators.get(key, COMMON_VALIDATORS.get(key))
            if check is not None:
                check(value, options, key)


_REGISTRY: dict[str, MeasureRecord] = {}


def register(
    *,
    mean_over_examples: Callable[[Mapping[str, Any]], bool] | bool = False,
    products: Callable[[Mapping[str, Any]], Products | None] | None = None,
    sizes: Callable[[Mapping[str, Any], int | None], list[tuple[str, int, int]]] | None = None,
    cost: Callable[[Mapping[str, Any], int | None], dict[str, float]],
    validators: Mapping[str, Callable[..., None]] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: record the measure it decorates under the function's name (the order of registration is the
    order :func:`names` lists)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        mean = mean_over_examples if callable(mean_over_examples) else (lambda options, v=mean_over_examples: v)
        _REGISTRY[fn.__name__] = MeasureRecord(
            name=fn.__name__,
            fn=fn,
            mean_over_examples=mean,
            products=products or (lambda options: None),
            sizes=sizes or (lambda options, dim: []),
            cost=cost,
            validators=dict(validators or {}),
        )
        return fn

    return decorate


def names() -> tuple[str, ...]:
    """The registered measures, in the order the docs list them."""
    return tuple(_REGISTRY)


def record(name: str) -> MeasureRecord:
    """The record of measure ``name``.

    Raises:
        ValueError: when no measure of that name is registered, listing those that are.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown measure {name!r}. Available: {list(_REGISTRY)}.")
    return _REGISTRY[name]


def _registered(name: str) -> MeasureRecord:
    """:func:`record`, after importing the measures (which register themselves): what unpickling calls."""
    import lightning_sharpness.measures  # noqa: F401

    return record(name)
