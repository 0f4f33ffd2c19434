"""SAM and its variants configured through LightningCLI: from a YAML file and from command-line flags."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lightning_sharpness import ASAM, SAM, LinearRho
from lightning_sharpness.geometry import AdaptiveGeometry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from cli import main  # noqa: E402

SHORT_RUN = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def sam_callbacks(cli):
    return [c for c in cli.trainer.callbacks if isinstance(c, SAM)]


def test_fit_from_the_example_yaml(tmp_path):
    config = Path(__file__).resolve().parents[1] / "examples" / "sam.yaml"
    cli = main(["fit", f"--config={config}", f"--trainer.default_root_dir={tmp_path}", *SHORT_RUN])
    (sam,) = sam_callbacks(cli)
    assert isinstance(sam.engine.rho, LinearRho) and sam.engine.rho.end == 0.05
    assert sam.engine.m == 16 and sam.start_epoch == 5
    assert cli.trainer.global_step == 3


def test_variant_from_command_line_flags(tmp_path):
    cli = main(
        [
            "fit",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks=lightning_sharpness.ASAM",
            "--trainer.callbacks.rho=0.3",
            "--trainer.callbacks.eta=0.0",
            "--trainer.callbacks.mode=global",
            *SHORT_RUN,
        ]
    )
    (asam,) = sam_callbacks(cli)
    assert isinstance(asam, ASAM) and isinstance(asam.engine.geometry, AdaptiveGeometry)
    assert asam.engine.rho == 0.3 and asam.engine.geometry.eta == 0.0 and asam.engine.mode == "global"
    assert cli.trainer.global_step == 3


def test_bad_value_in_yaml_is_reported_before_training(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_sharpness.SAM\n      init_args:\n        rho: -1\n"
    )
    # jsonargparse prints the parse error and exits, or raises it where it does not own the process
    with pytest.raises((SystemExit, ValueError)) as failure:
        main(["fit", f"--config={config}", f"--trainer.default_root_dir={tmp_path}", *SHORT_RUN])
    assert "`rho` must be a finite number >= 0, got -1.0." in str(failure.value) + capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))
