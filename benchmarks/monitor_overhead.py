"""Wall time of training with and without ``SharpnessMonitor()`` at its defaults, measured in one run.

Two jobs:

* the main job (default): ``examples/train_digits.py`` with and without the monitor. The whole job each time:
  ERM and SAM, three seeds each, on scikit-learn's digits, with the test evaluation and the final-sharpness
  analysis, as the README's first command runs it. Jobs alternate (without, with, without, ...) so that drifts of
  the machine hit both; the ratio of the fastest jobs is printed (the minimum is the estimate least disturbed by
  other load), with the monitor's own account of its share of the training time (``sharpness/seconds`` summed),
  which other load does not skew.
* ``--resnet``: a million-parameter model, a CIFAR-style ResNet-18 (11.2 M parameters, written here: 3x3 stem,
  four stages of two basic blocks) trained with SGD on generated 3x32x32 images of 10 classes, on the CPU, with
  the monitor at its defaults. Printed: the plan the monitor announced at fit start, its forecast of one
  measurement against the measured ones, and the monitor's share of the ``fit`` wall time (forecast and
  fit-start measurement included), by its own clock; ``--compare`` also times the same fit without it, before
  and after.

Usage::

    python benchmarks/monitor_overhead.py --repeats 2
    python benchmarks/monitor_overhead.py --resnet --steps 300 --batch-size 16
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import train_digits  # noqa: E402


def main_job(monitor: bool, log_dir: str) -> tuple[float, dict[str, list[dict[str, float]]]]:
    argv = ["--log-dir", log_dir] + ([] if monitor else ["--no-monitor"])
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the job's own summary table
        results = train_digits.main(argv)
    return time.perf_counter() - start, results


# ---------------------------------------------------------------------------------------------- ResNet-18


class BasicBlock(nn.Module):
    def __init__(self, channels_in: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (He et al., 2016, in the CIFAR form: a 3x3 stem without max-pooling), 11.2 M
    parameters for 10 classes."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(64)
        blocks, channels_in = [], 64
        for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(channels_in, channels, stride), BasicBlock(channels, channels, 1)]
            channels_in = channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ResNetClassifier(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = ResNet18()
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def generated_images(n: int, seed: int = 0) -> TensorDataset:
    """CIFAR-sized images of 10 classes: a fixed random pattern per class under noise (learnable, not trivial)."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(10, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    x = 0.5 * patterns[y] + torch.randn(n, 3, 32, 32, generator=g)
    return TensorDataset(x, y)


def resnet_job(args: argparse.Namespace, monitor: bool) -> dict:
    from lightning_sharpness import SharpnessMonitor

    pl.seed_everything(0, workers=True)
    model = ResNetClassifier()
    callback = SharpnessMonitor() if monitor else None
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        callbacks=[callback] if callback else [],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    per_epoch = args.steps // args.epochs
    data = DataLoader(generated_images(per_epoch * args.batch_size), batch_size=args.batch_size, shuffle=True)
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    return {"fit_seconds": seconds, "monitor": callback, "steps": trainer.global_step}


def resnet(args: argparse.Namespace) -> None:
    params = sum(p.numel() for p in ResNet18().parameters())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; ResNet-18 ({params / 1e6:.2f} M parameters), "
        f"3x32x32 inputs, batch {args.batch_size}, {args.steps} steps in {args.epochs} epoch(s), CPU; "
        "SharpnessMonitor() at its defaults"
    )
    before = resnet_job(args, monitor=False)["fit_seconds"] if args.compare else None
    run = resnet_job(args, monitor=True)
    monitor, fit = run["monitor"], run["fit_seconds"]
    plan = monitor.plan
    print(plan["line"])
    measured = [(step, values["seconds"]) for step, values in monitor.history]
    for step, seconds in measured:
        print(f"  measurement at step {step}: {seconds:.2f} s (forecast {plan['forecast_seconds']:.2f} s)")
    taken = sum(seconds for _, seconds in measured)
    print(
        f"forecast: {plan['timing_seconds']:.2f} s to time it, {plan['forecast_seconds']:.2f} s per measurement; "
        f"measured: {taken:.2f} s in {len(measured)} measurement(s)"
        + (f", {taken / len(measured):.2f} s each (ratio {taken / len(measured) / plan['forecast_seconds']:.2f})"
           if measured else "")
    )  # fmt: skip
    print(
        f"fit: {fit:.1f} s for {run['steps']} steps; the monitor's own clock: {monitor.seconds_measuring:.2f} s = "
        f"{monitor.seconds_measuring / fit:.1%} of the fit time (forecast training time {plan['train_seconds']:.1f} s)"
    )
    if args.compare:  # without, with, without: drifts of the machine show as the two "without" differing
        after = resnet_job(args, monitor=False)["fit_seconds"]
        base = (before + after) / 2
        print(
            f"fit without the monitor: {before:.1f} s before, {after:.1f} s after; with: {fit:.1f} s "
            f"({(fit / base - 1) * 100:+.1f}% over their mean)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="main job: runs with and without the monitor")
    parser.add_argument("--resnet", action="store_true", help="the ResNet-18 job instead of the main job")
    parser.add_argument("--steps", type=int, default=200, help="ResNet-18: training steps")
    parser.add_argument("--epochs", type=int, default=1, help="ResNet-18: epochs the steps are spread over")
    parser.add_argument("--batch-size", type=int, default=16, help="ResNet-18: batch size")
    parser.add_argument("--compare", action="store_true", help="ResNet-18: also time the fit without the monitor")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resnet:
        resnet(args)
        return
    without, with_monitor = [], []
    with tempfile.TemporaryDirectory() as log_dir:
        for _ in range(args.repeats):
            without.append(main_job(False, log_dir)[0])
            seconds, results = main_job(True, log_dir)
            with_monitor.append(seconds)
    base, monitored = min(without), min(with_monitor)
    runs = [r for method_runs in results.values() for r in method_runs]
    training = sum(r["seconds"] for r in runs)
    measuring = sum(r["monitor_share"] * r["seconds"] for r in runs)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, main job: {len(runs)} training runs")
    print(f"without monitor: {base:.1f} s (best of {args.repeats}: {', '.join(f'{t:.1f}' for t in without)})")
    print(f"with monitor:    {monitored:.1f} s (best of {args.repeats}: {', '.join(f'{t:.1f}' for t in with_monitor)})")
    print(f"monitor's account (last job): {measuring:.2f} s measuring = {measuring / monitored:.1%} of the job's wall")
    print(f"  time, {measuring / training:.1%} of its training time")
    print(f"overhead ratio:  {monitored / base:.3f} ({(monitored / base - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
