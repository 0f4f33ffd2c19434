"""Two-process (gloo, ``strategy="ddp"``) run of the SAM family: GSAM, WSAM (decoupled and coupled), FriendlySAM and
LookSAM in local and global mode, BSAM (global only), 3 steps each on a tiny MLP. Launched by
``tests/test_sam_family_ddp.py`` through ``tests.helpers.run_two_process_script``.

Each rank saves, per run, its final weights and the communication of each step (DDP's gradient all-reduces, counted
by a communication hook, and explicit ``torch.distributed.all_reduce`` calls, counted by a wrapper); rank 0 also saves
a plain-PyTorch reference of every run, computed here from the shards Lightning's DistributedSampler gives each rank:

* local mode: each rank's variant gradient on its own shard (ascent, second gradient, combination), the combined
  gradients averaged over ranks, and the variant's state following the mean over ranks (FriendlySAM's ``m`` the
  mean gradient at ``w``, WSAM's decoupled term and LookSAM's ``g_v`` the mean of the per-shard terms); LookSAM's
  one-pass steps turn the all-reduced gradient, as the engine documents;
* global mode: the variant on the gradient of the union of the shards.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

STEPS, BATCH, WORLD = 3, 8, 2
LR, LR_MIN, MOMENTUM = 0.1, 0.01, 0.9
GSAM_HP = dict(rho_max=0.1, rho_min=0.02, alpha=0.3)
WSAM_HP = dict(rho=0.1, gamma=0.8)
FRIENDLY_HP = dict(rho=0.1, sigma=1.0, lmbda=0.8)
LOOK_HP = dict(rho=0.1, k=2, alpha=0.5)
BSAM_HP = dict(num_data=STEPS * BATCH * WORLD, lr=0.05, weight_decay=1e-3, rho=0.05, damping=0.1, seed=3)
RUNS = [
    *[
        (name, mode)
        for name in ("gsam", "wsam-decoupled", "wsam-coupled", "friendlysam", "looksam")
        for mode in ("local", "global")
    ],
    ("bsam", "global"),
]


# ------------------------------------------------------------------------------------------ the plain reference
def _grad(net, xb, yb) -> list[torch.Tensor]:
    return list(torch.autograd.grad(F.cross_entropy(net(xb), yb), list(net.parameters())))


def _norm(ts) -> torch.Tensor:
    return torch.sqrt(sum((t * t).sum() for t in ts))


def _grad_at(net, shift, xb, yb) -> list[torch.Tensor]:
    """The gradient at ``w + shift``; the weights come back exactly."""
    saved = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p, s in zip(net.parameters(), shift):
            p.add_(s)
    g = _grad(net, xb, yb)
    with torch.no_grad():
        for p, w in zip(net.parameters(), saved):
            p.copy_(w)
    return g


def _mean(lists):
    return [sum(ts) / len(lists) for ts in zip(*lists)]


def _shard_batches(x, y, shards, t):
    return [(x[s[t * BATCH : (t + 1) * BATCH]], y[s[t * BATCH : (t + 1) * BATCH]]) for s in shards]


def reference_family(name: str, mode: str, net, x, y, shards) -> None:
    """``name`` in ``mode`` for STEPS steps: SGD with momentum, a cosine LR from LR to LR_MIN."""
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=LR_MIN)
    momentum, g_v = None, None  # FriendlySAM's m, LookSAM's stored orthogonal component
    for t in range(STEPS):
        parts = _shard_batches(x, y, shards, t)
        union = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        groups = parts if mode == "local" else [union]
        lr = opt.param_groups[0]["lr"]
        if name == "looksam" and t % LOOK_HP["k"] != 0:  # one pass, on the (all-reduced) gradient of the union
            g = _grad(net, *union)
            descent = [gi + LOOK_HP["alpha"] * gi.norm() / (v.norm() + 1e-8) * v for gi, v in zip(g, g_v)]
            sharpness = None
        else:
            rho = FRIENDLY_HP["rho"] if name == "friendlysam" else WSAM_HP["rho"]
            if name == "gsam":  # the radius follows the LR of this step
                rho = GSAM_HP["rho_min"] + (GSAM_HP["rho_max"] - GSAM_HP["rho_min"]) * (lr - LR_MIN) / (LR - LR_MIN)
            descents, terms, firsts = [], [], []
            for xb, yb in groups:  # each rank's shard (local) or the union (global)
                g_w = _grad(net, xb, yb)
                ascent = g_w
                if name == "friendlysam" and momentum is not None:
                    ascent = [g - FRIENDLY_HP["sigma"] * m for g, m in zip(g_w, momentum)]
                scale = rho / (_norm(ascent) + 1e-12)
                g_p = _grad_at(net, [scale * a for a in ascent], xb, yb)
                firsts.append(g_w)
                if name == "gsam":
                    cosine = sum((a * b).sum() for a, b in zip(g_w, g_p)) / (_norm(g_p) * _norm(g_w) + 1e-12)
                    factor = cosine * _norm(g_w) / (_norm(g_p) + 1e-12)
                    descents.append([b - GSAM_HP["alpha"] * (a - factor * b) for a, b in zip(g_w, g_p)])
                elif name.startswith("wsam"):
                    weight = WSAM_HP["gamma"] / (1 - WSAM_HP["gamma"])
                    if name == "wsam-coupled":
                        descents.append([a + weight * (b - a) for a, b in zip(g_w, g_p)])
                    else:
                        descents.append(g_w)
                        terms.append([b - a for a, b in zip(g_w, g_p)])
                elif name == "looksam":  # per tensor: the part of g_p orthogonal to g_w
                    descents.append(g_p)
                    terms.append(
                        [
                            b - b.norm() * ((a / a.norm()) * (b / b.norm())).sum() * a / a.norm()
                            for a, b in zip(g_w, g_p)
                        ]
                    )
                else:
                    descents.append(g_p)
            descent = _mean(descents)
            sharpness = _mean(terms) if name == "wsam-decoupled" else None
            if name == "looksam":
                g_v = _mean(terms)
            if name == "friendlysam":
                mean_first = _mean(firsts)
                lmbda = FRIENDLY_HP["lmbda"]
                momentum = (
                    mean_first
                    if momentum is None
                    else [lmbda * m + (1 - lmbda) * g for m, g in zip(momentum, mean_first)]
                )
        for p, d in zip(net.parameters(), descent):
            p.grad = d
        opt.step()
        if sharpness is not None:  # WSAM's decoupled sharpness term, after the optimizer's step
            weight = WSAM_HP["gamma"] / (1 - WSAM_HP["gamma"])
            with torch.no_grad():
                for p, s in zip(net.parameters(), sharpness):
                    p.sub_(lr * weight * s)
        sched.step()


def reference_bsam(net, x, y, shards) -> None:
    """The paper's BSAM (tests/reference.py's transcription of its Algorithm 1) on the union of the shards."""
    from tests.reference import PaperBSAM

    hp = BSAM_HP
    opt = PaperBSAM(
        net.parameters(), hp["num_data"], hp["lr"], hp["weight_decay"], hp["rho"], hp["damping"], hp["seed"]
    )
    for t in range(STEPS):
        parts = _shard_batches(x, y, shards, t)
        union = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        opt.step(lambda union=union: _grad(net, *union))


# ------------------------------------------------------------------------------------------ the DDP runs
def _main(out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import lightning.pytorch as pl

    from lightning_sharpness.sam.bsam import BSAM, BSAMOptimizer
    from lightning_sharpness.sam.family import GSAM, WSAM, FriendlySAM, LookSAM
    from tests.ddp_modules import shard_indices
    from tests.helpers import Classifier, classification_data, loader, mlp

    counts = {"ddp": 0, "explicit": 0}
    plain_all_reduce = torch.distributed.all_reduce

    def counted_all_reduce(*args, **kwargs):
        counts["explicit"] += 1
        return plain_all_reduce(*args, **kwargs)

    torch.distributed.all_reduce = counted_all_reduce  # average_over_processes looks it up at call time

    def counting_hook(state, bucket):
        """DDP's default all-reduce of a gradient bucket (a mean), counted; it calls the unwrapped all_reduce so
        that the explicit count holds only the all-reduces the SAM family makes itself."""
        counts["ddp"] += 1
        tensor = bucket.buffer().div_(torch.distributed.get_world_size())
        future = plain_all_reduce(tensor, async_op=True).get_future()
        return future.then(lambda f: f.value()[0])

    class CountPerStep(pl.Callback):
        """The all-reduces of each training batch (= step: no accumulation), DDP's and explicit ones apart."""

        def __init__(self) -> None:
            self.per_step: list[tuple[int, int]] = []

        def on_fit_start(self, trainer, pl_module) -> None:
            # Lightning registers `ddp_comm_hook` on CUDA only: on CPU put the hook in place by hand
            trainer.strategy.model.register_comm_hook(None, counting_hook)

        def on_train_batch_start(self, *args) -> None:
            self._start = dict(counts)

        def on_train_batch_end(self, *args) -> None:
            self.per_step.append(tuple(counts[k] - self._start[k] for k in ("ddp", "explicit")))

    def family_callback(name: str, mode: str):
        if name == "gsam":
            return GSAM(**GSAM_HP, lr_min=LR_MIN, mode=mode)
        if name.startswith("wsam"):
            return WSAM(**WSAM_HP, decouple=name == "wsam-decoupled", mode=mode)
        if name == "friendlysam":
            return FriendlySAM(**FRIENDLY_HP, mode=mode)
        return LookSAM(**LOOK_HP, mode=mode)

    def cosine(opt):
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=LR_MIN)

    x, y = classification_data(n=STEPS * BATCH * WORLD)
    results: dict = {}
    rank = 0
    for name, mode in RUNS:
        counter = CountPerStep()
        if name == "bsam":
            callback = BSAM(log_diagnostics=False)
            module = Classifier(mlp(), optimizer=lambda ps: BSAMOptimizer(ps, **BSAM_HP))
        else:
            callback = family_callback(name, mode)
            sgd = lambda ps: torch.optim.SGD(ps, lr=LR, momentum=MOMENTUM)  # noqa: E731
            module = Classifier(mlp(), optimizer=sgd, scheduler=cosine)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=WORLD,
            strategy="ddp",
            max_steps=STEPS,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[callback, counter],
        )
        trainer.fit(module, loader(x, y, BATCH))
        rank = trainer.global_rank
        results[(name, mode)] = {
            "weights": {k: v.detach().clone() for k, v in module.net.state_dict().items()},
            "all_reduces": counter.per_step,
        }
    if rank == 0:
        shards = shard_indices(len(y), WORLD)
        for name, mode in RUNS:
            net = mlp()
            if name == "bsam":
                reference_bsam(net, x, y, shards)
            else:
                reference_family(name, mode, net, x, y, shards)
            results[(name, mode)]["reference"] = {k: v.detach().clone() for k, v in net.state_dict().items()}
            print(
                f"all-reduces per step (DDP's, explicit) {name:15s} {mode:6s}: {results[(name, mode)]['all_reduces']}"
            )
    torch.save(results, out / f"rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
