"""benchmarks/measures.py: its ground-truth trace (the Gauss-Newton trace, equal to the Hessian's for networks whose
parameters each enter piecewise linearly) against dense Hessians, and the ``--quick`` run end to end (libraries that
are not installed are skipped by the script itself)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sharpness.curvature import HessianOperator

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_measures", BENCH / "measures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_measures", module)
    spec.loader.exec_module(module)
    return module


class TinyResidual(nn.Module):
    """Conv, eval-mode BatchNorm, ReLU, a residual sum, max-pooling, a linear head: each parameter enters the
    logits piecewise linearly. ``act=torch.tanh`` breaks that (a parameter inside a tanh enters nonlinearly)."""

    def __init__(self, act=F.relu) -> None:
        super().__init__()
        self.act = act
        self.conv1, self.bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 2 * 2, 4)

    def forward(self, x):
        h = self.act(self.bn(self.conv1(x)))
        h = self.act(h + self.conv2(h))
        return self.head(F.max_pool2d(h, 2).flatten(1))


def problem(act):
    torch.manual_seed(0)
    model = TinyResidual(act).double()
    g = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 2, 4, 4, generator=g, dtype=torch.float64))
    x = torch.randn(10, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (10,), generator=g)
    return model.eval(), x, y


def dense_trace(model, x, y) -> float:
    op = HessianOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y), chunk_size=64)
    return float(torch.trace(op.dense()))


def test_ground_truth_trace_is_the_hessian_trace_for_piecewise_linear_networks():
    bench = load_benchmark()
    model, x, y = problem(F.relu)
    assert bench.ggn_trace(model, x, y) == pytest.approx(dense_trace(model, x, y), rel=1e-10)
    # the identity needs the piecewise linearity: with tanh the traces differ
    model, x, y = problem(torch.tanh)
    assert bench.ggn_trace(model, x, y) != pytest.approx(dense_trace(model, x, y), rel=1e-3)


def test_benchmark_models_have_the_advertised_sizes():
    bench = load_benchmark()
    sizes = {}
    for name in ("cnn", "mlp", "resnet"):
        model = bench.MODELS[name]()[0]
        sizes[name] = sum(p.numel() for p in model.parameters())
        assert not model.training
    assert sizes == {"cnn": 4010, "mlp": 204810, "resnet": 954922}


@pytest.mark.slow
def test_quick_run_prints_and_writes_the_table(tmp_path, capsys):
    bench = load_benchmark()
    out = tmp_path / "table.md"
    bench.main(["--quick", "--out", str(out)])
    text = out.read_text()
    assert text.strip() == capsys.readouterr().out.strip()
    assert "| ours |" in text and "CNN 4k" in text and "machine was shared" in text
    for lib, module in bench.MODULES.items():
        if importlib.util.find_spec(module) is not None:
            assert f"| {bench.NAMES[lib]} |" in text
