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
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import DigitsClassifier, DigitsDataModule  # noqa: E402

from lightning_sharpness import SAM  # noqa: E402


def train(method: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    pl.seed_everything(seed, workers=True)
    callbacks = [SAM(rho=args.rho)] if method == "sam" else []
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        callbacks=callbacks,
        logger=TensorBoardLogger(args.log_dir, name=method, version=f"seed{seed}"),
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
    return {"test_acc": test["test/acc"], "test_loss": test["test/loss"], "seconds": seconds}


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
    parser.add_argument("--progress", action="store_true", help="show the progress bar")
    args = parser.parse_args(argv)

    results = {method: [train(method, seed, args) for seed in args.seeds] for method in args.methods}
    print(f"\nTest set of digits, {args.label_noise:.0%} training label noise, seeds {args.seeds}:")
    print(f"{'method':<8}{'test acc (mean +- std)':>24}{'test loss':>11}{'s / run':>9}")
    for method, runs in results.items():
        acc = torch.tensor([r["test_acc"] for r in runs])
        loss = torch.tensor([r["test_loss"] for r in runs])
        secs = sum(r["seconds"] for r in runs) / len(runs)
        std = acc.std().item() if len(runs) > 1 else 0.0
        print(f"{method:<8}{acc.mean().item():>16.4f} +- {std:.4f}{loss.mean().item():>11.4f}{secs:>9.1f}")
    print(f"\nTensorBoard logs in {args.log_dir}/: tensorboard --logdir {args.log_dir}")
    return results


if __name__ == "__main__":
    main()
