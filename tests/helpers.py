"""Small models, data and a LightningModule shared by the tests."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sharpness import SAMMixin, WithIndex


def mlp(seed: int = 0, d_in: int = 8, hidden: int = 16, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, classes)
    )


def cnn_bn(seed: int = 0, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, classes),
    )


def classification_data(n: int = 64, d_in: int = 8, classes: int = 3, seed: int = 1, image: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g) if image else torch.randn(n, d_in, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def loader(x, y, batch_size: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class Classifier(pl.LightningModule):
    """Cross-entropy classifier that records what each training_step call saw."""

    def __init__(self, net: nn.Module, optimizer=None, scheduler=None) -> None:
        super().__init__()
        self.net = net
        self.make_optimizer = optimizer or (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
        self.make_scheduler = scheduler
        self.calls: list[dict[str, Any]] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        loss = F.cross_entropy(out.float(), y)
        self.calls.append({"loss": loss.item(), "dtype": out.dtype, "n": x.shape[0]})
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = self.make_optimizer(self.parameters())
        if self.make_scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.make_scheduler(opt), "interval": "step"}}


class RecordingLogger(Logger):
    """Keeps every `log_metrics` call so tests can check what was logged, when and how often."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))

    def values(self, key: str) -> list[tuple[int, float]]:
        return [(s, m[key]) for s, m in self.records if key in m]


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def clone(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


def assert_same_weights(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x.float(), y.float(), atol=atol, rtol=0), (
            f"{name}: max diff {(x.float() - y.float()).abs().max()}"
        )


def double_backward_hessian(model: nn.Module, loss_fn, batch, params=None) -> torch.Tensor:
    """Ground truth for the measures: the dense Hessian of ``loss_fn(model, batch)`` w.r.t. the model's trainable
    parameters (``named_parameters()`` order, tied ones once; or the tensors ``params``) by double backward through
    the model itself, as it is called (tied weights and shared submodules enter every use). Use float64 models for
    tight checks."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(model, batch), params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        eye = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
        rows = torch.autograd.grad(flat, params, eye, is_grads_batched=True, allow_unused=True, materialize_grads=True)
    return torch.cat([r.reshape(flat.numel(), -1) for r in rows], dim=1).detach()


def run_two_process_script(script: str, out_dir) -> subprocess.CompletedProcess[str]:
    """Run a test module as a standalone 2-process (gloo) DDP script writing its results under ``out_dir``;
    asserts it exited cleanly and returns the finished process (its stderr holds the warnings)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    proc = subprocess.run(
        [sys.executable, script, str(out_dir)], cwd=root, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ---------------------------------------------------------------------------------------------- the monitor's tests
# A small classifier whose training_step logs (the monitor's calls must not), its data, and the measures they use.


class MonitorNet(pl.LightningModule):
    """A small classifier; ``training_step`` logs and counts its calls (the monitor's calls must not log)."""

    def __init__(self, seed: int = 0, dropout: float = 0.0, lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3))
        self.lr = lr
        self.log_calls = 0
        self.train_modes: list[bool] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x).float(), y)
        self.log("train_loss", loss)
        return loss

    def log(self, *args, **kwargs) -> None:
        self.log_calls += 1
        super().log(*args, **kwargs)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x).float(), y)
        self.log("val_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def monitor_data(n: int = 40, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def monitor_loader(n: int = 40, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    return DataLoader(monitor_data(n), batch_size=batch_size, shuffle=shuffle)


def monitor_ce(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def monitor_trainer(tmp_path=None, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=RecordingLogger(),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


TRACE = {"name": "hessian_trace", "method": "hutchinson", "matvecs": 8}
TOP = {"name": "hessian_eigenvalues", "k": 2}


def probe_batches(monitor, dataset: TensorDataset) -> list:
    return [(dataset[idx][0], dataset[idx][1]) for idx in monitor.state_dict()["probe_indices"]]


class MonitorData(pl.LightningDataModule):
    def train_dataloader(self):
        return monitor_loader()

    def val_dataloader(self):
        return monitor_loader(n=16)


# ---------------------------------------------------------------------------------------------- quadratics
class Quadratic(nn.Module):
    """``loss = 0.5 w^T A w + b^T w``: Hessian exactly ``A``."""

    def __init__(self, A: torch.Tensor, w0: torch.Tensor | None = None, b: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("b", torch.zeros(A.shape[0], dtype=A.dtype) if b is None else b)
        self.w = nn.Parameter(torch.zeros(A.shape[0], dtype=A.dtype) if w0 is None else w0.clone())

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.w @ self.A @ self.w + self.b @ self.w + 0 * batch.sum()


def quad_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch)


QBATCH = torch.zeros(1, 1, dtype=torch.float64)


def rotated(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return Q @ torch.diag(eigs.double()) @ Q.T


def fp16_plugin(init_scale: float = 2.0**16) -> MixedPrecision:
    """fp16 autocast with a GradScaler on CPU, as `precision="16-mixed"` builds it on GPU."""
    return MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=init_scale))


class ManualClassifier(SAMMixin, Classifier):
    """Manual optimization through `SAMMixin.sam_step`, with the engine it is given."""

    def __init__(self, net, sam=None, optimizer=None):
        super().__init__(net, optimizer=optimizer)
        self.automatic_optimization = False
        self.sam = sam

    def training_step(self, batch, batch_idx):
        def loss_fn(b):
            x, y = b
            out = self(x)
            self.calls.append({"dtype": out.dtype})
            return F.cross_entropy(out.float(), y)

        loss = self.sam_step(self.optimizers(), loss_fn, batch)
        self.log("train_loss", loss)


class IndexedClassifier(pl.LightningModule):
    """Returns the SAF contract: loss, logits and the examples' dataset indices."""

    def __init__(self, net, lr=0.1):
        super().__init__()
        self.net, self.lr = net, lr
        self.dtypes: list[torch.dtype] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        logits = self(x)
        self.dtypes.append(logits.dtype)
        return {"loss": F.cross_entropy(logits.float(), y), "logits": logits, "index": index}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def indexed_loader(x, y, batch_size: int = 8):
    return DataLoader(WithIndex(TensorDataset(x, y)), batch_size=batch_size, shuffle=False)
