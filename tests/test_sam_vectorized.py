"""The vectorized m-SAM gradient against the engine's per-chunk loop (ground truth: accumulate_sam_gradient with a
plain loss and backward, as the callback drives it), and its fallbacks."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_sharpness import SAM
from lightning_sharpness.geometry import AdaptiveGeometry, Geometry, StandardGeometry
from lightning_sharpness.sam import vectorized
from lightning_sharpness.sam.engine import SAMEngine, accumulate_sam_gradient, loss_scale
from lightning_sharpness.sam.vectorized import vectorizable_geometry, vectorized_sam_step
from tests import reference
from tests.helpers import Classifier, assert_same_weights, classification_data, clone, cnn_bn, loader, mlp, trainer
from tests.reference import norm_buffers


def vectorized_msam_gradient(*args, **kwargs):
    """The function under test, vectorizing from one chunk on: these tests' batches have few chunks."""
    kwargs.setdefault("min_chunks", 1)
    return vectorized.vectorized_msam_gradient(*args, **kwargs)


def cross_entropy(module: nn.Module, chunk) -> torch.Tensor:
    x, y = chunk
    return F.cross_entropy(module(x), y)


def loop_result(model, batch, m, rho, geometry, normalize, loss=cross_entropy):
    """The callback's path: the ordinary pass (it updates BatchNorm statistics), then the engine's loop."""
    engine = SAMEngine(rho=rho, geometry=geometry, normalize=normalize, m=m)
    engine.follow(model, torch.optim.SGD(model.parameters(), lr=0.1))
    stash = engine.take_grads()
    loss(model, batch).backward()
    stats = accumulate_sam_gradient(
        engine, batch, lambda chunk: loss(model, chunk), lambda value: value.backward(), rho, 1.0, stash, True
    )
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()], stats


def vectorized_result(model, batch, m, rho, geometry, normalize, loss=cross_entropy, **kwargs):
    """The same step with the loop replaced: the ordinary pass, then the vectorized passes."""
    loss(model, batch).backward()  # only for the running statistics: its gradient is not the chunks'
    model.zero_grad(set_to_none=True)
    before = [b.clone() for b in norm_buffers(model)]
    stats = vectorized_msam_gradient(
        model, loss, batch, m, rho, geometry, list(model.parameters()), lambda v: v.backward(), normalize, **kwargs
    )
    for b, saved in zip(norm_buffers(model), before):
        assert torch.equal(b, saved), "the vectorized passes changed a running statistic"
    if stats is None:
        return None, None
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()], stats


def assert_same(loop, vectorized, loop_stats, stats):
    for a, b in zip(loop, vectorized):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.loss, loop_stats.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.perturbed_loss, loop_stats.perturbed_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.grad_norm, loop_stats.grad_norm, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("network", ["mlp", "cnn_bn"])
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("geometry", ["standard", "adaptive"])
def test_equals_the_loop(network, m, geometry):
    n = 38  # m = 4 and 16 leave a short last chunk (2 and 6 examples); m = 1: 38 chunks of one
    x, y = classification_data(n=n, image=network == "cnn_bn")
    model = mlp() if network == "mlp" else cnn_bn()
    geometry_object = StandardGeometry() if geometry == "standard" else AdaptiveGeometry(0.01)
    rho = 0.05 if geometry == "standard" else 0.5
    twin = copy.deepcopy(model)
    loop, loop_stats = loop_result(model, (x, y), m, rho, geometry_object, True)
    vectorized, stats = vectorized_result(twin, (x, y), m, rho, geometry_object, True)
    assert stats is not None
    assert stats.losses.shape == (-(-n // m),)
    assert_same(loop, vectorized, loop_stats, stats)
    for a, b in zip(norm_buffers(model), norm_buffers(twin)):
        assert torch.equal(a, b)  # both as the ordinary pass left them
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)  # the weights are never moved


@pytest.mark.parametrize("geometry", ["standard", "adaptive"])
def test_unnormalized_equals_the_loop(geometry):
    x, y = classification_data(n=20, image=True)
    model = cnn_bn()
    geometry_object = StandardGeometry() if geometry == "standard" else AdaptiveGeometry(0.01)
    twin = copy.deepcopy(model)
    loop, loop_stats = loop_result(model, (x, y), 4, 0.05, geometry_object, False)
    vectorized, stats = vectorized_result(twin, (x, y), 4, 0.05, geometry_object, False)
    assert_same(loop, vectorized, loop_stats, stats)


def test_slices_under_a_memory_cap_equal_one_slice():
    x, y = classification_data(n=30, image=True)
    model = cnn_bn()
    twin = copy.deepcopy(model)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    loop, loop_stats = loop_result(model, (x, y), 4, 0.05, StandardGeometry(), True)
    # room for 2 chunks at a time: 7 full chunks in 4 slices, then the short one
    vectorized, stats = vectorized_result(twin, (x, y), 4, 0.05, StandardGeometry(), True, max_memory=8 * param_bytes)
    assert_same(loop, vectorized, loop_stats, stats)


def test_accumulates_onto_existing_gradients_and_scales_like_backward():
    """``.grad`` holds a stash (earlier micro-batches); backward scales by ``grad_divisor`` (a GradScaler's scale
    over the accumulation steps): the sum is the loop's, in the loop's scale."""
    x, y = classification_data(n=16)
    model = mlp()
    twin = copy.deepcopy(model)
    divisor = 1024.0
    stash = [torch.full_like(p, 0.5) for p in model.parameters()]
    engine = SAMEngine(rho=0.05, m=4)
    engine.follow(model, torch.optim.SGD(model.parameters(), lr=0.1))
    accumulate_sam_gradient(
        engine, (x, y), lambda c: cross_entropy(model, c), lambda v: (v * divisor).backward(), 0.05, divisor,
        [s.clone() for s in stash], False,
    )  # fmt: skip
    for p, s in zip(twin.parameters(), stash):
        p.grad = s.clone()
    stats = vectorized_msam_gradient(
        twin, cross_entropy, (x, y), 4, 0.05, StandardGeometry(), list(twin.parameters()),
        lambda v: (v * divisor).backward(), grad_divisor=divisor,
    )  # fmt: skip
    assert stats is not None
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-4)
    assert stats.grad_norms.min() < 10  # unscaled: the divisor is divided out


def test_only_the_perturbed_parameters_move():
    """SAM-ON-like: only the last layer is perturbed; every trainable parameter still gets the perturbed gradient."""
    x, y = classification_data(n=24)
    model = mlp()
    twin = copy.deepcopy(model)
    engine = SAMEngine(rho=0.1, m=8, perturb=lambda name, p: name.startswith("4."))
    engine.follow(model, torch.optim.SGD(model.parameters(), lr=0.1))
    engine.take_grads()
    cross_entropy(model, (x, y)).backward()
    loop_stats = accumulate_sam_gradient(
        engine, (x, y), lambda c: cross_entropy(model, c), lambda v: v.backward(), 0.1, 1.0,
        [None] * 6, True,
    )  # fmt: skip
    selected = [p for name, p in twin.named_parameters() if name.startswith("4.")]
    stats = vectorized_msam_gradient(twin, cross_entropy, (x, y), 8, 0.1, Geometry(), selected, lambda v: v.backward())
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.perturbed_loss, loop_stats.perturbed_loss, rtol=1e-5, atol=1e-6)


class WithUnusedLayer(nn.Module):
    """A parameter the loss never reaches: no gradient, so the loop leaves it unmoved and without ``.grad``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        return self.net(x)


def test_a_parameter_the_loss_does_not_reach_is_left_alone():
    x, y = classification_data(n=12)
    model = WithUnusedLayer()
    twin = copy.deepcopy(model)
    _, loop_stats = loop_result(model, (x, y), 4, 0.05, StandardGeometry(), True)
    _, stats = vectorized_result(twin, (x, y), 4, 0.05, StandardGeometry(), True)
    assert twin.unused.weight.grad is None and model.unused.weight.grad is None
    loop = [p.grad for p in model.net.parameters()]
    assert_same(loop, [p.grad for p in twin.net.parameters()], loop_stats, stats)


class WithTemperature(nn.Module):
    """A 0-dim parameter: its per-chunk gradients are one number per chunk."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.net(x) / self.temperature


@pytest.mark.parametrize("geometry", [StandardGeometry(), AdaptiveGeometry(0.01)], ids=["standard", "adaptive"])
def test_a_scalar_parameter_equals_the_loop(geometry):
    x, y = classification_data(n=16)
    model = WithTemperature()
    twin = copy.deepcopy(model)
    loop, loop_stats = loop_result(model, (x, y), 4, 0.05, geometry, True)
    vectorized, stats = vectorized_result(twin, (x, y), 4, 0.05, geometry, True)
    assert_same(loop, vectorized, loop_stats, stats)


def test_batch_of_dicts_with_shared_values():
    x, y = classification_data(n=12)
    model = mlp()
    twin = copy.deepcopy(model)

    def loss(module, chunk):
        return F.cross_entropy(module(chunk["x"]), chunk["y"]) * chunk["weight"] * chunk["factor"]

    batch = {"x": x, "y": y, "weight": torch.tensor(2.0), "factor": 0.5}
    loop, loop_stats = loop_result(model, batch, 4, 0.05, StandardGeometry(), True, loss)
    vectorized, stats = vectorized_result(twin, batch, 4, 0.05, StandardGeometry(), True, loss)
    assert_same(loop, vectorized, loop_stats, stats)


# ---------------------------------------------------------------- falling back
class ItemInForward(nn.Module):
    """A data-dependent branch through ``.item()``: cannot run under vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        out = self.net(x)
        return out * 2 if out.mean().item() > 1e9 else out


def test_item_in_forward_warns_once_and_leaves_the_step_to_the_loop():
    x, y = classification_data(n=16)
    model = ItemInForward()
    twin = copy.deepcopy(model)
    loop, loop_stats = loop_result(model, (x, y), 4, 0.05, StandardGeometry(), True)
    for p in twin.parameters():
        p.grad = torch.ones_like(p)
    with pytest.warns(UserWarning, match=r"ItemInForward.*cannot be vectorized.*item"):
        assert (
            vectorized_msam_gradient(
                twin,
                cross_entropy,
                (x, y),
                4,
                0.05,
                StandardGeometry(),
                list(twin.parameters()),
                lambda v: v.backward(),
            )
            is None
        )
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in twin.parameters())  # nothing written
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert (
            vectorized_msam_gradient(
                twin,
                cross_entropy,
                (x, y),
                4,
                0.05,
                StandardGeometry(),
                list(twin.parameters()),
                lambda v: v.backward(),
            )
            is None
        )
    # what the engine then does: its loop, which is the ground truth itself
    twin.zero_grad(set_to_none=True)
    fallback, fallback_stats = loop_result(twin, (x, y), 4, 0.05, StandardGeometry(), True)
    assert_same(loop, fallback, loop_stats, fallback_stats)


def test_failure_in_a_later_slice_restores_the_gradients():
    """The first slice's backward has written ``.grad`` when the short last chunk (1 example, BatchNorm) fails:
    the gradients go back to what they were and the step is the loop's."""
    x, y = classification_data(n=9)
    model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    with pytest.warns(UserWarning, match="cannot be vectorized"):
        stats = vectorized_msam_gradient(
            model, cross_entropy, (x, y), 4, 0.05, StandardGeometry(), list(model.parameters()), lambda v: v.backward()
        )
    assert stats is None
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())


def test_refusals_before_any_pass():
    x, y = classification_data(n=8)
    model = mlp()
    params = list(model.parameters())

    class Curved(Geometry):
        def retract_(self, params, steps):
            super().retract_(params, steps)

    assert vectorizable_geometry(AdaptiveGeometry()) and not vectorizable_geometry(Curved())
    cases = [
        ((model, cross_entropy, (x, y), 4, 0.05, Curved(), params), {}, "not element-wise"),
        ((model, cross_entropy, (x, ["a"] * 8), 4, 0.05, Geometry(), params), {}, "list of str"),
        ((model, lambda mod, c: mod(c[0]), (x, y), 4, 0.05, Geometry(), params), {}, "not a single number"),
        ((cnn_bn(), cross_entropy, (x, y), 4, 0.05, Geometry(), params), {}, "not a parameter of the module"),
    ]
    for args, kwargs, reason in cases:
        with pytest.warns(UserWarning, match=reason):
            assert vectorized_msam_gradient(*args, lambda v: v.backward(), **kwargs) is None
    instance = nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, track_running_stats=True), nn.Flatten())
    xi, yi = classification_data(n=8, image=True)
    with pytest.warns(UserWarning, match="'1' tracks running statistics"):
        assert vectorized_msam_gradient(
            instance, cross_entropy, (xi, yi % 2), 4, 0.05, Geometry(), list(instance.parameters()),
            lambda v: v.backward(),
        ) is None  # fmt: skip


def test_dropout_falls_back():
    x, y = classification_data(n=8)
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match="cannot be vectorized.*random"):
        assert (
            vectorized_msam_gradient(
                model, cross_entropy, (x, y), 4, 0.05, Geometry(), list(model.parameters()), lambda v: v.backward()
            )
            is None
        )


def test_non_finite_gradient_leaves_the_step_to_the_loop_without_a_warning():
    x, y = classification_data(n=8)
    x[0, 0] = float("inf")
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (
            vectorized_msam_gradient(
                model, cross_entropy, (x, y), 4, 0.05, Geometry(), list(model.parameters()), lambda v: v.backward()
            )
            is None
        )
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [("m", 0, "`m` must be an int >= 1"), ("rho", -1.0, "`rho`"), ("grad_divisor", 0.0, "`grad_divisor`"),
     ("max_memory", 0, "`max_memory`"), ("normalize", 1, "`normalize`"), ("min_chunks", 0, "`min_chunks`"),
     ("norm_stats", "first", "`norm_stats`")],
)  # fmt: skip
def test_bad_arguments_name_themselves(argument, value, message):
    x, y = classification_data(n=8)
    model = mlp()
    kwargs = dict(
        module=model, loss_of_chunk=cross_entropy, batch=(x, y), m=4, rho=0.05, geometry=Geometry(),
        params=list(model.parameters()), backward=lambda v: v.backward(),
    )  # fmt: skip
    kwargs[argument] = value
    with pytest.raises(ValueError, match=message):
        vectorized_msam_gradient(**kwargs)


# ---------------------------------------------------------------- the integration, through Lightning
class VectorizedSAM(SAM):
    """The SAM callback with the m-SAM loop replaced by the vectorized passes, as the engine is to wire it:
    ``vectorized_sam_step`` first, ``accumulate_sam_gradient`` (here: the callback's own pass) when it declines."""

    vectorized_steps = 0

    def _local_sam_pass(self, trainer, pl_module) -> None:
        k, scale = trainer.accumulate_grad_batches, loss_scale(trainer.precision_plugin)
        stats = vectorized_sam_step(
            self.engine, pl_module, self._batch, lambda chunk: self._loss(trainer, pl_module, chunk),
            lambda loss: self._backward(trainer, pl_module, loss, k / scale), self._stats.rho, scale / k,
            self._stash, first_grad_ready=True, min_chunks=1,
        )  # fmt: skip
        if stats is None:
            return super()._local_sam_pass(trainer, pl_module)
        self.vectorized_steps += 1
        self._stash = []
        self._record(stats.perturbed_loss / k, stats.grad_norm)


class LoggingClassifier(pl.LightningModule):
    """Logs in training_step (muted in the vectorized passes) and has no ``.item()``: it can be vmapped."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


@pytest.mark.parametrize(("callback", "reference_kwargs"), [
    (lambda: VectorizedSAM(rho=0.05, m=4), dict(rho=0.05, m=4)),
    (lambda: VectorizedSAM(rho=0.5, m=5, geometry=AdaptiveGeometry(0.01)), dict(rho=0.5, m=5, eta=0.01)),
])  # fmt: skip
def test_callback_with_vectorized_passes_equals_the_reference(callback, reference_kwargs):
    """Four steps of the callback, the loop replaced, against the plain-PyTorch reference (BatchNorm statistics
    included: state_dict holds them), with 16-example batches (m=5: a short last chunk)."""
    x, y = classification_data(image=True)
    net = cnn_bn()
    reference_net = clone(net)
    sam = callback()
    trainer(max_steps=4, callbacks=[sam]).fit(LoggingClassifier(net), loader(x, y))
    optimizer = torch.optim.SGD(reference_net.parameters(), lr=0.1, momentum=0.9)
    for i in range(4):
        batch = slice(i * 16, (i + 1) * 16)
        reference.sam_step(reference_net, optimizer, x[batch], y[batch], **reference_kwargs)
    assert sam.vectorized_steps == 4
    assert_same_weights(net, reference_net)


def test_callback_with_vectorized_passes_under_accumulation_equals_the_reference():
    """Two micro-batches of 32 per step: each one's chunks are added onto the stash of the earlier one, each
    backward divided by the accumulation count (``grad_divisor = 1/2``)."""
    x, y = classification_data()
    net = mlp()
    reference_net = clone(net)
    sam = VectorizedSAM(rho=0.05, m=4)
    trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[sam]).fit(LoggingClassifier(net), loader(x, y))
    optimizer = torch.optim.SGD(reference_net.parameters(), lr=0.1, momentum=0.9)
    for i in range(2):
        batch = slice(i * 32, (i + 1) * 32)
        reference.sam_step(reference_net, optimizer, x[batch], y[batch], rho=0.05, m=4)
    assert sam.vectorized_steps == 4
    assert_same_weights(net, reference_net)


@pytest.mark.parametrize("normalize", [True, False], ids=["sam", "usam"])
def test_callback_with_vectorized_passes_under_fp16_grad_scaler_equals_the_loop(normalize):
    """autocast(fp16) and a GradScaler: the pass at w is scaled like the loop's backward, so the scaler's scale,
    its decisions and the weights follow the loop's. Unnormalized SAM (``e = rho g``) is the sharp check: a scale
    not divided out would move the weights 2^16 times too far.

    The tolerance is fp16's, not fp32's: the vmapped passes multiply in fp16 through batched kernels (bmm) where
    the loop uses mm, which round differently (one fp16 ulp is 2^-11 of the value); four steps of lr 0.1 leave
    differences of about 1e-5 in weights of size 0.3."""
    x, y = classification_data()
    runs = []
    for make in (SAM, VectorizedSAM):
        net = mlp()
        callback = make(rho=0.05 if normalize else 0.3, m=4, normalize=normalize)
        plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**16))
        trainer(max_steps=4, plugins=[plugin], callbacks=[callback]).fit(LoggingClassifier(net), loader(x, y))
        runs.append((net, plugin.scaler.get_scale()))
    (loop_net, loop_scale), (net, scale) = runs
    assert scale == loop_scale
    assert callback.vectorized_steps == 4
    assert_same_weights(net, loop_net, atol=1e-4)


def test_fp16_pass_at_w_is_scaled_like_the_loop_so_it_does_not_underflow():
    """A loss so small that its fp16 gradients underflow unless scaled: with the GradScaler's scale as
    ``grad_divisor`` the per-chunk norms are the loop's; without it much of the gradient flushes to zero."""
    x, y = classification_data(n=16)
    model = mlp()
    scale = 2.0**16

    def tiny_loss(module, chunk):
        with torch.autocast("cpu", dtype=torch.float16):
            return 1e-7 * F.cross_entropy(module(chunk[0]).float(), chunk[1])

    engine = SAMEngine(rho=0.05, m=8)
    engine.follow(model, torch.optim.SGD(model.parameters(), lr=0.1))
    norms = []
    for start in (0, 8):  # the loop's norm of each chunk (it keeps the last one): one chunk per call
        engine.take_grads()
        chunk = (x[start : start + 8], y[start : start + 8])
        stats = accumulate_sam_gradient(
            engine, chunk, lambda c: tiny_loss(model, c), lambda v: (v * scale).backward(), 0.05, scale, [], False
        )
        norms.append(stats.grad_norm)
    model.zero_grad(set_to_none=True)
    params = list(model.parameters())
    stats = vectorized_msam_gradient(
        model, tiny_loss, (x, y), 8, 0.05, Geometry(), params, lambda v: (v * scale).backward(), grad_divisor=scale
    )
    torch.testing.assert_close(stats.grad_norms, torch.stack(norms), rtol=1e-3, atol=0)
    model.zero_grad(set_to_none=True)
    unscaled = vectorized_msam_gradient(model, tiny_loss, (x, y), 8, 0.05, Geometry(), params, lambda v: v.backward())
    assert (unscaled.grad_norms < 0.9 * stats.grad_norms).all()  # the underflow the scale prevents


class MetricClassifier(LoggingClassifier):
    """Updates a torchmetrics metric in training_step. Under ``quiet`` (the callback's loss) it runs inside vmap:
    torchmetrics assigns its states rather than updating them in place, and ``quiet`` puts them back."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net)
        self.train_acc = MulticlassAccuracy(num_classes=3, average="micro")

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.train_acc.update(logits, y)
        return F.cross_entropy(logits, y)


def test_callback_with_a_metric_in_training_step_vectorizes_and_counts_the_ordinary_passes_only():
    x, y = classification_data()
    runs = []
    for make in (SAM, VectorizedSAM):
        module = MetricClassifier(mlp())
        callback = make(rho=0.05, m=4)
        trainer(max_steps=2, callbacks=[callback]).fit(module, loader(x, y))
        runs.append(module)
    loop, vectorized = runs
    assert callback.vectorized_steps == 2
    assert_same_weights(vectorized.net, loop.net)
    states = {name: getattr(vectorized.train_acc, name) for name in ("tp", "fp", "tn", "fn")}
    assert all(torch.equal(value, getattr(loop.train_acc, name)) for name, value in states.items())
    assert int(states["tp"] + states["fn"]) == 32  # two batches of 16, each counted once


def test_callback_falls_back_for_item_in_training_step_and_equals_the_reference():
    """tests.helpers.Classifier records ``loss.item()`` in training_step: the loop runs, said once."""
    x, y = classification_data()
    net = mlp()
    reference_net = clone(net)
    sam = VectorizedSAM(rho=0.05, m=4)
    with pytest.warns(UserWarning, match=r"Classifier one chunk at a time.*item"):
        trainer(max_steps=2, callbacks=[sam]).fit(Classifier(net), loader(x, y))
    optimizer = torch.optim.SGD(reference_net.parameters(), lr=0.1, momentum=0.9)
    for i in range(2):
        batch = slice(i * 16, (i + 1) * 16)
        reference.sam_step(reference_net, optimizer, x[batch], y[batch], rho=0.05, m=4)
    assert sam.vectorized_steps == 0
    assert_same_weights(net, reference_net)


def test_a_process_group_keeps_the_loop(monkeypatch):
    """Under DDP the passes would bypass the wrapper's forward and its reducer: never vectorized there."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    x, y = classification_data(n=8)
    model = mlp()
    with pytest.warns(UserWarning, match="process group is initialized"):
        assert (
            vectorized_msam_gradient(
                model, cross_entropy, (x, y), 4, 0.05, Geometry(), list(model.parameters()), lambda v: v.backward()
            )
            is None
        )
    assert all(p.grad is None for p in model.parameters())


def test_fewer_chunks_than_min_chunks_leave_the_step_to_the_loop_silently():
    x, y = classification_data(n=28)
    model = mlp()
    call = (model, cross_entropy, (x, y), 4, 0.05, Geometry(), list(model.parameters()), lambda v: v.backward())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vectorized.vectorized_msam_gradient(*call) is None  # 7 chunks < 8, the default
    assert all(p.grad is None for p in model.parameters())
    assert vectorized.vectorized_msam_gradient(*call, min_chunks=7) is not None


def sam_step_on_a_stash(vectorized_step: bool, first_grad_ready: bool):
    """One step of ``accumulate_sam_gradient`` or ``vectorized_sam_step`` onto a stash of 0.5, with the caller's
    whole-batch gradient in ``.grad`` first (the callback) or nothing there (the mixin)."""
    x, y = classification_data(n=20)
    model = mlp()
    engine = SAMEngine(rho=0.05, m=4)
    engine.follow(model, torch.optim.SGD(model.parameters(), lr=0.1))
    stash = [torch.full_like(p, 0.5) for p in model.parameters()]
    if first_grad_ready:
        cross_entropy(model, (x, y)).backward()

    def loss_of(chunk):
        return cross_entropy(model, chunk)

    common = ((x, y), loss_of, lambda v: v.backward(), 0.05, 1.0, stash, first_grad_ready)
    if vectorized_step:
        stats = vectorized_sam_step(engine, model, *common, min_chunks=1)
    else:
        stats = accumulate_sam_gradient(engine, *common)
    return [p.grad.clone() for p in model.parameters()], stats


@pytest.mark.parametrize("first_grad_ready", [True, False], ids=["callback", "mixin"])
def test_vectorized_sam_step_keeps_accumulate_sam_gradients_contract(first_grad_ready):
    loop, loop_stats = sam_step_on_a_stash(False, first_grad_ready)
    grads, stats = sam_step_on_a_stash(True, first_grad_ready)
    assert_same(loop, grads, loop_stats, stats)


def test_vectorized_sam_step_declines_with_grad_and_stash_untouched():
    x, y = classification_data(n=20)
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    engine = SAMEngine(rho=0.05, m=4)
    engine.follow(model, torch.optim.SGD(model.parameters(), lr=0.1))
    stash = [torch.full_like(p, 0.5) for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    call = (engine, model, (x, y), lambda c: cross_entropy(model, c), lambda v: v.backward(), 0.05, 1.0, stash, True)
    with pytest.warns(UserWarning, match="random"):
        assert vectorized_sam_step(*call, min_chunks=1) is None
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    assert all(torch.equal(s, torch.full_like(s, 0.5)) for s in stash)
    assert vectorized_sam_step(*call) is None  # 5 chunks, fewer than the default 8: declined silently
    single = SAMEngine(rho=0.05)  # no m: n-SAM, the loop's
    single.follow(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert vectorized_sam_step(single, *call[1:], min_chunks=1) is None


@pytest.mark.parametrize(
    ("bn_update", "first_grad_ready", "momentum"),
    [("first", False, 0.1), ("both", True, 0.1), ("both", False, None)],
    ids=["mixin", "callback-both", "mixin-both-cumulative"],
)
def test_running_statistics_are_replayed_as_the_loop_updates_them(bn_update, first_grad_ready, momentum):
    """Where the loop's passes update BatchNorm statistics (the mixin's passes at w; every pass with
    ``bn_update='both'``), chunk by chunk, the vectorized passes replay the same updates in the same order, from
    each chunk's batch statistics; ``momentum=None`` (a cumulative average) counts every update."""
    x, y = classification_data(n=22, image=True)  # m = 4: five chunks and a short one of 2
    results = []
    for vectorized_step in (False, True):
        model = cnn_bn()
        model[1].momentum = momentum
        engine = SAMEngine(rho=0.05, m=4, bn_update=bn_update)
        engine.follow(model, torch.optim.SGD(model.parameters(), lr=0.1))
        stash = engine.take_grads()
        if first_grad_ready:
            cross_entropy(model, (x, y)).backward()

        def loss_of(chunk, model=model):
            return cross_entropy(model, chunk)

        common = ((x, y), loss_of, lambda v: v.backward(), 0.05, 1.0, stash, first_grad_ready)
        if vectorized_step:
            stats = vectorized_sam_step(engine, model, *common, min_chunks=1)
        else:
            stats = accumulate_sam_gradient(engine, *common)
        assert stats is not None
        results.append((model, [p.grad.clone() for p in model.parameters()], stats))
    (loop_model, loop, loop_stats), (model, grads, stats) = results
    assert_same(loop, grads, loop_stats, stats)
    updates = int(loop_model[1].num_batches_tracked)
    assert updates == (1 if first_grad_ready else 0) + 6 * (2 if bn_update == "both" else 1)
    assert int(model[1].num_batches_tracked) == updates
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(model[1], name), getattr(loop_model[1], name), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("vectorize", [True, False])
def test_the_sam_callback_vectorizes_m_sam_from_eight_chunks_and_equals_the_reference(vectorize, monkeypatch):
    """The engine's own wiring: ``SAM(m=2)`` on batches of 16 (8 chunks, BatchNorm CNN) takes the vectorized
    passes at every step, ``vectorize=False`` never does, and both equal the plain-PyTorch reference."""
    import lightning_sharpness.sam.engine as engine_module

    taken = []

    def counting(*args, **kwargs):
        stats = vectorized_sam_step(*args, **kwargs)
        taken.append(stats is not None)
        return stats

    monkeypatch.setattr(engine_module, "vectorized_sam_step", counting)
    x, y = classification_data(image=True)
    net = cnn_bn()
    reference_net = clone(net)
    trainer(max_steps=3, callbacks=[SAM(rho=0.05, m=2, vectorize=vectorize)]).fit(LoggingClassifier(net), loader(x, y))
    optimizer = torch.optim.SGD(reference_net.parameters(), lr=0.1, momentum=0.9)
    for i in range(3):
        batch = slice(i * 16, (i + 1) * 16)
        reference.sam_step(reference_net, optimizer, x[batch], y[batch], rho=0.05, m=2)
    assert taken == ([True] * 3 if vectorize else [])
    assert_same_weights(net, reference_net)


def test_a_sam_family_variant_keeps_the_loop(monkeypatch):
    """A variant's rules (here GSAM's combination) act per chunk in the loop: even with ``vectorize=True`` the
    engine never hands the step to the vectorized passes."""
    import lightning_sharpness.sam.engine as engine_module
    from lightning_sharpness.sam.variants import SurrogateGap

    def refuse(*args, **kwargs):
        raise AssertionError("a SAM-family variant reached the vectorized passes")

    monkeypatch.setattr(engine_module, "vectorized_sam_step", refuse)
    model = mlp()
    x, y = classification_data(n=16)
    engine = engine_module.SAMEngine(rho=0.05, m=1, variant=SurrogateGap(0.1), vectorize=True)
    engine.follow(model, torch.optim.SGD(model.parameters(), lr=0.1))
    engine.variant.begin_step(0)
    stash = engine.take_grads()
    engine_module.accumulate_sam_gradient(
        engine, (x, y), lambda b: cross_entropy(model, b), lambda loss: loss.backward(), 0.05, 1.0, stash, False
    )
    assert all(p.grad is not None for p in model.parameters())
