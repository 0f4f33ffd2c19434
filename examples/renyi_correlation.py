"""Renyi sharpness vs generalization: which sharpness measure ranks a family of CNNs by their generalization gap?

*Renyi Sharpness: A Novel Sharpness that Strongly Correlates with Generalization* (Zhang, Sun, Zhang, Liu; seed
000) defines Renyi sharpness as the negative Renyi entropy of the normalized Hessian spectrum (higher: a more
uneven, sharper spectrum) and reports a strong Kendall rank correlation with generalization (tau about 0.6-0.9)
where the trace of the Hessian correlates weakly. This script trains a family of digits CNNs (scikit-learn's
digits, shipped; the CNN with BatchNorm of ``digits.py``) with hyperparameters drawn per model (learning rate,
width, weight decay, batch size; training label noise too if ``--label-noises`` lists several levels, off by
default so that the gap is generalization, not the noise the model could not fit), measures each at its final
weights on training examples:

- Renyi sharpness (``measures.renyi_sharpness``, alpha = 2: ``log(||H||_F^2 / tr(H)^2)``),
- tr(H) (``measures.hessian_trace``), the top eigenvalue (``measures.hessian_eigenvalues``),
- adaptive worst-case sharpness (``measures.worst_case_sharpness(geometry="adaptive")``),

and prints Kendall's tau of each with the generalization gap (train accuracy - accuracy on the held-out
validation and test splits), with its spread over bootstrap resamples of the models.

python examples/renyi_correlation.py           # the full run (about 8 minutes on 2 CPU cores)
python examples/renyi_correlation.py --quick   # seconds: tiny sizes, checks the pipeline only
tensorboard --logdir lightning_logs/renyi_correlation
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import DigitsClassifier, DigitsDataModule  # noqa: E402
from results import bootstrap_tau, report  # noqa: E402

from lightning_sharpness import measures  # noqa: E402

NAME = "renyi_correlation"
MEASURES = {
    "renyi": "Renyi sharpness (alpha = 2)",
    "trace": "tr(H)",
    "top_eigenvalue": "top Hessian eigenvalue",
    "worst_case": "adaptive worst-case sharpness",
}


@dataclass
class Config:
    lr: float
    width: int
    weight_decay: float
    batch_size: int
    label_noise: float
    seed: int


def family(args: argparse.Namespace) -> list[Config]:
    """``args.models`` configurations drawn from the grids with a fixed seed (the same family every run)."""
    rng = random.Random(args.family_seed)
    return [
        Config(
            lr=rng.choice(args.lrs),
            width=rng.choice(args.widths),
            weight_decay=rng.choice(args.weight_decays),
            batch_size=rng.choice(args.batch_sizes),
            label_noise=rng.choice(args.label_noises),
            seed=i,
        )
        for i in range(args.models)
    ]


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def train_and_measure(config: Config, args: argparse.Namespace) -> dict[str, float]:
    pl.seed_everything(config.seed, workers=True)
    logger = TensorBoardLogger(args.log_dir, name="cnn", version=f"model{config.seed}")
    logger.log_hyperparams(asdict(config))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        limit_train_batches=args.limit_train_batches,
        logger=logger,
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        deterministic=True,
    )
    data = DigitsDataModule(batch_size=config.batch_size, label_noise=config.label_noise, seed=config.seed)
    model = DigitsClassifier(width=config.width, lr=config.lr, weight_decay=config.weight_decay)
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start

    x, y = data.train_set.tensors  # the labels the model was trained on (noisy where label_noise > 0)
    train_acc = accuracy(model, x, y)
    # The held-out set is the validation and test splits together (597 examples): with the 297 of the test split
    # alone one example is 0.34% of accuracy, the size of the differences between the gaps being ranked.
    held_out = [torch.cat(parts) for parts in zip(data.val_set.tensors, data.test_set.tensors)]
    test_acc = accuracy(model, *held_out)
    n = args.probe_examples
    probe = [(x[i : min(i + 128, n)], y[i : min(i + 128, n)]) for i in range(0, n, 128)]

    def loss_fn(net, batch):
        return F.cross_entropy(net(batch[0]), batch[1])

    start = time.perf_counter()
    values = {
        "renyi": float(measures.renyi_sharpness(model, loss_fn, probe, alpha=2, matvecs=args.matvecs)),
        "trace": float(measures.hessian_trace(model, loss_fn, probe, matvecs=args.matvecs, method="hutch++")),
        "top_eigenvalue": float(measures.hessian_eigenvalues(model, loss_fn, probe, tol=1e-3)),
        "worst_case": float(
            measures.worst_case_sharpness(model, loss_fn, probe, rho=args.rho, geometry="adaptive", steps=args.steps)
        ),
    }
    measuring = time.perf_counter() - start
    row = {"train_acc": train_acc, "test_acc": test_acc, "gap": train_acc - test_acc, **values}
    logger.log_metrics({f"final/{k}": v for k, v in row.items()}, trainer.global_step)
    logger.experiment.flush()
    return {**row, "seconds": seconds, "measuring": measuring}


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--weight-decays", type=float, nargs="+", default=[0.0, 5e-4, 5e-3])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--label-noises", type=float, nargs="+", default=[0.0])
    parser.add_argument("--rho", type=float, default=0.1, help="radius of the adaptive l2 ball")
    parser.add_argument("--steps", type=int, default=20, help="ascent steps of the worst-case sharpness")
    parser.add_argument("--matvecs", type=int, default=50, help="Hessian-vector products of Renyi and the trace")
    parser.add_argument("--probe-examples", type=int, default=256, help="training examples the measures use")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for tau's spread")
    parser.add_argument("--family-seed", type=int, default=0)
    parser.add_argument("--log-dir", default=f"lightning_logs/{NAME}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline in a few seconds")
    args = parser.parse_args(argv)
    args.limit_train_batches = 1.0
    if args.quick:
        # Trained a little (an untrained network's Hessian is indefinite and a few probes may estimate its trace
        # below zero, where Renyi sharpness has nothing to normalize), measured cheaply.
        args.models, args.epochs, args.widths, args.limit_train_batches = 4, 2, [4], 5
        args.steps, args.matvecs, args.probe_examples, args.bootstrap = 2, 20, 128, 50
    if args.models < 3:
        parser.error(f"--models must be at least 3 for a rank correlation, got {args.models}")
    if not 0 < args.probe_examples <= 1200:
        parser.error(f"--probe-examples must be in 1..1200 (the training set), got {args.probe_examples}")

    started = time.time()
    results = []
    for i, config in enumerate(family(args), 1):
        print(f"[{i}/{args.models}] {config} ...", end=" ", flush=True)
        r = train_and_measure(config, args)
        print(
            f"gap {r['gap']:.3f} (train {r['train_acc']:.3f}, test {r['test_acc']:.3f}), Renyi {r['renyi']:.3f}, "
            f"tr(H) {r['trace']:.4g}, top {r['top_eigenvalue']:.4g}, worst-case {r['worst_case']:.4g}; "
            f"{r['seconds']:.1f} s + {r['measuring']:.1f} s",
            flush=True,
        )
        results.append(r)

    header = ["measure", f"Kendall tau with the gap ({len(results)} models)"]
    rows = []
    for key, label in MEASURES.items():
        tau, std = bootstrap_tau([r[key] for r in results], [r["gap"] for r in results], args.bootstrap)
        rows.append([label, f"{tau:+.2f} ± {std:.2f}"])
    gaps = [r["gap"] for r in results]
    noise = f"training label noise {args.label_noises}"
    notes = [
        "Kendall's tau-b of each measure with the generalization gap (train accuracy on the training labels - "
        "accuracy on the 597 held-out examples, validation and test splits together) "
        f"over {len(results)} digits CNNs (BatchNorm), ± its std over {args.bootstrap} bootstrap resamples of the "
        f"models. Per model, drawn from: lr {args.lrs}, width {args.widths}, weight decay {args.weight_decays}, "
        f"batch {args.batch_sizes}, {noise}; SGD + momentum 0.9, cosine schedule, {args.epochs} epochs. "
        f"Gaps range {min(gaps):.3f} to {max(gaps):.3f}.",
        "",
        f"Measures at the final weights on the first {args.probe_examples} training examples (their training "
        f"labels): Renyi sharpness log(||H||_F^2 / tr(H)^2) and tr(H) from {args.matvecs} Hutchinson / Hutch++ "
        f"products, the top eigenvalue by Lanczos, adaptive worst-case sharpness over the l2 ball of radius "
        f"{args.rho} (|w| + 0.01), {args.steps} ascent steps, best of 10 starts.",
    ]
    report(
        NAME,
        "Renyi sharpness and other measures vs the generalization gap of digits CNNs",
        header,
        rows,
        started,
        notes,
        quick=args.quick,
    )
    print(f"TensorBoard logs in {args.log_dir}/: tensorboard --logdir {args.log_dir}")
    return rows


if __name__ == "__main__":
    main()
