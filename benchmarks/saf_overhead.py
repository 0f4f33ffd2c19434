"""Step time of SAF and MESA against a plain step, and the memory of SAF's stored logits, in one run.

Each configuration trains the same MLP classifier through Lightning for ``--epochs`` epochs (SAF with
``epochs_back=1``, so its term is on from the second epoch); the step time is the median over the steps of the
last epoch, timed from ``on_train_batch_start`` to ``on_train_batch_end``. Prints the ratios to the plain step
(targets: SAF <= 1.05x, MESA <= 1.4x) and SAF's stored bytes, measured and extrapolated to CIFAR-100 and ImageNet.

    OMP_NUM_THREADS=1 python benchmarks/saf_overhead.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sharpness.sam.saf import MESA, SAF, WithIndex


class Net(pl.LightningModule):
    def __init__(self, d_in: int, width: int, classes: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        logits = self(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits, "index": index}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.times.append((trainer.current_epoch, time.perf_counter() - self._t))


def run(callback, args, data) -> tuple[float, pl.Callback | None]:
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer] + ([callback] if callback else []),
    )
    trainer.fit(Net(args.d_in, args.width, args.classes), data)
    last = [t for e, t in timer.times if e == args.epochs - 1]
    return statistics.median(last), callback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.examples, args.d_in, generator=g)
    y = torch.randint(0, args.classes, (args.examples,), generator=g)
    data = DataLoader(WithIndex(TensorDataset(x, y)), batch_size=args.batch, shuffle=True)
    plain, _ = run(None, args, data)
    saf_time, saf = run(SAF(lmbda=0.3, tau=5.0, epochs_back=1), args, data)
    mesa_time, _ = run(MESA(lmbda=0.8, tau=1.0, decay=0.999), args, data)
    print(f"model: MLP {args.d_in}-{args.width}-{args.width}-{args.classes}, batch {args.batch}, {args.accelerator}")
    print(f"plain step  {plain * 1e3:8.2f} ms   1.00x")
    print(f"SAF step    {saf_time * 1e3:8.2f} ms   {saf_time / plain:.2f}x   (target <= 1.05x)")
    print(f"MESA step   {mesa_time * 1e3:8.2f} ms   {mesa_time / plain:.2f}x   (target <= 1.4x)")
    per_row = args.classes * 4 + 4  # fp32 logits and an int32 epoch stamp per example and slot
    print(
        f"SAF stored logits: {saf.stored_bytes / 2**20:.2f} MiB measured ({args.examples} examples x "
        f"{args.classes} classes x 1 epoch back, fp32)"
    )
    for name, n, c in (("CIFAR-100", 50_000, 100), ("ImageNet-1k", 1_281_167, 1000)):
        print(
            f"  {name}: {3 * n * (c * 4 + 4) / 2**30:.2f} GiB with epochs_back=3 fp32 "
            f"({3 * n * (c * 2 + 4) / 2**30:.2f} GiB fp16)"
        )
    print(f"  (expected {args.examples * per_row / 2**20:.2f} MiB = examples x (classes x 4 + 4) bytes)")


if __name__ == "__main__":
    main()
