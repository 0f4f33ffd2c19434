"""Second-order measures on models with PyTorch's fused attention: ``nn.TransformerEncoder`` (with and without its
inference fast path) and a HuggingFace BERT (``attn_implementation="sdpa"``). The fused kernels have no double
backward; the measures run the math kernel themselves and must give the values computed under it (ground truth:
double backward with the model run under ``sdpa_kernel(SDPBackend.MATH)``), and leave the user's settings as
they were."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

from lightning_sharpness import measures as M
from lightning_sharpness.curvature import HessianOperator
from lightning_sharpness.monitor import SharpnessMonitor
from tests.helpers import RecordingLogger, double_backward_hessian

transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------------------------------------- models
class Encoder(nn.Module):
    """``nn.TransformerEncoder`` (batch first, eligible for the inference fast path) with a linear head."""

    def __init__(self, width: int = 4, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def tiny_bert(dtype=torch.float64):
    config = transformers.BertConfig(
        vocab_size=20,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).to(dtype)
    assert model.config._attn_implementation == "sdpa"  # the default, fused on CPU
    return model


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def bert_loss(model, batch):
    return model(input_ids=batch[0], attention_mask=batch[2], labels=batch[1]).loss


def encoder_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)


def bert_batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 20, (4, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0  # padding: the masked path of the kernel too
    return ids, torch.randint(0, 3, (4,), generator=g), mask


def settings() -> tuple:
    """The user's attention settings that the measures must leave as they were."""
    return (
        torch.backends.mha.get_fastpath_enabled(),
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
        torch.backends.cuda.cudnn_sdp_enabled(),
    )


@pytest.fixture(params=["fast path", "no fast path"])
def fast_path(request):
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(request.param == "fast path")
    yield request.param == "fast path"
    torch.backends.mha.set_fastpath_enabled(before)


def math_kernel_hessian(model, loss_fn, batch, params=None):
    """The dense Hessian by double backward through the model run under the math kernel (training's fast path
    is not taken with gradients on)."""
    model.eval()
    with sdpa_kernel(SDPBackend.MATH):
        return double_backward_hessian(model, loss_fn, batch, params)


def fused_kernel_fails(model, loss_fn, batch) -> None:
    """Sanity check of the premise: double backward through the model as the user runs it fails."""
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(RuntimeError, match="scaled_dot_product|not implemented"):
        (g,) = torch.autograd.grad(loss_fn(model, batch), params[:1], create_graph=True)
        torch.autograd.grad(g.sum(), params[:1])


# ---------------------------------------------------------------------------------------------- TransformerEncoder
def test_encoder_runs_the_fast_path_and_a_fused_kernel_outside_the_measures(fast_path):
    model, batch = Encoder().double().eval(), encoder_batch()
    calls = []
    original = torch._transformer_encoder_layer_fwd

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    torch._transformer_encoder_layer_fwd = counting
    try:
        with torch.no_grad():
            model(batch[0])
    finally:
        torch._transformer_encoder_layer_fwd = original
    assert bool(calls) == fast_path  # the inference fast path is what the user's eval forward takes
    fused_kernel_fails(model.train(), ce, batch)


def test_every_hessian_measure_on_transformer_encoder_equals_the_math_kernel(fast_path):
    model, batch = Encoder().double(), encoder_batch()
    before = settings()
    H = math_kernel_hessian(model, ce, batch)
    dim = H.shape[0]
    eigs = torch.linalg.eigvalsh(H)
    assert float(M.hessian_eigenvalues(model, ce, batch, tol=1e-10)) == pytest.approx(eigs[-1].item(), rel=1e-7)
    # the attention's input projection: its exact diagonal, and Hutch++ with a sketch as wide as the block (exact)
    attention = ["encoder.layers.0.self_attn.in_proj_weight"]
    block = torch.cat([torch.full((p.numel(),), n in attention) for n, p in model.named_parameters()])
    diag = M.hessian_diagonal(model, ce, batch, params=attention, exact=True)
    assert torch.allclose(diag.diagonal[attention[0]].reshape(-1), H.diagonal()[block], rtol=1e-8, atol=1e-12)
    t = M.hessian_trace(model, ce, batch, params=attention, matvecs=3 * int(block.sum()), method="hutch++")
    assert float(t) == pytest.approx(H[block][:, block].trace().item(), rel=1e-8)
    for backend in ("vmap", "jvp"):  # forward-mode AD through the attention too
        v = torch.randn(dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        hv = HessianOperator(model, ce, batch, backend=backend) @ v
        assert torch.allclose(hv, H @ v, rtol=1e-8, atol=1e-11)
    assert settings() == before


def test_perturbation_measures_on_transformer_encoder_run_and_match_the_math_kernel(fast_path):
    model, batch = Encoder().double(), encoder_batch()
    kw = {"rho": 0.05, "steps": 3, "restarts": 2}
    worst = M.worst_case_sharpness(model, ce, batch, **kw)
    with sdpa_kernel(SDPBackend.MATH):
        assert float(M.worst_case_sharpness(model, ce, batch, **kw)) == float(worst)
    avg = M.average_case_sharpness(model, ce, batch, rho=0.05, samples=5)
    assert math.isfinite(float(avg)) and float(worst) > 0
    # the base loss is the model's own loss, whichever kernel the user's forward takes
    model.eval()
    with torch.no_grad():
        assert worst.base_loss == pytest.approx(ce(model, batch).item(), rel=1e-10)


# ---------------------------------------------------------------------------------------------- BERT
BERT_BLOCK = [
    "bert.encoder.layer.0.attention.self.query.weight",
    "bert.encoder.layer.0.attention.self.key.weight",
    "bert.encoder.layer.0.attention.self.value.bias",
    "classifier.weight",
]


def test_bert_with_sdpa_attention_measures_equal_the_math_kernel():
    model, batch = tiny_bert(), bert_batch()
    fused_kernel_fails(model.train(), bert_loss, batch)
    before = settings()
    named = dict(model.named_parameters())
    H = math_kernel_hessian(model, bert_loss, batch, [named[n] for n in BERT_BLOCK])
    top = M.hessian_eigenvalues(model, bert_loss, batch, params=BERT_BLOCK, tol=1e-10)
    assert float(top) == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), rel=1e-7)
    diag = M.hessian_diagonal(model, bert_loss, batch, params=BERT_BLOCK, exact=True)
    flat = torch.cat([diag.diagonal[n].reshape(-1) for n in BERT_BLOCK])
    assert torch.allclose(flat, H.diagonal(), rtol=1e-8, atol=1e-12)
    # all parameters: a Hessian-vector product against double backward under the math kernel
    params = list(model.parameters())
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype) for i, p in enumerate(params)]
    with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
        grads = torch.autograd.grad(bert_loss(model, batch), params, create_graph=True)
        truth = torch.autograd.grad(grads, params, v)
    full = HessianOperator(model, bert_loss, batch)
    hv = full @ torch.cat([t.reshape(-1) for t in v])
    assert torch.allclose(hv, torch.cat([t.reshape(-1) for t in truth]), rtol=1e-8, atol=1e-11)
    worst = M.worst_case_sharpness(model, bert_loss, batch, rho=0.01, steps=2, restarts=1)
    assert float(worst) > 0
    assert settings() == before


class BertModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_bert(torch.float32)
        self.seen: list[tuple] = []

    def on_train_batch_start(self, batch, batch_idx):
        self.seen.append(settings())  # the attention settings the training runs with (the monitor's own calls of
        # training_step, its loss function, run inside the measurement)

    def training_step(self, batch, batch_idx):
        return bert_loss(self.model, batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("budget", ["default", "none"])
def test_sharpness_monitor_on_bert_in_a_short_fit(budget):
    """At its defaults the monitor times a Hessian-vector product on the model (and measures if its budget allows:
    on 4 steps it may not); with ``max_overhead=None`` it measures. Neither crashes, and training keeps the
    user's attention kernels."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 20, (16, 6), generator=g)
    data = TensorDataset(ids, torch.randint(0, 3, (16,), generator=g), torch.ones_like(ids))
    module, logger = BertModule(), RecordingLogger()
    monitor = SharpnessMonitor() if budget == "default" else SharpnessMonitor(max_overhead=None)
    before = settings()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=logger,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=4))
    assert trainer.state.finished and monitor.seconds_measuring > 0
    logged = [v for s, m in logger.records for k, v in m.items() if k.startswith("sharpness/hessian")]
    if budget == "none":
        assert logged
    assert all(math.isfinite(v) for v in logged)
    assert settings() == before
    assert len(module.seen) == 4 and all(s == before for s in module.seen)  # the user's kernels and fast path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measures_on_cuda_attention_equal_the_math_kernel():
    model, batch = tiny_bert(torch.float32).cuda(), tuple(t.cuda() for t in bert_batch())
    named = dict(model.named_parameters())
    H = math_kernel_hessian(model, bert_loss, batch, [named[n] for n in BERT_BLOCK])
    t = M.hessian_trace(model, bert_loss, batch, params=BERT_BLOCK, matvecs=3 * H.shape[0], method="hutch++")
    assert float(t) == pytest.approx(H.trace().item(), rel=1e-3)
    encoder, eb = Encoder().cuda(), tuple(t.cuda() for t in encoder_batch())
    eb = (eb[0].float(), eb[1])
    H = math_kernel_hessian(encoder, ce, eb)
    top = M.hessian_eigenvalues(encoder, ce, eb, tol=1e-6)
    assert float(top) == pytest.approx(torch.linalg.eigvalsh(H.double())[-1].item(), rel=1e-3)
