"""The README's main job, shortened to one epoch and one seed: it trains ERM and SAM, prints its summary and
writes the TensorBoard curves the README points to, the monitor's and the final analysis's."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import train_digits  # noqa: E402


def _tags(run_dir: Path) -> tuple[EventAccumulator, dict[str, list[str]]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc, acc.Tags()


@pytest.mark.parametrize("monitor", [True, False])
def test_main_job_trains_both_methods_and_logs_its_curves(tmp_path, capsys, monitor):
    # One epoch of this job trains for well under a second: at its defaults the monitor's 5% budget admits no
    # measurement there (it says so in its plan line), so the monitored run asks for an explicit schedule.
    argv = ["--epochs", "1", "--seeds", "0", "--log-dir", str(tmp_path)]
    argv += ["--measure-every", "1"] if monitor else ["--no-monitor"]
    results = train_digits.main(argv)
    assert set(results) == {"erm", "sam"}
    for method, (run,) in results.items():
        assert 0.5 < run["test_acc"] <= 1.0  # one epoch already learns the digits
        assert run["top_eigenvalue"] > 0 and run["trace"] > 0
        assert (run["monitor_share"] > 0) == monitor
        acc, tags = _tags(tmp_path / method / "seed0")
        last_step = max(e.step for e in acc.Scalars("train/loss"))
        for tag, value in (("final/top_eigenvalue", run["top_eigenvalue"]), ("final/trace", run["trace"])):
            (event,) = acc.Scalars(tag)
            assert event.step >= last_step and math.isclose(event.value, value, rel_tol=1e-6)
        (density,) = acc.Histograms("final/spectral_density/histogram")
        assert density.histogram_value.num == pytest.approx(1000.0)  # the density's unit mass, in counts
        monitored = {t for t in tags["scalars"] if t.startswith("sharpness/")}
        expected = {"sharpness/hessian_eigenvalues", "sharpness/hessian_trace", "sharpness/seconds"}
        assert expected <= monitored if monitor else not monitored
        if method == "sam":
            assert "sam/sharpness_gap" in tags["scalars"]
    summary = capsys.readouterr().out
    assert "[1/2] erm seed 0: training 1 epochs ... test acc" in summary  # progress, one line per run
    assert "[2/2] sam seed 0: training 1 epochs ... test acc" in summary
    assert "erm" in summary and "sam" in summary and "tensorboard --logdir" in summary
