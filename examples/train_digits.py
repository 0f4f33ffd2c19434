"""The main job: ERM and SAM side by side on scikit-learn's digits, TensorBoard logs under lightning_logs/.

python examples/train_digits.py            # about a minute on 2 CPU cores
tensorboard --logdir lightning_logs        # then open http://localhost:6006
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import DigitsClassifier, DigitsDataModule  # noqa: E402

from lightning_sharpness import DEFAULT_MEASURES, SAM, SharpnessMonitor, log_density, measures  # noqa: E402


def train(method: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    pl.seed_everything(seed, workers=True)
    # The monitor at its defaults: top Hessian eigenvalue and Hutchinson trace on a fixed probe set, every epoch
    # within a 5% time budget (on these few-second runs that is one or two measurements), and at the end.
    monitor = None
    if args.measure_every:  # a denser picture: every n epochs, with the Hessian density, no time budget
        density = {"name": "spectral_density", "probes": 2, "steps": 20}
        monitor = SharpnessMonitor([*DEFAULT_MEASURES, density], every_n_epochs=args.measure_every, max_overhead=None)
    elif args.monitor:
        monitor = SharpnessMonitor()
    callbacks = [cb for cb in (monitor, SAM(rho=args.rho) if method == "sam" else None) if cb is not None]
    logger = TensorBoardLogger(args.log_dir, name=method, version=f"seed{seed}")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=args.progress,
        deterministic=True,
    )
    data = DigitsDataModule(batch_size=args.batch_size, label_noise=args.label_noise, seed=seed)
    model = DigitsClassifier(lr=args.lr)
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    test = trainer.test(model, data, verbose=False)[0]
    sharpness = final_sharpness(model, data, logger, trainer.global_step)
    measuring = monitor.seconds_measuring if monitor else 0.0  # its measurements and its cost forecast
    return {
        "test_acc": test["test/acc"],
        "test_loss": test["test/loss"],
        "seconds": seconds,
        "monitor_share": measuring / seconds,
        **sharpness,
    }


def final_sharpness(
    model: DigitsClassifier, data: DigitsDataModule, logger: TensorBoardLogger, step: int
) -> dict[str, float]:
    """Top Hessian eigenvalue and trace of the training loss at the final weights, on 512 training examples,
    and the eigenvalue density on 256 of them: logged under ``final/`` at the last step and returned. (The
    monitor's curves may skip late points to stay within its time budget; these always exist.)"""
    x, y = data.train_set.tensors
    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 512, 128)]

    def loss_fn(net, batch):
        return F.cross_entropy(net(batch[0]), batch[1])

    values = {
        "top_eigenvalue": float(measures.hessian_eigenvalues(model, loss_fn, batches, tol=1e-3)),
        "trace": float(measures.hessian_trace(model, loss_fn, batches)),
    }
    density = measures.spectral_density(model, loss_fn, batches[:2], probes=2, steps=20)
    logger.log_metrics({f"final/{k}": v for k, v in values.items()}, step=step)
    log_density(logger.experiment, "final/spectral_density", density, step)
    logger.experiment.flush()
    return values


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--label-noise", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--log-dir", default="lightning_logs")
    parser.add_argument("--methods", nargs="+", default=["erm", "sam"], choices=["erm", "sam"])
    parser.add_argument("--progress", action="store_true", help="show Lightning's progress bar inside each run")
    parser.add_argument("--no-monitor", dest="monitor", action="store_false", help="train without SharpnessMonitor")
    parser.add_argument(
        "--measure-every",
        type=int,
        default=None,
        metavar="N",
        help="instead of the monitor's defaults, measure every N epochs with the Hessian density, without budget",
    )
    args = parser.parse_args(argv)

    runs = [(method, seed) for method in args.methods for seed in args.seeds]
    results: dict[str, list[dict[str, float]]] = {method: [] for method in args.methods}
    for i, (method, seed) in enumerate(runs, 1):
        # one line per run; with the progress bar the bar gets the rest of the line
        end = "\n" if args.progress else " "
        print(f"[{i}/{len(runs)}] {method} seed {seed}: training {args.epochs} epochs ...", end=end, flush=True)
        run = train(method, seed, args)
        print(f"test acc {run['test_acc']:.4f}, {run['seconds']:.1f} s", flush=True)
        results[method].append(run)
    print(f"\nTest set of digits, {args.label_noise:.0%} training label noise, seeds {args.seeds}:")
    print(
        f"{'method':<8}{'test acc (mean +- std)':>24}{'test loss':>11}{'top eig':>9}{'tr(H)':>9}"
        f"{'s / run':>9}{'monitor':>9}"
    )
    for method, runs in results.items():
        acc = torch.tensor([r["test_acc"] for r in runs])
        loss = torch.tensor([r["test_loss"] for r in runs])
        eig = sum(r["top_eigenvalue"] for r in runs) / len(runs)
        trace = sum(r["trace"] for r in runs) / len(runs)
        secs = sum(r["seconds"] for r in runs) / len(runs)
        share = sum(r["monitor_share"] for r in runs) / len(runs)
        std = acc.std().item() if len(runs) > 1 else 0.0
        print(
            f"{method:<8}{acc.mean().item():>16.4f} +- {std:.4f}{loss.mean().item():>11.4f}"
            f"{eig:>9.2f}{trace:>9.1f}{secs:>9.1f}{share:>9.1%}"
        )
    print("(top eig, tr(H): Hessian of the training loss at the final weights, 512 training examples;")
    print(" monitor: share of the training time the SharpnessMonitor spent measuring)")
    print(f"\nTensorBoard logs in {args.log_dir}/: tensorboard --logdir {args.log_dir}")
    return results


if __name__ == "__main__":
    main()
