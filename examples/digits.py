"""scikit-learn's handwritten digits (shipped with the package, no download) as a LightningDataModule, and a
small CNN with BatchNorm: the workload of the main job, the benchmarks and the CLI example."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy


class DigitsDataModule(pl.LightningDataModule):
    """8x8 digit images, 10 classes: a fixed, seeded train/validation/test split of the 1797 examples.

    Args:
        batch_size: examples per batch.
        label_noise: fraction of training labels replaced by random ones (SAM's robustness setting).
        seed: seed of the split and of the noise.
    """

    def __init__(self, batch_size: int = 64, label_noise: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 <= label_noise < 1.0:
            raise ValueError(f"`label_noise` must be in [0, 1), got {label_noise!r}.")
        self.batch_size = batch_size
        self.label_noise = label_noise
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        x = (x - 0.3) / 0.4
        y = torch.tensor(data.target, dtype=torch.long)
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(y), generator=g)
        train, val, test = order[:1200], order[1200:1500], order[1500:]
        y_train = y[train].clone()
        noisy = torch.rand(len(train), generator=g) < self.label_noise
        y_train[noisy] = torch.randint(0, 10, (int(noisy.sum()),), generator=g)
        self.train_set = TensorDataset(x[train], y_train)
        self.val_set = TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(x[test], y[test])

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=g, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)


def small_cnn(width: int = 16) -> nn.Module:
    """Two conv-BN-ReLU blocks and a linear head for 8x8 single-channel images."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 16, 10),
    )


class DigitsClassifier(pl.LightningModule):
    """Cross-entropy training of :func:`small_cnn` with SGD + momentum and a cosine learning rate.

    Args:
        width: channels of the first conv block.
        lr: peak learning rate.
        weight_decay: SGD weight decay.
    """

    def __init__(self, width: int = 32, lr: float = 0.05, weight_decay: float = 5e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = small_cnn(width)
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.val_acc(logits, y)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("test/loss", F.cross_entropy(logits, y))
        self.test_acc(logits, y)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self):
        opt = torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay
        )
        steps = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(steps)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
