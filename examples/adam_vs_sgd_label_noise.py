"""Adam vs SGD with label noise on a diagonal linear network (*Adam Reduces a Unique Form of Sharpness:
Theoretical Insights Near the Minimizer Manifold*, 2025).

Near the manifold of interpolators, label-noise SGD drifts so as to minimize tr(H), while Adam drifts so as to
minimize tr(diag(H)^1/2). On sparse regression with f(x) = <x, u * v> the first is (a weighted) l1 norm of the
predictor u * v and the second an l1/2 quasi-norm, so the paper's claim is: SGD drives tr(H) down, Adam drives
tr(diag(H)^1/2) down and ends sparser, with a lower test loss. Both optimizers train the same network on the
same data from the same initialization, with fresh Gaussian noise on the labels at every full-batch step; the
``SharpnessMonitor`` measures both sharpness forms (exactly: every Hessian-vector product of a 2d-parameter
model) on the clean training loss along the way.

python examples/adam_vs_sgd_label_noise.py            # the full run (minutes): docs/results/adam_vs_sgd_label_noise.md
python examples/adam_vs_sgd_label_noise.py --quick    # seconds: docs/results/adam_vs_sgd_label_noise.quick.md
tensorboard --logdir lightning_logs/adam_vs_sgd_label_noise
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diagonal_networks_msam import (  # noqa: E402
    DiagonalNetwork,
    full_batch_loader,
    make_trainer,
    mse,
    nonzeros,
    sparse_regression,
    support_recovered,
)
from results import mean_spread, report  # noqa: E402

from lightning_sharpness import SharpnessMonitor  # noqa: E402

TRACE, DIAG_SQRT = "hessian_trace", "diag_sqrt_trace"


def train(optimizer: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """One run; returns the final sparsity and losses and the monitor's curve at start, middle and end."""
    pl.seed_everything(seed, workers=True)
    data = sparse_regression(args.n, args.d, args.k, seed)
    params = 2 * args.d
    monitor = SharpnessMonitor(
        measures=[
            # Hutch++ with a sketch as wide as the parameter count is exact; so is the diagonal with one
            # product per parameter: no estimation noise on these curves.
            {"name": TRACE, "method": "hutch++", "matvecs": 3 * params},  # a full-width sketch: exact
            {"name": DIAG_SQRT, "exact": True},
        ],
        every_n_steps=max(1, args.steps // args.measurements),
        probe_batches=1,  # the whole (clean) training set
        loss_fn=mse,  # the clean loss: the label noise is drawn inside training_step only
        max_overhead=None,
    )
    logger = TensorBoardLogger(args.log_dir, name=optimizer, version=f"seed{seed}")
    trainer = make_trainer(args.steps, [monitor], logger, log_every=max(1, args.steps // 200))
    lr = args.sgd_lr if optimizer == "sgd" else args.adam_lr
    model = DiagonalNetwork(args.d, args.alpha, lr, optimizer=optimizer, label_noise=args.label_noise)
    start = time.perf_counter()
    trainer.fit(model, full_batch_loader(data.x_train, data.y_train, args.steps))
    seconds = time.perf_counter() - start
    test_loader = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=len(data.y_test))
    test = trainer.test(model, test_loader, verbose=False)[0]
    with torch.no_grad():
        train_loss = float(mse(model, (data.x_train, data.y_train)))
    curve = [(step, values) for step, values in monitor.history if TRACE in values and DIAG_SQRT in values]
    first, middle, last = curve[0][1], curve[len(curve) // 2][1], curve[-1][1]
    beta = model.beta
    result = {
        "trace_start": first[TRACE],
        "trace_middle": middle[TRACE],
        "trace_end": last[TRACE],
        "dsq_start": first[DIAG_SQRT],
        "dsq_middle": middle[DIAG_SQRT],
        "dsq_end": last[DIAG_SQRT],
        "middle_step": curve[len(curve) // 2][0],
        "test_loss": test["test/loss"],
        "train_loss": train_loss,
        "nonzeros": nonzeros(beta, args.threshold),
        "recovered": float(support_recovered(beta, data.support, args.threshold)),
        "seconds": seconds,
    }
    logger.log_metrics({f"final/{k}": v for k, v in result.items()}, step=trainer.global_step)
    logger.experiment.flush()
    return result


HEADER = [
    "optimizer",
    "tr(H): start → middle → end",
    "tr(diag(H)^1/2): start → middle → end",
    "nonzeros of u*v",
    "support recovered",
    "test loss",
    "train loss (clean)",
]


def summary_row(optimizer: str, runs: Sequence[dict[str, float]]) -> list[object]:
    col = lambda key: [r[key] for r in runs]  # noqa: E731
    curve = lambda prefix: " → ".join(mean_spread(col(f"{prefix}_{at}")) for at in ("start", "middle", "end"))  # noqa: E731
    return [
        {"sgd": "SGD", "adam": "Adam"}[optimizer],
        curve("trace"),
        curve("dsq"),
        mean_spread(col("nonzeros")),
        f"{sum(col('recovered')):.0f}/{len(runs)}",
        mean_spread(col("test_loss")),
        mean_spread(col("train_loss")),
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16, help="training examples")
    parser.add_argument("--d", type=int, default=50, help="dimension")
    parser.add_argument("--k", type=int, default=3, help="nonzeros of the target")
    parser.add_argument("--alpha", type=float, default=0.5, help="initialization scale")
    parser.add_argument("--label-noise", type=float, default=1.0, help="std of the fresh label noise per step")
    parser.add_argument("--sgd-lr", type=float, default=0.08)
    parser.add_argument("--adam-lr", type=float, default=0.02)
    parser.add_argument("--steps", type=int, default=8000, help="full-batch steps")
    parser.add_argument("--measurements", type=int, default=10, help="monitor measurements over training")
    parser.add_argument("--threshold", type=float, default=0.01, help="|u*v| above this counts as nonzero")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--log-dir", default="lightning_logs/adam_vs_sgd_label_noise")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds (for the tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.d, args.k, args.steps, args.measurements, args.seeds = 8, 16, 2, 60, 3, [0]
    for name in ("n", "d", "k", "steps", "measurements"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.n >= args.d:
        parser.error(f"--n must be below --d (an underdetermined problem), got n={args.n}, d={args.d}")
    for name in ("alpha", "label_noise", "sgd_lr", "adam_lr", "threshold"):
        if not (getattr(args, name) > 0 and math.isfinite(getattr(args, name))):
            parser.error(f"--{name.replace('_', '-')} must be a positive number, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    started = time.time()
    results: dict[str, list[dict[str, float]]] = {"sgd": [], "adam": []}
    total, done = 2 * len(args.seeds), 0
    for seed in args.seeds:
        for optimizer in results:
            done += 1
            run = train(optimizer, seed, args)
            results[optimizer].append(run)
            print(
                f"[{done}/{total}] {optimizer} seed {seed}: tr(H) {run['trace_start']:.3g} -> {run['trace_end']:.3g}, "
                f"tr(diag(H)^1/2) {run['dsq_start']:.3g} -> {run['dsq_end']:.3g}, nonzeros {run['nonzeros']}, "
                f"test loss {run['test_loss']:.3g}, {run['seconds']:.1f} s",
                flush=True,
            )
    rows = [summary_row(optimizer, runs) for optimizer, runs in results.items()]
    sgd, adam = results["sgd"], results["adam"]
    pairs = list(zip(sgd, adam))
    notes = [
        f"Per seed (same data and initialization for both): SGD ends with the lower tr(H) in "
        f"{sum(s['trace_end'] < a['trace_end'] for s, a in pairs)}/{len(pairs)} seeds; Adam ends with the lower "
        f"tr(diag(H)^1/2) in {sum(a['dsq_end'] < s['dsq_end'] for s, a in pairs)}/{len(pairs)}, with fewer nonzeros "
        f"in {sum(a['nonzeros'] < s['nonzeros'] for s, a in pairs)}/{len(pairs)} and with the lower test loss in "
        f"{sum(a['test_loss'] < s['test_loss'] for s, a in pairs)}/{len(pairs)}.",
        "",
        f"Diagonal linear network f(x) = <x, u*v>, d = {args.d}, n = {args.n} training examples x ~ N(0, I), labels "
        f"of a {args.k}-sparse target (entries ±1), init u = {args.alpha:g}·1, v = 0, mean squared error; every "
        f"full-batch step draws fresh label noise N(0, {args.label_noise:g}²). SGD: lr {args.sgd_lr:g}; Adam: lr "
        f"{args.adam_lr:g}, betas (0.9, 0.999); {args.steps} steps each; seeds {args.seeds}. `SharpnessMonitor` "
        f"measures tr(H) (Hutch++ with a full-width sketch: exact) and tr(diag(H)^1/2) (exact diagonal) of the "
        f"clean training loss at step 0, every {max(1, args.steps // args.measurements)} steps and at the end; "
        f"middle = its measurement at step {sgd[0]['middle_step']}. Nonzeros: entries of u*v above "
        f"{args.threshold:g}; support recovered: those are exactly the target's support. Test loss: MSE on 2000 "
        f"fresh examples. Mean ± std over seeds. Scaled down from the paper to minutes on 2 CPU cores.",
    ]
    return report(
        "adam_vs_sgd_label_noise",
        "Adam vs SGD with label noise, diagonal linear network, sparse regression",
        HEADER,
        rows,
        started,
        notes,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
