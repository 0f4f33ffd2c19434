"""Wall time of a training job with and without ``SharpnessMonitor()`` at its defaults, measured in one run.

The job: a small CNN with BatchNorm on scikit-learn's 8x8 digits (1,797 images, shipped with scikit-learn),
SGD with momentum, batch size 32, TensorBoard logging, on CPU. Runs alternate (without, with, without, ...) so
that drifts of the machine hit both; the ratio of the fastest runs is printed (the minimum is the estimate least
disturbed by other load on the machine), with the monitor's own account of its share of the same run
(``sharpness/seconds`` summed, over the training time), which other load does not skew.

Usage::

    python benchmarks/monitor_overhead.py --epochs 10 --repeats 3
"""

from __future__ import annotations

import argparse
import tempfile
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sharpness.monitor import SharpnessMonitor


class DigitsCNN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def digits_loader(batch_size: int = 32) -> DataLoader:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return DataLoader(TensorDataset(x, torch.tensor(y)), batch_size=batch_size, shuffle=True)


def run(epochs: int, monitor: bool, log_dir: str) -> tuple[float, SharpnessMonitor | None]:
    torch.manual_seed(0)
    callback = SharpnessMonitor() if monitor else None
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=TensorBoardLogger(log_dir, name="with" if monitor else "without"),
        callbacks=[callback] if callback else [],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model, data = DigitsCNN(), digits_loader()
    start = time.perf_counter()
    trainer.fit(model, data)
    return time.perf_counter() - start, callback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    without, with_monitor = [], []
    last: SharpnessMonitor | None = None
    with tempfile.TemporaryDirectory() as log_dir:
        run(1, False, log_dir)  # warm-up: imports, thread pools, allocator
        for _ in range(args.repeats):
            without.append(run(args.epochs, False, log_dir)[0])
            seconds, last = run(args.epochs, True, log_dir)
            with_monitor.append(seconds)
    base, monitored = min(without), min(with_monitor)
    assert last is not None
    measured = [step for step, _ in last.history]
    spent = sum(values["seconds"] for _, values in last.history)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.epochs} epochs x 57 steps")
    print(f"without monitor: {base:.2f} s (best of {args.repeats}: {', '.join(f'{t:.2f}' for t in without)})")
    print(f"with monitor:    {monitored:.2f} s (best of {args.repeats}: {', '.join(f'{t:.2f}' for t in with_monitor)})")
    print(f"measurements at steps {measured}, {spent:.2f} s measuring in the last run")
    print(f"in-run share:    {spent / (seconds - spent) * 100:.1f}% of the training time of that run")
    print(f"overhead ratio:  {monitored / base:.3f} ({(monitored / base - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
