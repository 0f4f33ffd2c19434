"""The SAM family configured through LightningCLI (examples/cli.py): from examples/sam_family.yaml and from
command-line flags."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lightning_sharpness.sam.family import GSAM, WSAM, FriendlySAM, LookSAM
from lightning_sharpness.sam.rsam import RSAM
from lightning_sharpness.sam.schedules import ProportionalRho
from lightning_sharpness.sam.variants import SurrogateGap

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from cli import main  # noqa: E402

# No validation (and so no sanity check): what these tests check is the SAM family's configuration and training.
SHORT_RUN = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def test_fit_from_the_family_yaml(tmp_path):
    config = Path(__file__).resolve().parents[1] / "examples" / "sam_family.yaml"
    cli = main(["fit", f"--config={config}", f"--trainer.default_root_dir={tmp_path}", *SHORT_RUN])
    (gsam,) = [c for c in cli.trainer.callbacks if isinstance(c, GSAM)]
    rho, variant = gsam.engine.rho, gsam.engine.variant
    assert isinstance(rho, ProportionalRho) and (rho.rho_max, rho.rho_min, rho.lr_min) == (0.05, 0.01, 0.0)
    assert isinstance(variant, SurrogateGap) and variant.alpha == 0.4 and gsam.engine.mode == "local"
    assert cli.trainer.global_step == 3
    # the radius followed the model's cosine LR: lr_max is its peak, and after the 3 steps of T_max=3 the LR is 0
    assert rho.lr_max == cli.model.hparams.lr == 0.05
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert rho(0) == pytest.approx(0.01)


@pytest.mark.parametrize(
    "cls, flags, check",
    [
        (GSAM, ["rho_max=0.1", "rho_min=0.02", "alpha=0.3"], lambda c: isinstance(c.engine.rho, ProportionalRho)),
        (WSAM, ["rho=0.1", "gamma=0.8", "decouple=false"], lambda c: c.engine.variant.decouple is False),
        (FriendlySAM, ["sigma=0.5", "lmbda=0.7"], lambda c: c.engine.variant.lmbda == 0.7),
        (LookSAM, ["k=2", "alpha=0.5", "mode=global"], lambda c: c.engine.variant.k == 2),
        (RSAM, ["alpha=1.2", "gamma=0.2", "regularize=both"], lambda c: c.engine.variant.regularize == "both"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_family_from_command_line_flags(tmp_path, cls, flags, check):
    cli = main(
        [
            "fit",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.callbacks={cls.__module__}.{cls.__name__}",
            *[f"--trainer.callbacks.{f}" for f in flags],
            *SHORT_RUN,
        ]
    )
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, cls)]
    assert check(callback)
    assert cli.trainer.global_step == 3


def test_bad_family_value_is_reported_before_training(tmp_path, capsys):
    with pytest.raises((SystemExit, ValueError)) as failure:
        main(
            [
                "fit",
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.callbacks=lightning_sharpness.sam.family.LookSAM",
                "--trainer.callbacks.k=0",
                *SHORT_RUN,
            ]
        )
    assert "`k` must be an int >= 1, got 0." in str(failure.value) + capsys.readouterr().err
