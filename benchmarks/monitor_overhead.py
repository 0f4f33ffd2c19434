"""Wall time of the main job (``examples/train_digits.py``) with and without ``SharpnessMonitor()`` at its
defaults, measured in one run.

The whole job each time: ERM and SAM, three seeds each, on scikit-learn's digits, with the test evaluation and
the final-sharpness analysis, as the README's first command runs it. Jobs alternate (without, with, without, ...)
so that drifts of the machine hit both; the ratio of the fastest jobs is printed (the minimum is the estimate
least disturbed by other load), with the monitor's own account of its share of the training time
(``sharpness/seconds`` summed), which other load does not skew.

Usage::

    python benchmarks/monitor_overhead.py --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import train_digits  # noqa: E402


def main_job(monitor: bool, log_dir: str) -> tuple[float, dict[str, list[dict[str, float]]]]:
    argv = ["--log-dir", log_dir] + ([] if monitor else ["--no-monitor"])
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the job's own summary table
        results = train_digits.main(argv)
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    without, with_monitor = [], []
    with tempfile.TemporaryDirectory() as log_dir:
        for _ in range(args.repeats):
            without.append(main_job(False, log_dir)[0])
            seconds, results = main_job(True, log_dir)
            with_monitor.append(seconds)
    base, monitored = min(without), min(with_monitor)
    runs = [r for method_runs in results.values() for r in method_runs]
    training = sum(r["seconds"] for r in runs)
    measuring = sum(r["monitor_share"] * r["seconds"] for r in runs)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, main job: {len(runs)} training runs")
    print(f"without monitor: {base:.1f} s (best of {args.repeats}: {', '.join(f'{t:.1f}' for t in without)})")
    print(f"with monitor:    {monitored:.1f} s (best of {args.repeats}: {', '.join(f'{t:.1f}' for t in with_monitor)})")
    print(f"monitor's account (last job): {measuring:.2f} s measuring = {measuring / monitored:.1%} of the job's wall")
    print(f"  time, {measuring / training:.1%} of its training time")
    print(f"overhead ratio:  {monitored / base:.3f} ({(monitored / base - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
