"""SAM under the situations real projects create: parameters unfrozen during fit, exceptions and Ctrl-C in the
perturbed pass, a callback reused after an interrupted fit, per-example metadata in batches, parameters the
optimizer does not hold, dropout, custom buffers. Each test compares with a plain-PyTorch computation."""

from __future__ import annotations

import signal

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BackboneFinetuning, Callback, OnExceptionCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_sharpness import SAM, SAMEngine, SAMMixin
from tests import reference
from tests.helpers import Classifier, assert_same_weights, classification_data, clone, loader, mlp, trainer

# ------------------------------------------------------------------------------------------------ helpers


def sam_gradient(model: nn.Module, x, y, moving: list[nn.Parameter], rho: float) -> dict[int, torch.Tensor]:
    """grad L(w + e) for every trainable parameter, e = rho g / ||g|| over ``moving`` only (plain PyTorch)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(F.cross_entropy(model(x), y), moving)
    out = grads_at_perturbed(model, x, y, moving, reference.ascent(moving, g, rho), trainable)
    return {id(p): o for p, o in zip(trainable, out)}


def grads_at_perturbed(model, x, y, moving, e, wrt) -> tuple[torch.Tensor, ...]:
    """grad of L(w + e) w.r.t. ``wrt``, with ``e`` added to ``moving`` and taken off again."""
    with torch.no_grad():
        for p, d in zip(moving, e):
            p.add_(d)
    out = torch.autograd.grad(F.cross_entropy(model(x), y), wrt)
    with torch.no_grad():
        for p, d in zip(moving, e):
            p.sub_(d)
    return out


class StepRecorder(Callback):
    """Keeps, per optimizer step, the weights before it, which parameters were trainable, and the gradient the
    optimizer received."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append(
            {
                "weights": clone(pl_module.net),
                "batch": batch,
                "trainable": [p.requires_grad for p in pl_module.net.parameters()],
                "held": {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]},
            }
        )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps[-1]["grads"] = [None if p.grad is None else p.grad.clone() for p in pl_module.net.parameters()]
        self.steps[-1]["in_optimizer"] = [id(p) in self.steps[-1]["held"] for p in pl_module.net.parameters()]


def assert_sam_gradients(recorder: StepRecorder, rho: float) -> None:
    for i, step in enumerate(recorder.steps):
        net = step["weights"]
        for p, trainable in zip(net.parameters(), step["trainable"]):
            p.requires_grad_(trainable)
        moving = [p for p, held in zip(net.parameters(), step["in_optimizer"]) if p.requires_grad and held]
        x, y = step["batch"]
        expected = sam_gradient(net, x, y, moving, rho)
        for p, got, held in zip(net.parameters(), step["grads"], step["in_optimizer"]):
            if held and p.requires_grad:
                assert got is not None and torch.allclose(got, expected[id(p)], atol=1e-6), f"step {i}"


class Backboned(Classifier):
    """``net = [backbone..., head]``, with the attribute ``backbone`` that BackboneFinetuning freezes."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net)
        self.backbone = net[:-1]

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


# ------------------------------------------------------------------------------------------------ item 2


def test_parameters_unfrozen_during_fit_are_perturbed_from_that_step_on():
    x, y = classification_data()
    recorder = StepRecorder()
    finetune = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.5)
    trainer(max_epochs=2, callbacks=[finetune, SAM(rho=0.05), recorder]).fit(Backboned(mlp()), loader(x, y))
    assert len(recorder.steps) == 8
    assert not recorder.steps[0]["trainable"][0] and recorder.steps[-1]["trainable"][0]  # frozen, then unfrozen
    assert_sam_gradients(recorder, rho=0.05)  # before: unfrozen params got g(w) + g(w + e), unperturbed


class ManualUnfreeze(SAMMixin, Classifier):
    """A manual module that unfreezes its first layer after two steps and adds it to its optimizer."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net)
        self.automatic_optimization = False
        self.seen: list[tuple] = []

    def on_train_start(self) -> None:
        self.net[0].requires_grad_(False)

    def configure_optimizers(self):
        return torch.optim.SGD([p for n, p in self.net.named_parameters() if not n.startswith("0.")], lr=0.1)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        if self.global_step == 2:
            self.net[0].requires_grad_(True)
            opt.optimizer.add_param_group({"params": list(self.net[0].parameters()), "lr": 0.1})
        x, y = batch
        before = clone(self.net)
        self.sam_step(opt, lambda b: F.cross_entropy(self.net(b[0]), b[1]), batch, sam=SAM_ENGINE)
        self.seen.append((before, x, y, [p.requires_grad for p in self.net.parameters()], clone(self.net)))


SAM_ENGINE = SAMEngine(rho=0.05)


def test_mixin_follows_the_optimizers_param_groups():
    x, y = classification_data()
    module = ManualUnfreeze(mlp())
    trainer(max_steps=4).fit(module, loader(x, y))
    for before, xb, yb, flags, after in module.seen:
        for p, flag in zip(before.parameters(), flags):
            p.requires_grad_(flag)
        moving = [p for p in before.parameters() if p.requires_grad]
        expected = sam_gradient(before, xb, yb, moving, rho=0.05)
        for p, q in zip(before.parameters(), after.parameters()):
            want = p - 0.1 * expected[id(p)] if p.requires_grad else p
            assert torch.allclose(q, want, atol=1e-6)


# ------------------------------------------------------------------------------------------------ item 7


class HeadOnlyOptimizer(Classifier):
    """Every parameter is trainable, but the optimizer holds only the last layer."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.net[-1].parameters(), lr=0.1)


def test_callback_perturbs_only_what_the_optimizer_steps():
    x, y = classification_data()
    recorder = StepRecorder()
    trainer(max_steps=4, callbacks=[SAM(rho=0.05), recorder]).fit(HeadOnlyOptimizer(mlp()), loader(x, y))
    assert all(not all(step["in_optimizer"]) for step in recorder.steps)
    assert_sam_gradients(recorder, rho=0.05)  # e moves the head only, as the mixin always did


# ------------------------------------------------------------------------------------------------ item 3


class FailingPerturbedPass(Classifier):
    """Raises ``error`` (or returns None with ``error=None``) in the second training_step call of step ``at``."""

    def __init__(self, net: nn.Module, error: BaseException | None, at: int = 1) -> None:
        super().__init__(net)
        self.error, self.at = error, at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if len(self.calls) == 2 * self.at + 2:  # the pass at w + e of step ``at``
            if self.error is None:
                return None
            raise self.error
        return loss


class WeightsAtException(Callback):
    def on_exception(self, trainer, pl_module, exception) -> None:
        self.weights = clone(pl_module.net)


@pytest.mark.parametrize("mode", ["local", "global"])
@pytest.mark.parametrize("error", [RuntimeError("boom"), None], ids=["RuntimeError", "returns-None"])
def test_exception_in_perturbed_pass_leaves_the_weights_at_w(tmp_path, mode, error):
    x, y = classification_data()
    module = FailingPerturbedPass(mlp(), error)
    after_first_step = {}

    class Snapshot(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            after_first_step.setdefault("net", clone(pl_module.net))

    seen = WeightsAtException()
    on_exception = OnExceptionCheckpoint(dirpath=tmp_path)
    callbacks = [SAM(rho=0.5, mode=mode), Snapshot(), seen, on_exception]
    with pytest.raises(RuntimeError):
        trainer(max_steps=4, callbacks=callbacks, enable_checkpointing=True).fit(module, loader(x, y))
    w = after_first_step["net"].state_dict()
    for name, value in module.net.state_dict().items():
        assert torch.equal(value, w[name]), name  # bitwise w, not w + e
        assert torch.equal(seen.weights.state_dict()[name], w[name])
    saved = torch.load(tmp_path / "on_exception.ckpt", weights_only=False)["state_dict"]
    for name, value in w.items():
        assert torch.equal(saved[f"net.{name}"], value)


def test_keyboard_interrupt_in_perturbed_pass_leaves_the_weights_at_w():
    x, y = classification_data()
    module = FailingPerturbedPass(mlp(), KeyboardInterrupt(), at=0)
    before = clone(module.net)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown on Ctrl-C
            trainer(max_steps=4, callbacks=[SAM(rho=0.5)]).fit(module, loader(x, y))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C after the first
    for a, b in zip(before.state_dict().values(), module.net.state_dict().values()):
        assert torch.equal(a, b)


class ManualFailing(SAMMixin, Classifier):
    def __init__(self, net: nn.Module, error: BaseException) -> None:
        super().__init__(net)
        self.automatic_optimization = False
        self.error, self.passes = error, 0

    def training_step(self, batch, batch_idx):
        def loss_fn(b):
            self.passes += 1
            if self.passes == 2:
                raise self.error
            return F.cross_entropy(self.net(b[0]), b[1])

        self.sam_step(self.optimizers(), loss_fn, batch)


def test_mixin_exception_in_perturbed_pass_leaves_the_weights_at_w():
    module = ManualFailing(mlp(), RuntimeError("boom"))
    before = clone(module.net)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(max_steps=2).fit(module, loader(*classification_data()))
    for a, b in zip(before.state_dict().values(), module.net.state_dict().values()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ item 4


def test_global_mode_callback_reused_after_an_interrupted_fit_starts_clean():
    x, y = classification_data()
    callback = SAM(rho=0.05, mode="global")
    interrupted = FailingPerturbedPass(mlp(), RuntimeError("boom"), at=10)  # fails in the second micro-batch

    class StopMidStep(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == 0:
                raise RuntimeError("interrupted between micro-batches")

    with pytest.raises(RuntimeError, match="interrupted"):
        trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[callback, StopMidStep()]).fit(
            interrupted, loader(x, y)
        )
    reused, fresh = Classifier(mlp()), Classifier(mlp())
    trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[callback]).fit(reused, loader(x, y))
    trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[SAM(rho=0.05, mode="global")]).fit(fresh, loader(x, y))
    for a, b in zip(fresh.state_dict().values(), reused.state_dict().values()):
        assert torch.equal(a, b)
    assert len(reused.calls) == len(fresh.calls) == 8  # 2 steps x 2 micro-batches x (w, w + e)


def test_skipped_steps_count_per_fit():
    x, y = classification_data()
    callback = SAM(rho=0.05)
    callback.skipped_steps = 3  # left over from an earlier fit
    trainer(max_steps=2, callbacks=[callback]).fit(Classifier(mlp()), loader(x, y))
    assert callback.skipped_steps == 0


# ------------------------------------------------------------------------------------------------ item 5


class ManualWithTemporaryEngines(SAMMixin, Classifier):
    """Passes a new SAMEngine on every step, alternating its rho: each step must use the engine it got."""

    RHOS = (0.5, 0.0)

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        rho = self.RHOS[self.global_step % 2]
        self.sam_step(self.optimizers(), lambda b: F.cross_entropy(self.net(b[0]), b[1]), batch, sam=SAMEngine(rho))


def test_mixin_uses_the_engine_passed_at_each_step_and_holds_one_per_optimizer():
    x, y = classification_data(n=16 * 40)
    module = ManualWithTemporaryEngines(mlp())
    ref = clone(module.net)
    trainer(max_steps=40).fit(module, loader(x, y))
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for i in range(40):
        s = slice(16 * i, 16 * (i + 1))
        reference.sam_step(ref, opt, x[s], y[s], rho=ManualWithTemporaryEngines.RHOS[i % 2])
    for a, b in zip(ref.state_dict().values(), module.net.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)
    assert len(module._sam_engines) == 1


class ManualDefault(SAMMixin, Classifier):
    def __init__(self, net: nn.Module) -> None:
        super().__init__(net)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        self.sam_step(self.optimizers(), lambda b: F.cross_entropy(self.net(b[0]), b[1]), batch)


def test_mixin_default_engine_is_made_once():
    x, y = classification_data(n=16 * 30)
    module = ManualDefault(mlp())
    trainer(max_steps=30).fit(module, loader(x, y))
    assert len(module._sam_engines) == 1


# ------------------------------------------------------------------------------------------------ item 6


class WithMetadata(Classifier):
    """Batches are dicts whose "name" list must stay paired with the rows of "x"."""

    def __init__(self, net: nn.Module, check: bool = True) -> None:
        super().__init__(net)
        self.check = check

    def training_step(self, batch, batch_idx):
        x, y, names = batch["x"], batch["y"], batch["name"]
        if self.check:
            assert len(names) == x.shape[0]
            assert names == [f"example-{int(i)}" for i in x[:, 0].tolist()]  # column 0 holds the example's index
        return super().training_step((x, y), batch_idx)


def metadata_loader(n: int = 20, batch_size: int = 10, names: int | None = None) -> DataLoader:
    x, y = classification_data(n=n)
    x[:, 0] = torch.arange(n, dtype=x.dtype)
    items = [{"x": x[i], "y": y[i], "name": f"example-{i}"} for i in range(n)]
    if names is None:
        return DataLoader(items, batch_size=batch_size)

    def collate(rows):
        batch = torch.utils.data.default_collate(rows)
        batch["name"] = batch["name"][:names]  # a field that is not one entry per example
        return batch

    return DataLoader(items, batch_size=batch_size, collate_fn=collate)


def test_m_chunks_cut_per_example_lists_with_the_tensors():
    module = WithMetadata(mlp())
    trainer(max_steps=2, callbacks=[SAM(rho=0.05, m=3)]).fit(module, metadata_loader())
    # Lightning's pass, then per chunk its pass at w and at w + e; the last chunk is the short one
    assert [c["n"] for c in module.calls[:9]] == [10, 3, 3, 3, 3, 3, 3, 1, 1]


def test_m_chunks_refuse_a_field_of_the_wrong_length_naming_it():
    with pytest.raises(ValueError, match=r"batch\['name'\] has 4 entries while batch\['x'\] has 10"):
        trainer(max_steps=1, callbacks=[SAM(rho=0.05, m=3)]).fit(
            WithMetadata(mlp(), check=False), metadata_loader(names=4)
        )


# ------------------------------------------------------------------------------------------------ bullets


def test_batchnorm_chunk_of_one_says_which_m_made_it():
    net = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    x, y = classification_data(n=10)
    with pytest.raises(ValueError, match=r"m-sharpness gave a chunk of 1 example out of a batch of 10"):
        trainer(max_steps=1, callbacks=[SAM(rho=0.05, m=3)]).fit(Classifier(net), loader(x, y, batch_size=10))


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"eps": -1.0}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"same_dropout": 1}, "same_dropout"),
        ({"normalize": "yes"}, "normalize"),
        ({"m": 0}, "m"),
        ({"rho": -0.1}, "rho"),
    ],
)
def test_every_numeric_argument_is_checked(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        SAMEngine(**kwargs)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        SAM(**kwargs)


def dropout_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 3))


def reference_dropout_step(model, optimizer, x, y, rho: float, same_mask: bool) -> None:
    """SAM with dropout in plain PyTorch: the second pass replays the first pass's random state, or not."""
    state = torch.get_rng_state()
    loss = F.cross_entropy(model(x), y)
    params = list(model.parameters())
    e = reference.ascent(params, torch.autograd.grad(loss, params), rho)
    after_first = torch.get_rng_state()
    if same_mask:
        torch.set_rng_state(state)
    grads = grads_at_perturbed(model, x, y, params, e, params)
    if same_mask:
        torch.set_rng_state(after_first)
    for p, g in zip(params, grads):
        p.grad = g
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class RNGRecorder(Callback):
    """The random state each training step starts from (the DataLoader draws from it between steps)."""

    def __init__(self) -> None:
        self.states: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.states.append(torch.get_rng_state())


def replay_reference(states, x, y, same_mask: bool) -> nn.Module:
    ref = dropout_net()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for i, state in enumerate(states):
        torch.set_rng_state(state)
        reference_dropout_step(ref, opt, x[16 * i : 16 * (i + 1)], y[16 * i : 16 * (i + 1)], 0.05, same_mask)
    return ref


@pytest.mark.parametrize("same_dropout", [False, True])
def test_dropout_masks_in_the_perturbed_pass(same_dropout):
    x, y = classification_data()
    module, rng = Classifier(dropout_net()), RNGRecorder()
    trainer(max_steps=4, callbacks=[SAM(rho=0.05, same_dropout=same_dropout), rng]).fit(module, loader(x, y))
    expected = replay_reference(rng.states, x, y, same_mask=same_dropout)
    for a, b in zip(expected.state_dict().values(), module.net.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    other = replay_reference(rng.states, x, y, same_mask=not same_dropout)
    assert not torch.allclose(other[0].weight, module.net[0].weight, atol=1e-4)  # the choice matters


class CountingForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def test_other_buffers_are_updated_by_both_passes():
    net = CountingForward()
    trainer(max_steps=3, callbacks=[SAM(rho=0.05)]).fit(Classifier(net), loader(*classification_data()))
    assert int(net.calls) == 6  # documented: only normalization statistics are restored after SAM's pass


def test_rho_schedule_counts_from_the_first_sam_step_with_start_epoch():
    from lightning_sharpness import LinearRho

    x, y = classification_data()
    rhos = []

    class RhoSpy(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            rhos.append(sam._stats.rho if sam._active else None)

    sam = SAM(rho=LinearRho(0.0, 0.1, steps=4), start_epoch=1)
    trainer(max_epochs=3, callbacks=[sam, RhoSpy()]).fit(Classifier(mlp()), loader(x, y))
    assert rhos[:4] == [None] * 4
    assert rhos[4:] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1])


class ManualNaNOnce(ManualDefault):
    """The loss at w + e is NaN on the first step: that step is skipped and counted."""

    def training_step(self, batch, batch_idx):
        passes = []

        def loss_fn(b):
            passes.append(1)
            loss = F.cross_entropy(self.net(b[0]), b[1])
            return loss * float("nan") if self.global_step == 0 and len(passes) == 2 else loss

        self.sam_step(self.optimizers(), loss_fn, batch)


def test_mixin_skipped_steps_are_saved_in_checkpoints(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    x, y = classification_data()
    module = ManualNaNOnce(mlp())
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_steps=2, callbacks=[ckpt], enable_checkpointing=True).fit(module, loader(x, y))
    assert module._sam_skipped_steps == 1
    resumed = ManualDefault(mlp())
    trainer(max_steps=3).fit(resumed, loader(x, y), ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed._sam_skipped_steps == 1


def test_perturb_speaks_the_measures_vocabulary_of_parameter_names():
    x, y = classification_data()
    by_name, by_predicate = Classifier(mlp()), Classifier(mlp())
    trainer(max_steps=3, callbacks=[SAM(rho=0.1, perturb=["net.0.weight", "net.4.bias"])]).fit(by_name, loader(x, y))
    keep = {"net.0.weight", "net.4.bias"}
    trainer(max_steps=3, callbacks=[SAM(rho=0.1, perturb=lambda n, p: n in keep)]).fit(by_predicate, loader(x, y))
    for a, b in zip(by_name.state_dict().values(), by_predicate.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"`perturb` names unknown parameters \['net.9.weight'\]"):
        trainer(max_steps=1, callbacks=[SAM(perturb=["net.9.weight"])]).fit(Classifier(mlp()), loader(x, y))


class TiedNet(nn.Module):
    """Two layers sharing one weight (as tied language models share embedding and output weights)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 8, bias=False)
        self.out = nn.Linear(8, 8, bias=False)
        self.out.weight = self.inp.weight
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.out(torch.tanh(self.inp(x)))))


def test_tied_parameter_is_perturbed_once_with_its_whole_gradient():
    x, y = classification_data()
    net = TiedNet()
    ref = clone(net)
    assert ref.out.weight is ref.inp.weight
    trainer(max_steps=3, callbacks=[SAM(rho=0.1)]).fit(Classifier(net), loader(x, y))
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for i in range(3):
        reference.sam_step(ref, opt, x[16 * i : 16 * (i + 1)], y[16 * i : 16 * (i + 1)], rho=0.1)
    assert net.out.weight is net.inp.weight
    for a, b in zip(ref.state_dict().values(), net.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


class UnfreezesInTrainingStep(Classifier):
    """The first layer frozen at first, unfrozen by training_step itself at step 1 (after SAM's batch start)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net)
        net[0].requires_grad_(False)

    def training_step(self, batch, batch_idx):
        if self.global_step == 1:
            self.net[0].requires_grad_(True)
        return super().training_step(batch, batch_idx)


def test_parameters_unfrozen_inside_training_step_get_the_sam_gradient():
    x, y = classification_data()
    net = mlp()
    ref_net = clone(net)
    trainer(max_steps=3, callbacks=[SAM(rho=0.5)]).fit(UnfreezesInTrainingStep(net), loader(x, y))
    opt = torch.optim.SGD(ref_net.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        ref_net[0].requires_grad_(step >= 1)
        reference.sam_step(ref_net, opt, x[16 * step : 16 * (step + 1)], y[16 * step : 16 * (step + 1)], rho=0.5)
    assert_same_weights(net, ref_net, atol=1e-6)
