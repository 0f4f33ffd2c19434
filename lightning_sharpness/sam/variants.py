"""How the methods of pytorch-optimizer's SAM family depart from SAM, as small rules the engine consults.

SAM's step is: the gradient ``g_w`` at ``w``, the ascent ``e`` along it, the gradient ``g_p`` at ``w + e``,
the optimizer steps with ``g_p``. A :class:`SAMVariant` changes one or more of these points and nothing else:

* the ascent direction (:class:`FriendlyAscent`: ``g_w - sigma m``, ``m`` an EMA of past gradients);
* how the two gradients combine (:class:`SurrogateGap`: GSAM; :class:`WeightedSharpness`: WSAM);
* whether the step runs the second pass at all (:class:`LookAhead`: LookSAM, one pass between full steps);
* a correction after the optimizer's step (WSAM's decoupled form).

The radius schedule is a :class:`~lightning_sharpness.sam.schedules.RhoSchedule` (GSAM's is
:class:`~lightning_sharpness.sam.schedules.ProportionalRho`, which reads the learning rate).

Gradients reach a rule as ``divisor * g`` (a GradScaler's scale over the accumulation count): the rules keep
their state unscaled, so that a scale that changes between steps never leaks into it. A rule's per-step sums
(:attr:`SAMVariant.step_sums`) are means over micro-batches, and over processes under DDP's local mode, before
:meth:`SAMVariant.finish_step` turns them into state; a step whose gradients are not finite changes no state.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from lightning_sharpness.validation import check_flag, check_int, check_number

__all__ = ["FriendlyAscent", "LookAhead", "SAMVariant", "SurrogateGap", "WeightedSharpness"]

Grads = list[Tensor | None]


class SAMVariant:
    """SAM itself: every hook is the identity. Subclasses override the points where their method differs.

    The engine binds a variant to the trainable parameters (:meth:`bind`); every gradient list a hook receives
    is aligned with them (``None`` for a parameter without a gradient).
    """

    #: whether :meth:`combine_` needs the gradient at ``w`` kept (a copy of the trainable gradients).
    combines: bool = False
    #: under DDP's local mode, run every pass without DDP's all-reduce and average the descent gradient and
    #: :attr:`step_sums` over processes in one all-reduce at the end of the step (the combination is not
    #: linear in ``g_p``, or state must follow the mean gradient at ``w``, so that every process agrees).
    syncs_itself: bool = False

    def __init__(self) -> None:
        self._params: list[torch.nn.Parameter] = []
        self.step_sums: list[Tensor | None] = []  # per-step sums, averaged before finish_step
        self._weight = 0.0  # the sums' total weight: one per micro-batch

    # ---------------------------------------------------------------- binding and per-step life cycle
    def bind(self, params: list[torch.nn.Parameter]) -> None:
        """Attach to the trainable parameters. When they change (a part unfrozen or frozen mid-fit), per-parameter
        state follows each parameter by identity, as pytorch-optimizer's per-parameter state does: a parameter
        that stays keeps its state, one that joins starts without."""
        params = list(params)
        if [id(p) for p in params] != [id(p) for p in self._params]:
            if self._params:
                n = len(self._params)
                slots = [self.step_sums[i : i + n] for i in range(0, len(self.step_sums), n)]
                self.step_sums = [t for slot in slots for t in _remapped(slot, self._params, params)]
                self.remap_state(self._params, params)
            self._params = params

    def remap_state(self, old: list[torch.nn.Parameter], new: list[torch.nn.Parameter]) -> None:
        """Realign state kept per parameter of ``old`` with ``new`` (see :meth:`bind`; :func:`_remapped` helps)."""

    def begin_step(self, step: int) -> None:
        """Called once per optimizer step, before its first pass; ``step`` counts SAM's steps from 0."""
        self.step_sums = []
        self._weight = 0.0

    def runs_second_pass(self) -> bool:
        """Whether this step perturbs and recomputes (LookSAM: only every ``k`` steps)."""
        return True

    # ---------------------------------------------------------------- the step's points
    def ascent_(self, grads: Grads, divisor: float, weight: float) -> None:
        """Turn the gradient at ``w`` (``divisor * g``) in place into the direction of the ascent."""

    def combine_(self, first: Grads, perturbed: Grads, divisor: float, weight: float) -> None:
        """Turn ``perturbed`` (``divisor * g_p``) in place into the descent gradient, given ``first``
        (``divisor * g_w``); ``weight`` is the chunk's share of its micro-batch."""

    def finish_step(self) -> None:
        """After every pass of the step (and the average over processes): turn the step's sums into state."""

    def pass_context(self, perturbed: bool) -> AbstractContextManager:
        """A context for the forward of a pass (at ``w + e`` when ``perturbed``): RSAM's passes at ``w`` choose
        attention kernels that have a double backward."""
        return nullcontext()

    def objective(self, loss: Tensor, params: list[torch.nn.Parameter], perturbed: bool, scale: float) -> Tensor:
        """The loss a pass back-propagates, given the training loss of that pass; ``perturbed`` says whether the
        weights are at ``w + e``, ``params`` are the trainable parameters and ``scale`` the GradScaler's
        (RSAM adds its regularizer to the passes at ``w``). SAM back-propagates the loss itself."""
        return loss

    def one_pass_(self, grads: Grads) -> None:
        """On a step without a second pass: turn the gradient at ``w`` in place into the descent gradient."""

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Just before the optimizer steps (gradients unscaled)."""

    def after_optimizer_step(self, skipped: bool) -> None:
        """Just after the optimizer stepped (``skipped``: its gradients were not finite)."""

    def diagnostics(self) -> dict[str, Any]:
        """Values to log under ``sam/``, beyond SAM's own."""
        return {}

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # ---------------------------------------------------------------- helpers for subclasses
    def _add_to_sums(self, slot: int, tensors: list[Tensor | None], weight: float) -> None:
        """``step_sums[slot * n + i] += weight * tensors[i]`` (slots of ``n = len(params)`` entries)."""
        n = len(self._params)
        need = (slot + 1) * n
        if len(self.step_sums) < need:
            self.step_sums.extend([None] * (need - len(self.step_sums)))
        for i, t in enumerate(tensors):
            if t is None:
                continue
            j = slot * n + i
            add = t.detach().float() * weight
            self.step_sums[j] = add if self.step_sums[j] is None else self.step_sums[j] + add

    def _mean_of_sums(self, slot: int) -> list[Tensor | None]:
        n = len(self._params)
        if self._weight == 0 or len(self.step_sums) < (slot + 1) * n:
            return [None] * n
        return [None if s is None else s / self._weight for s in self.step_sums[slot * n : (slot + 1) * n]]

    def count_micro_batch(self) -> None:
        """One more micro-batch contributed to the step's sums (their mean divides by this count)."""
        self._weight += 1.0


def _finite(tensors: list[Tensor | None]) -> bool:
    peaks = [t.abs().amax().float() for t in tensors if t is not None and t.numel()]
    return not peaks or bool(torch.stack(peaks).isfinite().all())


def _remapped(state: list[Any], old: list[torch.nn.Parameter], new: list[torch.nn.Parameter]) -> list[Any]:
    """``state`` (aligned with ``old``) aligned with ``new``: by parameter identity, ``None`` for a newcomer."""
    position = {id(p): i for i, p in enumerate(old)}
    return [state[position[id(p)]] if id(p) in position and position[id(p)] < len(state) else None for p in new]


def _to_list(state: list[Tensor | None], params: list[torch.nn.Parameter]) -> list[Tensor | None]:
    return [None if s is None else s.to(p.device) for s, p in zip(state, params)]


class SurrogateGap(SAMVariant):
    """GSAM's descent gradient (Zhuang et al., ICLR 2022): ``g_p - alpha g_perp``, where ``g_perp`` is the
    component of ``g_w`` orthogonal to ``g_p`` (the surrogate gap's ascent direction, taken against).

    ``cos = <g_w, g_p> / (||g_w|| ||g_p|| + eps)`` and ``g_perp = g_w - cos ||g_w|| g_p / (||g_p|| + eps)``
    over all trainable parameters, as pytorch-optimizer's ``GSAM.gradient_decompose``.
    """

    syncs_itself = True

    combines = True

    def __init__(self, alpha: float = 0.4, eps: float = 1e-12) -> None:
        super().__init__()
        self.alpha = check_number(alpha, "alpha", minimum=0.0)
        if self.alpha > 1.0:
            raise ValueError(f"`alpha` must be in [0, 1], got {alpha!r}.")
        self.eps = check_number(eps, "eps", minimum=0.0)
        self.last_cosine: Tensor | None = None

    def combine_(self, first: Grads, perturbed: Grads, divisor: float, weight: float) -> None:
        pairs = [(w, p) for w, p in zip(first, perturbed) if p is not None]
        if not pairs:
            return
        # Unscaled: the eps terms then mean what they mean in the plain loop, whatever the loss scale.
        g_w = [(w if w is not None else torch.zeros_like(p)).float() / divisor for w, p in pairs]
        g_p = [p.float() / divisor for _, p in pairs]
        inner = sum((a * b).sum() for a, b in zip(g_w, g_p))
        norm_p = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g_p]))
        norm_w = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g_w]))
        cosine = inner / (norm_p * norm_w + self.eps)
        self.last_cosine = cosine.detach()
        factor = cosine * norm_w / (norm_p + self.eps)
        for (_, out), a, b in zip(pairs, g_w, g_p):
            vertical = a - factor * b
            out.copy_(((b - self.alpha * vertical) * divisor).to(out.dtype))

    def diagnostics(self) -> dict[str, Any]:
        return {} if self.last_cosine is None else {"cosine": self.last_cosine.float()}


class WeightedSharpness(SAMVariant):
    """WSAM's gradient (Yue et al., KDD 2023): ``g_w + a (g_p - g_w)`` with ``a = gamma / (1 - gamma)``, the
    gradient of ``L + a (L(w + e) - L)``.

    ``decouple=False`` (coupled): the optimizer steps with that gradient. ``decouple=True``: the optimizer steps
    with ``g_w`` alone and the sharpness term is applied after its step as ``w <- w - lr a (g_p - g_w)`` (each
    parameter with its param group's learning rate), as pytorch-optimizer's ``WSAM``. A non-finite sharpness
    term makes the optimizer's gradient non-finite, so that the step is skipped (a GradScaler backs off).
    """

    syncs_itself = True

    combines = True

    def __init__(self, gamma: float = 0.9, decouple: bool = True) -> None:
        super().__init__()
        check_number(gamma, "gamma", minimum=0.0)
        if gamma >= 1.0:
            raise ValueError(f"`gamma` must be in [0, 1), got {gamma!r}.")
        self.gamma = float(gamma)
        self.decouple = check_flag(decouple, "decouple")
        self.alpha = self.gamma / (1.0 - self.gamma)
        self._lrs: list[float] = []

    def combine_(self, first: Grads, perturbed: Grads, divisor: float, weight: float) -> None:
        if self.decouple:
            sharpness = [
                None if p is None else (p - (w if w is not None else torch.zeros_like(p))) / divisor
                for w, p in zip(first, perturbed)
            ]
            self._add_to_sums(0, sharpness, weight)
        for w, p in zip(first, perturbed):
            if p is None:
                continue
            w = torch.zeros_like(p) if w is None else w
            if self.decouple:
                # g_w, made non-finite exactly when the sharpness term is (0 * inf = nan), so the step is skipped
                p.copy_(w + (p - w) * 0.0)
            else:
                p.lerp_(w, 1.0 - self.alpha)  # g_p + (1 - a)(g_w - g_p) = g_w + a (g_p - g_w)

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        lr_of = {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
        self._lrs = [lr_of.get(id(p), 0.0) for p in self._params]

    def after_optimizer_step(self, skipped: bool) -> None:
        if not self.decouple or skipped:
            return
        sharpness = self._mean_of_sums(0)
        if not _finite(sharpness):
            return
        with torch.no_grad():
            for p, s, lr in zip(self._params, sharpness, self._lrs):
                if s is not None and p.grad is not None:
                    p.add_(s.to(p.dtype), alpha=-lr * self.alpha)


class FriendlyAscent(SAMVariant):
    """FriendlySAM's ascent (Li et al., CVPR 2024): along ``g_w - sigma m``, where ``m`` is an EMA of past
    gradients at ``w``: ``m <- lmbda m + (1 - lmbda) g_w`` after the ascent (``m = g_w`` at the first step, whose
    ascent is SAM's), as pytorch-optimizer's ``FriendlySAM``. With gradient accumulation or DDP's local mode each
    micro-batch's ascent uses the ``m`` of the step before, and ``m`` follows the step's mean gradient at ``w``.
    """

    syncs_itself = True

    def __init__(self, sigma: float = 1.0, lmbda: float = 0.9) -> None:
        super().__init__()
        self.sigma = check_number(sigma, "sigma", minimum=0.0)
        self.lmbda = check_number(lmbda, "lmbda", minimum=0.0)
        self.momentum: list[Tensor | None] | None = None
        self._pending: list[Tensor | None] | None = None  # loaded from a checkpoint before binding

    def remap_state(self, old: list[torch.nn.Parameter], new: list[torch.nn.Parameter]) -> None:
        if self.momentum is not None:  # a newcomer's EMA starts at its first gradient, its first ascent is SAM's
            self.momentum = _remapped(self.momentum, old, new)

    def ascent_(self, grads: Grads, divisor: float, weight: float) -> None:
        self._add_to_sums(0, [None if g is None else g / divisor for g in grads], weight)
        self._adopt_pending()
        if self.momentum is None:
            return  # the first step: m is still to be made from this gradient, the ascent is SAM's
        for g, m in zip(grads, self.momentum):
            if g is not None and m is not None:
                g.sub_((m * divisor).to(g.dtype), alpha=self.sigma)

    def finish_step(self) -> None:
        mean = self._mean_of_sums(0)
        if not _finite(mean) or all(t is None for t in mean):
            return
        if self.momentum is None:
            self.momentum = [None if t is None else t.clone() for t in mean]
            return
        for i, (m, t) in enumerate(zip(self.momentum, mean)):
            if t is None:
                continue
            if m is None:
                self.momentum[i] = t.clone()
            else:
                m.lerp_(t, 1.0 - self.lmbda)

    def _adopt_pending(self) -> None:
        if self._pending is not None and self._params:
            self.momentum = _to_list(self._pending, self._params)
            self._pending = None

    def diagnostics(self) -> dict[str, Any]:
        if self.momentum is None:
            return {}
        sq = sum((m.float() ** 2).sum() for m in self.momentum if m is not None)
        return {"momentum_norm": torch.as_tensor(sq).sqrt()}

    def state_dict(self) -> dict[str, Any]:
        self._adopt_pending()
        state = self.momentum if self.momentum is not None else self._pending
        return {"momentum": None if state is None else [None if m is None else m.cpu() for m in state]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.momentum, self._pending = None, state.get("momentum")


class LookAhead(SAMVariant):
    """LookSAM's reuse (Liu et al., CVPR 2022): the full SAM step every ``k`` steps, which stores ``g_v``, the
    component of ``g_p`` orthogonal to ``g_w``; in between ONE pass at ``w`` and the descent gradient
    ``g + alpha ||g|| / (||g_v|| + 1e-8) g_v``. Norms and projections are per parameter tensor, as in
    pytorch-optimizer's ``LookSAM``; the weights never return to an older snapshot.
    """

    syncs_itself = True

    combines = True

    def __init__(self, k: int = 10, alpha: float = 0.7, eps: float = 1e-12) -> None:
        super().__init__()
        self.k = check_int(k, "k")
        self.alpha = check_number(alpha, "alpha", minimum=0.0)
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}.")
        self.eps = check_number(eps, "eps", minimum=0.0)
        self.g_v: list[Tensor | None] | None = None
        self._pending: list[Tensor | None] | None = None
        self._full = True

    def remap_state(self, old: list[torch.nn.Parameter], new: list[torch.nn.Parameter]) -> None:
        if self.g_v is not None:  # a newcomer takes plain gradients in one-pass steps until the next full step
            self.g_v = _remapped(self.g_v, old, new)

    def begin_step(self, step: int) -> None:
        super().begin_step(step)
        self._adopt_pending()
        # A step without a stored g_v (the first) is a full one.
        self._full = step % self.k == 0 or self.g_v is None

    def runs_second_pass(self) -> bool:
        return self._full

    def combine_(self, first: Grads, perturbed: Grads, divisor: float, weight: float) -> None:
        orthogonal = []
        for w, p in zip(first, perturbed):
            if p is None or w is None:
                orthogonal.append(None)
                continue
            g_s, g_w = p.float() / divisor, w.float() / divisor
            norm_s = torch.linalg.vector_norm(g_s)
            unit_w = g_w / torch.linalg.vector_norm(g_w).clamp_min(self.eps)
            unit_s = g_s / norm_s.clamp_min(self.eps)
            orthogonal.append(g_s - norm_s * (unit_w * unit_s).sum() * unit_w)
        self._add_to_sums(0, orthogonal, weight)

    def finish_step(self) -> None:
        mean = self._mean_of_sums(0)
        if _finite(mean) and any(t is not None for t in mean):
            self.g_v = mean

    def one_pass_(self, grads: Grads) -> None:
        for g, v in zip(grads, self.g_v or []):
            if g is None or v is None:
                continue
            norm = torch.linalg.vector_norm(g.float())
            g.add_((v * (norm / (torch.linalg.vector_norm(v) + 1e-8))).to(g.dtype), alpha=self.alpha)

    def _adopt_pending(self) -> None:
        if self._pending is not None and self._params:
            self.g_v = _to_list(self._pending, self._params)
            self._pending = None

    def diagnostics(self) -> dict[str, Any]:
        return {"full_step": float(self._full)}

    def state_dict(self) -> dict[str, Any]:
        self._adopt_pending()
        state = self.g_v if self.g_v is not None else self._pending
        return {"g_v": None if state is None else [None if v is None else v.cpu() for v in state]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.g_v, self._pending = None, state.get("g_v")
