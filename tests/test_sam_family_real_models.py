"""The SAM family on the models users train, the way they would run it: an ``nn.TransformerEncoder`` classifier,
HuggingFace BERT built from a tiny config, a BERT masked-LM whose decoder shares the word-embedding weight (one
parameter, two modules), and a ResNet-18 with BatchNorm written here (no torchvision).

* every variant x model: the run finishes, every weight is finite and moved, the variant's diagnostics are logged
  under ``sam/`` at every step, no step is skipped, and on the ResNet the BatchNorm running statistics are exactly
  those of Lightning's own pass (``bn_update="first"``);
* on the transformer encoder (fp32 CPU, dropout 0), equality to 1e-5 with the references the family is proven
  against on MLPs: pytorch-optimizer 4.1 (GSAM, WSAM, FriendlySAM, LookSAM, BSAM) and plain-PyTorch transcriptions
  (SSAM-F/D, layer-wise and l-inf ASAM, SAF, MESA, RSAM);
* on the tied masked-LM, FriendlySAM, LookSAM and SSAM-F against the same references, with one state entry (EMA,
  stored component, mask) for the shared weight;
* a backbone unfrozen mid-fit under FriendlySAM and LookSAM, against pytorch-optimizer (whose per-parameter state
  ``SAMVariant.bind`` follows: the head keeps its state, the backbone's starts);
* vectorized m-SAM (``SAM(m=4, vectorize=True)``) against the loop on the ResNet-18 and the transformer encoder.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import lightning.pytorch as pl
import pytest
import pytorch_optimizer as po
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BaseFinetuning, Callback
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from lightning_sharpness import (
    BSAM,
    GSAM,
    MESA,
    RSAM,
    SAF,
    SAM,
    SSAMD,
    SSAMF,
    WSAM,
    BSAMOptimizer,
    FriendlySAM,
    LayerwiseAdaptiveGeometry,
    LinfAdaptiveGeometry,
    LookSAM,
    WithIndex,
)
from tests import reference
from tests.helpers import RecordingLogger, assert_same_weights, clone, trainer
from tests.reference import norm_buffers

VOCAB, SEQ, CLASSES, WIDTH = 50, 8, 3, 32
LR = 0.05


# ---------------------------------------------------------------------------------------------- models
class EncoderClassifier(nn.Module):
    """Token embedding, a 2-layer ``nn.TransformerEncoder`` (batch_first, d_model 32, 4 heads, dropout 0, GELU), mean
    pooling over the sequence and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        # GELU (BERT's and ViT's): smooth, so that two implementations that round differently take the same gradients
        # (a ReLU input within rounding of 0 switches a unit on in one and off in the other; see the m-SAM test)
        layer = nn.TransformerEncoderLayer(
            WIDTH, 4, dim_feedforward=64, dropout=0.0, activation="gelu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


class HFLogits(nn.Module):
    """A HuggingFace model as users call it in ``training_step``: ``model(input_ids=...).logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model(input_ids=tokens).logits


def bert_config(**kwargs) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=CLASSES,
        **kwargs,
    )


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convolutions with BatchNorm, a projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu(out)


class ResNet18(nn.Module):
    """ResNet-18 for small images (CIFAR's stem: a 3x3 convolution, no max-pool), BasicBlocks [2, 2, 2, 2]."""

    def __init__(self, width: int = 8, classes: int = CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


def encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return EncoderClassifier()


def bert(seed: int = 0) -> nn.Module:
    """BERT for sequence classification with its default dropout (0.1), as users train it."""
    torch.manual_seed(seed)
    return HFLogits(BertForSequenceClassification(bert_config()))


def tied_lm(seed: int = 0) -> nn.Module:
    """BERT's masked-LM head: ``cls.predictions.decoder.weight`` IS ``bert.embeddings.word_embeddings.weight``.
    Dropout 0, so that it can be compared with references step by step."""
    torch.manual_seed(seed)
    net = HFLogits(BertForMaskedLM(bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)))
    assert tied_weight(net) is net.model.bert.embeddings.word_embeddings.weight
    return net


def tied_weight(net: nn.Module) -> nn.Parameter:
    return net.model.cls.predictions.decoder.weight


def resnet18(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ResNet18()


MODELS: dict[str, Callable[[], nn.Module]] = {
    "encoder": encoder,
    "bert": bert,
    "tied_lm": tied_lm,
    "resnet18": resnet18,
}


def data(model: str, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic data: 16x16 RGB images for the ResNet, 8 tokens for the transformers (a class per sequence, or the
    next token at every position for the language model)."""
    g = torch.Generator().manual_seed(seed)
    if model == "resnet18":
        return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
    tokens = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    if model == "tied_lm":
        return tokens, tokens.roll(-1, dims=1)
    return tokens, torch.randint(0, CLASSES, (n,), generator=g)


def ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dimension: per sequence (classifiers) or per token (the language model)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def loss_of(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ce(net(x), y)


def make_loader(x, y, batch_size: int, indexed: bool = False) -> DataLoader:
    dataset = TensorDataset(x, y)
    return DataLoader(WithIndex(dataset) if indexed else dataset, batch_size=batch_size, shuffle=False)


class Task(pl.LightningModule):
    """What users write: the model's logits, cross-entropy, ``self.log``, and the dict SAF and MESA read
    (``{"loss", "logits"}``, plus ``"index"`` when the dataset is wrapped in ``WithIndex``). No ``.item()``, so
    that vectorized m-SAM can vmap it."""

    def __init__(self, net: nn.Module, optimizer=None, scheduler=None) -> None:
        super().__init__()
        self.net = net
        self.make_optimizer = optimizer or sgd
        self.make_scheduler = scheduler

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = ce(logits, y)
        self.log("train/loss", loss)
        out = {"loss": loss, "logits": logits}
        if len(batch) == 3:
            out["index"] = batch[2]
        return out

    def configure_optimizers(self):
        optimizer = self.make_optimizer(list(self.parameters()))
        if self.make_scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.make_scheduler(optimizer), "interval": "step"},
        }


def sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


# ---------------------------------------------------------------------------------------------- the variants
@dataclass
class Variant:
    """How a user runs one member of the family: its callback (made per model), optimizer, data layout, and the
    diagnostics it adds under ``sam/`` (logged at every step from ``logged_from`` on)."""

    make: Callable[[str], Callback]
    keys: tuple[str, ...]
    optimizer: Callable = sgd
    scheduler: Callable | None = None
    indexed: bool = False
    epochs: int = 1
    logged_from: int = 0
    batch: int = 8
    sam_diagnostics: bool = True  # logs SAM's own sam/rho, sam/skipped_steps, ...
    check: Callable[[RecordingLogger], None] | None = None  # what the logged values must be


def logged(logger: RecordingLogger, key: str) -> list[float]:
    return [float(v) for _, v in logger.values(key)]


def rho_follows_the_cosine_learning_rate(logger) -> None:  # GSAM: rho_max at lr_max, then down with the lr
    rhos = logged(logger, "sam/rho")
    assert rhos[0] == pytest.approx(0.1) and all(a > b > 0.02 for a, b in zip(rhos, rhos[1:])), rhos


def full_every_second_step(logger) -> None:  # LookSAM, k = 2
    assert logged(logger, "sam/full_step") == [1.0, 0.0, 1.0, 0.0]


def half_the_weights_held(logger) -> None:  # SSAM, sparsity 0.5
    assert logged(logger, "sam/sparsity") == pytest.approx([0.5] * STEPS, abs=1e-3)


def every_example_covered(logger) -> None:  # SAF in its second epoch: every example has logits from the first
    assert logged(logger, "sam/saf_coverage") == [1.0] * (STEPS // 2)


def momentum_kept(logger) -> None:  # FriendlySAM's EMA of the gradient
    assert all(v > 0 for v in logged(logger, "sam/momentum_norm"))


def renyi_in_range(logger) -> None:  # S_alpha lies in [-log d, 0]
    assert all(-math.log(1e7) < v <= 0 for v in logged(logger, "sam/renyi_sharpness"))


STEPS = 4  # per fit (SAF: 2 epochs of 2)


def cosine(optimizer):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS, eta_min=LR / 10)


def bsam_optimizer(params):
    return BSAMOptimizer(params, num_data=STEPS * 8, lr=0.05, weight_decay=1e-3, rho=0.05, seed=3)


VARIANTS: dict[str, Variant] = {
    "gsam": Variant(
        lambda m: GSAM(rho_max=0.1, rho_min=0.02, alpha=0.3, lr_min=LR / 10),
        ("sam/cosine",),
        scheduler=cosine,
        check=rho_follows_the_cosine_learning_rate,
    ),
    "wsam": Variant(lambda m: WSAM(rho=0.1, gamma=0.8), ("sam/sharpness_gap",)),
    "friendlysam": Variant(
        lambda m: FriendlySAM(rho=0.1, sigma=1.0, lmbda=0.8), ("sam/momentum_norm",), check=momentum_kept
    ),
    "looksam": Variant(lambda m: LookSAM(rho=0.1, k=2, alpha=0.5), ("sam/full_step",), check=full_every_second_step),
    "bsam": Variant(lambda m: BSAM(), ("sam/noisy_loss", "sam/perturbed_loss"), optimizer=bsam_optimizer),
    # the docstring's advice for BatchNorm in training mode: Fisher gradients of 2 examples, not of one
    "ssamf": Variant(
        lambda m: SSAMF(rho=0.1, sparsity=0.5, num_samples=4, update_freq=2, fisher_chunk=2 if m == "resnet18" else 1),
        ("sam/sparsity",),
        check=half_the_weights_held,
    ),
    "ssamd": Variant(
        lambda m: SSAMD(rho=0.1, sparsity=0.5, drop_rate=0.5, update_freq=2),
        ("sam/sparsity",),
        check=half_the_weights_held,
    ),
    "layerwise": Variant(lambda m: SAM(rho=0.5, geometry=LayerwiseAdaptiveGeometry()), ("sam/grad_norm",)),
    "linf": Variant(lambda m: SAM(rho=0.002, geometry=LinfAdaptiveGeometry()), ("sam/grad_norm",)),
    "saf": Variant(
        lambda m: SAF(lmbda=0.3, tau=2.0, epochs_back=1),
        ("sam/saf_kl", "sam/saf_coverage"),
        indexed=True,
        epochs=2,
        logged_from=STEPS // 2,  # the term starts one epoch in
        sam_diagnostics=False,
        check=every_example_covered,
    ),
    "mesa": Variant(lambda m: MESA(lmbda=0.5, tau=2.0, decay=0.8), ("sam/mesa_kl",), sam_diagnostics=False),
    "rsam": Variant(lambda m: RSAM(rho=0.05, alpha=2.0, gamma=0.1), ("sam/renyi_sharpness",), check=renyi_in_range),
    "msam": Variant(lambda m: SAM(rho=0.05, m=4, vectorize=True), ("sam/sharpness_gap",), batch=32),
}


class NormStatsRecorder(Callback):
    """Per step: the running statistics that a plain forward in train mode of the step's batch gives, from the
    weights and statistics Lightning's pass starts from (placed after the variant's callback: BSAM's noise is in the
    weights by then), and the statistics the step leaves."""

    def __init__(self) -> None:
        self.expected: list[list[torch.Tensor]] = []
        self.got: list[list[torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        twin = copy.deepcopy(pl_module.net).train()
        with torch.no_grad():
            twin(batch[0])
        self.expected.append([b.clone() for b in norm_buffers(twin)])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.got.append([b.clone() for b in norm_buffers(pl_module.net)])


def fit_variant(variant: str, model: str, net: nn.Module | None = None, callbacks=()):
    spec = VARIANTS[variant]
    net = MODELS[model]() if net is None else net
    per_epoch = STEPS // spec.epochs
    x, y = data(model, per_epoch * spec.batch)
    module = Task(net, optimizer=spec.optimizer, scheduler=spec.scheduler)
    callback, logger = spec.make(model), RecordingLogger()
    fitted = trainer(max_epochs=spec.epochs, callbacks=[callback, *callbacks], logger=logger, log_every_n_steps=1)
    fitted.fit(module, make_loader(x, y, spec.batch, spec.indexed))
    return module, callback, logger, fitted


# ---------------------------------------------------------------------------------------------- every variant x model
SLOW = {("rsam", "resnet18"), ("msam", "resnet18"), ("msam", "bert")}  # the longest here (about 0.5 s each, 2 cores)
#: SAF keeps one row of logits per example; a language model's logits are per token (see the test below)
UNSUPPORTED = {("saf", "tied_lm")}


def _cases():
    for variant in VARIANTS:
        for model in MODELS:
            if (variant, model) in UNSUPPORTED:
                continue
            marks = [pytest.mark.slow] if (variant, model) in SLOW else []
            yield pytest.param(variant, model, id=f"{variant}-{model}", marks=marks)


def count_vectorized_steps(monkeypatch) -> list[bool]:
    """Whether each m-SAM step took the vectorized passes (the engine's own call, counted)."""
    import lightning_sharpness.sam.engine as engine_module

    taken, original = [], engine_module.vectorized_sam_step

    def counting(*args, **kwargs):
        stats = original(*args, **kwargs)
        taken.append(stats is not None)
        return stats

    monkeypatch.setattr(engine_module, "vectorized_sam_step", counting)
    return taken


@pytest.mark.parametrize("variant, model", list(_cases()))
def test_variant_trains_the_model(variant, model, monkeypatch):
    spec = VARIANTS[variant]
    net = MODELS[model]()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    recorder = NormStatsRecorder()
    vectorized = count_vectorized_steps(monkeypatch)
    if variant == "msam" and model == "bert":  # BERT's dropout (0.1) cannot be vmapped: the loop, said once
        with pytest.warns(UserWarning, match="one chunk at a time.*random operation"):
            module, callback, logger, fitted = fit_variant(variant, model, net, callbacks=[recorder])
    else:
        module, callback, logger, fitted = fit_variant(variant, model, net, callbacks=[recorder])
    assert fitted.global_step == STEPS
    if variant == "msam":
        assert vectorized == [model != "bert"] * STEPS
    not_finite = [n for n, p in net.named_parameters() if not torch.isfinite(p).all()]
    assert not not_finite, not_finite
    unmoved = [n for n, p in net.named_parameters() if torch.equal(p, before[n])]
    assert not unmoved, unmoved
    for key in spec.keys:
        values = logger.values(key)
        assert [s for s, _ in values] == list(range(spec.logged_from, STEPS)), key
        assert all(math.isfinite(float(v)) for _, v in values), (key, values)
    if spec.check is not None:
        spec.check(logger)
    if spec.sam_diagnostics:
        assert logged(logger, "sam/skipped_steps") == [0.0] * STEPS
    if model == "tied_lm":
        assert tied_weight(net) is net.model.bert.embeddings.word_embeddings.weight
    if model == "resnet18":  # BatchNorm statistics follow Lightning's pass only (bn_update="first")
        assert len(recorder.expected) == STEPS and recorder.expected[0]
        for step, (expected, got) in enumerate(zip(recorder.expected, recorder.got)):
            for i, (a, b) in enumerate(zip(expected, got)):
                assert torch.equal(a, b), (step, i, (a.float() - b.float()).abs().max())


def test_bn_check_sees_the_perturbed_pass_with_bn_update_both():
    """The check above can fail: with ``bn_update="both"`` SAM's pass at ``w + e`` moves the statistics too."""
    recorder = NormStatsRecorder()
    x, y = data("resnet18", 16)
    trainer(max_steps=2, callbacks=[SAM(rho=0.05, bn_update="both"), recorder]).fit(
        Task(resnet18()), make_loader(x, y, 8)
    )
    assert all(not torch.equal(a, b) for a, b in zip(recorder.expected[0], recorder.got[0]) if a.is_floating_point())


# ---------------------------------------------------------------------------------------------- the references
REF_STEPS, REF_BATCH = 5, 16


def batches(x, y, batch: int = REF_BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


def fit_callback(
    net, callback, model: str = "encoder", steps: int = REF_STEPS, batch: int = REF_BATCH, optimizer=sgd, **kw
):
    """A fit of ``callback`` on ``net`` over the first ``steps * batch`` examples of ``model``'s data."""
    x, y = data(model, steps * batch)
    module = Task(net, optimizer=optimizer, scheduler=kw.pop("scheduler", None))
    trainer(max_steps=steps, callbacks=[callback, *kw.pop("callbacks", [])], **kw).fit(module, make_loader(x, y, batch))
    return module


BASES = {
    "sgd": (torch.optim.SGD, dict(lr=LR, momentum=0.9)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01)),
}


def po_closure_loop(net, opt, pairs, before_step: Callable[[int], None] | None = None) -> None:
    """pytorch-optimizer's usage for FriendlySAM, LookSAM, WSAM and BSAM: the gradient at w, then ``step(closure)``
    (``before_step(t)`` runs first at step ``t``: an unfreeze)."""
    for t, (xb, yb) in enumerate(pairs):
        if before_step is not None:
            before_step(t)
        opt.zero_grad()
        loss_of(net, xb, yb).backward()

        def closure(xb=xb, yb=yb):
            opt.zero_grad()
            loss = loss_of(net, xb, yb)
            loss.backward()
            return loss

        opt.step(closure)


def po_gsam_loop(net, base_name, pairs, rho_max, rho_min, alpha) -> None:
    make, kwargs = BASES[base_name]
    base = make(net.parameters(), **kwargs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=len(pairs), eta_min=kwargs["lr"] / 10)
    rho = po.ProportionScheduler(
        sched, max_lr=kwargs["lr"], min_lr=kwargs["lr"] / 10, max_value=rho_max, min_value=rho_min
    )
    opt = po.GSAM(net.parameters(), base, net, rho, alpha=alpha)
    for xb, yb in pairs:
        opt.set_closure(ce, xb, yb)
        opt.step()
        sched.step()
        opt.update_rho_t()


@pytest.mark.parametrize("base_name", list(BASES))
@pytest.mark.parametrize("variant", ["gsam", "wsam-decoupled", "wsam-coupled", "friendlysam", "looksam"])
def test_encoder_equals_pytorch_optimizer(variant, base_name):
    """The transformer encoder, 5 steps of 16 sequences, fp32: the family's callbacks equal pytorch-optimizer 4.1's
    classes in a plain loop to 1e-5, with SGD + momentum and with AdamW (the transformers' optimizer)."""
    net = encoder()
    ref = clone(net)
    make, kwargs = BASES[base_name]
    pairs = batches(*data("encoder", REF_STEPS * REF_BATCH))
    optimizer = lambda ps: make(ps, **kwargs)
    if variant == "gsam":
        lr = kwargs["lr"]
        schedule = lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=REF_STEPS, eta_min=lr / 10)
        fit_callback(
            net, GSAM(rho_max=0.1, rho_min=0.02, alpha=0.3, lr_min=lr / 10), optimizer=optimizer, scheduler=schedule
        )
        po_gsam_loop(ref, base_name, pairs, rho_max=0.1, rho_min=0.02, alpha=0.3)
    elif variant.startswith("wsam"):
        decouple = variant == "wsam-decoupled"
        fit_callback(net, WSAM(rho=0.1, gamma=0.8, decouple=decouple), optimizer=optimizer)
        po_closure_loop(
            ref, po.WSAM(ref, ref.parameters(), make, rho=0.1, gamma=0.8, decouple=decouple, **kwargs), pairs
        )
    elif variant == "friendlysam":
        fit_callback(net, FriendlySAM(rho=0.1, sigma=1.0, lmbda=0.8), optimizer=optimizer)
        po_closure_loop(ref, po.FriendlySAM(ref.parameters(), make, rho=0.1, sigma=1.0, lmbda=0.8, **kwargs), pairs)
    else:
        fit_callback(net, LookSAM(rho=0.1, k=2, alpha=0.5), optimizer=optimizer)
        po_closure_loop(ref, po.LookSAM(ref.parameters(), make, rho=0.1, k=2, alpha=0.5, **kwargs), pairs)
    if base_name == "adamw":
        assert_same_but_the_key_biases(net, ref, atol=1e-5)
    else:
        assert_same_weights(net, ref, atol=1e-5)
    assert not torch.allclose(net.head.weight, encoder().head.weight, atol=1e-3)  # it trained


def assert_same_but_the_key_biases(net, ref, atol) -> None:
    """Every weight equal, except the key part of each attention's ``in_proj_bias``. Its gradient is zero in exact
    arithmetic (adding ``b_k`` to every key adds ``q . b_k`` to all the scores of a query: softmax ignores it) and
    about 1e-10 in floats; AdamW divides that rounding noise by its own square root and moves the key bias by up to
    ``lr * 0.1``, differently in any two implementations. Checked here: the gradient is that small."""
    names = [f"encoder.layers.{i}.self_attn.in_proj_bias" for i in range(2)]
    fresh = encoder()
    xb, yb = data("encoder", REF_BATCH)
    grads = dict(
        zip(
            (n for n, _ in fresh.named_parameters()),
            torch.autograd.grad(loss_of(fresh, xb, yb), list(fresh.parameters())),
        )
    )
    for name in names:
        key, query = grads[name][WIDTH : 2 * WIDTH], grads[name][:WIDTH]
        assert key.abs().max() < 1e-6 * query.abs().max(), (name, key.abs().max(), query.abs().max())
    ours, theirs = net.state_dict(), ref.state_dict()
    for name in names:
        for part in (slice(0, WIDTH), slice(2 * WIDTH, 3 * WIDTH)):  # query and value biases
            torch.testing.assert_close(ours[name][part], theirs[name][part], atol=atol, rtol=0)
        del ours[name], theirs[name]
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name], atol=atol, rtol=0, msg=name)


def test_encoder_bsam_equals_pytorch_optimizer():
    hyper = dict(num_data=REF_STEPS * REF_BATCH, lr=0.05, weight_decay=1e-3, rho=0.05, damping=0.1)
    net = encoder()
    ref = clone(net)
    fit_callback(net, BSAM(), optimizer=lambda ps: BSAMOptimizer(ps, seed=7, algorithm="pytorch-optimizer", **hyper))
    opt = po.BSAM(ref.parameters(), **hyper)
    torch.manual_seed(7)  # pytorch-optimizer draws its noise from the global generator; ours from its own
    # pytorch-optimizer's BSAM adds noise only to parameters that hold a gradient when its step begins: the loop's
    # gradient before each step gives them one (its value is not read; the encoder has no dropout to draw)
    po_closure_loop(ref, opt, batches(*data("encoder", REF_STEPS * REF_BATCH)))
    assert_same_weights(net, ref, atol=1e-5)


# SSAM in plain PyTorch (the algorithm of tests/test_sam_ssam.py, for any loss): a masked SAM step, the Fisher mask of
# per-example gradients, the drop/grow update. ``named_parameters()`` gives a tied weight once.
def masked_sam_step(net, opt, xb, yb, masks, rho) -> list[torch.Tensor]:
    params = list(net.parameters())
    grads = torch.autograd.grad(loss_of(net, xb, yb), params)
    mg = [m * g for m, g in zip(masks, grads)]
    norm = torch.sqrt(sum((t**2).sum() for t in mg))
    e = [rho * t / (norm + 1e-12) for t in mg]
    with torch.no_grad():
        for p, d in zip(params, e):
            p.add_(d)
    perturbed = torch.autograd.grad(loss_of(net, xb, yb), params)
    with torch.no_grad():
        for p, d in zip(params, e):
            p.sub_(d)
    for p, g in zip(params, perturbed):
        p.grad = g.clone()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return grads


def split_flat(flat, params) -> list[torch.Tensor]:
    out, start = [], 0
    for p in params:
        out.append(flat[start : start + p.numel()].reshape(p.shape))
        start += p.numel()
    return out


def reference_ssamf(net, pairs, rho, sparsity, num_samples, freq) -> list[torch.Tensor]:
    params = list(net.parameters())
    opt = sgd(params)
    for t, (xb, yb) in enumerate(pairs):
        if t % freq == 0:
            fisher = torch.zeros(sum(p.numel() for p in params))
            for i in range(num_samples):
                g = torch.autograd.grad(loss_of(net, xb[i : i + 1], yb[i : i + 1]), params)
                fisher += torch.cat([h.reshape(-1) for h in g]) ** 2
            flat = torch.zeros_like(fisher)
            flat[torch.topk(fisher, round((1 - sparsity) * fisher.numel())).indices] = 1.0
            masks = split_flat(flat, params)
        masked_sam_step(net, opt, xb, yb, masks, rho)
    return masks


def reference_ssamd(net, pairs, rho, sparsity, drop_rate, freq, seed) -> torch.Tensor:
    params = list(net.parameters())
    opt = sgd(params)
    gen = torch.Generator().manual_seed(seed)
    total = sum(p.numel() for p in params)
    flat = torch.zeros(total, dtype=torch.bool)
    flat[torch.randperm(total, generator=gen)[: round((1 - sparsity) * total)]] = True
    for t, (xb, yb) in enumerate(pairs):
        if t % freq == 0 and t > 0:
            g = torch.autograd.grad(loss_of(net, xb, yb), params)
            score = torch.cat([h.reshape(-1) for h in g]).abs()
            active, inactive = flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)
            k = min(round(drop_rate * active.numel()), inactive.numel())
            dropped = active[torch.topk(score[active], k, largest=False).indices]
            grown = inactive[torch.randperm(inactive.numel(), generator=gen)[:k]]
            flat = flat.clone()
            flat[dropped], flat[grown] = False, True
        masked_sam_step(net, opt, xb, yb, split_flat(flat.float(), params), rho)
    return flat


def callback_masks(callback, module) -> torch.Tensor:
    return torch.cat([callback.masked.masks[n].reshape(-1) for n, _ in module.named_parameters()])


@pytest.mark.parametrize("which", ["F", "D"])
def test_encoder_ssam_equals_reference(which):
    net = encoder()
    ref = clone(net)
    pairs = batches(*data("encoder", REF_STEPS * REF_BATCH))
    if which == "F":
        callback = SSAMF(rho=0.05, sparsity=0.7, num_samples=6, update_freq=2)
        ref_flat = torch.cat([m.reshape(-1) for m in reference_ssamf(ref, pairs, 0.05, 0.7, 6, 2)]).bool()
    else:
        callback = SSAMD(rho=0.05, sparsity=0.7, drop_rate=0.3, update_freq=2, seed=7)
        ref_flat = reference_ssamd(ref, pairs, 0.05, 0.7, 0.3, 2, seed=7)
    module = fit_callback(net, callback)
    assert torch.equal(callback_masks(callback, module), ref_flat)
    assert_same_weights(net, ref, atol=1e-5)


@pytest.mark.parametrize("geometry", ["layerwise", "linf"])
def test_encoder_asam_geometries_equal_reference(geometry):
    from tests.test_geometry_variants import layerwise_ascent, linf_ascent, reference_sam

    net = encoder()
    ref = clone(net)
    if geometry == "layerwise":
        rho, made, ascent = 0.5, LayerwiseAdaptiveGeometry(eta=0.01), layerwise_ascent(0.01)
    else:
        rho, made, ascent = 0.002, LinfAdaptiveGeometry(eta=0.01), linf_ascent(0.01)
    fit_callback(net, SAM(rho=rho, geometry=made))
    reference_sam(ref, *data("encoder", REF_STEPS * REF_BATCH), ascent, rho, steps=REF_STEPS, optimizer=sgd)
    assert_same_weights(net, ref, atol=1e-5)


@pytest.mark.parametrize("which", ["saf", "mesa"])
def test_encoder_saf_and_mesa_equal_reference(which):
    from tests.test_sam_saf import LMBDA, TAU, reference_mesa, reference_saf

    net = encoder()
    ref = clone(net)
    x, y = data("encoder", 32)
    callback = SAF(lmbda=LMBDA, tau=TAU, epochs_back=1) if which == "saf" else MESA(lmbda=LMBDA, tau=TAU, decay=0.8)
    optimizer = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)  # the references' optimizer
    trainer(max_epochs=2, callbacks=[callback]).fit(Task(net, optimizer=optimizer), make_loader(x, y, 8, indexed=True))
    if which == "saf":
        reference_saf(ref, x, y, epochs_back=1, epochs=2, batch=8)
    else:
        reference_mesa(ref, x, y, decay=0.8, epochs=2, batch=8)
    assert_same_weights(net, ref, atol=1e-5)


def test_encoder_rsam_on_the_fused_attention_kernel_equals_reference():
    from tests.test_sam_rsam import RHO, reference_rsam

    net = encoder()
    ref = clone(net)
    x, y = data("encoder", 4 * 16)
    optimizer = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)  # the reference's optimizer
    # the user leaves torch's fused attention kernel on (it has no double backward): RSAM's passes at w choose the
    # math kernel themselves; the reference, a double backward too, needs it throughout
    trainer(max_steps=4, callbacks=[RSAM(rho=RHO, alpha=2.0, gamma=0.5)]).fit(
        Task(net, optimizer=optimizer), make_loader(x, y, 16)
    )
    with sdpa_kernel(SDPBackend.MATH):
        reference_rsam(ref, x, y, alpha=2.0, gamma=0.5)
    assert_same_weights(net, ref, atol=1e-5)


def test_saf_on_per_token_logits_says_what_to_do():
    """SAF keeps one row of logits per example: a language model's (B, T, V) logits fail at the first step, naming
    SAF, the shape and MESA (which keeps no store)."""
    x, y = data("tied_lm", 16)
    with pytest.raises(RuntimeError, match=r"SAF stores one row of logits per example.*\(8, 8, 50\).*MESA"):
        trainer(max_epochs=2, callbacks=[SAF(epochs_back=1)]).fit(Task(tied_lm()), make_loader(x, y, 8, indexed=True))


# ---------------------------------------------------------------------------------------------- one weight, two modules
@pytest.mark.parametrize("variant", ["friendlysam", "looksam", "ssamf"])
def test_tied_weight_has_one_state_entry_and_equals_the_reference(variant):
    """BERT's masked-LM decoder shares the word-embedding weight: the variant keeps one EMA / stored component /
    mask for it (``parameters()`` and ``named_parameters()`` give it once), whose gradient sums both uses, and the
    run equals the reference (pytorch-optimizer for FriendlySAM and LookSAM, the SSAM-F transcription)."""
    net = tied_lm()
    ref = clone(net)
    assert tied_weight(ref) is ref.model.bert.embeddings.word_embeddings.weight
    pairs = batches(*data("tied_lm", REF_STEPS * 8), batch=8)
    make, kwargs = BASES["sgd"]
    if variant == "friendlysam":
        callback = FriendlySAM(rho=0.1, sigma=1.0, lmbda=0.8)
        po_closure_loop(ref, po.FriendlySAM(ref.parameters(), make, rho=0.1, sigma=1.0, lmbda=0.8, **kwargs), pairs)
    elif variant == "looksam":
        callback = LookSAM(rho=0.1, k=2, alpha=0.5)
        po_closure_loop(ref, po.LookSAM(ref.parameters(), make, rho=0.1, k=2, alpha=0.5, **kwargs), pairs)
    else:
        callback = SSAMF(rho=0.05, sparsity=0.7, num_samples=4, update_freq=2)
        ref_masks = reference_ssamf(ref, pairs, 0.05, 0.7, 4, 2)
    module = fit_callback(net, callback, model="tied_lm", batch=8)
    params = list(module.parameters())
    assert sum(p is tied_weight(net) for p in params) == 1
    if variant == "friendlysam":
        state = callback.engine.variant.momentum
    elif variant == "looksam":
        state = callback.engine.variant.g_v
    else:
        assert set(callback.masked.masks) == {n for n, _ in module.named_parameters()}
        assert "net.model.cls.predictions.decoder.weight" not in callback.masked.masks
        assert torch.equal(callback_masks(callback, module), torch.cat([m.reshape(-1) for m in ref_masks]).bool())
        state = [callback.masked.masks[n] for n, _ in module.named_parameters()]
    assert len(state) == len(params) and all(s.shape == p.shape for s, p in zip(state, params))
    assert tied_weight(net) is net.model.bert.embeddings.word_embeddings.weight
    assert_same_weights(net, ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------- unfreezing mid-fit
UNFREEZE_AT, PER_EPOCH = 3, 3  # the backbone joins at step 3, the first of epoch 1 (LookSAM's k = 2: off its schedule)


def backbone(net: EncoderClassifier) -> list[nn.Module]:
    return [net.embed, net.encoder]


class UnfreezeBackbone(BaseFinetuning):
    """``BackboneFinetuning``'s mechanism for the encoder: frozen before training, unfrozen at epoch 1 and added to
    the optimizer as a new param group (at the head's learning rate)."""

    def freeze_before_training(self, pl_module) -> None:
        self.freeze(backbone(pl_module.net))

    def finetune_function(self, pl_module, epoch, optimizer) -> None:
        if epoch == 1:
            self.unfreeze_and_add_param_group(backbone(pl_module.net), optimizer, lr=LR)


class RequiresGradAt(Callback):
    """Sets ``requires_grad`` on the frozen backbone at a given step; its parameters are in the optimizer from the
    start (without gradients SGD skips them). Listed before the SAM callback, whose binding at the step's start
    must see the change (see the report: a parameter unfrozen after that start gets g(w) + g(w + e) for a step)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == UNFREEZE_AT:
            for module in backbone(pl_module.net):
                module.requires_grad_(True)


def po_add_param_group(opt, params, lr) -> None:
    """``add_param_group`` on pytorch-optimizer's wrapper: the base optimizer's group, with the wrapper's options."""
    opt.base_optimizer.add_param_group({"params": params, "lr": lr})
    for key, value in opt.defaults.items():
        opt.param_groups[-1].setdefault(key, value)


class LookSAMWithReset(po.LookSAM):
    """pytorch-optimizer's LookSAM with a reset: every stored ``g_v`` dropped and the next step a full one (then the
    schedule of full steps every ``k`` steps goes on), the behaviour the test rules out."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.t, self.forced = 0, False

    def get_step(self):
        return 0 if self.forced else self.t

    def reset(self) -> None:
        for state in self.state.values():
            state.pop("gv", None)
        self.forced = True

    def step(self, closure=None):
        loss = super().step(closure)
        self.t, self.forced = self.t + 1, False
        return loss


def unfreeze_reference(variant: str, flavor: str, reset: bool) -> nn.Module:
    """pytorch-optimizer's FriendlySAM or LookSAM with the backbone unfrozen before step UNFREEZE_AT; ``reset``: every
    parameter's variant state dropped there too (what ``SAMVariant.bind`` did before it followed parameters)."""
    net = encoder()
    for module in backbone(net):
        module.requires_grad_(False)
    params = list(net.head.parameters()) if flavor == "finetuning" else list(net.parameters())
    make, kwargs = BASES["sgd"]
    if variant == "friendlysam":
        opt = po.FriendlySAM(params, make, rho=0.1, sigma=1.0, lmbda=0.8, **kwargs)
    else:
        opt = (LookSAMWithReset if reset else po.LookSAM)(params, make, rho=0.1, k=2, alpha=0.5, **kwargs)

    def before_step(t: int) -> None:
        if t != UNFREEZE_AT:
            return
        joined = [p for module in backbone(net) for p in module.parameters()]
        for p in joined:
            p.requires_grad_(True)
        if flavor == "finetuning":
            po_add_param_group(opt, joined, lr=LR)
        if reset and variant == "friendlysam":
            for state in opt.state.values():
                state.pop("momentum", None)
        elif reset:
            opt.reset()

    po_closure_loop(net, opt, batches(*data("encoder", PER_EPOCH * 8), batch=8) * 2, before_step)  # 2 epochs
    return net


@pytest.mark.parametrize("flavor", ["finetuning", "requires_grad"])
@pytest.mark.parametrize("variant", ["friendlysam", "looksam"])
def test_backbone_unfrozen_mid_fit_equals_pytorch_optimizer(variant, flavor):
    """FriendlySAM's EMA and LookSAM's stored component across a backbone unfrozen at step 3: equal to
    pytorch-optimizer, which keeps the head's state and starts the backbone's (``SAMVariant.bind`` follows each
    parameter by identity), and NOT to resetting every parameter's state there (the test can fail)."""
    net = encoder()
    if flavor == "finetuning":
        callbacks = [UnfreezeBackbone()]
        optimizer = lambda ps: sgd([p for p in ps if p.requires_grad])  # as BackboneFinetuning needs
    else:
        for module in backbone(net):
            module.requires_grad_(False)
        callbacks, optimizer = [RequiresGradAt()], sgd
    callback = (
        FriendlySAM(rho=0.1, sigma=1.0, lmbda=0.8) if variant == "friendlysam" else LookSAM(rho=0.1, k=2, alpha=0.5)
    )
    logger = RecordingLogger()
    x, y = data("encoder", PER_EPOCH * 8)
    fitted = trainer(max_epochs=2, callbacks=[*callbacks, callback], logger=logger, log_every_n_steps=1)
    fitted.fit(Task(net, optimizer=optimizer), make_loader(x, y, 8))
    assert all(p.requires_grad for p in net.parameters())
    assert not torch.equal(net.embed.weight, encoder().embed.weight)  # the backbone trained after the unfreeze
    if variant == "looksam":  # k = 2: full at 0, 2 and 4, whatever joins
        assert [v for _, v in logger.values("sam/full_step")] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert_same_weights(net, unfreeze_reference(variant, flavor, reset=False), atol=1e-5)
    reset = unfreeze_reference(variant, flavor, reset=True)
    assert max((a - b).abs().max() for a, b in zip(net.parameters(), reset.parameters())) > 1e-4


# ---------------------------------------------------------------------------------------------- vectorized m-SAM
def float64(net: nn.Module) -> nn.Module:
    return net.double()


@pytest.mark.parametrize("model", [pytest.param("resnet18", marks=pytest.mark.slow), "encoder"])
def test_vectorized_msam_equals_the_loop(model, monkeypatch):
    """``SAM(m=4, vectorize=True)`` on batches of 32 (8 chunks: vectorized) against ``vectorize=False`` to 1e-5,
    weights and BatchNorm statistics (state_dict), and against the plain-PyTorch m-SAM of tests/reference.py.

    The ResNet runs in float64. Its ReLUs make the gradient jump where a unit's input crosses 0, and in float32 the
    vmapped convolutions (grouped, batched) and the loop's round differently by about 1e-7: with these weights and
    data a ReLU input sits at 8e-8 at w + e of step 0's first chunk, so the two runs take different (both valid)
    gradients there and end 1.6e-2 apart after 3 steps. In float64 the rounding is 1e-16 and they agree; the encoder
    (GELU, smooth) is compared in float32."""
    taken = count_vectorized_steps(monkeypatch)
    make = (lambda: float64(resnet18())) if model == "resnet18" else encoder
    x, y = data(model, 3 * 32)
    if model == "resnet18":
        x = x.double()
    nets = {}
    for vectorize in (True, False):
        nets[vectorize] = make()
        module = Task(nets[vectorize])
        trainer(max_steps=3, callbacks=[SAM(rho=0.05, m=4, vectorize=vectorize)]).fit(module, make_loader(x, y, 32))
    assert taken == [True] * 3
    assert_same_weights(nets[True], nets[False], atol=1e-5)
    ref = make()
    opt = sgd(ref.parameters())
    for xb, yb in batches(x, y, batch=32):
        reference.sam_step(ref, opt, xb, yb, rho=0.05, m=4, loss_fn=ce)
    assert_same_weights(nets[True], ref, atol=1e-5)
