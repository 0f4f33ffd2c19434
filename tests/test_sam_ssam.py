"""SSAM-F and SSAM-D (Mi et al., 2022) against plain-PyTorch transcriptions of the algorithm (fp32 CPU, 1e-5), and in
the modes: fp16 with a GradScaler, bf16, accumulation, checkpoint resume, the mixin, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision

from lightning_sharpness import SAMEngine
from lightning_sharpness.geometry_variants import MaskedGeometry
from lightning_sharpness.sam.ssam import SSAMD, SSAMF, fisher_mask
from tests.helpers import (
    Classifier,
    ManualClassifier,
    RecordingLogger,
    assert_same_weights,
    classification_data,
    clone,
    loader,
    mlp,
    trainer,
)

STEPS, FREQ, RHO, SPARSITY = 5, 2, 0.05, 0.7


def _masked_sam_step(net, opt, xb, yb, masks, rho):
    params = list(net.parameters())
    grads = torch.autograd.grad(F.cross_entropy(net(xb), yb), params)
    mg = [m * g for m, g in zip(masks, grads)]
    norm = torch.sqrt(sum((t**2).sum() for t in mg))
    e = [rho * t / (norm + 1e-12) for t in mg]
    with torch.no_grad():
        for p, d in zip(params, e):
            p.add_(d)
    perturbed = torch.autograd.grad(F.cross_entropy(net(xb), yb), params)
    with torch.no_grad():
        for p, d in zip(params, e):
            p.sub_(d)
    for p, g in zip(params, perturbed):
        p.grad = g.clone()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return grads


def _split(flat, params):
    out, s = [], 0
    for p in params:
        out.append(flat[s : s + p.numel()].reshape(p.shape))
        s += p.numel()
    return out


def reference_ssamf(net, x, y, num_samples, steps=STEPS, batch=16):
    """Fisher diagonal over per-example gradients of the first ``num_samples`` examples, the top ``1 - sparsity``
    elements kept, refreshed every FREQ steps before the step's own pass."""
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for t in range(steps):
        xb, yb = x[t * batch : (t + 1) * batch], y[t * batch : (t + 1) * batch]
        if t % FREQ == 0:
            fisher = torch.zeros(sum(p.numel() for p in params))
            for i in range(num_samples):
                g = torch.autograd.grad(F.cross_entropy(net(xb[i : i + 1]), yb[i : i + 1]), params)
                fisher += torch.cat([h.reshape(-1) for h in g]) ** 2
            flat = torch.zeros_like(fisher)
            flat[torch.topk(fisher, round((1 - SPARSITY) * fisher.numel())).indices] = 1.0
            masks = _split(flat, params)
        _masked_sam_step(net, opt, xb, yb, masks, RHO)
    return net, masks


def reference_ssamd(net, x, y, drop_rate, seed, steps=STEPS, batch=16):
    """A random mask at step 0; every FREQ steps the active elements of smallest |g| (g of the step's own pass)
    dropped and as many inactive ones grown at random."""
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    total = sum(p.numel() for p in params)
    flat = torch.zeros(total, dtype=torch.bool)
    flat[torch.randperm(total, generator=gen)[: round((1 - SPARSITY) * total)]] = True
    for t in range(steps):
        xb, yb = x[t * batch : (t + 1) * batch], y[t * batch : (t + 1) * batch]
        if t % FREQ == 0 and t > 0:
            g = torch.cat([h.reshape(-1) for h in torch.autograd.grad(F.cross_entropy(net(xb), yb), params)]).abs()
            active, inactive = flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)
            k = min(round(drop_rate * active.numel()), inactive.numel())
            dropped = active[torch.topk(g[active], k, largest=False).indices]
            grown = inactive[torch.randperm(inactive.numel(), generator=gen)[:k]]
            flat = flat.clone()
            flat[dropped], flat[grown] = False, True
        _masked_sam_step(net, opt, xb, yb, _split(flat.float(), params), RHO)
    return net, flat


def test_ssamf_matches_reference():
    x, y = classification_data(n=STEPS * 16)
    net = mlp()
    ref_net = clone(net)
    logger = RecordingLogger()
    callback = SSAMF(rho=RHO, sparsity=SPARSITY, num_samples=6, update_freq=FREQ)
    trainer(max_steps=STEPS, callbacks=[callback], logger=logger, log_every_n_steps=1).fit(
        Classifier(net), loader(x, y)
    )
    _, ref_masks = reference_ssamf(ref_net, x, y, num_samples=6)
    assert_same_weights(net, ref_net, atol=1e-5)
    got = torch.cat([callback.masked.masks[f"net.{n}"].reshape(-1) for n, _ in net.named_parameters()])
    assert torch.equal(got, torch.cat([m.reshape(-1) for m in ref_masks]).bool())
    assert [v for _, v in logger.values("sam/sparsity")] == pytest.approx([SPARSITY] * STEPS, abs=2e-3)


def test_ssamd_matches_reference():
    x, y = classification_data(n=STEPS * 16)
    net = mlp()
    ref_net = clone(net)
    callback = SSAMD(rho=RHO, sparsity=SPARSITY, drop_rate=0.3, update_freq=FREQ, seed=7)
    trainer(max_steps=STEPS, callbacks=[callback]).fit(Classifier(net), loader(x, y))
    _, ref_flat = reference_ssamd(ref_net, x, y, drop_rate=0.3, seed=7)
    assert_same_weights(net, ref_net, atol=1e-5)
    got = torch.cat([callback.masked.masks[f"net.{n}"].reshape(-1) for n, _ in net.named_parameters()])
    assert torch.equal(got, ref_flat)


def _fit(callback, plugins=(), precision=None, steps=4, accumulate=1, net=None):
    x, y = classification_data()
    net = net or mlp()
    kwargs = dict(plugins=list(plugins)) if plugins else {}
    if precision:
        kwargs["precision"] = precision
    module = Classifier(net)
    trainer(max_steps=steps, callbacks=[callback], accumulate_grad_batches=accumulate, **kwargs).fit(
        module, loader(x, y, batch_size=8 if accumulate > 1 else 16)
    )
    return module


@pytest.mark.parametrize(
    "make",
    [lambda: SSAMF(sparsity=0.5, num_samples=4, update_freq=2), lambda: SSAMD(sparsity=0.5, update_freq=2)],
    ids=["F", "D"],
)
@pytest.mark.parametrize("mode", ["fp16", "bf16", "accumulation"])
def test_modes_keep_the_requested_sparsity(make, mode):
    callback = make()
    if mode == "fp16":
        plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**16))
        module = _fit(callback, plugins=[plugin])
        # Lightning's and SAM's passes autocast; SSAM-F's per-example Fisher passes (n = 1) run in fp32
        assert all(c["dtype"] == (torch.float16 if c["n"] > 1 else torch.float32) for c in module.calls)
    elif mode == "bf16":
        module = _fit(callback, precision="bf16-mixed")
        assert all(c["dtype"] == (torch.bfloat16 if c["n"] > 1 else torch.float32) for c in module.calls)
    else:
        module = _fit(callback, accumulate=2)
    assert callback.masked.sparsity() == pytest.approx(0.5, abs=2e-3)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert callback._mask_step == 2  # refreshed at steps 0 and 2 of 4


@pytest.mark.parametrize(
    "make",
    [lambda: SSAMF(sparsity=0.6, num_samples=4, update_freq=3), lambda: SSAMD(sparsity=0.6, update_freq=1, seed=3)],
    ids=["F", "D"],
)
def test_checkpoint_resume_is_bitwise(make, tmp_path):
    x, y = classification_data(n=32)
    straight = Classifier(mlp())
    trainer(max_epochs=2, callbacks=[make()]).fit(straight, loader(x, y))
    first = Classifier(mlp())
    t1 = trainer(max_epochs=1, callbacks=[make()])
    t1.fit(first, loader(x, y))
    t1.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = Classifier(mlp())
    trainer(max_epochs=2, callbacks=[make()]).fit(resumed, loader(x, y), ckpt_path=tmp_path / "mid.ckpt")
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_mixin_with_a_fisher_mask_matches_reference():
    x, y = classification_data()
    net = mlp()
    ref_net = clone(net)
    params = list(net.parameters())
    masks = fisher_mask(lambda b: F.cross_entropy(net(b[0]), b[1]), params, (x[:8], y[:8]), sparsity=0.5)
    geometry = MaskedGeometry()
    geometry.set_masks({f"net.{n}": m for (n, _), m in zip(net.named_parameters(), masks)})
    trainer(max_steps=4).fit(ManualClassifier(net, SAMEngine(rho=RHO, geometry=geometry)), loader(x, y))
    opt = torch.optim.SGD(ref_net.parameters(), lr=0.1, momentum=0.9)
    for t in range(4):
        _masked_sam_step(
            ref_net, opt, x[t * 16 : (t + 1) * 16], y[t * 16 : (t + 1) * 16], [m.float() for m in masks], RHO
        )
    assert_same_weights(net, ref_net, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.0), "sparsity"),
        (dict(sparsity=-0.1), "sparsity"),
        (dict(update_freq=0), "update_freq"),
        (dict(geometry="adaptive"), "base="),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    for cls in (SSAMF, SSAMD):
        with pytest.raises(ValueError, match=match):
            cls(**kwargs)
    with pytest.raises(ValueError, match="num_samples"):
        SSAMF(num_samples=0)
    with pytest.raises(ValueError, match="drop_rate"):
        SSAMD(drop_rate=1.5)


@pytest.mark.slow
def test_variants_under_ddp(tmp_path):
    """One 2-process gloo launch for every part-B variant (tests/sam_variants_b_ddp_script.py): both processes end
    with the same weights, the same masks and the same SAF store (every example, from every process); RSAM refuses."""
    from pathlib import Path

    from tests.helpers import run_two_process_script

    run_two_process_script(str(Path(__file__).resolve().parent / "sam_variants_b_ddp_script.py"), tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for name in ("ssamf", "ssamd", "layerwise", "linf", "saf", "mesa"):
        assert "error" not in r0[name], r0[name].get("error")
        for key, value in r0[name]["weights"].items():
            assert torch.equal(value, r1[name]["weights"][key]), (name, key)
        assert torch.isfinite(torch.cat([v.reshape(-1).float() for v in r0[name]["weights"].values()])).all()
    for name in ("ssamf", "ssamd"):
        assert r0[name]["masks"].keys() == r1[name]["masks"].keys() and len(r0[name]["masks"]) == 6
        assert all(torch.equal(m, r1[name]["masks"][k]) for k, m in r0[name]["masks"].items())
        assert any("sam/sparsity" in m for _, m in r0[name]["logged"])
    # 32 examples, 16 per process: after 3 epochs every process holds epoch 2's logits of all 32
    assert torch.equal(r0["saf"]["stamps"], torch.full((1, 32), 2, dtype=torch.int32))
    assert torch.equal(r0["saf"]["stamps"], r1["saf"]["stamps"])
    assert any("sam/saf_kl" in m for _, m in r0["saf"]["logged"])
    assert any("sam/mesa_kl" in m for _, m in r0["mesa"]["logged"])
    assert "DistributedDataParallel" in r0["rsam"]["error"]
    first = next(iter(r0["ssamf"]["weights"]))
    assert not torch.equal(r0["ssamf"]["weights"][first], r0["layerwise"]["weights"][first])


@pytest.mark.parametrize("accumulate", [1, 2], ids=["one-batch", "accumulated"])
@pytest.mark.parametrize("variant", ["F", "D"])
def test_global_mode_is_the_step_on_the_union(variant, accumulate):
    """``mode="global"``: one perturbation from the gradient of the whole effective batch. With 2 accumulated
    micro-batches of 8 it equals the reference on their union (16 examples), masks included (SSAM-D's drop/grow
    reads the whole step's gradient, on its last micro-batch)."""
    x, y = classification_data(n=STEPS * 16)
    net = mlp()
    ref_net = clone(net)
    if variant == "F":
        callback = SSAMF(rho=RHO, sparsity=SPARSITY, num_samples=6, update_freq=FREQ, mode="global")
        _, ref_masks = reference_ssamf(ref_net, x, y, num_samples=6)
        ref_flat = torch.cat([m.reshape(-1) for m in ref_masks]).bool()
    else:
        callback = SSAMD(rho=RHO, sparsity=SPARSITY, drop_rate=0.3, update_freq=FREQ, seed=7, mode="global")
        _, ref_flat = reference_ssamd(ref_net, x, y, drop_rate=0.3, seed=7)
    trainer(max_steps=STEPS, callbacks=[callback], accumulate_grad_batches=accumulate).fit(
        Classifier(net), loader(x, y, batch_size=16 // accumulate)
    )
    got = torch.cat([callback.masked.masks[f"net.{n}"].reshape(-1) for n, _ in net.named_parameters()])
    assert torch.equal(got, ref_flat)
    assert_same_weights(net, ref_net, atol=1e-5)


def test_linf_geometry_refuses_unnormalized_steps_at_construction():
    """A sign step has no unnormalized form: SAM, USAM and the engine refuse it before any Trainer exists."""
    from lightning_sharpness import SAM, USAM
    from lightning_sharpness.geometry_variants import LinfAdaptiveGeometry

    for make in (
        lambda: SAM(rho=0.1, normalize=False, geometry=LinfAdaptiveGeometry()),
        lambda: USAM(rho=0.1, geometry=LinfAdaptiveGeometry()),
        lambda: SAMEngine(rho=0.1, normalize=False, geometry=LinfAdaptiveGeometry()),
    ):
        with pytest.raises(ValueError, match=r"`normalize=False` cannot be used .*Linf.*no unnormalized form"):
            make()
    assert SAMEngine(rho=0.1, geometry=LinfAdaptiveGeometry()).normalize  # the normalized form is accepted
