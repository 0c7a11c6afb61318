"""Energy per role (edge, cloud): measured where the hardware has a counter, a labelled model elsewhere.

Meters read a role's energy over named windows (``begin(name)`` / ``end(name)`` ->
:class:`Reading`: ``joules``, ``kind`` in {"measured", "estimated"}, ``source``, and for
estimates the ``model`` and ``constants``):

* :class:`NvmlMeter` (measured, GPU): ``nvmlDeviceGetTotalEnergyConsumption`` differenced
  over the window; without that counter, ``nvmlDeviceGetPowerUsage`` sampled at >= 10 Hz
  and integrated (trapezoid).
* :class:`RaplMeter` (measured, CPU package): powercap ``intel-rapl:N`` package zones,
  wrap-around via ``max_energy_range_uj``; sub-zones reported apart, never added;
  "no permission" kept apart from "absent".
* :class:`CpuTimeMeter` (estimated): CPU-seconds of the role's process tree x TDP /
  hardware threads (+ static power x wall time).
* Virtual time (:mod:`harness.energy.virtual`): the modelled devices' busy and idle time x
  the device profile's active and idle power, attributed per request and per round.

:func:`select_meter` (``energy=auto``) tries NVML, RAPL and the estimate in that order for
a role and records why each earlier one failed. A figure that could not be obtained is
None with a reason, never 0; measured and estimated figures never share a column unlabelled.

Formulas of the libraries this follows (cited, not depended on: CodeCarbon and Zeus pull in
hundreds of MB and give no figure at all without counters):

* CodeCarbon (``codecarbon/external/hardware.py``, ``core/cpu.py``): CPU power in process
  mode ``P = TDP x cpu_load% / n_cores / 100``, machine mode ``P = TDP x (0.1 + 0.9 u^3)``;
  TDP from its ``cpu_power.csv`` table, else 4 W per hardware thread; energy = power x time
  between samples. :class:`CpuTimeMeter` integrates the process-mode formula exactly with
  CPU-time counters instead of sampled load.
* Zeus (``zeus.monitor.ZeusMonitor``): GPU energy = ``nvmlDeviceGetTotalEnergyConsumption``
  at ``end_window`` minus at ``begin_window`` (Volta+), else power samples integrated; CPU
  energy from RAPL ``energy_uj`` with wrap-around ``max_energy_range_uj - before + after``.

See ``harness/energy/README.md``.
"""

from harness.energy.base import (
    ABSENT,
    ALREADY_CLAIMED,
    DISABLED,
    KINDS,
    NO_PERMISSION,
    UNSUPPORTED,
    EnergyUnavailable,
    Meter,
    NullMeter,
    Reading,
)
from harness.energy.estimate import DEFAULT_W_PER_THREAD, CpuTimeMeter, process_tree_cpu_seconds
from harness.energy.nvml import NvmlMeter
from harness.energy.rapl import POWERCAP_ROOT, RaplMeter
from harness.energy.select import MODES, EnergyConfig, energy_config, select_meter, select_meters
from harness.energy.virtual import DevicePower, VirtualEnergy, attribute_run, device_power

__all__ = [
    "ABSENT", "ALREADY_CLAIMED", "DEFAULT_W_PER_THREAD", "DISABLED", "KINDS", "MODES", "NO_PERMISSION",
    "POWERCAP_ROOT", "UNSUPPORTED", "CpuTimeMeter", "DevicePower", "EnergyConfig", "EnergyUnavailable", "Meter",
    "NullMeter", "NvmlMeter", "RaplMeter", "Reading", "VirtualEnergy", "attribute_run", "device_power",
    "energy_config", "process_tree_cpu_seconds", "select_meter", "select_meters",
]
