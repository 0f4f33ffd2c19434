"""SharpnessMonitor under DDP with 2 CPU processes (gloo) against a single-process measurement of the same probe set.

The test launches this file as a script (``strategy="ddp"`` re-runs it for rank 1); each rank saves what it
measured and which probe batches each measure saw, and the test recomputes every number in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import run_two_process_script

ROOT = Path(__file__).resolve().parents[1]

MEASURES = [
    {"name": "hessian_trace", "method": "hutchinson", "matvecs": 10},  # linear: sharded
    {"name": "hessian_diagonal", "matvecs": 6},  # linear: sharded
    {"name": "average_case_sharpness", "rho": 0.1, "samples": 5},  # linear: sharded
    {"name": "worst_case_sharpness", "rho": 0.05, "m": 5, "init": "zero", "steps": 3},  # linear: sharded
    {"name": "hessian_eigenvalues", "k": 2},  # not linear: whole probe set on every process
    {"name": "hessian_trace", "method": "hutch++", "matvecs": 12, "tag": "trace_hutchpp"},  # Hutch++: not linear
]
SHARDED = {"hessian_trace", "hessian_diagonal", "average_case_sharpness", "worst_case_sharpness"}


def _main(out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_sharpness.monitor import SharpnessMonitor
    from tests.helpers import MonitorNet as Net
    from tests.helpers import monitor_ce as ce
    from tests.helpers import monitor_data as data

    seen: list[tuple[str, float]] = []
    current = [""]

    def loss_fn(model, batch):
        seen.append((current[0], round(float(batch[0][0, 0]), 6)))  # which probe batch this measure evaluated
        return ce(model, batch)

    monitor = SharpnessMonitor(measures=MEASURES, probe="val", probe_batches=4, every_n_steps=2, loss_fn=loss_fn)
    for m in monitor.measures:

        def traced(*args, _fn=m.fn, _tag=m.tag, **kwargs):
            current[0] = _tag
            return _fn(*args, **kwargs)

        m.fn = traced
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[monitor],
    )
    model = Net(seed=0)
    train, val = DataLoader(data(32), batch_size=4), DataLoader(data(40, seed=5), batch_size=5)
    trainer.fit(model, train, val)
    seen.clear()
    trainer.validate(model, val)
    torch.save(
        {
            "history": monitor.history,
            "indices": monitor.state_dict()["probe_indices"],
            "weights": model.state_dict(),
            "seen": seen,
            "world_size": trainer.world_size,
        },
        out / f"rank{trainer.global_rank}.pt",
    )
    # Lightning destroys the process group at exit for NCCL only; a gloo process exiting while its peer's
    # connections close can abort after the work is done, so both leave together with the group destroyed.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_match_a_single_process_measurement(tmp_path):
    run_two_process_script(str(Path(__file__).resolve()), tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == 2
    # Both processes hold the same probe set, the same weights and the same combined numbers.
    assert r0["indices"] == r1["indices"] and len(r0["indices"]) == 4
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"].values(), r1["weights"].values()))
    assert r0["history"] == r1["history"]
    assert [s for s, _ in r0["history"]] == [0, 2, 2]  # fit (at fit start, every_n_steps=2), then validate

    # Each process measured its share for linear measures, the whole probe set for the others.
    from tests.helpers import MonitorNet as Net
    from tests.helpers import monitor_ce as ce
    from tests.helpers import monitor_data as data

    val = data(40, seed=5)
    batches = [(val[idx][0], val[idx][1]) for idx in r0["indices"]]
    fingerprints = [round(float(b[0][0, 0]), 6) for b in batches]
    for spec in MEASURES:
        tag = spec.get("tag", spec["name"])
        s0 = {f for t, f in r0["seen"] if t == tag}
        s1 = {f for t, f in r1["seen"] if t == tag}
        if tag in SHARDED:
            assert s0 == set(fingerprints[0::2]) and s1 == set(fingerprints[1::2]), tag
        else:
            assert s0 == s1 == set(fingerprints), tag

    from lightning_sharpness import measures

    model = Net(seed=0)
    model.load_state_dict(r0["weights"])
    model.eval()
    logged = r0["history"][-1][1]
    for spec in MEASURES:
        options = {k: v for k, v in spec.items() if k not in ("name", "tag")}
        expected = getattr(measures, spec["name"])(model, ce, batches, **options)
        tag = spec.get("tag", spec["name"])
        assert logged[tag] == pytest.approx(float(expected), rel=1e-5, abs=1e-7), tag
    expected_top = measures.hessian_eigenvalues(model, ce, batches, k=2)
    assert logged["hessian_eigenvalues/eigenvalue_1"] == pytest.approx(float(expected_top.eigenvalues[1]), rel=1e-5)


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
