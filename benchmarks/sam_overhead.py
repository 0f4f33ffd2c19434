"""What SAM costs per optimizer step, measured in one run on CPU.

Prints, for a small CNN with BatchNorm on a fixed batch:
  * SAM / plain Lightning training (the floor is 2.0: two forward-backward passes);
  * our callback / a plain-PyTorch reference SAM loop (the 60-line SAM most people paste);
  * peak memory during a step, SAM minus plain, against the size of one copy of the parameters;
  * SAM / plain under fp16 with a GradScaler and under bf16 autocast;
  * 2-process DDP (gloo): SAM local and global against plain DDP, step time and bytes all-reduced per step;
  * the SAM family on our engine (pytorch-optimizer's GSAM, WSAM, FriendlySAM, LookSAM with k=10, BSAM; SSAM-F/D,
    layer-wise and l-inf ASAM, RSAM, MESA, m-SAM): step time / plain and / SAM, extra peak memory in parameter
    copies, and gradient all-reduces per step under 2-process DDP (counted by a DDP communication hook).

    python benchmarks/sam_overhead.py [--steps 30] [--repeats 3] [--batch-size 128] [--family-only]

Timings are medians over steps, taken round-robin over repeats so that drift hits every configuration alike.
Peak memory is read off the allocations PyTorch's profiler records over a short run from scratch (model,
optimizer state and all), since the CPU allocator keeps no statistics.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from peak_memory import PeakMemory
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from lightning_sharpness import (
    BSAM,
    GSAM,
    MESA,
    RSAM,
    SAM,
    SSAMD,
    SSAMF,
    WSAM,
    BSAMOptimizer,
    FriendlySAM,
    LayerwiseAdaptiveGeometry,
    LinfAdaptiveGeometry,
    LookSAM,
)


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 256), nn.ReLU(), nn.Linear(256, 10),
    )  # fmt: skip


def make_batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, 3, 32, 32, generator=g), torch.randint(0, 10, (batch_size,), generator=g)


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


# ---------------------------------------------------------------- peak memory of one step
# ---------------------------------------------------------------- Lightning
class StepTimer(Callback):
    """Wall time of each training step (batch start to batch end, optimizer step included)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._start)


class RepeatedBatch:
    """The same batch ``n`` times, as a data loader Lightning accepts (a plain list would be read as n loaders)."""

    def __init__(self, batch, n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self):
        return iter([self.batch] * self.n)

    def __len__(self) -> int:
        return self.n


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = cnn()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return sgd(self.parameters())


class BSAMModule(Module):
    def configure_optimizers(self):
        return BSAMOptimizer(self.parameters(), num_data=50_000, lr=0.01)


class LogitsModule(Module):
    """MESA's contract: ``training_step`` returns the loss and the logits it came from."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}


def module_for(callbacks: list) -> pl.LightningModule:
    """The module a configuration needs: BSAM's optimizer, or MESA's logits in training_step's output."""
    if any(isinstance(c, BSAM) for c in callbacks):
        return BSAMModule()
    if any(isinstance(c, MESA) for c in callbacks):
        return LogitsModule()
    return Module()


def lightning_run(batch, steps: int, warmup: int, callbacks: list, **trainer_kwargs) -> list[float]:
    timer = StepTimer(warmup)
    trainer_kwargs.setdefault("devices", 1)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps + warmup, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, timer], **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(module_for(callbacks), RepeatedBatch(batch, steps + warmup))
    return timer.times


# ---------------------------------------------------------------- DDP, 2 processes (gloo)
COMMUNICATED = {"calls": 0, "bytes": 0, "explicit": 0}  # DDP's bucket all-reduces, and the family's own ones


def counting_allreduce_hook(state, bucket):
    COMMUNICATED["calls"] += 1
    COMMUNICATED["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
    return default_hooks.allreduce_hook(state, bucket)


class CountAllReduces(Callback):
    """Lightning registers `ddp_comm_hook` on CUDA only; on CPU the counting hook is put in place here. Every
    ``torch.distributed.all_reduce`` call is counted too (the SAM family's own, one flat all-reduce per step, as
    ``sam/stepping.average_over_processes`` makes it); the hook's are taken out of that count."""

    def on_fit_start(self, trainer, pl_module) -> None:
        trainer.strategy.model.register_comm_hook(None, counting_allreduce_hook)
        plain = torch.distributed.all_reduce

        def counted(*args, **kwargs):
            COMMUNICATED["explicit"] += 1
            return plain(*args, **kwargs)

        torch.distributed.all_reduce = counted  # looked up at call time by the hook and by the family alike


class ReportFromRankZero(Callback):
    """Rank zero writes its step times and what it all-reduced per step after the warm-up to ``path``."""

    def __init__(self, path: str, timer: StepTimer, warmup: int) -> None:
        self.path, self.timer, self.warmup = path, timer, warmup

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = dict(COMMUNICATED)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            steps = trainer.global_step - self.warmup
            sent = {key: (COMMUNICATED[key] - self.start[key]) / steps for key in COMMUNICATED}
            report = {
                "times": self.timer.times,
                "bytes_per_step": sent["bytes"],
                "calls_per_step": sent["calls"],
                "explicit_per_step": sent["explicit"] - sent["calls"],  # each hook call made one all_reduce
            }
            Path(self.path).write_text(json.dumps(report))


def ddp_run(batch, steps: int, warmup: int, callbacks: list, workdir: str) -> dict:
    timer = StepTimer(warmup)
    path = str(Path(workdir) / "report.json")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_steps=steps + warmup, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        strategy=DDPStrategy(start_method="spawn"),
        callbacks=[*callbacks, CountAllReduces(), timer, ReportFromRankZero(path, timer, warmup)],
    )  # fmt: skip
    trainer.fit(module_for(callbacks), RepeatedBatch(batch, steps + warmup))
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------- plain PyTorch
def reference_sam_step(model: nn.Module, opt: torch.optim.Optimizer, x, y, rho: float = 0.05) -> None:
    """The widely copied two-pass SAM: ascend along g / ||g||, recompute, descend, step."""
    F.cross_entropy(model(x), y).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in params]), p=2)
    scale = rho / (grad_norm + 1e-12)
    with torch.no_grad():
        steps = [p.grad * scale for p in params]
        for p, e in zip(params, steps):
            p.add_(e)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        for p, e in zip(params, steps):
            p.sub_(e)
    opt.step()
    opt.zero_grad()


def plain_step(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> None:
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def torch_run(step: Callable, batch, steps: int, warmup: int) -> list[float]:
    model = cnn()
    opt = sgd(model.parameters())
    x, y = batch
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step(model, opt, x, y)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def peak_bytes(run: Callable[[], object]) -> int:
    """Peak of everything ``run`` allocates: model, optimizer state, activations, gradients, SAM's copy."""
    with PeakMemory() as mem:
        run()
    return mem.peak


# ---------------------------------------------------------------- report
def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision-steps", type=int, default=8, help="steps per fp16/bf16 run (fp16 is slow on CPU)")
    parser.add_argument("--skip-ddp", action="store_true", help="leave out the 2-process DDP section")
    parser.add_argument("--family-only", action="store_true", help="only the SAM-family section")
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    batch = make_batch(args.batch_size)
    if args.family_only:
        return family_section(batch, args)
    configs: dict[str, Callable[[int, int], list[float]]] = {
        "lightning plain": lambda steps, warmup: lightning_run(batch, steps, warmup, []),
        "lightning SAM": lambda steps, warmup: lightning_run(batch, steps, warmup, [SAM(rho=0.05)]),
        "torch plain": lambda steps, warmup: torch_run(plain_step, batch, steps, warmup),
        "torch reference SAM": lambda steps, warmup: torch_run(reference_sam_step, batch, steps, warmup),
    }
    peaks = {name: peak_bytes(lambda run=run: run(3, 0)) for name, run in configs.items()}
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, run in configs.items():
            times[name] += run(args.steps, args.warmup)
    median = {name: statistics.median(t) for name, t in times.items()}
    param_bytes = sum(p.numel() * p.element_size() for p in cnn().parameters())
    results = {
        "sam_over_plain": median["lightning SAM"] / median["lightning plain"],
        "ours_over_reference_sam": median["lightning SAM"] / median["torch reference SAM"],
        "reference_sam_over_torch_plain": median["torch reference SAM"] / median["torch plain"],
        "extra_peak_over_param_bytes": (peaks["lightning SAM"] - peaks["lightning plain"]) / param_bytes,
    }
    print(f"small CNN, batch {args.batch_size} of 3x32x32, {torch.get_num_threads()} CPU threads, "
          f"{sum(p.numel() for p in cnn().parameters()):,} parameters ({param_bytes / 2**20:.2f} MiB)")  # fmt: skip
    for name in configs:
        print(f"  {name:<22} {1e3 * median[name]:8.2f} ms/step   peak {peaks[name] / 2**20:7.2f} MiB")
    print(f"SAM / plain (Lightning, floor 2.0):          {results['sam_over_plain']:.3f}")
    print(f"our callback / reference SAM loop:           {results['ours_over_reference_sam']:.3f}")
    print(f"reference SAM / plain (plain PyTorch):       {results['reference_sam_over_torch_plain']:.3f}")
    print(f"peak memory, SAM - plain, in parameter copies: {results['extra_peak_over_param_bytes']:.2f}")
    results.update(precision_section(batch, args))
    results.update(family_section(batch, args))
    if not args.skip_ddp:
        results.update(ddp_section(batch, args))
    return results


def fp16_scaler() -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))


def precision_section(batch, args) -> dict[str, float]:
    """SAM / plain under fp16 with a GradScaler and under bf16 autocast (CPU)."""
    steps, warmup = args.precision_steps, args.warmup
    configs = {
        "fp16+scaler plain": lambda: lightning_run(batch, steps, warmup, [], plugins=[fp16_scaler()]),
        "fp16+scaler SAM": lambda: lightning_run(batch, steps, warmup, [SAM()], plugins=[fp16_scaler()]),
        "bf16 plain": lambda: lightning_run(batch, steps, warmup, [], precision="bf16-mixed"),
        "bf16 SAM": lambda: lightning_run(batch, steps, warmup, [SAM()], precision="bf16-mixed"),
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, run in configs.items():
            times[name] += run()
    median = {name: statistics.median(t) for name, t in times.items()}
    for name in configs:
        print(f"  {name:<22} {1e3 * median[name]:8.2f} ms/step")
    results = {
        "fp16_sam_over_plain": median["fp16+scaler SAM"] / median["fp16+scaler plain"],
        "bf16_sam_over_plain": median["bf16 SAM"] / median["bf16 plain"],
    }
    print(f"SAM / plain, fp16 with GradScaler:           {results['fp16_sam_over_plain']:.3f}")
    print(f"SAM / plain, bf16 autocast:                  {results['bf16_sam_over_plain']:.3f}")
    return results


def family_section(batch, args) -> dict[str, float]:
    """The SAM family on our engine, fp32: step time / plain and / SAM, extra peak memory (SAF: its own benchmark,
    benchmarks/saf_overhead.py, since it needs indexed data).

    A step time here is the mean over a run's measured steps (the median over repeats of those means), so that
    the steps a method runs only now and then (LookSAM's full step every k, SSAM's mask refresh) count at their
    share: ``--steps`` and ``--warmup`` should be multiples of 10, LookSAM's k and SSAM's update period here.
    All-reduces per step: gradient all-reduces (DDP buckets; one per backward for this model) of a 2-process DDP
    run of 10 steps, batch 16 per process, in the default (local) mode; ``--skip-ddp`` leaves them out.
    """
    family = {
        "plain": lambda: [],
        "SAM": lambda: [SAM(rho=0.05)],
        "GSAM": lambda: [GSAM(rho_max=0.05, rho_min=0.01, alpha=0.4)],
        "WSAM": lambda: [WSAM(rho=0.05, gamma=0.9)],
        "FriendlySAM": lambda: [FriendlySAM(rho=0.05)],
        "LookSAM k=10": lambda: [LookSAM(rho=0.05, k=10)],
        "BSAM": lambda: [BSAM()],
        "SSAM-F (mask every 10 steps)": lambda: [SSAMF(rho=0.05, sparsity=0.5, num_samples=16, update_freq=10)],
        "SSAM-D (mask every 10 steps)": lambda: [SSAMD(rho=0.05, sparsity=0.5, update_freq=10)],
        "layer-wise ASAM": lambda: [SAM(rho=0.5, geometry=LayerwiseAdaptiveGeometry())],
        "l-inf ASAM": lambda: [SAM(rho=0.05, geometry=LinfAdaptiveGeometry())],
        "RSAM": lambda: [RSAM(rho=0.05)],
        "RSAM regularize='both'": lambda: [RSAM(rho=0.05, regularize="both")],
        "MESA": lambda: [MESA()],
        "SAM m=16, loop": lambda: [SAM(rho=0.05, m=16, vectorize=False)],
        "SAM m=16, vectorized": lambda: [SAM(rho=0.05, m=16)],
        "SAM m=4, loop": lambda: [SAM(rho=0.05, m=4, vectorize=False)],
        "SAM m=4, vectorized": lambda: [SAM(rho=0.05, m=4)],
    }
    peaks = {name: peak_bytes(lambda make=make: lightning_run(batch, 3, 0, make())) for name, make in family.items()}
    means: dict[str, list[float]] = {name: [] for name in family}
    for _ in range(args.repeats):
        for name, make in family.items():
            means[name].append(statistics.mean(lightning_run(batch, args.steps, args.warmup, make())))
    median = {name: statistics.median(m) for name, m in means.items()}
    reduces = {} if args.skip_ddp else family_all_reduces(family)
    param_bytes = sum(p.numel() * p.element_size() for p in cnn().parameters())
    print("| method | ms/step | / plain | / SAM | extra peak memory (parameter copies) | DDP all-reduces / step |")
    print("|---|---|---|---|---|---|")
    results = {}
    for name in family:
        extra = (peaks[name] - peaks["plain"]) / param_bytes
        over_plain, over_sam = median[name] / median["plain"], median[name] / median["SAM"]
        count = reduces.get(name, "")
        count = f"{count:.2f}" if isinstance(count, float) else count
        print(f"| {name} | {1e3 * median[name]:.1f} | {over_plain:.2f} | {over_sam:.2f} | {extra:.2f} | {count} |")
        results[f"family_{name}_over_plain"] = over_plain
        results[f"family_{name}_extra_param_copies"] = extra
    return results


def family_all_reduces(family: dict[str, Callable[[], list]]) -> dict[str, float | str]:
    """All-reduces per step of each configuration under 2-process DDP (local mode): DDP's gradient all-reduces
    in units of plain DDP's (its buckets per backward), plus the ones the family makes itself; or why it refused.
    Ten measured steps after ten of warm-up (DDP re-buckets after its first step)."""
    reports: dict[str, dict | str] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name, make in family.items():
            try:
                reports[name] = ddp_run(make_batch(16), 10, 10, make(), workdir)
            except Exception as error:  # a method that refuses DDP says so at setup, with a ValueError
                reports[name] = "refused at setup" if "ValueError" in str(error) else f"failed: {error!r}"[:80]
    per_backward = reports["plain"]["calls_per_step"]
    return {
        name: r if isinstance(r, str) else r["calls_per_step"] / per_backward + r["explicit_per_step"]
        for name, r in reports.items()
    }


def ddp_section(batch, args) -> dict[str, float]:
    """2-process DDP on CPU (gloo), each process on the same batch: plain, SAM local, SAM global."""
    configs = {"ddp plain": [], "ddp SAM local": [SAM(mode="local")], "ddp SAM global": [SAM(mode="global")]}
    times: dict[str, list[float]] = {name: [] for name in configs}
    sent: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.repeats):
            for name, callbacks in configs.items():
                report = ddp_run(batch, args.steps, args.warmup, callbacks, workdir)
                times[name] += report["times"]
                sent[name] = report["bytes_per_step"]
    median = {name: statistics.median(t) for name, t in times.items()}
    for name in configs:
        print(f"  {name:<22} {1e3 * median[name]:8.2f} ms/step   all-reduced {sent[name] / 2**20:6.2f} MiB/step")
    results = {
        "ddp_local_over_plain": median["ddp SAM local"] / median["ddp plain"],
        "ddp_global_over_local": median["ddp SAM global"] / median["ddp SAM local"],
        "ddp_bytes_global_over_local": sent["ddp SAM global"] / sent["ddp SAM local"],
        "ddp_bytes_local_over_plain": sent["ddp SAM local"] / sent["ddp plain"],
    }
    print(f"DDP SAM local / plain DDP, step time:        {results['ddp_local_over_plain']:.3f}")
    print(f"DDP SAM global / local, step time:           {results['ddp_global_over_local']:.3f}")
    print(f"DDP bytes all-reduced, local / plain:        {results['ddp_bytes_local_over_plain']:.3f}")
    print(f"DDP bytes all-reduced, global / local:       {results['ddp_bytes_global_over_local']:.3f}")
    return results


if __name__ == "__main__":
    main()
