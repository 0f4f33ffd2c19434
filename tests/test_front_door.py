"""What a newcomer meets first: the extras the examples need, and SAM's progress-bar option."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

from lightning_sharpness import SAM
from tests.helpers import Classifier, classification_data, loader, mlp, trainer

ROOT = Path(__file__).resolve().parents[1]


def _extra(name: str) -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in cfg["options.extras_require"][name].splitlines()]
    return {re.split(r"[<>=\[ ]", line)[0] for line in lines if line and not line.startswith("#")}


def test_examples_extra_installs_what_the_examples_import():
    # examples/cli.py runs LightningCLI, which needs jsonargparse with its signatures extra
    assert "jsonargparse" in _extra("examples")
    cfg = (ROOT / "setup.cfg").read_text()
    assert re.search(r"examples =(\n    .*)*\n    jsonargparse\[signatures\]", cfg)


def test_prog_bar_shows_the_sharpness_gap_at_every_step():
    x, y = classification_data()
    t = trainer(max_steps=3, log_every_n_steps=50, callbacks=[SAM(rho=0.05, prog_bar=True)])
    t.fit(Classifier(mlp()), loader(x, y))
    assert "sam/sharpness_gap" in t.progress_bar_metrics
    assert t.progress_bar_metrics["sam/sharpness_gap"] > 0
