"""SharpnessMonitor on real jobs (issue 10, items 3-7): a failing measurement never loses the run, an explicit
schedule wins over the budget, bad option values fail at construction, the fit-start plan forecasts the cost and
sizes the measurement to the budget, and ``trainer.validate`` returns the numbers.

The DDP test launches this file as a script (``strategy="ddp"`` re-runs it for rank 1).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_sharpness import measures
from lightning_sharpness.monitor import SharpnessMonitor
from lightning_sharpness.monitor import callback as monitor_callback
from tests.helpers import TOP, TRACE, RecordingLogger, probe_batches, run_two_process_script
from tests.helpers import MonitorData as Data
from tests.helpers import MonitorNet as Net
from tests.helpers import monitor_ce as ce
from tests.helpers import monitor_data as data
from tests.helpers import monitor_loader as loader
from tests.helpers import monitor_trainer as make_trainer

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"name": "hessian_eigenvalues", "max_iter": 60, "tol": 1e-12}  # far more than 5% of these tiny steps


class CountSteps(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1


# ---------------------------------------------------------------------------------------------- 3. never lose a run


def _flaky_loss(trainer_ref: list, fail_at: set[int], error: Exception, after_calls: int = 2):
    """``ce``, raising ``error`` in the measurements at the steps ``fail_at``, after ``after_calls`` calls into
    that measurement (mid-way through its products, when the measure has already evaluated the model)."""
    calls = {"step": None, "n": 0}

    def loss_fn(model, batch):
        step = trainer_ref[0].global_step
        if step in fail_at:
            calls["n"] = calls["n"] + 1 if calls["step"] == step else 1
            calls["step"] = step
            if calls["n"] > after_calls:
                raise error
        return ce(model, batch)

    return loss_fn


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("derivative for aten::_fancy_attention_backward is not implemented"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        ValueError("Expected input batch_size (8) to match target batch_size (7)."),  # a bad batch
    ],
    ids=["unsupported-op", "out-of-memory", "bad-batch"],
)
def test_a_measurement_failing_in_training_warns_once_counts_and_training_goes_on(error):
    def run(with_monitor: bool):
        torch.manual_seed(0)
        model, logger, holder = Net(), RecordingLogger(), []
        callbacks = []
        monitor = None
        if with_monitor:
            loss_fn = _flaky_loss(holder, {2, 3}, error)
            monitor = SharpnessMonitor(measures=[TRACE, TOP], every_n_steps=1, loss_fn=loss_fn, max_overhead=None)
            callbacks.append(monitor)
        trainer = make_trainer(logger=logger, max_steps=5, callbacks=callbacks)
        holder.append(trainer)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, loader(shuffle=True))
        return model, trainer, monitor, logger, [str(w.message) for w in caught]

    plain, *_ = run(False)
    model, trainer, monitor, logger, caught = run(True)
    assert trainer.global_step == 5  # training went on to its end
    failures = [m for m in caught if "failed and is skipped" in m]
    assert len(failures) == 1, caught  # warned once, with the error
    assert "measurement at step 2" in failures[0] and str(error) in failures[0]
    assert [s for s, _ in monitor.history] == [0, 1, 4, 5]  # steps 2 and 3 skipped, measuring goes on after
    assert logger.values("sharpness/errors") == [(2, 1.0), (3, 2.0)]
    assert monitor.errors == 2 and monitor.state_dict()["errors"] == 2
    # A measurement that failed half-way left the model as it was: training ended bitwise as without the monitor.
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_error_at_fit_start_stops_before_any_training_step():
    def broken(model, batch):
        raise ValueError("loss_fn: this batch has no labels")

    counter = CountSteps()
    monitor = SharpnessMonitor(measures=[TRACE], loss_fn=broken)  # the defaults: the first epoch end was the first
    with pytest.raises(ValueError, match="this batch has no labels"):
        make_trainer(max_epochs=3, callbacks=[counter, monitor]).fit(Net(), loader())
    assert counter.batches == 0  # no training time spent


def test_the_fit_start_measurement_is_a_baseline_at_step_0():
    model, logger = Net(), RecordingLogger()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    monitor = SharpnessMonitor(measures=[TRACE], max_overhead=None, every_n_epochs=2)
    make_trainer(logger=logger, max_epochs=2, callbacks=[monitor]).fit(model, loader())
    assert [s for s, _ in logger.values("sharpness/hessian_trace")] == [0, 10]
    fresh = Net()
    fresh.load_state_dict(initial)
    expected = measures.hessian_trace(fresh.eval(), ce, probe_batches(monitor, data()), method="hutchinson", matvecs=8)
    assert logger.values("sharpness/hessian_trace")[0][1] == pytest.approx(float(expected), rel=1e-6)


# ---------------------------------------------------------------------------------------------- 4. explicit schedules


def test_an_explicit_schedule_is_measured_at_every_point_despite_the_default_budget():
    monitor = SharpnessMonitor(measures=[HEAVY], every_n_steps=5)  # max_overhead at its default
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_epochs=-1, max_steps=30, callbacks=[monitor]).fit(Net(), loader())
    assert [s for s, _ in monitor.history] == [0, 5, 10, 15, 20, 25, 30]
    assert not [w for w in caught if "SharpnessMonitor" in str(w.message)]  # nothing skipped
    assert monitor.budget is None and monitor.plan["budget"] is None


def test_the_budget_applies_to_the_default_schedule_or_when_asked_for():
    assert SharpnessMonitor().budget == 0.05  # default schedule: every epoch, within 5%
    assert SharpnessMonitor(every_n_steps=5).budget is None
    assert SharpnessMonitor(every_n_epochs=2).budget is None
    assert SharpnessMonitor(every_n_steps=5, max_overhead=0.05).budget == 0.05
    assert SharpnessMonitor(max_overhead=None).budget is None
    with pytest.raises(ValueError, match="`max_overhead` must be 'auto', a positive number or None"):
        SharpnessMonitor(max_overhead="always")
    # Asked for with an explicit schedule, the budget holds: here not even one measurement fits.
    monitor = SharpnessMonitor(measures=[HEAVY], every_n_steps=5, max_overhead=0.01)
    with pytest.warns(UserWarning, match="no measurement fits in the budget"):
        make_trainer(max_epochs=-1, max_steps=30, callbacks=[monitor]).fit(Net(), loader())
    assert monitor.history == []


# ---------------------------------------------------------------------------------------------- 5. bad values


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"name": "worst_case_sharpness", "rho": -1}, r"'worst_case_sharpness'.*`rho` must be a finite number >= 0"),
        ({"name": "average_case_sharpness", "rho": float("nan")}, r"`rho` must be a finite number >= 0"),
        ({"name": "hessian_trace", "matvecs": 0}, r"'hessian_trace'.*`matvecs` must be an int >= 2, got 0"),
        ({"name": "hessian_trace", "method": "hutch++", "matvecs": 5}, r"`matvecs` must be an int >= 6, got 5"),
        ({"name": "hessian_trace", "method": "xtrace", "matvecs": 3}, r"`matvecs` must be an int >= 4, got 3"),
        ({"name": "hessian_diagonal", "matvecs": 0}, r"`matvecs` must be an int >= 2, got 0"),
        ({"name": "hessian_eigenvalues", "k": 0}, r"'hessian_eigenvalues'.*`k` must be an int >= 1, got 0"),
        ({"name": "hessian_eigenvalues", "k": 3, "max_iter": 2}, r"`max_iter` must be an int >= 3, got 2"),
        ({"name": "hessian_eigenvalues", "tol": -1e-3}, r"`tol` must be a positive"),
        ({"name": "spectral_density", "steps": 0}, r"`steps` must be an int >= 1, got 0"),
        ({"name": "worst_case_sharpness", "rho": 0.1, "m": 0}, r"`m` must be an int >= 1, got 0"),
        ({"name": "average_case_sharpness", "rho": 0.1, "samples": 1}, r"`samples` must be an int >= 2, got 1"),
    ],
)
def test_bad_option_values_fail_when_the_callback_is_built(spec, match):
    with pytest.raises(ValueError, match=match):
        SharpnessMonitor(measures=[spec])


def test_the_monitor_uses_the_measures_own_validators():
    from lightning_sharpness.measures import registry

    # the monitor rejects what the measure itself rejects, with the measure's own message
    for name, options in [
        ("hessian_trace", {"matvecs": 5, "method": "hutch++"}),
        ("worst_case_sharpness", {"rho": -1.0}),
    ]:
        with pytest.raises(ValueError) as by_record:
            registry.record(name).validate(options)
        with pytest.raises(ValueError) as by_monitor:
            SharpnessMonitor(measures=[{"name": name, **options}])
        assert str(by_record.value) in str(by_monitor.value)
    net = Net()
    with pytest.raises(ValueError, match="`matvecs` must be an int >= 6, got 5"):
        measures.hessian_trace(net, ce, next(iter(loader())), matvecs=5, method="hutch++")


def test_val_probe_without_a_validation_loader_fails_at_fit_start_naming_the_option():
    counter = CountSteps()
    monitor = SharpnessMonitor(measures=[TRACE], probe="val", max_overhead=None)
    with pytest.raises(ValueError, match=r"SharpnessMonitor\(probe='val'\).*this run has none.*`probe`"):
        make_trainer(max_epochs=2, callbacks=[counter, monitor]).fit(Net(), loader())
    assert counter.batches == 0


def test_val_probe_from_the_loader_given_to_fit_is_measured_at_fit_start():
    model = Net()
    monitor = SharpnessMonitor(measures=[TRACE], probe="val", probe_batches=1, max_overhead=None)
    val = DataLoader(data(16, seed=0), batch_size=8)
    make_trainer(max_steps=2, callbacks=[monitor], limit_val_batches=0).fit(Net(), loader(), val)
    assert monitor.history[0][0] == 0
    expected = measures.hessian_trace(model.eval(), ce, probe_batches(monitor, data(16, seed=0)), method="hutchinson",
                                      matvecs=8)  # fmt: skip
    assert monitor.history[0][1]["hessian_trace"] == pytest.approx(float(expected), rel=1e-6)


# ---------------------------------------------------------------------------------------------- 6. the plan


def test_the_plan_is_announced_in_one_line_at_fit_start_before_measuring(monkeypatch):
    lines: list[tuple[str, int]] = []
    monitor = SharpnessMonitor(measures=[TRACE, TOP], max_overhead=None)
    record = lambda message: lines.append((message, len(monitor.history)))  # noqa: E731
    monkeypatch.setattr(monitor_callback, "rank_zero_info", record)
    make_trainer(max_epochs=2, callbacks=[monitor]).fit(Net(), loader())
    ((line, measured_before),) = [(m, n) for m, n in lines if "SharpnessMonitor" in m]
    assert measured_before == 0 and "\n" not in line
    assert line.startswith(
        "SharpnessMonitor plan: hessian_trace(method='hutchinson', matvecs=8), hessian_eigenvalues(k=2)"
    )
    assert "on 16 probe examples, at fit start, every epoch, at the end of training; forecast" in line
    assert "s per measurement (one HVP" in line and "for the 3 scheduled" in line and "no time budget" in line
    plan = monitor.plan
    assert plan["line"] == line and plan["examples"] == plan["probe_examples"] == 16
    assert plan["forecast_seconds"] > 0 and plan["hvp_seconds"] > 0 and plan["train_seconds"] > 0
    assert plan["timing_seconds"] > 0 and monitor.seconds_measuring >= plan["timing_seconds"] + sum(
        v["seconds"] for _, v in monitor.history
    )


class FakeClock:
    """Timings the plan reads, as if the model were large: per probe subset of ``n`` examples, a gradient with
    its graph costs ``0.1 + 0.01 n`` s and a Hessian-vector product as much; a training step 1 s."""

    def __init__(self, step_seconds: float = 1.0) -> None:
        self.step_seconds = step_seconds
        self.timed: list[int] = []

    def install(self, monkeypatch) -> None:
        clock = self

        def time_products(self, pl_module, batches, warm_up=False):
            n = sum(int(b[0].shape[0]) for b in batches)
            clock.timed.append(n)
            return 0.1 + 0.01 * n, 0.1 + 0.01 * n

        monkeypatch.setattr(SharpnessMonitor, "_time_products", time_products)
        monkeypatch.setattr(SharpnessMonitor, "_time_gradient", lambda self, *a: clock.step_seconds)


def _plan_for(monkeypatch, step_seconds: float, steps: int = 20, **kwargs):
    clock = FakeClock(step_seconds)
    clock.install(monkeypatch)
    monitor = SharpnessMonitor(probe_batches=4, **kwargs)  # 32 probe examples; the default measures
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(max_steps=steps, callbacks=[monitor]).fit(Net(), loader(n=8 * steps))  # one epoch
    return monitor, clock


@pytest.mark.parametrize(
    "step_seconds, examples, products, start_end",
    [
        # The default measures: Lanczos forecast at 15 products (capped there), Hutchinson at 10, a gradient graph
        # each: 27 units of 0.1 + 0.01 n s. 20 steps of (fake) 24 s: the 5% budget is 24 s, 12 s a measurement
        # (start and end): all 32 examples (11.3 s).
        (24.0, 32, (15, 10), (True, True)),
        # 12 s steps: 6 s a measurement: fewer examples (16: 7.0 s, 8: 4.9 s).
        (12.0, 8, (15, 10), (True, True)),
        # 6 s steps: 3 s a measurement: 8 examples and fewer products (2 + 8 + 5 units of 0.18 s = 2.7 s; the
        # next factor up gives 9 + 6: 3.06 s).
        (6.0, 8, (8, 5), (True, True)),
        # 2 s steps: 1 s a measurement, not even 2 + 2 products fit (1.08 s): one measurement, at the end, with
        # 2 graphs + 5 + 3 products (1.8 s of 2 s; 6 + 4 would take 2.16 s).
        (2.0, 8, (5, 3), (False, True)),
        # 0.5 s steps: 0.5 s for all: none (later ones only where the real training time allows).
        (0.5, 8, (2, 2), (False, False)),
    ],
)
def test_the_plan_sizes_the_measurement_to_the_budget(monkeypatch, step_seconds, examples, products, start_end):
    monitor, clock = _plan_for(monkeypatch, step_seconds)
    plan = monitor.plan
    assert plan["train_seconds"] == pytest.approx(20 * step_seconds)
    assert plan["budget"] == 0.05 and plan["probe_examples"] == 32 and plan["examples"] == examples
    assert (plan["options"]["hessian_eigenvalues"]["max_iter"], plan["options"]["hessian_trace"]["matvecs"]) == products
    assert (plan["at_start"], plan["at_end"]) == start_end
    assert plan["forecast_seconds"] == pytest.approx((2 + sum(products)) * (0.1 + 0.01 * examples))
    assert clock.timed[0] == 8 and clock.timed == sorted(clock.timed)  # timed from the smallest subset up
    if start_end[0]:
        assert monitor.history[0][0] == 0
    else:
        assert all(step > 0 for step, _ in monitor.history)


def test_the_measurement_follows_the_plan(monkeypatch):
    """What is measured is what the plan says: its examples (the first of the probe set) and its products."""
    clock = FakeClock(6.0)
    clock.install(monkeypatch)
    seen = []
    monitor = SharpnessMonitor(probe_batches=4)
    for m in monitor.measures:

        def spy(model, loss_fn, batches, _fn=m.fn, **options):
            result = _fn(model, loss_fn, batches, **options)
            seen.append((sum(int(b[0].shape[0]) for b in batches), options, result.matvecs))
            return result

        m.fn = spy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(max_steps=20, callbacks=[monitor]).fit(Net(), loader(n=160))
    plan = monitor.plan
    assert seen and all(n == plan["examples"] == 8 for n, _, _ in seen)
    eigen, trace = seen[0], seen[1]
    assert eigen[1]["max_iter"] == plan["options"]["hessian_eigenvalues"]["max_iter"] == 8 and eigen[2] <= 8
    assert trace[1]["matvecs"] == 5 and trace[2] == 5
    first = probe_batches(monitor, data(160))[0]
    expected = measures.hessian_trace(Net().eval(), ce, [(first[0][:8], first[1][:8])], method="hutchinson",
                                      matvecs=5)  # fmt: skip
    assert monitor.history[0][1]["hessian_trace"] == pytest.approx(float(expected), rel=1e-6)


def test_forecast_products_bound_the_products_measured():
    """Under a budget the forecast counts every product: Lanczos is capped at its forecast count."""
    seen = {}
    monitor = SharpnessMonitor(max_overhead=1e4)  # the default measures, a budget the tiny net meets in full
    for m in monitor.measures:

        def spy(model, loss_fn, batches, _fn=m.fn, _tag=m.tag, **options):
            result = _fn(model, loss_fn, batches, **options)
            seen.setdefault(_tag, []).append(result.matvecs)
            return result

        m.fn = spy
    make_trainer(max_epochs=2, callbacks=[monitor]).fit(Net(), loader())
    plan = monitor.plan
    assert plan["examples"] == 16 and plan["options"]["hessian_eigenvalues"]["max_iter"] == 15
    assert 1 <= max(seen["hessian_eigenvalues"]) <= 15 and set(seen["hessian_trace"]) == {10}


# ---------------------------------------------------------------------------------------------- 7. validate


def test_validate_returns_the_sharpness_values(tmp_path, capsys):
    model = Net()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    monitor = SharpnessMonitor(measures=[TRACE, TOP], max_overhead=None)
    make_trainer(tmp_path, max_steps=4, callbacks=[monitor, ckpt], enable_checkpointing=True).fit(model, Data())
    trained = monitor.history[-1][1]

    validator, logger = SharpnessMonitor(measures=[TRACE, TOP], max_overhead=None), RecordingLogger()
    trainer = make_trainer(logger=logger, callbacks=[validator])
    capsys.readouterr()
    (result,) = trainer.validate(Net(seed=42), Data(), ckpt_path=str(tmp_path / "last.ckpt"))
    table = capsys.readouterr().out
    for key in ("hessian_trace", "hessian_trace/stderr", "hessian_eigenvalues", "hessian_eigenvalues/eigenvalue_1"):
        assert result[f"sharpness/{key}"] == pytest.approx(trained[key], rel=1e-6), key
        assert float(trainer.callback_metrics[f"sharpness/{key}"]) == pytest.approx(trained[key], rel=1e-6)
    for key in ("hessian_trace", "hessian_eigenvalues"):
        assert f"sharpness/{key} " in table  # Lightning's validate table
    assert "val_loss" in result and "sharpness/seconds" in result
    # Once on the loggers, at the checkpoint's step (the curves of training), with the validation loss.
    assert logger.values("sharpness/hessian_trace") == [(4, pytest.approx(trained["hessian_trace"], rel=1e-6))]
    assert [s for s, _ in logger.values("val_loss")] == [4]

    # A model in memory, with a Trainer that trained it: the same numbers, at its step.
    trainer = make_trainer(callbacks=[SharpnessMonitor(measures=[TRACE, TOP], max_overhead=None)])
    (again,) = trainer.validate(model, Data())
    assert again["sharpness/hessian_trace"] == pytest.approx(trained["hessian_trace"], rel=1e-6)


# ---------------------------------------------------------------------------------------------- DDP


def _ddp_main(out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import lightning.pytorch as pl

    holder: list = []

    def loss_fn(model, batch):
        # Fails on rank 1 only, in the measurement at step 2, after rank 0 has measured its share.
        if holder[0].global_rank == 1 and holder[0].global_step == 2:
            raise RuntimeError("rank 1: out of memory")
        return ce(model, batch)

    measures_ = [TRACE, {"name": "hessian_eigenvalues", "k": 2}]
    monitor = SharpnessMonitor(measures=measures_, probe_batches=4, every_n_steps=1, loss_fn=loss_fn, max_overhead=None)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[monitor],
    )
    holder.append(trainer)
    start = time.perf_counter()
    trainer.fit(Net(seed=0), DataLoader(data(32), batch_size=4))
    torch.save(
        {"history": monitor.history, "errors": monitor.errors, "step": trainer.global_step,
         "seconds": time.perf_counter() - start},
        out / f"rank{trainer.global_rank}.pt",
    )  # fmt: skip
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_every_process_skips_a_measurement_that_failed_on_one(tmp_path):
    proc = run_two_process_script(str(Path(__file__).resolve()), tmp_path)
    assert "measurement at step 2 failed" in proc.stderr and "rank 1: out of memory" in proc.stderr
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["step"] == r1["step"] == 4
    assert r0["history"] == r1["history"] and [s for s, _ in r0["history"]] == [0, 1, 3, 4]
    assert r0["errors"] == r1["errors"] == 1


if __name__ == "__main__":
    _ddp_main(Path(sys.argv[1]))
