"""Which parameters a perturbation or a measure covers: all, normalization layers (SAM-ON), names, or a predicate."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Union

import torch
from torch import nn

__all__ = ["NORM_LAYERS", "ParameterFilter", "select_parameters"]

#: ``None`` or ``"all"`` (every parameter), ``"norm"`` (normalization layers), names, or a predicate.
ParameterFilter = Union[None, Literal["all", "norm"], Sequence[str], Callable[[str, torch.Tensor], bool]]

# RMSNorm exists from torch 2.4 on.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)
_NAMED_FILTERS = ("all", "norm")


def validate_filter(perturb: ParameterFilter, argument: str = "perturb") -> ParameterFilter:
    """Check the form of a parameter selection (whether it matches anything is checked against a module).

    Raises:
        ValueError: naming ``argument`` and the accepted forms.
    """
    names = isinstance(perturb, Sequence) and not isinstance(perturb, str)
    if perturb is None or perturb in _NAMED_FILTERS or callable(perturb):
        return perturb
    if names and all(isinstance(n, str) for n in perturb):
        return perturb
    raise ValueError(
        f"`{argument}` must be None or 'all', 'norm', a list of parameter names or a callable (name, param) -> bool, "
        f"got {perturb!r}."
    )


def select_parameters(
    module: nn.Module, perturb: ParameterFilter = "all", trainable_only: bool = True, argument: str = "perturb"
) -> list[tuple[str, nn.Parameter]]:
    """The parameters of ``module`` chosen by ``perturb``, in ``named_parameters`` order. SAM's ``perturb=`` and
    the measures' ``params=`` speak this one vocabulary:

    * ``None`` or ``"all"``: every parameter;
    * ``"norm"``: those of normalization layers only (SAM-ON, Mueller et al. 2023);
    * a list of names: those parameters (a tied parameter may be named by any of its names);
    * a callable ``(name, param) -> bool``: those it accepts.

    A parameter used under several names (tied weights) appears once, under the first name
    ``named_parameters()`` gives it. ``trainable_only`` keeps those with ``requires_grad``.

    Raises:
        ValueError: when ``perturb`` has another form, names an unknown parameter, or selects nothing (so that
            a typo in a filter cannot silently turn SAM into plain training).
    """
    validate_filter(perturb, argument)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not trainable_only]
    which = "trainable parameter" if trainable_only else "parameter (trainable or frozen)"
    if perturb == "norm":
        norm_layers = [m for m in module.modules() if isinstance(m, NORM_LAYERS)]
        norm_params = {id(p) for m in norm_layers for p in m.parameters(recurse=False)}
        chosen = [(n, p) for n, p in named if id(p) in norm_params]
    elif perturb is None or perturb == "all":
        chosen = named
    elif callable(perturb):
        chosen = [(n, p) for n, p in named if perturb(n, p)]
    else:
        first_name = {id(p): n for n, p in module.named_parameters()}
        alias = {n: first_name[id(p)] for n, p in module.named_parameters(remove_duplicate=False)}
        known = {n for n, _ in named}
        unknown = [n for n in perturb if alias.get(n) not in known]
        if unknown:
            raise ValueError(
                f"`{argument}` names unknown or frozen parameters {unknown}; {which}s: {sorted(known)}."
                if trainable_only
                else f"`{argument}` names unknown parameters {unknown}; parameters: {sorted(known)}."
            )
        wanted = {alias[n] for n in perturb}
        chosen = [(n, p) for n, p in named if n in wanted]
    if not chosen:
        raise ValueError(
            f"`{argument}={perturb!r}` selects no {which} of {type(module).__name__}; "
            "nothing would be perturbed. Use 'all', 'norm' (normalization layers) or a predicate that matches."
        )
    return chosen
