"""What every reproduction script shares: mean and spread over seeds, rank correlation, and the results table
printed to the terminal and written as Markdown under ``docs/results/`` (the README includes those files, so
no number in it is typed by hand)."""

from __future__ import annotations

import math
import platform
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent.parent / "docs" / "results"


def mean_spread(values: Sequence[float]) -> str:
    """``mean ± std`` (sample std over seeds; ``± 0`` for a single run), with 4 significant digits."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{mean:.4g} ± {std:.2g}"


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b rank correlation of two sequences (ties counted as in scipy's ``kendalltau``)."""
    from scipy.stats import kendalltau

    return float(kendalltau(list(x), list(y)).statistic)


def bootstrap_tau(x: Sequence[float], y: Sequence[float], resamples: int, seed: int = 0) -> tuple[float, float]:
    """Kendall's tau of ``x`` and ``y`` and its standard deviation over bootstrap resamples of the pairs
    (resamples where one side is constant, whose tau is undefined, are skipped)."""
    import random

    tau = kendall_tau(x, y)
    rng = random.Random(seed)
    taus = []
    for _ in range(resamples):
        idx = [rng.randrange(len(x)) for _ in x]
        xs, ys = [x[i] for i in idx], [y[i] for i in idx]
        if len(set(xs)) > 1 and len(set(ys)) > 1:
            taus.append(kendall_tau(xs, ys))
    mean = sum(taus) / len(taus)
    std = (sum((t - mean) ** 2 for t in taus) / max(1, len(taus) - 1)) ** 0.5
    return tau, std


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; floats keep 4 significant digits."""

    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(
    name: str,
    title: str,
    header: Sequence[str],
    rows: Sequence[Sequence[object]],
    started: float,
    notes: Sequence[str] = (),
    quick: bool = False,
) -> str:
    """Print the table and write it to ``docs/results/<name>.md`` with the command that made it and its wall
    time (``--quick`` runs write ``<name>.quick.md``, so that a test never overwrites a full run's table)."""
    seconds = time.time() - started
    command = "python examples/" + Path(sys.argv[0]).name + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    text = "\n".join(
        [
            f"**{title}**",
            "",
            markdown_table(header, rows),
            "",
            *notes,
            *([""] if notes else []),
            f"Made by `{command}` in {seconds / 60:.1f} min on {_machine()}.",
            "",
        ]
    )
    print("\n" + text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / (f"{name}.quick.md" if quick else f"{name}.md")
    path.write_text(text)
    print(f"(written to {path})")
    return text


README = RESULTS_DIR.parent.parent / "README.md"
_BLOCK = re.compile(r"(<!-- results/(?P<name>[\w.-]+\.md) -->\n)(?P<body>.*?)(<!-- end results/(?P=name) -->)", re.S)


def splice_readme(readme: Path = README) -> list[str]:
    """Copy every ``docs/results/<name>.md`` into README.md between ``<!-- results/<name>.md -->`` and
    ``<!-- end results/<name>.md -->``, so the README shows exactly what the scripts wrote; returns the names.

    Raises:
        FileNotFoundError: a marker names a results file that no script has written.
    """
    names: list[str] = []

    def fill(match: re.Match) -> str:
        names.append(match["name"])
        body = (RESULTS_DIR / match["name"]).read_text().rstrip("\n") + "\n"
        return match.group(1) + body + match.group(4)

    text = _BLOCK.sub(fill, readme.read_text())
    readme.write_text(text)
    return names


def readme_blocks(readme: Path = README) -> dict[str, str]:
    """The results blocks README.md holds now, by file name (what :func:`splice_readme` wrote)."""
    return {m["name"]: m["body"] for m in _BLOCK.finditer(readme.read_text())}


def _machine() -> str:
    import os

    import torch

    threads = torch.get_num_threads()
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, {threads} threads"


if __name__ == "__main__":
    # python examples/results.py: refresh README.md's results blocks from docs/results/ after a full run.
    print("README.md now shows:", ", ".join(splice_readme()))
