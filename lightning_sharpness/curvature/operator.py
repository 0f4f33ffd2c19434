"""The Hessian of a model's mean loss as a linear operator on flat parameter vectors.

``H @ v`` (one vector) and ``H @ V`` (a block of vectors, the columns of ``V``) are Hessian-vector products
by forward-over-reverse differentiation (``torch.func.jvp`` of ``torch.func.grad`` over
``torch.func.functional_call``), batched over the vectors with ``torch.func.vmap``; models whose operations
``vmap`` or forward-mode AD do not support fall back to a loop of ``jvp`` calls, then to autograd's double
backward. Every curvature algorithm in this package takes such an operator only.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sharpness.curvature.batches import as_batches

__all__ = ["HessianOperator", "select_named_parameters"]

ParamSelection = None | Sequence[str] | Callable[[str, Tensor], bool]
_BACKENDS = ("auto", "vmap", "jvp", "autograd")
_CHOICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(params, block): backend}


def select_named_parameters(model: nn.Module, params: ParamSelection = None) -> list[tuple[str, Tensor]]:
    """The trainable parameters of ``model`` chosen by ``params``: ``None`` (all), names, or a predicate."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"`model` ({type(model).__name__}) has no trainable parameter (requires_grad=True).")
    if params is None:
        return named
    if callable(params):
        chosen = [(n, p) for n, p in named if params(n, p)]
    elif isinstance(params, Sequence) and not isinstance(params, str):
        known = {n for n, _ in named}
        unknown = [n for n in params if n not in known]
        if unknown:
            raise ValueError(f"`params` names unknown or frozen parameters {unknown}; trainable: {sorted(known)}.")
        wanted = set(params)
        chosen = [(n, p) for n, p in named if n in wanted]
    else:
        raise TypeError(f"`params` must be None, a list of parameter names or a predicate, got {params!r}.")
    if not chosen:
        raise ValueError(f"`params={params!r}` selects no trainable parameter of {type(model).__name__}.")
    return chosen


class _LossModule(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so that ``functional_call`` can swap the weights."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


class HessianOperator:
    """The Hessian of ``mean loss over batches`` w.r.t. (a subset of) the trainable parameters.

    The model is used as it is (call ``model.eval()`` first for BatchNorm / dropout; the measures do this
    for you) and never modified: the weights are swapped in functionally.

    Example::

        op = HessianOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y))
        hv = op @ torch.randn(op.dim)          # one HVP
        HV = op @ torch.randn(op.dim, 8)       # eight HVPs, batched with vmap
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], Tensor],
        batches: Any,
        params: ParamSelection = None,
        backend: str = "auto",
        chunk_size: int = 16,
    ) -> None:
        if backend not in _BACKENDS:
            raise ValueError(f"`backend` must be one of {list(_BACKENDS)}, got {backend!r}.")
        if not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable as loss_fn(model, batch), got {loss_fn!r}.")
        if not (isinstance(chunk_size, int) and chunk_size >= 1):
            raise ValueError(f"`chunk_size` must be an int >= 1, got {chunk_size!r}.")
        named = select_named_parameters(model, params)
        self.model = model
        self.batches, self.weights = as_batches(batches)
        self.names = [n for n, _ in named]
        self.params = tuple(p.detach() for _, p in named)
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.dim = sum(self.numels)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.backend = backend
        self.chunk_size = chunk_size
        self._module = _LossModule(model, loss_fn)
        chosen = set(self.names)
        self._frozen = {f"model.{n}": p.detach() for n, p in model.named_parameters() if n not in chosen}
        self._frozen.update({f"model.{n}": b for n, b in model.named_buffers()})
        self.matvecs = 0  # number of Hessian-vector products computed so far

    # ------------------------------------------------------------------ flat <-> per-parameter
    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors into one flat vector."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Split a flat vector (or the rows of a ``(dim, k)`` block) into per-parameter tensors."""
        rest = tuple(flat.shape[1:])
        return [c.reshape(*s, *rest) for c, s in zip(torch.split(flat, self.numels), self.shapes)]

    # ------------------------------------------------------------------ the function
    def loss_at(self, params: Sequence[Tensor], batch: Any) -> Tensor:
        """The loss of one batch with the chosen parameters replaced by ``params``."""
        mapping = dict(self._frozen)
        mapping.update({f"model.{n}": p for n, p in zip(self.names, params)})
        return torch.func.functional_call(self._module, mapping, (batch,), strict=False, tie_weights=False)

    def loss(self) -> float:
        """The mean loss over the batches (weighted by batch size)."""
        with torch.no_grad():
            return float(sum(w * self.loss_at(self.params, b).double() for b, w in zip(self.batches, self.weights)))

    def gradient(self) -> Tensor:
        """The flat gradient of the mean loss."""
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for batch, w in zip(self.batches, self.weights):
            g = torch.func.grad(lambda p, b=batch: self.loss_at(p, b))(self.params)
            total.add_(self.flatten(g), alpha=w)
        return total

    # ------------------------------------------------------------------ products
    def _hvp_vmap(self, batch: Any, vs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        grad_fn = torch.func.grad(lambda p: self.loss_at(p, batch))

        def one(*v: Tensor) -> tuple[Tensor, ...]:
            return torch.func.jvp(grad_fn, (self.params,), (tuple(v),))[1]

        return torch.func.vmap(one)(*vs)

    def _hvp_jvp(self, batch: Any, vs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        grad_fn = torch.func.grad(lambda p: self.loss_at(p, batch))
        outs = [torch.func.jvp(grad_fn, (self.params,), (tuple(v[i] for v in vs),))[1] for i in range(len(vs[0]))]
        return tuple(torch.stack(o) for o in zip(*outs))

    def _hvp_autograd(self, batch: Any, vs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        with torch.enable_grad():
            leaves = tuple(p.clone().requires_grad_(True) for p in self.params)
            grads = torch.autograd.grad(self.loss_at(leaves, batch), leaves, create_graph=True)
            k = len(vs[0])
            outs = []
            for i in range(k):
                hv = torch.autograd.grad(
                    grads, leaves, tuple(v[i] for v in vs), retain_graph=i < k - 1, allow_unused=True
                )
                outs.append([torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, self.params)])
        return tuple(torch.stack(o) for o in zip(*outs))

    def _hvp_block(self, batch: Any, vs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        if self.backend == "auto":
            return self._choose_backend(batch, vs)
        return getattr(self, f"_hvp_{self.backend}")(batch, vs)

    def _choose_backend(self, batch: Any, vs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """First working backend in a device-dependent order, remembered per model and parameter set.

        On CUDA, forward-over-reverse batched with ``vmap`` comes first. On CPU, autograd's double backward
        (one graph, reused for every vector of the block) comes first: in ``benchmarks/measures.py`` it was
        faster there, and the transforms' first-call overhead is paid per operator. Models a backend cannot
        handle fall through to the next one.
        """
        key = tuple(self.names)
        order = [_CHOICES.get(self.model, {}).get(key)]
        order += ["vmap", "autograd", "jvp"] if self.device.type == "cuda" else ["autograd", "vmap", "jvp"]
        errors = []
        for name in dict.fromkeys(n for n in order if n is not None):
            try:
                out = getattr(self, f"_hvp_{name}")(batch, vs)
            except (RuntimeError, NotImplementedError, TypeError, ValueError) as err:
                errors.append(f"{name}: {err}")
                continue
            self.backend = name
            _CHOICES.setdefault(self.model, {})[key] = name
            return out
        raise RuntimeError("No Hessian-vector product backend works for this model: " + "; ".join(errors))

    def matmat(self, V: Tensor) -> Tensor:
        """``H @ V`` for a ``(dim, k)`` block of vectors, ``chunk_size`` HVPs at a time."""
        if V.dim() != 2 or V.shape[0] != self.dim:
            raise ValueError(f"`V` must have shape ({self.dim}, k), got {tuple(V.shape)}.")
        V = V.to(dtype=self.dtype, device=self.device)
        out = torch.zeros_like(V)
        for start in range(0, V.shape[1], self.chunk_size):
            block = V[:, start : start + self.chunk_size]
            vs = tuple(t.movedim(-1, 0).contiguous() for t in self.unflatten(block))
            acc = None
            for batch, w in zip(self.batches, self.weights):
                hv = self._hvp_block(batch, vs)
                flat = torch.cat([h.detach().reshape(h.shape[0], -1) for h in hv], dim=1).T
                acc = flat.mul(w) if acc is None else acc.add_(flat, alpha=w)
            out[:, start : start + block.shape[1]] = acc
        self.matvecs += V.shape[1]
        return out

    def matvec(self, v: Tensor) -> Tensor:
        """``H @ v`` for one flat vector."""
        if v.dim() != 1 or v.shape[0] != self.dim:
            raise ValueError(f"`v` must have shape ({self.dim},), got {tuple(v.shape)}.")
        return self.matmat(v[:, None])[:, 0]

    def __matmul__(self, x: Tensor) -> Tensor:
        return self.matvec(x) if x.dim() == 1 else self.matmat(x)

    def dense(self) -> Tensor:
        """The full ``(dim, dim)`` Hessian from ``dim`` HVPs (for tiny models and tests)."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return self.matmat(eye)

    def __repr__(self) -> str:
        return f"HessianOperator(dim={self.dim}, batches={len(self.batches)}, backend={self.backend!r})"
