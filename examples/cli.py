"""LightningCLI entry point for the digits example: SAM and its variants configured from YAML or flags.

python examples/cli.py fit --config examples/sam.yaml
python examples/cli.py fit --config examples/sam.yaml --trainer.callbacks.rho=0.1
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import DigitsClassifier, DigitsDataModule  # noqa: E402


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(DigitsClassifier, DigitsDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
