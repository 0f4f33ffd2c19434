"""Geodesic geometry on attention as real models write it: HuggingFace BERT and ViT (separate query/key/value
Linear layers), a timm-style fused qkv Linear, grouped-query Llama; and a clear error where there is none."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

from lightning_sharpness import SAM, GeodesicGeometry
from lightning_sharpness import measures as M
from lightning_sharpness.geometry import AdaptiveGeometry
from tests.helpers import Classifier, loader, trainer

HIDDEN, HEADS, LAYERS = 16, 2, 2
HEAD_DIM = HIDDEN // HEADS


# ---------------------------------------------------------------------------------------------- models
def bert(layers: int = LAYERS, init: float = 0.3) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=40,
        hidden_size=HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        initializer_range=init,  # larger than BERT's 0.02, so that the attention is far from uniform
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def vit(init: float = 0.3) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=32,
        num_labels=3,
        initializer_range=init,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


class TimmAttention(nn.Module):
    """timm's ``Attention`` (ViT), reduced: one fused qkv Linear laid out [q; k; v], head-major, then ``proj``."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, beit_bias: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=not beit_bias)
        if beit_bias:  # BEiT / EVA: query and value biases, no key bias
            self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        bias = self.qkv.bias
        if bias is None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TimmBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, **attn) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = TimmAttention(dim, num_heads, **attn)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmViT(nn.Module):
    """Tokens in, classes out: embedding, ``LAYERS`` pre-norm blocks, mean pooling, linear head."""

    def __init__(self, d_in: int = 6, classes: int = 3, **attn) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(d_in, HIDDEN)
        self.blocks = nn.Sequential(*(TimmBlock(HIDDEN, HEADS, **attn) for _ in range(LAYERS)))
        self.head = nn.Linear(HIDDEN, classes)
        with torch.no_grad():  # a peaked attention, as for the HuggingFace models
            for block in self.blocks:
                block.attn.qkv.weight.normal_(0.0, 0.3)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)).mean(1))


def llama(heads: int = 4, kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=32,
        max_position_embeddings=16,
        initializer_range=0.3,
    )
    return LlamaForCausalLM(config)


def data(kind: str):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (8,), generator=g)
    if kind == "bert":
        return torch.randint(0, 40, (8, 6), generator=g), y
    if kind == "vit":
        return torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64), y
    return torch.randn(8, 5, 6, generator=g, dtype=torch.float64), y


def loss_bert(model, batch):
    return F.cross_entropy(model(input_ids=batch[0]).logits, batch[1])


def loss_vit(model, batch):
    return F.cross_entropy(model(pixel_values=batch[0]).logits, batch[1])


def loss_fused(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


# ---------------------------------------------------------------------------------------------- the symmetry
def random_gl(h: int, g: torch.Generator) -> torch.Tensor:
    """``U diag(s) V^T`` with random orthogonal ``U``, ``V`` and singular values from 0.1 to 10."""
    u, _ = torch.linalg.qr(torch.randn(h, h, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(h, h, generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.logspace(-1, 1, h, dtype=torch.float64)) @ v.T


def move_head(q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, rows: list[slice], cols: slice, g):
    """One head along its GL(h) symmetry: ``W_q -> A W_q``, ``W_k -> A^-T W_k``, ``W_v -> B W_v``,
    ``W_o -> W_o B^-1`` and the biases alike (``rows``: the head's rows of q, k, v; ``cols``: of o).
    Returns ``(A, B)``."""
    h = cols.stop - cols.start
    A, B = random_gl(h, g), random_gl(h, g)
    with torch.no_grad():
        for lin, r, M_ in ((q, rows[0], A), (k, rows[1], torch.linalg.inv(A).T), (v, rows[2], B)):
            lin.weight[r] = M_ @ lin.weight[r]
            if lin.bias is not None:
                lin.bias[r] = M_ @ lin.bias[r]
        o.weight[:, cols] = o.weight[:, cols] @ torch.linalg.inv(B)
    return A, B


def moved(kind: str, model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every head of every layer moved along the symmetry: the same function."""
    out, g = copy.deepcopy(model), torch.Generator().manual_seed(5)
    for i in range(HEADS):
        head = slice(i * HEAD_DIM, (i + 1) * HEAD_DIM)
        if kind == "bert":
            for layer in out.bert.encoder.layer:
                s, o = layer.attention.self, layer.attention.output.dense
                move_head(s.query, s.key, s.value, o, [head] * 3, head, g)
        elif kind == "vit":
            for layer in out.vit.layers:
                a = layer.attention
                move_head(a.q_proj, a.k_proj, a.v_proj, a.o_proj, [head] * 3, head, g)
        else:
            for block in out.blocks:
                a = block.attn
                rows = [slice(j * HIDDEN + head.start, j * HIDDEN + head.stop) for j in range(3)]
                A, B = move_head(a.qkv, a.qkv, a.qkv, a.proj, rows, head, g)
                if kind == "beit":
                    with torch.no_grad():
                        a.q_bias[head] = A @ a.q_bias[head]
                        a.v_bias[head] = B @ a.v_bias[head]
    return out


SETUPS = {
    "bert": (bert, loss_bert),
    "vit": (vit, loss_vit),
    "fused": (TimmViT, loss_fused),
    "beit": (lambda: TimmViT(beit_bias=True), loss_fused),  # fused qkv without bias, q_bias and v_bias beside
}


def bound(model: nn.Module, **kwargs) -> GeodesicGeometry:
    geo = GeodesicGeometry(**kwargs)
    geo = geo.bind(model, list(model.named_parameters()))
    return geo


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", ["bert", "vit", "fused", "beit"])
def test_heads_found_one_pair_each_per_layer_and_head(kind):
    model = SETUPS[kind][0]()
    geo = bound(model)
    assert [b.kind for b in geo.blocks].count("qk") == LAYERS * HEADS
    assert [b.kind for b in geo.blocks].count("vo") == LAYERS * HEADS
    assert len(geo.attention) == LAYERS and not any(a.note for a in geo.attention)
    names = {name for b in geo.blocks for name in b.names()}
    expected = {
        "bert": "bert.encoder.layer.1.attention.output.dense.weight",  # the sibling BertSelfOutput's dense
        "vit": "vit.layers.1.attention.o_proj.weight",
        "fused": "blocks.1.attn.proj.weight",
        "beit": "blocks.1.attn.q_bias",
    }[kind]
    assert expected in names and (kind != "beit" or "blocks.1.attn.v_bias" in names)
    # declaring a layer's heads by hand replaces what was found there; nothing is counted twice
    if kind == "bert":
        pre = "bert.encoder.layer.0.attention."
        declared = bound(
            model,
            qk_pairs=[(f"{pre}self.query", f"{pre}self.key", HEADS)],
            vo_pairs=[(f"{pre}self.value", f"{pre}output.dense", HEADS)],
        )
        assert len(declared.blocks) == 2 * LAYERS * HEADS and declared.attention[0].form == "declared"


@pytest.mark.parametrize("kind", ["bert", "vit", "fused", "beit"])
def test_geodesic_sharpness_invariant_under_head_symmetry_where_adaptive_is_not(kind):
    build, loss_fn = SETUPS[kind]
    model = build().double().eval()
    other = moved(kind, model)
    batch = data(kind)
    with torch.no_grad():
        assert float(loss_fn(other, batch)) == pytest.approx(float(loss_fn(model, batch)), rel=1e-10)
    s = {}
    for geometry in ("geodesic", "adaptive"):
        for name, m in (("w", model), ("moved", other)):
            s[geometry, name] = float(M.worst_case_sharpness(m, loss_fn, batch, rho=0.1, geometry=geometry, steps=6))
    assert s["geodesic", "w"] > 1e-3
    # exact invariance up to round-off (float64); observed ~1e-9 relative
    assert s["geodesic", "moved"] == pytest.approx(s["geodesic", "w"], rel=1e-6)
    ratio = max(s["adaptive", "moved"] / s["adaptive", "w"], s["adaptive", "w"] / s["adaptive", "moved"])
    assert ratio > 2.0, s


def test_average_case_geodesic_invariant_on_bert():
    model = bert().double().eval()
    other, batch = moved("bert", model), data("bert")
    a = M.average_case_sharpness(model, loss_bert, batch, rho=0.1, geometry="geodesic", samples=8)
    b = M.average_case_sharpness(other, loss_bert, batch, rho=0.1, geometry="geodesic", samples=8)
    assert float(b) == pytest.approx(float(a), rel=1e-6)


def test_no_attention_raises_at_bind_and_says_how_to_declare_heads():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    mse = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    for call in (
        lambda: bound(mlp),
        lambda: M.worst_case_sharpness(mlp, mse, (x, y), rho=0.1, geometry="geodesic"),
        lambda: M.average_case_sharpness(mlp, mse, (x, y), rho=0.1, geometry="geodesic"),
    ):
        with pytest.raises(ValueError, match="found no attention heads in Sequential") as info:
            call()
        message = str(info.value)
        for needle in ("nn.MultiheadAttention", "num_attention_heads", "qkv", "qk_pairs", "vo_pairs", "adaptive"):
            assert needle in message
    assert bound(mlp, require_heads=False).blocks == []  # opting out: the adaptive geometry
    # a module that looks like attention but has no head count is reported, with what it lacks
    mlp.q, mlp.k, mlp.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
    with pytest.raises(ValueError, match="found but unusable: <root> .*no head count attribute"):
        bound(mlp)


def test_query_key_pair_left_out_where_rotary_or_qk_norm_breaks_it():
    geo = bound(TimmViT(qk_norm=True))
    assert [b.kind for b in geo.blocks] == ["vo"] * (LAYERS * HEADS)
    assert "normalization" in geo.attention[0].note
    # Llama: rotary embedding (no query/key symmetry) and grouped-query attention (2 value heads for 4 heads)
    model = llama().double().eval()
    geo = bound(model)
    assert [b.kind for b in geo.blocks] == ["vo", "vo"] and "rotary" in geo.attention[0].note
    # each value head's B acts on the output columns of both query heads that read it: same function
    ids = torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(0))
    loss_fn = lambda m, b: m(input_ids=b, labels=b).loss  # noqa: E731
    other, g = copy.deepcopy(model), torch.Generator().manual_seed(3)
    a = other.model.layers[0].self_attn
    h = a.head_dim
    with torch.no_grad():
        for kv in range(2):
            B = random_gl(h, g)
            a.v_proj.weight[kv * h : (kv + 1) * h] = B @ a.v_proj.weight[kv * h : (kv + 1) * h]
            cols = slice(2 * kv * h, 2 * (kv + 1) * h)
            a.o_proj.weight[:, cols] = a.o_proj.weight[:, cols] @ torch.block_diag(*[torch.linalg.inv(B)] * 2)
        assert float(loss_fn(other, ids)) == pytest.approx(float(loss_fn(model, ids)), rel=1e-10)
    s = [float(M.worst_case_sharpness(m, loss_fn, ids, rho=0.1, geometry="geodesic", steps=4)) for m in (model, other)]
    assert s[0] > 0 and s[1] == pytest.approx(s[0], rel=1e-6)


class BertClassifier(Classifier):
    """Records the weights of every training_step call (SAM calls it at w, then at w + e)."""

    def training_step(self, batch, batch_idx):
        ids, y = batch
        loss = F.cross_entropy(self.net(input_ids=ids).logits, y)
        self.calls.append(
            {"loss": loss.item(), "weights": {n: p.detach().clone() for n, p in self.net.named_parameters()}}
        )
        return loss


def expected_perturbation(net: nn.Module, batch, geometry, rho: float) -> dict[str, torch.Tensor]:
    """``w + e`` from the geometry itself, for the first step: the gradient at ``w``, the ascent, the move."""
    net = copy.deepcopy(net)
    F.cross_entropy(net(input_ids=batch[0]).logits, batch[1]).backward()
    named = list(net.named_parameters())
    geometry = geometry.bind(net, named)
    params, grads = [p for _, p in named], [p.grad for _, p in named]
    norm = geometry.dual_sq_norm(params, grads).sqrt()
    with torch.no_grad():
        geometry.ascent_(params, grads, rho / (norm + 1e-12))
        geometry.retract_(params, grads)
    return {n: p.detach() for n, p in named}


def test_geodesic_sam_trains_bert_and_perturbs_along_the_geodesic():
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 40, (32, 6), generator=g), torch.randint(0, 3, (32,), generator=g)
    rho, runs = 0.05, {}
    for geometry in ("geodesic", "adaptive"):
        module = BertClassifier(bert(layers=1))
        start = copy.deepcopy(module.net)
        trainer(max_steps=3, callbacks=[SAM(rho=rho, geometry=geometry)]).fit(module, loader(ids, y, batch_size=8))
        assert len(module.calls) == 6 and all(torch.isfinite(p).all() for p in module.net.parameters())
        losses = [c["loss"] for c in module.calls]
        assert all(perturbed > clean for clean, perturbed in zip(losses[0::2], losses[1::2]))
        runs[geometry] = (start, module.calls)
    start, calls = runs["geodesic"]
    geo = GeodesicGeometry()
    expected = expected_perturbation(start, (ids[:8], y[:8]), geo, rho)
    assert len(geo.bind(start, list(start.named_parameters())).blocks) == 2 * HEADS
    seen = calls[1]["weights"]  # the weights of SAM's second pass of the first step
    for name, w in expected.items():
        assert torch.allclose(seen[name], w, atol=1e-6, rtol=1e-5), name
    # adaptive SAM (checked the same way) moves the attention weights differently
    _, adaptive_calls = runs["adaptive"]
    expected_adaptive = expected_perturbation(start, (ids[:8], y[:8]), AdaptiveGeometry(), rho)
    query = "bert.encoder.layer.0.attention.self.query.weight"
    step_geo = seen[query] - calls[0]["weights"][query]
    step_ada = adaptive_calls[1]["weights"][query] - adaptive_calls[0]["weights"][query]
    assert torch.allclose(adaptive_calls[1]["weights"][query], expected_adaptive[query], atol=1e-6, rtol=1e-5)
    assert (step_geo - step_ada).norm() > 0.3 * step_ada.norm()
