"""Which parameters a perturbation moves: all trainable ones, only normalization layers (SAM-ON), or a predicate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch
from torch import nn

__all__ = ["NORM_LAYERS", "ParameterFilter", "select_parameters"]

ParameterFilter = Union[str, Callable[[str, torch.Tensor], bool]]

# RMSNorm exists from torch 2.4 on.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)
_NAMED_FILTERS = ("all", "norm")


def validate_filter(perturb: ParameterFilter) -> ParameterFilter:
    if isinstance(perturb, str) and perturb in _NAMED_FILTERS or callable(perturb):
        return perturb
    raise ValueError(
        f"`perturb` must be one of {list(_NAMED_FILTERS)} or a callable (name, param) -> bool, got {perturb!r}."
    )


def select_parameters(
    module: nn.Module, perturb: ParameterFilter = "all", trainable_only: bool = True
) -> list[tuple[str, nn.Parameter]]:
    """The parameters of ``module`` chosen by ``perturb``, in ``named_parameters`` order (a tied parameter
    once, under its first name).

    ``"all"``: every parameter; ``"norm"``: those of normalization layers only (SAM-ON, Mueller et al. 2023);
    a callable ``(name, param) -> bool`` for anything else. ``trainable_only`` keeps those with
    ``requires_grad``. Raises if nothing is selected, so that a typo in a filter cannot silently turn SAM into
    plain training.
    """
    validate_filter(perturb)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not trainable_only]
    if perturb == "norm":
        norm_layers = [m for m in module.modules() if isinstance(m, NORM_LAYERS)]
        norm_params = {id(p) for m in norm_layers for p in m.parameters(recurse=False)}
        chosen = [(n, p) for n, p in named if id(p) in norm_params]
    elif perturb == "all":
        chosen = named
    else:
        chosen = [(n, p) for n, p in named if perturb(n, p)]
    if not chosen:
        which = "trainable parameter" if trainable_only else "parameter (trainable or frozen)"
        raise ValueError(
            f"`perturb={perturb!r}` selects no {which} of {type(module).__name__}; "
            "nothing would be perturbed. Use 'all', 'norm' (normalization layers) or a predicate that matches."
        )
    return chosen
