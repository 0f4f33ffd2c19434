"""Two-process (gloo, ``strategy="ddp"``) run of every part-B SAM variant: SSAM-F, SSAM-D, layer-wise and l-inf ASAM,
SAF, MESA, and RSAM's refusal. Launched by ``tests/test_sam_ssam.py::test_variants_under_ddp`` through
``tests.helpers.run_two_process_script``; each rank saves, per variant, its final weights, its masks / stored
logits, what it logged, and the error of the variants refused."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _main(out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import lightning.pytorch as pl

    from lightning_sharpness import SAM
    from lightning_sharpness.geometry_variants import LayerwiseAdaptiveGeometry, LinfAdaptiveGeometry
    from lightning_sharpness.sam.rsam import RSAM
    from lightning_sharpness.sam.saf import MESA, SAF
    from lightning_sharpness.sam.ssam import SSAMD, SSAMF
    from tests.helpers import (
        Classifier,
        IndexedClassifier,
        RecordingLogger,
        classification_data,
        indexed_loader,
        loader,
        mlp,
    )

    variants = {
        "ssamf": (lambda: SSAMF(rho=0.05, sparsity=0.5, num_samples=4, update_freq=2), False),
        "ssamd": (lambda: SSAMD(rho=0.05, sparsity=0.5, update_freq=2, seed=1), False),
        "layerwise": (lambda: SAM(rho=0.5, geometry=LayerwiseAdaptiveGeometry()), False),
        "linf": (lambda: SAM(rho=0.002, geometry=LinfAdaptiveGeometry()), False),
        "saf": (lambda: SAF(lmbda=0.5, tau=2.0, epochs_back=1), True),
        "mesa": (lambda: MESA(lmbda=0.5, tau=2.0, decay=0.8), True),
        "rsam": (lambda: RSAM(rho=0.05, gamma=0.5), False),
    }
    results = {}
    x, y = classification_data(n=32)
    for name, (make, indexed) in variants.items():
        callback, logger = make(), RecordingLogger()
        module = IndexedClassifier(mlp()) if indexed else Classifier(mlp())
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            max_epochs=3,
            logger=logger,
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[callback],
        )
        data = indexed_loader(x, y, batch_size=4) if indexed else loader(x, y, batch_size=4)
        entry: dict = {}
        try:
            trainer.fit(module, data)
        except ValueError as err:
            entry["error"] = str(err)
        entry["weights"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        entry["logged"] = logger.records
        if hasattr(callback, "masked"):
            entry["masks"] = {k: v.clone() for k, v in callback.masked.masks.items()}
        if isinstance(callback, SAF) and callback.stamps is not None:
            entry["stamps"] = callback.stamps.clone()
        results[name] = entry
        rank = trainer.global_rank
    torch.save(results, out / f"rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
