"""Single-process simulators, for studies too large for real processes (``tandem sim ...``).

:mod:`tandem.sim.goco` simulates the ``gossip`` strategy (GOCO and its baselines) for up to
thousands of devices on the regression workload; :mod:`tandem.sim.study` sweeps it over the
straggling rate and the redundancy and plots the curves.
"""

from tandem.sim.goco import MAX_BYTES, MAX_DEVICES, MODES, SimConfig, SimResult, simulate
from tandem.sim.study import (
    floor_table,
    format_table,
    plot_study,
    save_study,
    study,
    study_configs,
)

__all__ = ["MAX_BYTES", "MAX_DEVICES", "MODES", "SimConfig", "SimResult", "floor_table",
           "format_table", "plot_study", "save_study", "simulate", "study", "study_configs"]
