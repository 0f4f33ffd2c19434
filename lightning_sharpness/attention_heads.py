"""Where the attention heads of a model are: which rows and columns of which parameters each head owns.

The geodesic geometry needs, per head, the query/key pair and the value/output pair: their products
``W_q^T W_k`` and ``W_o W_v`` (restricted to the head) are all the network sees, so ``W_q -> A W_q``,
``W_k -> A^-T W_k`` and ``W_v -> B W_v``, ``W_o -> W_o B^-1`` (biases alike) leave it unchanged for any
invertible ``A``, ``B`` (the GL(h) symmetry of attention). :func:`find_attention` recognizes the common ways
to write attention by their structure and names; :func:`declared_attention` turns the user's ``qk_pairs`` /
``vo_pairs`` declarations into the same description.

Recognized forms:

* ``nn.MultiheadAttention`` (so ``nn.TransformerEncoderLayer`` and friends), packed or separate projections;
* separate projections: a module with ``nn.Linear`` children ``query``/``key``/``value`` (or ``q_proj``/
  ``k_proj``/``v_proj``, ``q``/``k``/``v``, ``q_lin``/``k_lin``/``v_lin``) and a head count attribute
  (``num_attention_heads``, ``num_heads``, ``n_heads``, ``n_head``, ``nhead``, or the same on its ``config``);
  the output projection is its own ``o_proj``/``out_proj``/``o``/``out_lin`` child or, as in HuggingFace
  BERT/RoBERTa, the ``dense`` layer of a sibling ``*SelfOutput`` module. Fewer key/value heads than query
  heads (grouped-query attention) are read from the projections' sizes;
* a fused ``qkv`` ``nn.Linear`` laid out ``[q; k; v]``, head-major in each (timm's ViT), with a head count
  attribute and an output ``proj``/``out_proj``/``o_proj``/``projection`` child; a bias-free ``qkv`` with
  ``q_bias`` / ``v_bias`` parameters beside it (BEiT, EVA) has those as the query and value biases.

Where something else acts on queries and keys (rotary or relative position embeddings, query/key
normalization, ``add_bias_kv``), the query/key pair has no GL(h) symmetry and is left out; the
value/output pair is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

__all__ = ["AttentionHeads", "Output", "Projection", "declared_attention", "find_attention", "no_attention_message"]

#: One piece of a head's factor: (parameter name, "rows" | "cols" | "bias", which rows / columns / entries).
Piece = tuple[str, str, slice]

_HEAD_COUNTS = ("num_attention_heads", "num_heads", "n_heads", "n_head", "nhead")
_HEAD_DIMS = ("attention_head_size", "head_dim", "key_value_proj_dim", "head_size")
_SEPARATE = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"), ("q_lin", "k_lin", "v_lin"))
_OUTPUTS = ("o_proj", "out_proj", "o", "out_lin")
_FUSED_OUTPUTS = ("proj", "out_proj", "o_proj", "projection")
_QK_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_norm", "key_norm", "q_ln", "k_ln")
_ROPE_CONFIG = ("rope_parameters", "rope_scaling", "rope_theta", "rotary_dim", "rotary_emb_base", "rotary_pct")
_RELATIVE = ("rotary", "relative_key", "relative_key_query")


@dataclass(frozen=True)
class Projection:
    """An input projection with head-major outputs: head ``i`` owns rows ``offset + i * dim`` to
    ``offset + (i + 1) * dim`` of ``weight`` and the entries of ``bias`` from ``bias_offset + i * dim``
    (``bias_offset`` defaults to ``offset``)."""

    weight: str
    bias: str | None
    heads: int
    dim: int
    offset: int = 0
    bias_offset: int | None = None

    def rows(self, head: int) -> list[Piece]:
        start = head * self.dim
        out: list[Piece] = [(self.weight, "rows", slice(self.offset + start, self.offset + start + self.dim))]
        if self.bias is not None:
            b = self.offset if self.bias_offset is None else self.bias_offset
            out.append((self.bias, "bias", slice(b + start, b + start + self.dim)))
        return out


@dataclass(frozen=True)
class Output:
    """The output projection: head ``i`` owns columns ``i * dim`` to ``(i + 1) * dim`` of ``weight``."""

    weight: str
    heads: int
    dim: int

    def cols(self, head: int) -> list[Piece]:
        return [(self.weight, "cols", slice(head * self.dim, (head + 1) * self.dim))]


@dataclass(frozen=True)
class AttentionHeads:
    """The heads of one attention layer (parameter names relative to the bound module).

    ``query``/``key`` form the query/key pairs and ``value``/``output`` the value/output pairs; either half
    may be missing (``None``), with the reason in ``note``. With fewer key/value heads than query heads, the
    query heads sharing a key head (``query head i`` uses ``key head i // (heads / kv_heads)``) share its
    transformation, and so do the output columns of the heads sharing a value head.
    """

    where: str
    form: str
    query: Projection | None = None
    key: Projection | None = None
    value: Projection | None = None
    output: Output | None = None
    note: str = ""

    def __post_init__(self) -> None:
        for first, second in ((self.query, self.key), (self.output, self.value)):
            if (first is None) != (second is None):
                raise ValueError(f"{self.where}: query/key and value/output come in pairs.")
            if first is not None and (first.dim != second.dim or first.heads % second.heads):
                raise ValueError(
                    f"{self.where}: {first.heads} heads of size {first.dim} do not match "
                    f"{second.heads} heads of size {second.dim}."
                )

    def pairs(self) -> list[tuple[str, list[Piece], list[Piece]]]:
        """``(kind, G, H)`` per symmetry group, ``kind`` ``"qk"`` or ``"vo"``: the pieces stacked into the
        factors ``G`` (transforming as ``G A``) and ``H`` (as ``H A^-T``)."""
        out = []
        if self.query is not None and self.key is not None:
            group = self.query.heads // self.key.heads
            for g in range(self.key.heads):
                stacked = [p for i in range(g * group, (g + 1) * group) for p in self.query.rows(i)]
                out.append(("qk", stacked, self.key.rows(g)))
        if self.value is not None and self.output is not None:
            group = self.output.heads // self.value.heads
            for g in range(self.value.heads):
                stacked = [p for i in range(g * group, (g + 1) * group) for p in self.output.cols(i)]
                out.append(("vo", self.value.rows(g), stacked))
        return out

    def parameter_names(self) -> set[str]:
        return {name for _, g, h in self.pairs() for name, _, _ in g + h}

    def describe(self) -> str:
        halves = [n for n, ok in (("query/key", self.query), ("value/output", self.value)) if ok is not None]
        text = f"{self.where or '<root>'} ({self.form}: {' and '.join(halves) or 'no usable pair'})"
        return f"{text}; {self.note}" if self.note else text


# ---------------------------------------------------------------------------------------------- discovery
def find_attention(module: nn.Module) -> list[AttentionHeads]:
    """Every attention layer of ``module`` in a recognized form (see the module docstring), in module order."""
    modules = dict(module.named_modules())
    found, taken = [], set()
    for name, m in modules.items():
        spec = _multihead(name, m) or _separate(name, m, modules) or _fused(name, m)
        if spec is not None and not spec.parameter_names() & taken:
            found.append(spec)
            taken |= spec.parameter_names()
    return found


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _int_attr(obj: object, names: Sequence[str]) -> int | None:
    for attr in names:
        value = getattr(obj, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return None


def _head_count(m: nn.Module) -> int | None:
    return _int_attr(m, _HEAD_COUNTS) or _int_attr(getattr(m, "config", None), _HEAD_COUNTS)


def _qk_broken(m: nn.Module) -> str:
    """Why queries and keys have no GL(h) symmetry in ``m`` ("" when they have)."""
    children = dict(m.named_children())
    if any(n in children and not isinstance(children[n], nn.Identity) for n in _QK_NORMS):
        return "query/key normalization breaks the query/key symmetry"
    if any("rotary" in n or "rope" in n for n in children):
        return "rotary position embedding breaks the query/key symmetry"
    config = getattr(m, "config", None)
    for obj in (m, config):
        if getattr(obj, "position_embedding_type", None) in _RELATIVE:
            return f"{obj.position_embedding_type} position embedding breaks the query/key symmetry"
    if config is not None and any(getattr(config, attr, None) not in (None, False, {}) for attr in _ROPE_CONFIG):
        return "rotary position embedding breaks the query/key symmetry"
    return ""


def _multihead(name: str, m: nn.Module) -> AttentionHeads | None:
    if not isinstance(m, nn.MultiheadAttention):
        return None
    pre, e, heads, dim = _prefix(name), m.embed_dim, m.num_heads, m.head_dim
    bias = f"{pre}in_proj_bias" if m.in_proj_bias is not None else None
    if m._qkv_same_embed_dim:
        q, k, v = (Projection(f"{pre}in_proj_weight", bias, heads, dim, i * e) for i in range(3))
    else:
        q, k, v = (Projection(f"{pre}{w}_proj_weight", bias, heads, dim, 0, i * e) for i, w in enumerate("qkv"))
    notes = []
    if m.bias_k is not None:
        q = k = None
        notes.append("add_bias_kv breaks the query/key symmetry")
    out = Output(f"{pre}out_proj.weight", heads, dim)
    if m.bias_v is not None:
        v = out = None
        notes.append("add_bias_kv breaks the value/output symmetry")
    return AttentionHeads(name, "nn.MultiheadAttention", q, k, v, out, "; ".join(notes))


def _linear_projection(pre: str, attr: str, linear: nn.Linear, heads: int, dim: int, offset: int = 0) -> Projection:
    return Projection(
        f"{pre}{attr}.weight", f"{pre}{attr}.bias" if linear.bias is not None else None, heads, dim, offset
    )


def _split(features: int, dim: int) -> int | None:
    return features // dim if features % dim == 0 and features >= dim else None


def _separate(name: str, m: nn.Module, modules: dict[str, nn.Module]) -> AttentionHeads | None:
    children = dict(m.named_children())
    names = next((n for n in _SEPARATE if all(isinstance(children.get(c), nn.Linear) for c in n)), None)
    if names is None:
        return None
    form, heads = "query/key/value Linear", _head_count(m)
    if heads is None:
        return AttentionHeads(name, form, note=f"no head count attribute ({', '.join(_HEAD_COUNTS)})")
    q, k, v = (children[c] for c in names)
    dim = q.out_features // heads
    kv_heads = _split(k.out_features, dim) if q.out_features % heads == 0 else None
    if kv_heads is None or heads % kv_heads or _int_attr(m, _HEAD_DIMS) not in (None, dim):
        sizes = f"{q.out_features} query and {k.out_features} key features"
        return AttentionHeads(name, form, note=f"{sizes} do not split into {heads} heads")
    pre = _prefix(name)
    query = _linear_projection(pre, names[0], q, heads, dim)
    key = _linear_projection(pre, names[1], k, kv_heads, dim)
    notes = []
    broken = _qk_broken(m)
    if broken:
        query = key = None
        notes.append(broken)
    value = output = None
    out_name, out = _output_projection(name, m, modules)
    if out is not None and out.in_features % heads == 0:
        vdim = out.in_features // heads
        v_heads = _split(v.out_features, vdim)
        if v_heads is not None and heads % v_heads == 0:
            value = _linear_projection(pre, names[2], v, v_heads, vdim)
            output = Output(f"{out_name}.weight", heads, vdim)
    if value is None:
        notes.append("no output projection found next to it")
    return AttentionHeads(name, form, query, key, value, output, "; ".join(notes))


def _output_projection(name: str, m: nn.Module, modules: dict[str, nn.Module]) -> tuple[str, nn.Linear | None]:
    """The Linear applied to the concatenated head outputs: a child of ``m``, or the ``dense`` of a sibling
    ``*SelfOutput`` module (HuggingFace BERT: ``attention.self`` and ``attention.output.dense``)."""
    children = dict(m.named_children())
    for attr in _OUTPUTS:
        if isinstance(children.get(attr), nn.Linear):
            return f"{_prefix(name)}{attr}", children[attr]
    if not name:
        return "", None
    parent_name = name.rpartition(".")[0]
    parent = modules.get(parent_name)
    if parent is None:
        return "", None
    for sibling_name, sibling in parent.named_children():
        dense = getattr(sibling, "dense", None)
        if sibling is not m and type(sibling).__name__.endswith("SelfOutput") and isinstance(dense, nn.Linear):
            return f"{_prefix(parent_name)}{sibling_name}.dense", dense
    return "", None


def _fused(name: str, m: nn.Module) -> AttentionHeads | None:
    children = dict(m.named_children())
    qkv, heads = children.get("qkv"), _head_count(m)
    if not isinstance(qkv, nn.Linear) or heads is None or qkv.out_features % (3 * heads):
        return None
    dim = qkv.out_features // (3 * heads)
    if _int_attr(m, _HEAD_DIMS) not in (None, dim):
        return None
    pre = _prefix(name)
    query, key, value = (_linear_projection(pre, "qkv", qkv, heads, dim, i * heads * dim) for i in range(3))
    own = dict(m.named_parameters(recurse=False))
    if qkv.bias is None:  # BEiT / EVA: a query and a value bias of their own, no key bias
        if own.get("q_bias") is not None and own["q_bias"].shape == (heads * dim,):
            query = Projection(f"{pre}qkv.weight", f"{pre}q_bias", heads, dim, 0, 0)
        if own.get("v_bias") is not None and own["v_bias"].shape == (heads * dim,):
            value = Projection(f"{pre}qkv.weight", f"{pre}v_bias", heads, dim, 2 * heads * dim, 0)
    notes = []
    broken = _qk_broken(m)
    if broken:
        query = key = None
        notes.append(broken)
    out_attr = next((a for a in _FUSED_OUTPUTS if isinstance(children.get(a), nn.Linear)), None)
    output = None
    if out_attr is not None and children[out_attr].in_features == heads * dim:
        output = Output(f"{pre}{out_attr}.weight", heads, dim)
    else:
        value = None
        notes.append("no output projection found next to it")
    return AttentionHeads(name, "fused qkv Linear", query, key, value, output, "; ".join(notes))


# ---------------------------------------------------------------------------------------------- declared
def declared_attention(
    module: nn.Module, qk_pairs: Sequence[tuple[str, str, int]], vo_pairs: Sequence[tuple[str, str, int]]
) -> list[AttentionHeads]:
    """The user's declarations: ``(query, key, heads)`` and ``(value, output, heads)`` names of ``nn.Linear``
    modules relative to ``module``; ``heads`` counts query (output) heads, fewer key (value) heads are read
    from the sizes."""
    modules = dict(module.named_modules())
    out = []
    for kind, pairs in (("qk", qk_pairs), ("vo", vo_pairs)):
        for first, second, heads in pairs:
            for name in (first, second):
                if not isinstance(modules.get(name), nn.Linear):
                    raise ValueError(f"`{kind}_pairs`: {name!r} is not an nn.Linear of {type(module).__name__}.")
            a, b = modules[first], modules[second]
            where = f"{kind}_pairs {(first, second, heads)}"
            many = a.out_features if kind == "qk" else b.in_features
            if many % heads:
                raise ValueError(f"`{where}`: {many} features do not split into {heads} heads.")
            dim = many // heads
            few = b.out_features if kind == "qk" else a.out_features
            shared = _split(few, dim)
            if shared is None or heads % shared:
                raise ValueError(f"`{where}`: {few} features do not split into heads of size {dim} shared by {heads}.")
            if kind == "qk":
                q, k = _linear_projection("", first, a, heads, dim), _linear_projection("", second, b, shared, dim)
                out.append(AttentionHeads(where, "declared", query=q, key=k))
            else:
                v, o = _linear_projection("", first, a, shared, dim), Output(f"{second}.weight", heads, dim)
                out.append(AttentionHeads(where, "declared", value=v, output=o))
    return out


def no_attention_message(module: nn.Module, found: Sequence[AttentionHeads]) -> str:
    """Why the geodesic geometry refuses ``module``: what it looked for, what it found, how to declare heads."""
    seen = "".join(f"\n  found but unusable: {a.describe()}" for a in found)
    return (
        f"geometry='geodesic' found no attention heads in {type(module).__name__}.{seen}\n"
        "It looks for nn.MultiheadAttention; modules with nn.Linear children query/key/value (or q_proj/k_proj/"
        "v_proj, q/k/v, q_lin/k_lin/v_lin) and a head count attribute (num_attention_heads, num_heads, n_heads, "
        "n_head, nhead, or on its config), with the output projection o_proj/out_proj/o/out_lin beside them or "
        "in the `dense` of a sibling *SelfOutput module (HuggingFace BERT, RoBERTa, ViT, CLIP, T5, ...); and a "
        "fused `qkv` nn.Linear laid out [q; k; v] with num_heads and an output `proj` (timm's ViT).\n"
        "Declare heads by naming nn.Linear modules relative to the model: GeodesicGeometry(qk_pairs=[(query, "
        "key, heads)], vo_pairs=[(value, output, heads)]), e.g. qk_pairs=[('blocks.0.attn.q', 'blocks.0.attn.k', "
        "4)], vo_pairs=[('blocks.0.attn.v', 'blocks.0.attn.o', 4)]. For a model without attention use "
        "geometry='adaptive' (what geodesic reduces to there), or GeodesicGeometry(require_heads=False) to "
        "accept that. See docs/geodesic.md."
    )
