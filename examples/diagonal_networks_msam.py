"""1-SAM vs n-SAM vs ERM on sparse regression with diagonal linear networks (Andriushchenko & Flammarion,
*Towards Understanding Sharpness-Aware Minimization*, ICML 2022).

The network is f(x) = <x, u * v> with u, v in R^d, fitted to n < d noiseless examples of a k-sparse linear
target by full-batch gradient descent from u = alpha * 1, v = 0. Every method interpolates the training set;
which interpolator it picks is its implicit bias. The paper's claim: 1-SAM (each example perturbed by its own
gradient, ``SAM(m=1)``) reduces the effective initialization scale far more than n-SAM (one perturbation from
the full-batch gradient), so it finds a much sparser predictor u * v that generalizes far better, while all
methods reach near-zero training loss. The unnormalized variants (``USAM``, e = rho g, the paper's theory) are
run too, and a rho sweep for 1-SAM and n-SAM.

python examples/diagonal_networks_msam.py            # the full run (minutes): docs/results/diagonal_networks_msam.md
python examples/diagonal_networks_msam.py --quick    # seconds: docs/results/diagonal_networks_msam.quick.md
tensorboard --logdir lightning_logs/diagonal_networks_msam
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import mean_spread, report  # noqa: E402

from lightning_sharpness import SAM, USAM, LinearRho, RhoSchedule, measures  # noqa: E402

Optimizer = Literal["sgd", "adam"]


# ------------------------------------------------------------------------------------------------ the problem
@dataclass
class SparseRegression:
    """n training and ``test_size`` test examples x ~ N(0, I_d), labels y = <x, beta_star> with a k-sparse
    beta_star (random support, entries +-1)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    beta_star: torch.Tensor

    @property
    def support(self) -> torch.Tensor:
        return self.beta_star != 0


def sparse_regression(n: int, d: int, k: int, seed: int, test_size: int = 2000) -> SparseRegression:
    """The data of one seed.

    Raises:
        ValueError: unless ``1 <= k <= d`` and ``n >= 1``.
    """
    if not (isinstance(k, int) and 1 <= k <= d):
        raise ValueError(f"`k` must be an int in [1, d={d}], got {k!r}.")
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"`n` must be a positive int, got {n!r}.")
    g = torch.Generator().manual_seed(seed)
    beta = torch.zeros(d)
    support = torch.randperm(d, generator=g)[:k]
    beta[support] = torch.randint(0, 2, (k,), generator=g).float() * 2 - 1
    x_train = torch.randn(n, d, generator=g)
    x_test = torch.randn(test_size, d, generator=g)
    return SparseRegression(x_train, x_train @ beta, x_test, x_test @ beta, beta)


class RepeatedBatch(Dataset):
    """The whole training set as one batch, ``steps`` times: full-batch gradient descent as one long epoch
    (no per-epoch overhead of Lightning between steps)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
        self.x, self.y, self.steps = x, y, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


def full_batch_loader(x: torch.Tensor, y: torch.Tensor, steps: int) -> DataLoader:
    return DataLoader(RepeatedBatch(x, y, steps), batch_size=None)


# ------------------------------------------------------------------------------------------------ the network
class DiagonalNetwork(pl.LightningModule):
    """f(x) = <x, u * v>, initialized at u = alpha * 1, v = 0 (the predictor u * v starts at 0), trained on the
    mean squared error.

    Args:
        d: input dimension.
        alpha: initialization scale (small: rich, sparse regime; large: kernel, dense regime).
        lr: learning rate.
        optimizer: ``"sgd"`` (plain gradient descent) or ``"adam"``.
        label_noise: standard deviation of Gaussian noise added to the labels afresh at every step
            (0: none); the noise drives the drift along the manifold of interpolators.

    Raises:
        ValueError: on a non-positive ``alpha`` or ``lr``, a negative ``label_noise``, an unknown optimizer.
    """

    def __init__(self, d: int, alpha: float, lr: float, optimizer: Optimizer = "sgd", label_noise: float = 0.0) -> None:
        super().__init__()
        if not alpha > 0:
            raise ValueError(f"`alpha` must be positive, got {alpha!r}.")
        if not lr > 0:
            raise ValueError(f"`lr` must be positive, got {lr!r}.")
        if not label_noise >= 0:
            raise ValueError(f"`label_noise` must be >= 0, got {label_noise!r}.")
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"`optimizer` must be 'sgd' or 'adam', got {optimizer!r}.")
        self.save_hyperparameters()
        self.u = nn.Parameter(torch.full((d,), float(alpha)))
        self.v = nn.Parameter(torch.zeros(d))

    @property
    def beta(self) -> torch.Tensor:
        """The linear predictor u * v."""
        return (self.u * self.v).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.u * self.v)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.hparams.label_noise > 0:
            y = y + self.hparams.label_noise * torch.randn_like(y)
        loss = F.mse_loss(self(x), y)
        self.log("train/loss", loss)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/loss", F.mse_loss(self(x), y))

    def configure_optimizers(self):
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def mse(model: nn.Module, batch) -> torch.Tensor:
    """The clean training loss (no label noise): what the measures take the Hessian of."""
    return F.mse_loss(model(batch[0]), batch[1])


def nonzeros(beta: torch.Tensor, threshold: float) -> int:
    """Entries of the predictor above ``threshold`` in magnitude (the target's nonzeros are +-1)."""
    return int((beta.abs() > threshold).sum())


def support_recovered(beta: torch.Tensor, support: torch.Tensor, threshold: float) -> bool:
    """Whether the entries above ``threshold`` are exactly the target's support."""
    return bool(torch.equal(beta.abs() > threshold, support))


def make_trainer(steps: int, callbacks: list, logger: TensorBoardLogger, log_every: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        max_steps=steps,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=log_every,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )


# ------------------------------------------------------------------------------------------------ the methods
#: name -> (callback from rho, which rho argument it takes); n-SAM perturbs with the full-batch gradient,
#: 1-SAM (m=1) each example with its own; USAM is the unnormalized ascent e = rho g.
#: The radius decays linearly from rho to 0 over training, so that every method ends at an interpolator (a fixed
#: normalized radius keeps the loss above zero; the implicit bias is acquired early, while the loss is large).
METHODS: dict[str, tuple[Callable[[RhoSchedule], pl.Callback] | None, str | None]] = {
    "ERM": (None, None),
    "n-SAM": (lambda rho: SAM(rho=rho), "rho"),
    "1-SAM": (lambda rho: SAM(rho=rho, m=1), "rho"),
    "n-USAM": (lambda rho: USAM(rho=rho), "usam_rho"),
    "1-USAM": (lambda rho: USAM(rho=rho, m=1), "usam_rho"),
}


def train(method: str, rho: float | None, seed: int, args: argparse.Namespace, version: str) -> dict[str, float]:
    """One run: fit, test, and the final predictor's sparsity and the training loss's tr(H)."""
    pl.seed_everything(seed, workers=True)
    data = sparse_regression(args.n, args.d, args.k, seed)
    factory, _ = METHODS[method]
    callbacks = [factory(LinearRho(start=rho, end=0.0, steps=args.steps))] if factory is not None else []
    logger = TensorBoardLogger(args.log_dir, name=method, version=version)
    trainer = make_trainer(args.steps, callbacks, logger, log_every=max(1, args.steps // 100))
    model = DiagonalNetwork(args.d, args.alpha, args.lr)
    start = time.perf_counter()
    trainer.fit(model, full_batch_loader(data.x_train, data.y_train, args.steps))
    seconds = time.perf_counter() - start
    test_loader = DataLoader(torch.utils.data.TensorDataset(data.x_test, data.y_test), batch_size=len(data.y_test))
    test = trainer.test(model, test_loader, verbose=False)[0]
    train_batch = (data.x_train, data.y_train)
    with torch.no_grad():
        train_loss = float(mse(model, train_batch))
    trace = float(measures.hessian_trace(model, mse, train_batch, method="hutch++"))
    beta = model.beta
    result = {
        "train_loss": train_loss,
        "test_loss": test["test/loss"],
        "nonzeros": nonzeros(beta, args.threshold),
        "recovered": float(support_recovered(beta, data.support, args.threshold)),
        "l1": float(beta.abs().sum()),
        "trace": trace,
        "seconds": seconds,
    }
    logger.log_metrics({f"final/{k}": v for k, v in result.items()}, step=trainer.global_step)
    logger.experiment.flush()
    return result


def summary_row(label: str, rho: float | None, runs: Sequence[dict[str, float]]) -> list[object]:
    col = lambda key: [r[key] for r in runs]  # noqa: E731
    return [
        label,
        "-" if rho is None else f"{rho:g}",
        mean_spread(col("test_loss")),
        mean_spread(col("nonzeros")),
        f"{sum(col('recovered')):.0f}/{len(runs)}",
        mean_spread(col("train_loss")),
        mean_spread(col("trace")),
        mean_spread(col("l1")),
    ]


HEADER = [
    "method",
    "rho",
    "test loss",
    "nonzeros of u*v",
    "support recovered",
    "train loss",
    "tr(H)",
    "‖u*v‖₁",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="training examples")
    parser.add_argument("--d", type=int, default=50, help="dimension")
    parser.add_argument("--k", type=int, default=3, help="nonzeros of the target")
    parser.add_argument("--alpha", type=float, default=0.5, help="initialization scale")
    parser.add_argument("--lr", type=float, default=0.075)
    parser.add_argument("--steps", type=int, default=500, help="full-batch gradient steps")
    parser.add_argument("--rho", type=float, default=0.4, help="initial radius of SAM (normalized)")
    parser.add_argument("--usam-rho", type=float, default=0.1, help="initial radius of USAM (unnormalized)")
    parser.add_argument("--sweep", type=float, nargs="*", default=[0.1, 0.2, 0.4, 0.6], help="rho sweep (SAM)")
    parser.add_argument("--threshold", type=float, default=0.01, help="|u*v| above this counts as nonzero")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--log-dir", default="lightning_logs/diagonal_networks_msam")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds (for the tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.d, args.k, args.steps, args.seeds, args.sweep = 8, 16, 2, 30, [0], [0.4]
    for name in ("n", "d", "k", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.n >= args.d:
        parser.error(f"--n must be below --d (an underdetermined problem), got n={args.n}, d={args.d}")
    for name in ("alpha", "lr", "rho", "usam_rho", "threshold"):
        if not (getattr(args, name) > 0 and math.isfinite(getattr(args, name))):
            parser.error(f"--{name.replace('_', '-')} must be a positive number, got {getattr(args, name)}")
    if any(not (r > 0 and math.isfinite(r)) for r in args.sweep):
        parser.error(f"--sweep values must be positive numbers, got {args.sweep}")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    started = time.time()
    rows = []
    configs = {(m, getattr(args, a) if a else None) for m, (_, a) in METHODS.items()}
    configs |= {(m, rho) for m in ("n-SAM", "1-SAM") for rho in args.sweep}
    runs_total = len(configs) * len(args.seeds)
    done = 0
    finished: dict[tuple[str, float | None], list[dict[str, float]]] = {}  # the sweep reuses the main runs

    def run_all(method: str, rho: float | None, tag: str) -> list[dict[str, float]]:
        nonlocal done
        if (method, rho) in finished:
            return finished[(method, rho)]
        runs = finished[(method, rho)] = []
        for seed in args.seeds:
            done += 1
            run = train(method, rho, seed, args, version=f"{tag}seed{seed}")
            print(
                f"[{done}/{runs_total}] {method} rho={rho} seed {seed}: test loss {run['test_loss']:.3g}, "
                f"nonzeros {run['nonzeros']}, train loss {run['train_loss']:.2g}, {run['seconds']:.1f} s",
                flush=True,
            )
            runs.append(run)
        return runs

    for method, (_, rho_arg) in METHODS.items():
        rho = getattr(args, rho_arg) if rho_arg else None
        rows.append(summary_row(method, rho, run_all(method, rho, "")))
    for method in ("n-SAM", "1-SAM"):
        for rho in args.sweep:
            rows.append(summary_row(f"{method} (sweep)", rho, run_all(method, rho, f"rho{rho:g}-")))
    notes = [
        f"Diagonal linear network f(x) = <x, u*v>, d = {args.d}, n = {args.n} training examples x ~ N(0, I), "
        f"noiseless labels of a {args.k}-sparse target (entries ±1), init u = {args.alpha:g}·1, v = 0; full-batch "
        f"gradient descent, lr {args.lr:g}, {args.steps} steps, mean squared error; the SAM radius decays linearly "
        f"from rho to 0 over training (`LinearRho`); seeds {args.seeds} (data and "
        f"support change with the seed). Test loss: MSE on 2000 fresh examples; nonzeros: entries of u*v above "
        f"{args.threshold:g} in magnitude; support recovered: those are exactly the target's support (seeds out "
        f"of all); tr(H): Hutch++ trace of the training loss's Hessian at the end. Mean ± std over seeds. "
        f"1-SAM is `SAM(m=1)`, n-SAM `SAM()` on the full batch, USAM the unnormalized ascent. The paper's "
        f"sizes are larger; this is scaled to a few minutes on 2 CPU cores.",
    ]
    return report(
        "diagonal_networks_msam",
        "1-SAM vs n-SAM vs ERM, diagonal linear network, sparse regression",
        HEADER,
        rows,
        started,
        notes,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
