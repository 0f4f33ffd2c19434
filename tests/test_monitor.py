"""SharpnessMonitor: configuration errors, schedule, probe set, values against direct measurements, resume."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_sharpness import measures
from lightning_sharpness.monitor import SharpnessMonitor, available_measures
from tests.helpers import (
    TOP,
    TRACE,
    RecordingLogger,
    probe_batches,
)
from tests.helpers import (
    MonitorData as Data,
)
from tests.helpers import (
    MonitorNet as Net,
)
from tests.helpers import (
    monitor_ce as ce,
)
from tests.helpers import (
    monitor_data as data,
)
from tests.helpers import (
    monitor_loader as loader,
)
from tests.helpers import (
    monitor_trainer as make_trainer,
)

# ---------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"measures": ["hessian_trase"]}, r"Unknown measure 'hessian_trase'.*Available: \['hessian_eigenvalues'"),
        ({"measures": [{"name": "hessian_trace", "rho": 0.1}]}, r"Unknown option\(s\) \['rho'\].*\['matvecs'"),
        ({"measures": []}, "non-empty list"),
        ({"measures": ["worst_case_sharpness"]}, r"needs option\(s\) \['rho'\].*Allowed options: \['rho', 'geometry'"),
        ({"measures": [{"rho": 0.1}]}, "mapping with a `name` key"),
        ({"measures": ["hessian_trace", {"name": "hessian_trace"}]}, "distinct `tag`"),
        ({"probe_batches": 0}, r"`probe_batches` must be an integer >= 1"),
        ({"every_n_steps": 0}, r"`every_n_steps` must be an integer >= 1 or None, got 0"),
        ({"every_n_epochs": -2}, r"`every_n_epochs` must be an integer >= 1"),
        ({"probe": "test"}, r"`probe` must be one of \['train', 'val'\] or a torch DataLoader"),
        ({"density": "violin"}, r"`density` must be one of \['histogram', 'image', 'both', 'none'\]"),
        ({"progress_bar": "hessian_trace"}, r"tag of a monitored measure \['hessian_eigenvalues'\]"),
        ({"landscape": {"dims": [3]}}, r"subset of \[1, 2\]"),
        ({"landscape": {"resolution": 3}}, r"allowed: \['dims', 'steps', 'span', 'seed'\]"),
        ({"max_seconds": 0}, "`max_seconds` must be a positive"),
        ({"max_hvps": 0}, "`max_hvps` must be an integer >= 1"),
        ({"max_overhead": -0.1}, "`max_overhead` must be a positive"),
    ],
)
def test_bad_config_fails_at_construction_listing_what_is_allowed(kwargs, match):
    kwargs = {"measures": ["hessian_eigenvalues"], **kwargs}
    with pytest.raises(ValueError, match=match):
        SharpnessMonitor(**kwargs)


def test_every_available_measure_is_accepted_and_seeded():
    names = available_measures()
    assert {"hessian_eigenvalues", "hessian_trace", "spectral_density"} <= set(names)
    specs = [{"name": n, "rho": 0.05} if n.endswith("case_sharpness") else n for n in names]
    monitor = SharpnessMonitor(measures=specs, seed=5)
    assert [m.name for m in monitor.measures] == names
    assert all(m.options.get("seed") == 5 for m in monitor.measures if "seed" in m.defaults)
    # The user's own seed wins.
    assert SharpnessMonitor(measures=[{"name": "hessian_trace", "seed": 2}]).measures[0].options["seed"] == 2
    # every_n_epochs defaults to 1, and to off when every_n_steps is given.
    assert SharpnessMonitor().every_n_epochs == 1
    assert SharpnessMonitor(every_n_steps=3).every_n_epochs is None


# ---------------------------------------------------------------------------------------------- schedule


def test_schedule_every_n_steps_and_train_end_logs_at_the_global_step():
    model, logger = Net(), RecordingLogger()
    monitor = SharpnessMonitor(measures=[TRACE], every_n_steps=3, max_overhead=None)
    make_trainer(logger=logger, max_epochs=2, callbacks=[monitor]).fit(model, loader())  # 5 steps per epoch
    steps = [s for s, _ in logger.values("sharpness/hessian_trace")]
    assert steps == [0, 3, 6, 9, 10]  # at fit start, every 3 steps, at the end
    assert [s for s, _ in logger.values("sharpness/seconds")] == steps
    assert all(v > 0 for _, v in logger.values("sharpness/seconds"))
    assert [s for s, _ in monitor.history] == steps
    assert model.log_calls == 10  # the monitor's training_step calls logged nothing


def test_schedule_every_n_epochs_does_not_repeat_at_train_end():
    logger = RecordingLogger()
    monitor = SharpnessMonitor(measures=[TRACE], every_n_epochs=2, max_overhead=None)
    make_trainer(logger=logger, max_epochs=3, callbacks=[monitor]).fit(Net(), loader())
    assert [s for s, _ in logger.values("sharpness/hessian_trace")] == [0, 10, 15]
    logger = RecordingLogger()
    monitor = SharpnessMonitor(measures=[TRACE], max_overhead=None)
    make_trainer(logger=logger, max_epochs=2, callbacks=[monitor]).fit(Net(), loader())
    assert [s for s, _ in logger.values("sharpness/hessian_trace")] == [0, 5, 10]


def test_schedule_with_gradient_accumulation_measures_once_per_optimizer_step():
    logger = RecordingLogger()
    monitor = SharpnessMonitor(measures=[TRACE], every_n_steps=1, on_train_end=False, max_overhead=None)
    trainer = make_trainer(logger=logger, accumulate_grad_batches=2, callbacks=[monitor])
    trainer.fit(Net(), loader(n=48))  # 6 batches, 3 optimizer steps
    assert [s for s, _ in logger.values("sharpness/hessian_trace")] == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------- probe set & values


def test_probe_set_is_seeded_fixed_and_independent_of_the_loader_order():
    def indices(seed, shuffle):
        monitor = SharpnessMonitor(measures=[TRACE], probe_batches=3, seed=seed, max_overhead=None)
        make_trainer(max_steps=2, callbacks=[monitor]).fit(Net(), loader(shuffle=shuffle))
        return monitor.state_dict()["probe_indices"]

    a = indices(0, False)
    assert len(a) == 3 and all(len(chunk) == 8 for chunk in a)
    flat = [i for chunk in a for i in chunk]
    assert len(set(flat)) == 24 and all(0 <= i < 40 for i in flat)
    assert flat != sorted(flat)  # drawn at random, not the first batches
    assert indices(0, True) == a
    assert indices(1, False) != a


def test_logged_values_equal_direct_measurements_of_the_probe_set():
    """At train end, every logged number is the measure of the final weights on the probe batches."""
    model, logger = Net(dropout=0.5), RecordingLogger()
    spec = [TRACE, TOP, {"name": "hessian_trace", "tag": "trace_pp", "method": "hutch++", "matvecs": 12}]
    monitor = SharpnessMonitor(measures=spec, every_n_epochs=None, every_n_steps=100, max_overhead=None, seed=3)
    make_trainer(logger=logger, max_epochs=2, callbacks=[monitor]).fit(model, loader())
    batches = probe_batches(monitor, data())
    model.eval()  # the monitor measures in eval mode: dropout off
    expected_trace = measures.hessian_trace(model, ce, batches, method="hutchinson", matvecs=8, seed=3)
    expected_top = measures.hessian_eigenvalues(model, ce, batches, k=2, seed=3)
    expected_pp = measures.hessian_trace(model, ce, batches, method="hutch++", matvecs=12, seed=3)
    first, (step, logged) = [r for r in logger.records if "sharpness/hessian_trace" in r[1]]
    assert first[0] == 0 and step == 10  # at fit start, then at train end
    assert logged["sharpness/hessian_trace"] == pytest.approx(float(expected_trace), rel=1e-6)
    assert logged["sharpness/hessian_trace/stderr"] == pytest.approx(expected_trace.stderr, rel=1e-6)
    assert logged["sharpness/hessian_eigenvalues"] == pytest.approx(float(expected_top), rel=1e-5)
    assert logged["sharpness/hessian_eigenvalues/eigenvalue_1"] == pytest.approx(
        float(expected_top.eigenvalues[1]), rel=1e-5
    )
    assert logged["sharpness/trace_pp"] == pytest.approx(float(expected_pp), rel=1e-6)


def test_default_loss_is_the_training_step_loss_and_a_custom_loss_fn_is_used():
    model = Net()
    default = SharpnessMonitor(measures=[TRACE], max_overhead=None)
    custom = SharpnessMonitor(measures=[TRACE], max_overhead=None, loss_fn=lambda m, b: 2.0 * ce(m, b))
    make_trainer(max_steps=3, callbacks=[default, custom]).fit(model, loader())
    (_, a), (_, b) = default.history[-1], custom.history[-1]
    assert default.state_dict()["probe_indices"] == custom.state_dict()["probe_indices"]
    assert b["hessian_trace"] == pytest.approx(2.0 * a["hessian_trace"], rel=1e-6)


def test_validation_step_loss_with_val_probe():
    model = Net()
    monitor = SharpnessMonitor(measures=[TRACE], probe="val", probe_batches=1, max_overhead=None)
    make_trainer(max_steps=2, callbacks=[monitor], limit_val_batches=1).fit(
        model, loader(), DataLoader(data(16, seed=0), batch_size=8)
    )
    val = data(16, seed=0)
    expected = measures.hessian_trace(model.eval(), ce, probe_batches(monitor, val), method="hutchinson", matvecs=8)
    assert monitor.history[-1][1]["hessian_trace"] == pytest.approx(float(expected), rel=1e-6)


def test_probe_from_a_user_dataloader_and_too_few_examples():
    model = Net()
    user = DataLoader(data(12, seed=7), batch_size=8)
    monitor = SharpnessMonitor(measures=[TRACE], probe=user, probe_batches=3, max_overhead=None)
    with pytest.warns(UserWarning, match="fewer than probe_batches"):
        make_trainer(max_steps=1, callbacks=[monitor]).fit(model, loader())
    idx = monitor.state_dict()["probe_indices"]
    assert [len(c) for c in idx] == [8, 4] and sorted(i for c in idx for i in c) == list(range(12))
    expected = measures.hessian_trace(
        model.eval(), ce, probe_batches(monitor, data(12, seed=7)), method="hutchinson", matvecs=8
    )
    assert monitor.history[-1][1]["hessian_trace"] == pytest.approx(float(expected), rel=1e-6)


def test_measuring_does_not_change_training_and_keeps_train_mode():
    """A run with the monitor ends bitwise equal to one without; training_step always saw train mode."""

    class Modes(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pl_module.train_modes.append(all(m.training for m in pl_module.modules()))

    def run(with_monitor):
        torch.manual_seed(123)
        model = Net(dropout=0.3)
        callbacks = [Modes()]
        if with_monitor:
            callbacks.append(SharpnessMonitor(measures=[TRACE, TOP], every_n_steps=2, max_overhead=None))
        make_trainer(max_epochs=2, callbacks=callbacks).fit(model, loader(shuffle=True))
        return model

    plain, monitored = run(False), run(True)
    for (name, a), b in zip(plain.state_dict().items(), monitored.state_dict().values()):
        assert torch.equal(a, b), name
    assert monitored.train_modes == [True] * 10


def test_no_measurement_sees_an_inference_tensor_in_validate(tmp_path):
    """trainer.validate runs under inference_mode; the monitor still measures (autograd re-enabled)."""
    model = Net()
    monitor = SharpnessMonitor(measures=[TRACE], probe="val", max_overhead=None)
    make_trainer(callbacks=[monitor]).validate(model, loader(n=16))
    assert len(monitor.history) == 1 and monitor.history[0][0] == 0


# ---------------------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_half_precision_training_is_measured_in_fp32(precision):
    model = Net()
    monitor = SharpnessMonitor(measures=[TRACE], max_overhead=None)
    make_trainer(max_steps=3, precision=precision, callbacks=[monitor]).fit(model, loader())
    dtype = next(model.parameters()).dtype
    assert dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)
    reference = copy.deepcopy(model.net).float().eval()
    expected = measures.hessian_trace(
        reference, lambda m, b: ce(m, b), probe_batches(monitor, data()), method="hutchinson", matvecs=8
    )
    assert monitor.history[-1][1]["hessian_trace"] == pytest.approx(float(expected), rel=1e-6)


def test_bf16_true_weights_are_restored_bitwise():
    model = Net()
    monitor = SharpnessMonitor(measures=[TRACE], max_overhead=None, on_train_end=False)
    trainer = make_trainer(max_steps=1, precision="bf16-true", callbacks=[monitor])
    trainer.fit(model, loader())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monitor._measure(trainer, model, guarded=False)
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in model.state_dict().items())
    assert all(p.grad is None or p.grad.dtype == torch.bfloat16 for p in model.parameters())


# ---------------------------------------------------------------------------------------------- budgets


def test_hvp_budget_caps_and_skips_measures():
    monitor = SharpnessMonitor(
        measures=[{"name": "hessian_trace", "method": "hutchinson", "matvecs": 50}, TOP],
        max_hvps=30,
        max_overhead=None,
    )
    with pytest.warns(UserWarning, match="max_hvps=30 spent; skipping hessian_eigenvalues"):
        make_trainer(max_steps=1, callbacks=[monitor]).fit(Net(), loader())
    values = monitor.history[-1][1]
    assert "hessian_eigenvalues" not in values
    model_batches = probe_batches(monitor, data())
    assert "hessian_trace" in values and len(model_batches) == 2


def test_time_budget_skips_the_measures_after_it():
    monitor = SharpnessMonitor(measures=[TRACE, TOP], max_seconds=1e-9, max_overhead=None)
    with pytest.warns(UserWarning, match="skipping hessian_eigenvalues"):
        make_trainer(max_steps=1, callbacks=[monitor]).fit(Net(), loader())
    assert set(monitor.history[-1][1]) == {"hessian_trace", "hessian_trace/stderr", "seconds"}
    assert all("hessian_eigenvalues" not in v for _, v in monitor.history)


def test_overhead_guard_keeps_measuring_time_within_the_fraction_after_the_first():
    # Measuring (a 60-step Lanczos at every step) costs far more than 1% of these tiny steps. Issue 10 changed
    # this: the budget used to allow the first measurement whatever it cost; the fit-start plan now forecasts
    # that not even one fits, says so, and measures nothing (tests/test_monitor_robust.py tests the sizing).
    monitor = SharpnessMonitor(
        measures=[{"name": "hessian_eigenvalues", "max_iter": 60, "tol": 1e-12}], every_n_steps=1, max_overhead=0.01
    )
    with pytest.warns(UserWarning, match="no measurement fits in the budget.*max_overhead=0.01"):
        make_trainer(max_steps=6, callbacks=[monitor]).fit(Net(), loader(n=48))
    assert monitor.history == []
    state = monitor.state_dict()
    assert state["last_step"] == -1 and state["last_cost"] is None and state["plan"]["at_end"] is False
    # Without the guard, every scheduled point is measured.
    monitor = SharpnessMonitor(measures=[TRACE], every_n_steps=1, max_overhead=None)
    make_trainer(max_steps=6, callbacks=[monitor]).fit(Net(), loader(n=48))
    assert [s for s, _ in monitor.history] == [0, 1, 2, 3, 4, 5, 6]


def test_resume_keeps_probe_set_and_last_step(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = SharpnessMonitor(measures=[TRACE], every_n_steps=5, seed=1, max_overhead=None)
    make_trainer(tmp_path, max_epochs=1, callbacks=[first, ckpt], enable_checkpointing=True).fit(Net(), loader())
    state = first.state_dict()
    assert state["last_step"] == 5 and [s for s, _ in first.history] == [0, 5]

    resumed = SharpnessMonitor(measures=[TRACE], every_n_steps=5, seed=99, max_overhead=None)  # another seed
    logger = RecordingLogger()
    make_trainer(tmp_path, logger=logger, max_epochs=2, callbacks=[resumed]).fit(
        Net(), loader(), ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert resumed.state_dict()["probe_indices"] == state["probe_indices"]
    assert [s for s, _ in logger.values("sharpness/hessian_trace")] == [10]
    assert [s for s, _ in resumed.history] == [0, 5, 10]  # step 5 was measured: not again at the restart


def test_validate_a_checkpoint_measures_it_at_its_global_step(tmp_path):
    model = Net()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    monitor = SharpnessMonitor(measures=[TRACE], max_overhead=None)
    make_trainer(tmp_path, max_steps=4, callbacks=[monitor, ckpt], enable_checkpointing=True).fit(model, Data())
    trained = monitor.history[-1]

    fresh, logger = Net(seed=42), RecordingLogger()
    validator = SharpnessMonitor(measures=[TRACE], max_overhead=None)
    make_trainer(logger=logger, callbacks=[validator]).validate(fresh, Data(), ckpt_path=str(tmp_path / "last.ckpt"))
    # Same probe set (restored from the checkpoint), same weights: the same number, logged at the same step.
    assert logger.values("sharpness/hessian_trace") == [(4, pytest.approx(trained[1]["hessian_trace"], rel=1e-6))]


def test_progress_bar_shows_the_chosen_measure():
    monitor = SharpnessMonitor(
        measures=[TRACE, TOP], every_n_steps=2, progress_bar="hessian_eigenvalues", max_overhead=None
    )
    trainer = make_trainer(max_steps=3, callbacks=[monitor])
    trainer.fit(Net(), loader())
    shown = trainer.progress_bar_metrics["sharpness/hessian_eigenvalues"]
    assert shown == pytest.approx(dict(monitor.history)[2]["hessian_eigenvalues"])
    assert "sharpness/hessian_trace" not in trainer.progress_bar_metrics


def test_manual_optimization_needs_a_loss_fn():
    class Manual(Net):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = ce(self, batch)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    with pytest.raises(ValueError, match="optimizes manually.*loss_fn"):
        make_trainer(max_steps=1, callbacks=[SharpnessMonitor(measures=[TRACE])]).fit(Manual(), loader())
    monitor = SharpnessMonitor(measures=[TRACE], loss_fn=ce, max_overhead=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(max_steps=2, callbacks=[monitor]).fit(Manual(), loader())
    assert [s for s, _ in monitor.history] == [0, 2]


def test_yaml_config_through_lightning_cli(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  callbacks:
    - class_path: lightning_sharpness.monitor.SharpnessMonitor
      init_args:
        measures:
          - hessian_eigenvalues
          - {name: hessian_trace, method: hutchinson, matvecs: 20}
        every_n_steps: 200
        probe_batches: 4
"""
    )
    cli = LightningCLI(Net, run=False, args=["--config", str(config)], save_config_callback=None)
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, SharpnessMonitor)]
    assert [m.name for m in monitor.measures] == ["hessian_eigenvalues", "hessian_trace"]
    assert monitor.measures[1].options == {"method": "hutchinson", "matvecs": 20, "seed": 0}
    assert monitor.every_n_steps == 200 and monitor.every_n_epochs is None and monitor.probe_batches == 4


def test_every_measure_runs_through_the_monitor_and_logs_a_finite_number():
    specs = [
        {"name": "hessian_eigenvalues", "max_iter": 20},
        {"name": "hessian_trace", "matvecs": 12},
        {"name": "hessian_diagonal", "matvecs": 8},
        {"name": "diag_sqrt_trace", "matvecs": 8},
        {"name": "spectral_density", "probes": 2, "steps": 10},
        {"name": "renyi_sharpness", "matvecs": 8},
        {"name": "worst_case_sharpness", "rho": 0.05, "steps": 3, "m": 8},
        {"name": "average_case_sharpness", "rho": 0.05, "samples": 4},
    ]
    assert sorted(s["name"] for s in specs) == sorted(available_measures())
    logger = RecordingLogger()
    monitor = SharpnessMonitor(measures=specs, max_overhead=None)
    make_trainer(logger=logger, max_steps=2, callbacks=[monitor]).fit(Net(), loader())
    ((step, logged),) = logger.records[-1:]
    assert step == 2
    for spec in specs:
        value = logged[f"sharpness/{spec['name']}"]
        assert value == value and abs(value) < 1e6, spec["name"]
    assert logged["sharpness/worst_case_sharpness"] >= 0.0
