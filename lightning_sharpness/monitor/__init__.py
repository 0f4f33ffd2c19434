"""SharpnessMonitor: measure sharpness on a fixed probe set while training, log it to the Trainer's loggers.

The package is split by job, as Lightning's ``SpikeDetection`` is a thin callback over a core:

* :mod:`~lightning_sharpness.monitor.spec`: *what* to measure (the measure specs, checked when the callback is
  built with each measure's own validators, and the monitor's arguments);
* :mod:`~lightning_sharpness.monitor.probe`: *on what* (the seeded probe set, the loss);
* :mod:`~lightning_sharpness.monitor.plan`: *when and how much* (the schedule, the time budget, the fit-start
  plan and its cost model);
* :mod:`~lightning_sharpness.monitor.context`: *how* a measurement runs in a fit (modes, precision, processes);
* :mod:`~lightning_sharpness.monitor.callback`: the callback that wires them to Lightning's hooks and loggers.
"""

from lightning_sharpness.monitor.callback import SharpnessMonitor
from lightning_sharpness.monitor.plan import AUTO_MAX_OVERHEAD
from lightning_sharpness.monitor.spec import DEFAULT_MEASURES, MeasureSpec, available_measures

__all__ = ["SharpnessMonitor", "MeasureSpec", "DEFAULT_MEASURES", "AUTO_MAX_OVERHEAD", "available_measures"]
