"""What SAM costs per optimizer step, measured in one run on CPU.

Prints, for a small CNN with BatchNorm on a fixed batch:
  * SAM / plain Lightning training (the floor is 2.0: two forward-backward passes);
  * our callback / a plain-PyTorch reference SAM loop (the 60-line SAM most people paste);
  * peak memory during a step, SAM minus plain, against the size of one copy of the parameters.

    python benchmarks/sam_overhead.py [--steps 30] [--repeats 3] [--batch-size 128]

Timings are medians over steps, taken round-robin over repeats so that drift hits every configuration alike.
Peak memory is read off the allocations PyTorch's profiler records over a short run from scratch (model,
optimizer state and all), since the CPU allocator keeps no statistics.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action  # the timeline behind export_memory_timeline

from lightning_sharpness import SAM


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
class PeakMemory:
    """Peak bytes of live tensors while the block runs, from the profiler's memory timeline (exact on CPU,
    where the allocator keeps no statistics): every tensor created adds its size, every one destroyed
    subtracts it."""

    def __enter__(self) -> PeakMemory:
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        current = peak = 0
        for _, action, _, size in sorted(self._prof._memory_profile().timeline, key=lambda r: r[0]):
            current += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
            peak = max(peak, current)
        self.peak = peak


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

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return sgd(self.parameters())


def lightning_run(batch, steps: int, warmup: int, callbacks: list, **trainer_kwargs) -> list[float]:
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps + warmup, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, timer], **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(Module(), RepeatedBatch(batch, steps + warmup))
    return timer.times


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
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    batch = make_batch(args.batch_size)
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
    return results


if __name__ == "__main__":
    main()
