"""The monitor's TensorBoard output, read back with TensorBoard's own reader, tbparse, and the real server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_sharpness.monitor import SharpnessMonitor
from tests.helpers import MonitorNet as Net
from tests.helpers import monitor_loader as loader

MEASURES = [
    {"name": "hessian_eigenvalues", "k": 2},
    {"name": "hessian_trace", "method": "hutchinson", "matvecs": 8},
    {"name": "spectral_density", "probes": 2, "steps": 12},
]


def _run(tmp_path: Path, **monitor_kwargs) -> tuple[SharpnessMonitor, Path]:
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    monitor = SharpnessMonitor(measures=MEASURES, every_n_steps=2, max_overhead=None, **monitor_kwargs)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=logger,
        max_steps=4,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    trainer.fit(Net(), loader())
    return monitor, Path(logger.log_dir)


def test_event_files_hold_scalars_density_and_landscape_pictures(tmp_path):
    monitor, log_dir = _run(tmp_path, density="both", landscape={"steps": 5})
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    expected_scalars = {
        "sharpness/hessian_eigenvalues",
        "sharpness/hessian_eigenvalues/eigenvalue_1",
        "sharpness/hessian_trace",
        "sharpness/hessian_trace/stderr",
        "sharpness/spectral_density",
        "sharpness/spectral_density/stderr",
        "sharpness/seconds",
    }
    assert expected_scalars <= set(tags["scalars"])
    assert [s for s, _ in monitor.history] == [0, 2, 4]  # at fit start, then every 2 steps
    for tag in expected_scalars:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [0, 2, 4], tag
        key = tag.removeprefix("sharpness/")
        for event, (_, values) in zip(events, monitor.history):
            assert event.value == pytest.approx(values[key], rel=1e-6, abs=1e-12), tag  # stored as float32
    # Eigenvalues are ordered, and the SLQ trace agrees in sign and size with Hutchinson's on this small net.
    top = [e.value for e in acc.Scalars("sharpness/hessian_eigenvalues")]
    second = [e.value for e in acc.Scalars("sharpness/hessian_eigenvalues/eigenvalue_1")]
    assert all(a >= b for a, b in zip(top, second))

    assert "sharpness/spectral_density/histogram" in tags["histograms"]
    hist = acc.Histograms("sharpness/spectral_density/histogram")
    assert [h.step for h in hist] == [0, 2, 4]
    assert sum(hist[0].histogram_value.bucket) == pytest.approx(1000.0, rel=1e-6)
    assert hist[0].histogram_value.max == pytest.approx(top[0], rel=1e-3)  # largest Ritz value = top eigenvalue

    for tag in ("sharpness/landscape_1d", "sharpness/landscape_2d", "sharpness/spectral_density/image"):
        assert tag in tags["images"], tag
        images = acc.Images(tag)
        assert [i.step for i in images] == [0, 2, 4]
        assert images[0].width >= 300 and images[0].height >= 200
        assert images[0].encoded_image_string[:4] == b"\x89PNG"


def test_tbparse_reads_the_same_scalars(tmp_path):
    from tbparse import SummaryReader

    monitor, log_dir = _run(tmp_path, density="none")
    df = SummaryReader(str(log_dir)).scalars
    trace = df[df["tag"] == "sharpness/hessian_trace"]
    assert trace["step"].tolist() == [0, 2, 4]
    assert trace["value"].tolist() == pytest.approx([v["hessian_trace"] for _, v in monitor.history], rel=1e-6)
    assert not any(t.startswith("sharpness/landscape") for t in df["tag"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_real_tensorboard_server_serves_the_sharpness_tags(tmp_path):
    monitor, log_dir = _run(tmp_path, density="none")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path), "--port", str(port),
         "--host", "127.0.0.1", "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        tags: dict = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                tags = _get_json(f"{base}/data/plugin/scalars/tags")
                if any("sharpness/hessian_trace" in t for t in tags.values()):
                    break
            except OSError:
                pass
            assert server.poll() is None, server.stdout.read().decode()
            time.sleep(0.5)
        (run,) = [r for r, t in tags.items() if "sharpness/hessian_trace" in t]
        assert run == "run/version_0"
        assert {"sharpness/hessian_eigenvalues", "sharpness/hessian_trace", "sharpness/seconds"} <= set(tags[run])
        query = urllib.parse.urlencode({"run": run, "tag": "sharpness/hessian_trace"})
        points = _get_json(f"{base}/data/plugin/scalars/scalars?{query}")
        assert [p[1] for p in points] == [0, 2, 4]
        assert [p[2] for p in points] == pytest.approx([v["hessian_trace"] for _, v in monitor.history], rel=1e-6)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert server.returncode is not None
