"""The reproduction scripts of issue 13, part a (1-SAM vs n-SAM on diagonal networks, Adam vs SGD with label
noise, ERM then SAM) run end to end in ``--quick`` mode from a foreign working directory: each prints and writes
its results table with the expected rows and only finite numbers, and logs to TensorBoard under --log-dir.
These check the plumbing, not the scientific outcome (that is the full runs' job, docs/results/*.md)."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RESULTS = EXAMPLES.parent / "docs" / "results"
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?|nan|inf", re.IGNORECASE)


def load(script: str):
    """Import ``examples/<script>.py`` as a module (the examples folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_examples_{script}", EXAMPLES / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the (first) Markdown table in ``text``, as lists of cells."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, f"no table in:\n{text}"
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def numbers(cells: list[str]) -> list[float]:
    found = [float(token) for cell in cells for token in NUMBER.findall(cell)]
    assert found, f"no numbers in {cells}"
    return found


def run_quick(script: str, tmp_path: Path, monkeypatch) -> tuple[str, list[list[str]]]:
    """``main([--quick, --log-dir ...])`` with the working directory in an empty temporary folder; checks the
    returned table is the written one and that TensorBoard event files exist, returns the text and rows."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    logs = tmp_path / "logs"
    text = load(script).main(["--quick", "--log-dir", str(logs)])
    assert (RESULTS / f"{script}.quick.md").read_text() == text
    assert list(logs.rglob("events.out.tfevents.*")), "no TensorBoard logs written"
    assert not (work / "lightning_logs").exists(), "logged outside --log-dir"
    return text, table_rows(text)


def assert_finite(rows: list[list[str]], skip_columns: int = 1) -> None:
    for row in rows:
        values = numbers(row[skip_columns:])
        assert all(math.isfinite(v) for v in values), row


def test_diagonal_networks_msam_quick(tmp_path, monkeypatch):
    text, rows = run_quick("diagonal_networks_msam", tmp_path, monkeypatch)
    labels = [row[0] for row in rows]
    assert labels[:5] == ["ERM", "n-SAM", "1-SAM", "n-USAM", "1-USAM"]
    assert labels[5:] == ["n-SAM (sweep)", "1-SAM (sweep)"]  # --quick sweeps one radius
    assert_finite(rows)
    assert "Made by `python examples/" in text


def test_adam_vs_sgd_label_noise_quick(tmp_path, monkeypatch):
    text, rows = run_quick("adam_vs_sgd_label_noise", tmp_path, monkeypatch)
    assert [row[0] for row in rows] == ["SGD", "Adam"]
    assert_finite(rows)
    for row in rows:  # start -> middle -> end of each curve, the start shared by both optimizers
        assert row[1].count("→") == 2 and row[2].count("→") == 2
    assert rows[0][1].split("→")[0] == rows[1][1].split("→")[0]
    assert re.search(r"SGD ends with the lower tr\(H\) in [01]/1 seeds", text)


def test_erm_then_sam_quick(tmp_path, monkeypatch):
    text, rows = run_quick("erm_then_sam", tmp_path, monkeypatch)
    trainings = ["ERM throughout", "ERM → SAM at 50%", "SAM throughout"]
    assert [row[:2] for row in rows] == [[s, t] for s in ("cosine", "constant") for t in trainings]
    assert [row[2] for row in rows] == ["0", "1", "2"] * 2  # SAM epochs of 2
    assert_finite([[c for c in row if c != "n/a"] for row in rows], skip_columns=2)
    assert [row[8] for row in rows][::3] == ["1.00×", "1.00×"]  # each schedule's ERM is its own reference


@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [
        ("diagonal_networks_msam", ["--n", "60", "--d", "50"], "--n must be below --d"),
        ("diagonal_networks_msam", ["--rho", "-1"], "--rho must be a positive number"),
        ("adam_vs_sgd_label_noise", ["--label-noise", "0"], "--label-noise must be a positive number"),
        ("erm_then_sam", ["--switches", "1.0"], "--switches must lie strictly between 0 and 1"),
    ],
)
def test_bad_arguments_fail_before_training(script, argv, message, capsys):
    with pytest.raises(SystemExit):
        load(script).main(argv)
    assert message in capsys.readouterr().err


def test_support_and_switch_helpers():
    diag = load("diagonal_networks_msam")
    beta = torch.tensor([0.0, 1.2, -0.005, -0.9])
    support = torch.tensor([False, True, False, True])
    assert diag.nonzeros(beta, 0.01) == 2
    assert diag.support_recovered(beta, support, 0.01)
    assert not diag.support_recovered(beta, support, 0.001)  # the -0.005 entry now counts
    data = diag.sparse_regression(n=5, d=12, k=3, seed=1)
    assert int(data.support.sum()) == 3 and torch.allclose(data.y_train, data.x_train @ data.beta_star)
    with pytest.raises(ValueError, match="`k` must be"):
        diag.sparse_regression(n=5, d=12, k=13, seed=1)
    erm_then_sam = load("erm_then_sam")
    assert [erm_then_sam.switch_epoch(f, 30) for f in (None, 0.0, 0.5, 0.75, 0.9)] == [None, 0, 15, 22, 27]


def test_piecewise_schedule_of_the_paper_code():
    erm_then_sam = load("erm_then_sam")
    factors = [erm_then_sam.piecewise_factor(step, 100) for step in (0, 49, 50, 74, 75, 99)]
    assert factors == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    assert isinstance(erm_then_sam.make_classifier("piecewise", 0.05), erm_then_sam.PiecewiseDigitsClassifier)
    assert isinstance(erm_then_sam.make_classifier("constant", 0.05), erm_then_sam.ConstantDigitsClassifier)
    with pytest.raises(ValueError, match="`schedule` must be"):
        erm_then_sam.make_classifier("linear", 0.05)
