"""The geodesic geometry of attention heads (da Silva, Dangel & Oore, *Hide & Seek*, 2025).

An attention head sees its query/key weights only through ``W_q^T W_k`` and its value/output weights only
through ``W_o W_v``: moving the factors along ``GL(h)`` leaves the network unchanged. This geometry measures
and takes perturbations in the quotient by that symmetry (horizontal steps, the invariant metric, geodesic
retraction), so that sharpness and SAM's step do not depend on where in its orbit a trained model sits. Which
heads a model has is found by :mod:`lightning_sharpness.attention_heads`; everything that is not a head
pair falls back to the adaptive geometry.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_sharpness.attention_heads import (
    AttentionHeads,
    Piece,
    declared_attention,
    find_attention,
    no_attention_message,
)
from lightning_sharpness.geometry import AdaptiveGeometry, Norm

__all__ = ["GeodesicGeometry"]


class _Block:
    """One head's factor pair ``(G, H)`` whose product ``G H^T`` is all the network sees (``G -> G A``,
    ``H -> H A^-T`` for any invertible ``A`` leaves it unchanged). Each factor is stacked from pieces of
    parameters: the head's rows of a projection weight (transposed), its columns, or its bias entries (one
    extra row, since the biases transform with the same ``A``)."""

    def __init__(self, kind: str, g: list[Piece], h: list[Piece]) -> None:
        self.kind = kind  # "qk" or "vo"
        self.factors = (g, h)

    def names(self) -> set[str]:
        return {piece[0] for factor in self.factors for piece in factor}

    @staticmethod
    def gather(factor: list[Piece], tensors: dict[str, Tensor]) -> Tensor:
        parts = []
        for name, kind, idx in factor:
            t = tensors[name]
            parts.append(t[idx].T if kind == "rows" else t[:, idx] if kind == "cols" else t[idx][None, :])
        return torch.cat(parts, 0)

    @staticmethod
    def scatter(factor: list[Piece], tensors: dict[str, Tensor], matrix: Tensor) -> None:
        start = 0
        for name, kind, idx in factor:
            t = tensors[name]
            if kind == "rows":
                n = t[idx].shape[1]
                t[idx] = matrix[start : start + n].T
            elif kind == "cols":
                n = t.shape[0]
                t[:, idx] = matrix[start : start + n]
            else:
                n = 1
                t[idx] = matrix[start]
            start += n


def _horizontal(G: Tensor, H: Tensor, xg: Tensor, xh: Tensor) -> tuple[Tensor, Tensor]:
    """Remove from ``(xg, xh)`` its component along the orbit ``{(G L, -H L^T)}``, orthogonally in the metric.

    Solves the Sylvester equation ``K L + L K = Q G^T xg - xh^T H P`` with ``K = Q P``, ``P = G^T G``,
    ``Q = H^T H``, by diagonalizing the symmetric ``P^1/2 Q P^1/2``. Batched over leading dimensions.
    """
    P, Q = G.mT @ G, H.mT @ H
    ep, up = torch.linalg.eigh(P)
    root = ep.sqrt()[..., None, :]
    sqrt_p = (up * root) @ up.mT
    inv_sqrt_p = (up / root) @ up.mT
    d, u = torch.linalg.eigh(sqrt_p @ Q @ sqrt_p)
    V, V_inv = inv_sqrt_p @ u, u.mT @ sqrt_p
    C = Q @ G.mT @ xg - xh.mT @ H @ P
    L = V @ ((V_inv @ C @ V) / (d[..., :, None] + d[..., None, :])) @ V_inv
    return xg - G @ L, xh + H @ L.mT


def _metric_sq(P: Tensor, x: Tensor) -> Tensor:
    """``tr(P^-1 x^T x)`` summed over a batch: the squared metric size of ``x`` at a factor with ``P = G^T G``."""
    return (torch.linalg.solve(P, x.mT) * x.mT).sum()


class GeodesicGeometry(AdaptiveGeometry):
    """Symmetry-aware geometry for attention ("Hide & Seek", da Silva, Dangel & Oore, 2025).

    Per head, the query/key pair ``(G, H) = (W_q^T, W_k^T)`` and the value/output pair ``(W_v^T, W_o)`` carry a
    GL(h) symmetry. On each pair this geometry uses the GL(h)-invariant metric
    ``<xi, eta> = tr((G^T G)^-1 xi_G^T eta_G) + tr((H^T H)^-1 xi_H^T eta_H)`` (Mishra et al., 2014), keeps
    perturbations horizontal (orthogonal to the symmetry orbit) and moves along the second-order geodesic
    ``x + xi - Gamma(xi, xi) / 2`` with ``Gamma_G(xi, xi) = G P^-1 xi^T xi - xi P^-1 (xi^T G + G^T xi)``.
    All other parameters use the adaptive geometry (``T = |w| + eta``). Balls are l2 only.

    :meth:`bind` finds the heads by itself (:mod:`lightning_sharpness.attention_heads`): ``nn.MultiheadAttention``
    (so ``nn.TransformerEncoderLayer`` and friends), HuggingFace-style self-attention with separate
    query/key/value ``nn.Linear`` layers (BERT, RoBERTa, ViT, CLIP, T5, ...) and a fused ``qkv`` ``nn.Linear``
    with a head count and a ``proj`` (timm's ViT). Other attention is declared with ``qk_pairs`` /
    ``vo_pairs``: ``(query, key, heads)`` and ``(value, output, heads)`` names of ``nn.Linear`` modules,
    relative to the bound module. A model where no head is found or declared raises at :meth:`bind`, unless
    ``require_heads=False`` (then this is the adaptive geometry). The bound geometry :meth:`bind` returns lists in
    ``attention`` what was found (:class:`~lightning_sharpness.attention_heads.AttentionHeads`) and in ``blocks``
    the head pairs used.

    Example::

        geo = GeodesicGeometry(qk_pairs=[("attn.q", "attn.k", 4)], vo_pairs=[("attn.v", "attn.o", 4)])
        worst_case_sharpness(model, loss_fn, batch, rho=0.05, geometry=geo)

    For SAM: :meth:`retract_` also overwrites the steps with the displacement actually taken.
    """

    name = "geodesic"
    norms = ("l2",)

    def __init__(
        self,
        eta: float = 0.01,
        qk_pairs: Sequence[tuple[str, str, int]] = (),
        vo_pairs: Sequence[tuple[str, str, int]] = (),
        require_heads: bool = True,
    ) -> None:
        super().__init__(eta)
        if not isinstance(require_heads, bool):
            raise ValueError(f"`require_heads` must be True or False, got {require_heads!r}.")
        for arg, pairs in (("qk_pairs", qk_pairs), ("vo_pairs", vo_pairs)):
            for pair in pairs:
                if not (
                    isinstance(pair, (tuple, list))
                    and len(pair) == 3
                    and isinstance(pair[0], str)
                    and isinstance(pair[1], str)
                    and isinstance(pair[2], int)
                    and pair[2] >= 1
                ):
                    raise ValueError(f"`{arg}` entries must be (name, name, heads >= 1), got {pair!r}.")
        self.qk_pairs = [tuple(p) for p in qk_pairs]
        self.vo_pairs = [tuple(p) for p in vo_pairs]
        self.require_heads = require_heads
        self.attention: list[AttentionHeads] = []
        self.blocks: list[_Block] = []
        self._by_id: dict[int, str] = {}

    # ------------------------------------------------------------------ structure
    def bind(self, module: torch.nn.Module, named_params: Sequence[tuple[str, Tensor]]) -> GeodesicGeometry:
        """A copy of this geometry bound to ``module``: the heads found (declared ones first, then those
        :func:`find_attention` recognizes that share no parameter with a declared one), keeping the pairs whose
        parameters are all in ``named_params``. This geometry itself stays unbound, so it may be bound to several
        models (SAM and a measure, or two runs) without one binding overwriting the other.

        Raises:
            ValueError: when ``module`` has no usable head at all (naming what was looked for), unless
                ``require_heads=False``; when a declared pair names a module that does not exist.
        """
        chosen = {name for name, _ in named_params}
        declared = declared_attention(module, self.qk_pairs, self.vo_pairs)
        taken = set().union(*(a.parameter_names() for a in declared))
        found = [a for a in find_attention(module) if not a.parameter_names() & taken]
        attention = declared + found
        blocks = [_Block(kind, g, h) for a in attention for kind, g, h in a.pairs()]
        if not blocks and self.require_heads:
            raise ValueError(no_attention_message(module, found))
        bound = copy.copy(self)
        bound._by_id = {id(p): name for name, p in named_params}
        bound.attention = attention
        bound.blocks = [b for b in blocks if b.names() <= chosen]
        return bound

    def _active(self, params: Sequence[Tensor]) -> tuple[dict[str, int], list[_Block]]:
        index = {self._by_id[id(p)]: i for i, p in enumerate(params) if id(p) in self._by_id}
        return index, [b for b in self.blocks if b.names() <= index.keys()]

    def _covered(self, params: Sequence[Tensor], blocks: list[_Block], index: dict[str, int]) -> list[Tensor | None]:
        """Per tensor, a 0/1 mask of the elements handled by blocks (``None`` where none is)."""
        masks: list[Tensor | None] = [None] * len(params)
        for b in blocks:
            for factor in b.factors:
                for name, kind, idx in factor:
                    i = index[name]
                    if masks[i] is None:
                        masks[i] = torch.zeros_like(params[i], dtype=torch.bool)
                    mask = masks[i]
                    if kind == "cols":
                        mask[:, idx] = True
                    else:
                        mask[idx] = True
        return masks

    def _factors(self, b: _Block, index: dict[str, int], tensors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        named = {name: tensors[i] for name, i in index.items()}
        return b.gather(b.factors[0], named), b.gather(b.factors[1], named)

    def _stacked(
        self, blocks: list[_Block], index: dict[str, int], *lists: Sequence[Tensor]
    ) -> list[tuple[list[_Block], list[tuple[Tensor, Tensor]]]]:
        """The blocks grouped by factor shapes, and per group the factors of each tensor list stacked along a new
        first dimension: one batched linear-algebra call per group instead of one per head."""
        named = [{name: tensors[i] for name, i in index.items()} for tensors in lists]
        groups: dict[tuple, tuple[list[_Block], list[list[tuple[Tensor, Tensor]]]]] = {}
        for b in blocks:
            factors = [(b.gather(b.factors[0], n), b.gather(b.factors[1], n)) for n in named]
            key = (factors[0][0].shape, factors[0][1].shape)
            members, per_list = groups.setdefault(key, ([], [[] for _ in lists]))
            members.append(b)
            for acc, f in zip(per_list, factors):
                acc.append(f)
        return [
            (members, [(torch.stack([g for g, _ in acc]), torch.stack([h for _, h in acc])) for acc in per_list])
            for members, per_list in groups.values()
        ]

    def _write(self, b: _Block, index: dict[str, int], tensors: Sequence[Tensor], g: Tensor, h: Tensor) -> None:
        named = {name: tensors[i] for name, i in index.items()}
        b.scatter(b.factors[0], named, g)
        b.scatter(b.factors[1], named, h)

    def _write_all(
        self, blocks: list[_Block], index: dict[str, int], tensors: Sequence[Tensor], g: Tensor, h: Tensor
    ) -> None:
        """Scatter stacked factors (first dimension: ``blocks``) back into ``tensors``."""
        named = {name: tensors[i] for name, i in index.items()}
        for b, gb, hb in zip(blocks, g, h):
            b.scatter(b.factors[0], named, gb)
            b.scatter(b.factors[1], named, hb)

    # ------------------------------------------------------------------ metric
    def dual_sq_norm(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
        index, blocks = self._active(params)
        masks = self._covered(params, blocks, index)
        grads = [g.detach().float() for g in grads]
        pf = [p.detach().float() for p in params]
        terms = [torch.zeros(())]
        for p, g, mask in zip(pf, grads, masks):
            tg = g * self.scale(p)
            terms.append((tg if mask is None else tg.masked_fill(mask, 0)).pow(2).sum())
        for _, ((G, H), (dg, dh)) in self._stacked(blocks, index, pf, grads):
            # the metric norm of the horizontal Riemannian gradient: what ascent_ turns the gradient into
            P, Q = G.mT @ G, H.mT @ H
            rg, rh = _horizontal(G, H, dg @ P, dh @ Q)
            terms.append(_metric_sq(P, rg) + _metric_sq(Q, rh))
        return torch.stack(terms).sum()

    def sq_norm(self, params: Sequence[Tensor], steps: Sequence[Tensor]) -> Tensor:
        index, blocks = self._active(params)
        masks = self._covered(params, blocks, index)
        steps = [d.detach().double() for d in steps]
        pf = [p.detach().double() for p in params]
        terms = [torch.zeros((), dtype=torch.float64, device=pf[0].device if pf else None)]
        for p, d, mask in zip(pf, steps, masks):
            u = d / self.scale(p)
            terms.append((u if mask is None else u.masked_fill(mask, 0)).pow(2).sum())
        for _, ((G, H), (xg, xh)) in self._stacked(blocks, index, pf, steps):
            terms.append(_metric_sq(G.mT @ G, xg) + _metric_sq(H.mT @ H, xh))
        return torch.stack(terms).sum()

    def horizontal_(self, params: Sequence[Tensor], steps: Sequence[Tensor]) -> None:
        """Project the steps of every head pair, in place, onto the horizontal space (no symmetry direction)."""
        index, blocks = self._active(params)
        with torch.no_grad():
            for group, ((G, H), (xg, xh)) in self._stacked(blocks, index, [p.detach() for p in params], steps):
                self._write_all(group, index, steps, *_horizontal(G, H, xg, xh))

    def ascent_(self, params: Sequence[Tensor], grads: Sequence[Tensor], coefficient: float | Tensor) -> None:
        """``g -> coefficient * grad_R`` with the Riemannian gradient ``(g_G P, g_H Q)`` on head pairs, made
        horizontal, and ``T^2 g`` elsewhere."""
        index, blocks = self._active(params)
        with torch.no_grad():
            pd = [p.detach() for p in params]
            riem = []
            for group, ((G, H), (dg, dh)) in self._stacked(blocks, index, pd, grads):
                riem.append((group, _horizontal(G, H, dg @ (G.mT @ G), dh @ (H.mT @ H))))
            for p, g in zip(pd, grads):
                t = self.scale(p)
                g.mul_(t).mul_(t)
            for group, (rg, rh) in riem:
                self._write_all(group, index, grads, rg, rh)
            for g in grads:
                g.mul_(coefficient)

    def linf_ascent_(self, params: Sequence[Tensor], grads: Sequence[Tensor], coefficient: float | Tensor) -> None:
        raise ValueError("`norm='linf'` is not defined for the geodesic geometry; use norm='l2'.")

    def project_(self, params: Sequence[Tensor], steps: Sequence[Tensor], rho: float, norm: Norm = "l2") -> None:
        self.check_norm(norm)
        self.horizontal_(params, steps)
        super().project_(params, steps, rho, "l2")

    def sample(self, params: Sequence[Tensor], generator: torch.Generator, norm: Norm = "l2") -> list[Tensor]:
        """A standard Gaussian in the metric: ``T * N(0, 1)`` elsewhere and, per head pair, ``Z G`` with ``Z``
        square standard normal (rows ``~ N(0, G^T G)``, equivariant under ``G -> G A``), made horizontal."""
        self.check_norm(norm)
        out = super().sample(params, generator, "l2")
        index, blocks = self._active(params)
        pd = [p.detach() for p in params]
        for b in blocks:  # Z G and Z H per block, drawn in block order, written into ``out``
            G, H = self._factors(b, index, pd)
            zg = torch.randn(G.shape[0], G.shape[0], generator=generator, dtype=G.dtype).to(G.device) @ G
            zh = torch.randn(H.shape[0], H.shape[0], generator=generator, dtype=H.dtype).to(H.device) @ H
            self._write(b, index, out, zg, zh)
        self.horizontal_(params, out)
        return out

    # ------------------------------------------------------------------ moving
    @staticmethod
    def _geodesic(G: Tensor, xi: Tensor) -> Tensor:
        """``G + xi - Gamma(xi, xi) / 2`` (batched over leading dimensions)."""
        P = G.mT @ G
        P_inv_xtx = torch.linalg.solve(P, xi.mT @ xi)
        P_inv_sym = torch.linalg.solve(P, xi.mT @ G + G.mT @ xi)
        return G + xi + 0.5 * (xi @ P_inv_sym) - 0.5 * (G @ P_inv_xtx)

    def retract(self, params: Sequence[Tensor], steps: Sequence[Tensor]) -> list[Tensor]:
        index, blocks = self._active(params)
        out = [p.detach() + d for p, d in zip(params, steps)]
        pd = [p.detach() for p in params]
        for group, ((G, H), (xg, xh)) in self._stacked(blocks, index, pd, steps):
            self._write_all(group, index, out, self._geodesic(G, xg), self._geodesic(H, xh))
        return out

    def retract_(self, params: Sequence[Tensor], steps: Sequence[Tensor]) -> None:
        with torch.no_grad():
            moved = self.retract(params, steps)
            for p, d, new in zip(params, steps, moved):
                d.copy_(new - p)
                p.copy_(new)

    def __repr__(self) -> str:
        return f"GeodesicGeometry(eta={self.eta}, head_pairs={len(self.blocks)})"
