"""The Hessian of a model's mean loss as a linear operator on flat parameter vectors.

``H @ v`` (one vector) and ``H @ V`` (a block of vectors, the columns of ``V``) are Hessian-vector products by
one of three backends:

* ``"autograd"`` (double backward, the default): the gradient of each batch is computed once with
  ``create_graph=True`` and every product is one backward pass through that graph
  (``torch.autograd.grad(g, w, v, retain_graph=True)``; a block is a loop of them, or one
  ``is_grads_batched=True`` pass with ``batched=True``, the default on CUDA), with no new forward pass.
  The graphs are held while the operator lives, as long as their saved tensors fit in ``graph_memory`` bytes
  (1 GiB by default; a graph holds about what a training step's activations do); the graphs of the batches
  beyond the budget are rebuilt for each block of products. :meth:`HessianOperator.release` frees them. The
  graphs are of the weights at their first use: call ``release()`` after changing the model.
* ``"vmap"``: forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad`` over ``functional_call``), batched
  over the vectors with ``torch.func.vmap``; ``"jvp"``: the same, one vector at a time.

The model runs with the math kernel of ``scaled_dot_product_attention`` and without the fused attention fast paths
while it is measured (:func:`differentiable_attention`): the fused kernels have no double backward.

Every curvature algorithm in this package takes such an operator only.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

try:  # torch >= 2.2
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover
    SDPBackend = sdpa_kernel = None

from lightning_sharpness.batching import BATCH_FORMS, as_batches, is_ambiguous
from lightning_sharpness.selection import ParameterFilter, select_parameters, validate_filter

__all__ = ["HessianOperator", "NonFiniteLossError", "differentiable_attention", "select_named_parameters"]

ParamSelection = ParameterFilter  # the vocabulary of selection.py, shared with SAM's perturb=
_BACKENDS = ("auto", "vmap", "jvp", "autograd")
_CHOICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(params, block): backend}


def select_named_parameters(model: nn.Module, params: ParamSelection = None) -> list[tuple[str, Tensor]]:
    """The trainable parameters of ``model`` chosen by ``params``, in the vocabulary SAM's ``perturb=`` speaks
    (:func:`lightning_sharpness.selection.select_parameters`): ``None`` or ``"all"``, ``"norm"`` (normalization
    layers), names, or a predicate ``(name, param) -> bool``.

    A parameter used under several names (tied weights, ``self.b.weight = self.a.weight``, or a submodule
    registered twice) is one parameter: it appears once, under the first name ``named_parameters()`` gives it.
    A list of names may use any of its names; a predicate is asked about that first name, as SAM's ``perturb=``.

    Raises:
        TypeError: when ``model`` is not a module or ``params`` is not one of the forms above.
        ValueError: when ``model`` has no trainable parameter, or ``params`` names an unknown or frozen one or
            selects none.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"`model` ({type(model).__name__}) has no trainable parameter (requires_grad=True).")
    try:
        validate_filter(params, "params")
    except ValueError as err:
        raise TypeError(str(err)) from None
    return select_parameters(model, params, trainable_only=True, argument="params")


def _eval_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``F.batch_norm`` with running statistics as the per-channel affine map it is, ``x * scale + shift``."""
    if training or running_mean is None or running_var is None:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    shape = (1, -1) + (1,) * (input.dim() - 2)
    return torch.addcmul(shift.view(shape), input, scale.view(shape))


class _AffineBatchNorm(TorchFunctionMode):
    """Evaluates eval-mode ``F.batch_norm`` as ``x * scale + shift``: the same function, whose double backward
    is a few products instead of the native kernel's generic one (about 25% of an HVP on the benchmark CNN)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func is F.batch_norm:
            return _eval_batch_norm(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _tied_aliases(model: nn.Module, prefix: str = "model.") -> dict[str, list[str]]:
    """First name -> other names of each parameter or buffer that ``model`` holds on more than one submodule
    (tied weights: ``self.b.weight = self.a.weight``); the swap in :meth:`HessianOperator.loss_at` must replace
    all of them, or the other uses keep the original tensor, a constant.

    A submodule registered under two names is one object: one swap reaches all its uses. Its second names are
    left out, because swapping the same attribute twice restores it wrongly (``functional_call(...,
    tie_weights=True)`` leaves the substitute tensor in such a model, torch 2.13)."""
    first: dict[int, str] = {}
    slots: dict[int, set[tuple[int, str]]] = {}
    aliases: dict[str, list[str]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        owner, _, attr = name.rpartition(".")
        slot = (id(model.get_submodule(owner)), attr)
        seen = slots.setdefault(id(tensor), set())
        if slot in seen:
            continue  # the same attribute of the same module, reached through another path
        seen.add(slot)
        if id(tensor) in first:
            aliases.setdefault(prefix + first[id(tensor)], []).append(prefix + name)
        else:
            first[id(tensor)] = name
    return aliases


@contextmanager
def differentiable_attention() -> Iterator[None]:
    """Attention kernels that have second derivatives, for the measured forward passes only.

    The fused kernels of ``F.scaled_dot_product_attention`` (flash, memory-efficient, cuDNN; on CPU the flash one,
    HuggingFace's default ``attn_implementation="sdpa"``) have no derivative of their backward and no forward-mode
    AD, and the inference fast paths of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer``
    (``torch._native_multi_head_attention``, ``torch._transformer_encoder_layer_fwd``) no derivative at all. Here
    the math kernel (the same function, to rounding) and the standard paths run instead; on exit the user's
    settings, and so the training outside the measurement, are as they were.
    """
    mha = getattr(torch.backends, "mha", None)
    fast_path = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        if sdpa_kernel is None:  # pragma: no cover
            yield
        else:
            with sdpa_kernel(SDPBackend.MATH):
                yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fast_path)


class NonFiniteLossError(ValueError):
    """The loss is NaN or infinite where it is measured: no curvature or sharpness is defined there. The measures
    add their name to the message (``measure`` holds it)."""

    measure: str | None = None


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

    ``graph_memory``: bytes of saved tensors the held gradient graphs may use (``0``: rebuild per block of
    products, ``math.inf``: hold all). ``batched``: a block of products through a held graph in one
    ``is_grads_batched`` pass (default on CUDA) or a loop (default on CPU, where it measured faster).
    ``affine_batchnorm``: evaluate eval-mode ``F.batch_norm`` as the per-channel affine map it is (the same
    function; its double backward is about 20% of an HVP cheaper than the native kernel's on the benchmark CNN).

    Example::

        op = HessianOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y))
        hv = op @ torch.randn(op.dim)          # one HVP
        HV = op @ torch.randn(op.dim, 8)       # eight HVPs through the same gradient graph
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], Tensor],
        batches: Any,
        params: ParamSelection = None,
        backend: Literal["auto", "vmap", "jvp", "autograd"] = "auto",
        chunk_size: int = 16,
        graph_memory: float = 2**30,
        batched: bool | None = None,
        affine_batchnorm: bool = True,
    ) -> None:
        if backend not in _BACKENDS:
            raise ValueError(f"`backend` must be one of {list(_BACKENDS)}, got {backend!r}.")
        if not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable as loss_fn(model, batch), got {loss_fn!r}.")
        if not (isinstance(chunk_size, int) and chunk_size >= 1):
            raise ValueError(f"`chunk_size` must be an int >= 1, got {chunk_size!r}.")
        if not (isinstance(graph_memory, (int, float)) and not isinstance(graph_memory, bool) and graph_memory >= 0):
            raise ValueError(f"`graph_memory` must be a number of bytes >= 0, got {graph_memory!r}.")
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
        self._aliases = _tied_aliases(model)
        self.matvecs = 0  # number of Hessian-vector products computed so far
        self.graph_memory = graph_memory
        self.affine_batchnorm = bool(affine_batchnorm)
        self.graph_bytes = 0  # saved-tensor bytes of the gradient graphs held
        # Per batch: (leaves, gradient with its graph), ``None`` when not built yet, ``False`` over the budget.
        self._graphs: list[Any] = [None] * len(self.batches)
        # A block through a held graph: one ``is_grads_batched`` backward, or a loop of backward passes (faster on
        # CPU on the benchmark CNN: 6.3 ms per vector looped against 9-18 ms batched in blocks of 4-64, 1 thread).
        self.batched = self.device.type == "cuda" if batched is None else bool(batched)
        self._finite: set[int] = set()  # batches whose loss at the weights is known to be finite
        for index, batch in enumerate(self.batches):
            if is_ambiguous(batch):
                self._check_batch(index)  # fail now, with the batch contract, if loss_fn cannot take it

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
        """The loss of one batch with the chosen parameters replaced by ``params`` (under every name of a tied
        one, so that each use sees them), with attention kernels that have second derivatives
        (:func:`differentiable_attention`)."""
        mapping = dict(self._frozen)
        mapping.update({f"model.{n}": p for n, p in zip(self.names, params)})
        for name, others in self._aliases.items():
            mapping.update(dict.fromkeys(others, mapping[name]))
        with differentiable_attention():
            if not self.affine_batchnorm:
                return torch.func.functional_call(self._module, mapping, (batch,), strict=False, tie_weights=False)
            with _AffineBatchNorm():
                return torch.func.functional_call(self._module, mapping, (batch,), strict=False, tie_weights=False)

    def loss(self) -> float:
        """The mean loss over the batches (weighted by batch size)."""
        with torch.no_grad():
            losses = [self._require_finite(self.loss_at(self.params, b), i) for i, b in enumerate(self.batches)]
        return float(sum(w * loss.double() for loss, w in zip(losses, self.weights)))

    def _check_batch(self, index: int) -> None:
        """Raise :class:`NonFiniteLossError` unless the loss of batch ``index`` at the weights is finite (once per
        batch; a forward pass without gradient). A list of tensors that ``loss_fn`` cannot take fails with the batch
        contract in the message: it may have been meant as several single-tensor batches."""
        if index in self._finite:
            return
        batch = self.batches[index]
        try:
            with torch.no_grad():
                loss = self.loss_at(self.params, batch)
        except Exception as err:
            if not is_ambiguous(batch):
                raise
            raise TypeError(
                f"loss_fn(model, batch) raised {type(err).__name__} on batch {index + 1}, a list of {len(batch)} "
                f"tensors, which is one batch (as `[x, y]` from a DataLoader): {err}. If it holds {len(batch)} "
                f"single-tensor batches, pass `Batches([...])`. {BATCH_FORMS}"
            ) from err
        self._require_finite(loss, index)

    def _require_finite(self, loss: Tensor, index: int | None) -> Tensor:
        """``loss``, the loss of batch ``index`` at the weights, if it is a finite number; else the error."""
        value = loss.detach()
        if value.numel() != 1 or not bool(torch.isfinite(value).all()):
            what = f"a tensor of shape {tuple(value.shape)}" if value.numel() != 1 else f"{float(value)}"
            where = "" if index is None else f" on batch {index + 1} of {len(self.batches)}"
            raise NonFiniteLossError(
                f"the loss at the model's weights is not a finite number ({what}){where}: no curvature is defined "
                "there. Check the model's outputs and the batch (NaN or inf in inputs or weights, log of 0, an "
                "overflow in low precision); `loss_fn` must return a scalar."
            )
        if index is not None:
            self._finite.add(index)
        return loss

    def gradient(self) -> Tensor:
        """The flat gradient of the mean loss. With the double-backward backend it comes from the gradient graphs
        the products use (built here if needed and held within ``graph_memory``), so it costs nothing extra."""
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for i, (batch, w) in enumerate(zip(self.batches, self.weights)):
            g = None
            if self.backend in ("auto", "autograd"):
                try:
                    g = self._graph(i)[1]
                except NonFiniteLossError:
                    raise
                except (RuntimeError, NotImplementedError, TypeError, ValueError):
                    g = None
            if g is None:
                self._check_batch(i)
                g = torch.func.grad(lambda p, b=batch: self.loss_at(p, b))(self.params)
            total.add_(self.flatten([t.detach() for t in g]), alpha=w)
        return total

    # ------------------------------------------------------------------ gradient graphs
    def _build_graph(
        self, batch: Any, measure: bool, index: int | None = None
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], int]:
        """Leaves (copies of the parameters), the gradient at them with its graph, and the bytes it saves."""
        seen: dict[int, int] = {}

        def pack(t: Tensor) -> Tensor:
            if t.layout == torch.strided:
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.enable_grad():
            leaves = tuple(p.clone().requires_grad_(True) for p in self.params)
            if measure:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = self._require_finite(self.loss_at(leaves, batch), index)
                    grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
            else:
                loss = self._require_finite(self.loss_at(leaves, batch), index)
                grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        grads = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads))
        return leaves, grads, sum(seen.values())

    def _graph(self, index: int) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], bool]:
        """The gradient graph of batch ``index``: held (built on first use while within ``graph_memory``) or
        built afresh (``False`` as third item: the caller may free it after one block)."""
        held = self._graphs[index]
        if held:
            return held[0], held[1], True
        keep = held is None and self.graph_memory > 0
        leaves, grads, nbytes = self._build_graph(self.batches[index], measure=keep, index=index)
        if keep and self.graph_bytes + nbytes <= self.graph_memory:
            self._graphs[index] = (leaves, grads)
            self.graph_bytes += nbytes
            return leaves, grads, True
        self._graphs[index] = False  # over the budget: rebuilt for every block
        return leaves, grads, False

    def release(self) -> None:
        """Free the held gradient graphs (they are rebuilt on the next product)."""
        self._graphs = [None] * len(self.batches)
        self.graph_bytes = 0

    # ------------------------------------------------------------------ products
    def _hvp_vmap(self, index: int, vs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        self._check_batch(index)
        batch = self.batches[index]
        grad_fn = torch.func.grad(lambda p: self.loss_at(p, batch))

        def one(*v: Tensor) -> tuple[Tensor, ...]:
            return torch.func.jvp(grad_fn, (self.params,), (tuple(v),))[1]

        return torch.func.vmap(one)(*vs)

    def _hvp_jvp(self, index: int, vs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        self._check_batch(index)
        batch = self.batches[index]
        grad_fn = torch.func.grad(lambda p: self.loss_at(p, batch))
        outs = [torch.func.jvp(grad_fn, (self.params,), (tuple(v[i] for v in vs),))[1] for i in range(len(vs[0]))]
        return tuple(torch.stack(o) for o in zip(*outs))

    def _hvp_autograd(self, index: int, vs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Double backward through the gradient graph of batch ``index`` (held, or built for this block)."""
        leaves, grads, held = self._graph(index)
        k = len(vs[0])
        if k > 1 and self.batched:
            try:
                hv = torch.autograd.grad(grads, leaves, vs, retain_graph=True, allow_unused=True, is_grads_batched=True)
            except (RuntimeError, NotImplementedError):
                self.batched = False  # no batching rule for some backward op: loop instead
            else:
                return tuple(torch.zeros_like(v) if h is None else h for h, v in zip(hv, vs))
        outs = []
        for i in range(k):
            hv = torch.autograd.grad(
                grads, leaves, tuple(v[i] for v in vs), retain_graph=held or i < k - 1, allow_unused=True
            )
            outs.append([torch.zeros_like(p) if h is None else h for h, p in zip(hv, self.params)])
        return tuple(torch.stack(o) for o in zip(*outs))

    def _hvp_block(self, index: int, vs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        if self.backend == "auto":
            return self._choose_backend(index, vs)
        return getattr(self, f"_hvp_{self.backend}")(index, vs)

    def _choose_backend(self, index: int, vs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """First working backend, remembered per model and parameter set: autograd's double backward through
        the held gradient graph, then forward-over-reverse batched with ``vmap``, then one ``jvp`` per vector.

        Measured on CPU (``benchmarks/measures.py``, CNN with BatchNorm, 1 thread): one product through the held
        graph costs about 1.1 gradients (forward + backward), the first one with the graph build about 2, and
        forward-over-reverse about 1.9 per vector even batched 16 at a time with ``vmap`` (it redoes the forward
        and backward pass for every block). Models a backend cannot handle fall through to the next one.
        """
        key = tuple(self.names)
        order = [_CHOICES.get(self.model, {}).get(key), "autograd", "vmap", "jvp"]
        errors = []
        for name in dict.fromkeys(n for n in order if n is not None):
            try:
                out = getattr(self, f"_hvp_{name}")(index, vs)
            except NonFiniteLossError:
                raise  # no backend can help: the function itself is not finite
            except (RuntimeError, NotImplementedError, TypeError, ValueError) as err:
                errors.append(f"{name}: {err}")
                continue
            self.backend = name
            _CHOICES.setdefault(self.model, {})[key] = name
            return out
        self._check_batch(index)  # a loss_fn that fails without derivatives too: its own error, not the backends'
        raise RuntimeError("No Hessian-vector product backend works for this model: " + "; ".join(errors))

    def matmat(self, V: Tensor) -> Tensor:
        """``H @ V`` for a ``(dim, k)`` block of vectors, ``chunk_size`` HVPs at a time."""
        if V.dim() != 2 or V.shape[0] != self.dim:
            raise ValueError(f"`V` must have shape ({self.dim}, k), got {tuple(V.shape)}.")
        V = V.to(dtype=self.dtype, device=self.device)
        k = V.shape[1]
        out = None
        for start in range(0, k, self.chunk_size):
            block = V[:, start : start + self.chunk_size].T.contiguous()  # (k, dim): one row per vector
            vs = tuple(c.view(-1, *s) for c, s in zip(torch.split(block, self.numels, dim=1), self.shapes))
            acc = None
            for index, w in enumerate(self.weights):
                hv = self._hvp_block(index, vs)
                flat = torch.cat([h.detach().reshape(h.shape[0], -1) for h in hv], dim=1)
                if w != 1.0:
                    flat = flat.mul_(w) if acc is None else flat
                acc = flat if acc is None else acc.add_(flat, alpha=w)
            if k <= self.chunk_size:
                out = acc.T
                break
            if out is None:
                out = torch.empty(self.dim, k, dtype=self.dtype, device=self.device)
            out[:, start : start + block.shape[0]] = acc.T
        self.matvecs += k
        return out

    def matmat_rows(self, V: Tensor, flat: bool = True) -> Tensor | list[Tensor]:
        """``H v`` for each row ``v`` of a ``(b, dim)`` block, rows in and rows out: none of :meth:`matmat`'s
        ``(dim, k)`` transposes and copies. ``flat=False`` gives the per-parameter blocks ``(b, *shape)`` as the
        products return them (no concatenation). Blocks of more than ``chunk_size`` rows go ``chunk_size`` at a time.
        """
        if V.dim() != 2 or V.shape[1] != self.dim:
            raise ValueError(f"`V` must have shape (b, {self.dim}), got {tuple(V.shape)}.")
        V = V.to(dtype=self.dtype, device=self.device)
        parts = []
        for start in range(0, V.shape[0], self.chunk_size):
            rows = V[start : start + self.chunk_size]
            vs = tuple(c.view(-1, *s) for c, s in zip(torch.split(rows, self.numels, dim=1), self.shapes))
            acc = None
            for index, w in enumerate(self.weights):
                hv = [h.detach() for h in self._hvp_block(index, vs)]
                if acc is None:  # a product may return its input itself (an identity block): never write into it
                    acc = [h * w for h in hv] if w != 1.0 or len(self.weights) > 1 else hv
                else:
                    for a, h in zip(acc, hv):
                        a.add_(h, alpha=w)
            parts.append(acc)
        self.matvecs += V.shape[0]
        out = parts[0] if len(parts) == 1 else [torch.cat(p) for p in zip(*parts)]
        return torch.cat([o.reshape(o.shape[0], -1) for o in out], dim=1) if flat else out

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
