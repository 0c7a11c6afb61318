"""GPU energy through NVML (``nvidia-ml-py``, imported as ``pynvml`` only when used).

Volta and later GPUs keep a total-energy counter, ``nvmlDeviceGetTotalEnergyConsumption``
(millijoules since the driver loaded): a window's energy is its difference, as Zeus's
``ZeusMonitor`` does. Older GPUs only report instantaneous power
(``nvmlDeviceGetPowerUsage``, milliwatts): a thread samples it at ``sample_hz`` (>= 10 Hz) and
integrates with the trapezoid rule, the fallback Zeus's ``PowerMonitor`` uses.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence

from harness.energy.base import ABSENT, NO_PERMISSION, UNSUPPORTED, EnergyUnavailable, Meter

MIN_SAMPLE_HZ = 10.0


def import_pynvml():
    """The ``pynvml`` module of ``nvidia-ml-py``; :class:`EnergyUnavailable` when it is not installed."""
    try:
        import pynvml
    except ImportError as exc:
        raise EnergyUnavailable(f"nvidia-ml-py is not installed ({exc})", ABSENT) from exc
    return pynvml


def _error_types(nvml) -> tuple[type[BaseException], ...]:
    err = getattr(nvml, "NVMLError", None)
    return (err,) if isinstance(err, type) else (OSError,)


def _code(nvml, exc: BaseException) -> str:
    value = getattr(exc, "value", None)
    if value is not None and value == getattr(nvml, "NVML_ERROR_NO_PERMISSION", object()):
        return NO_PERMISSION
    if value is not None and value == getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", object()):
        return UNSUPPORTED
    return ABSENT


class _PowerIntegrator:
    """Samples power (W) of some devices and keeps the trapezoid integral (J) per device."""

    def __init__(self, read_w: Callable[[int], float], devices: Sequence[int], hz: float,
                 clock: Callable[[], float]):
        self.read_w, self.devices, self.hz, self.clock = read_w, list(devices), hz, clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples = 0
        t = clock()
        self._last = {d: (t, read_w(d)) for d in self.devices}
        self._joules = {d: 0.0 for d in self.devices}

    def sample(self) -> None:
        """Take one sample of every device (the thread calls this ``hz`` times a second)."""
        for d in self.devices:
            p, t = self.read_w(d), self.clock()
            with self._lock:
                t0, p0 = self._last[d]
                self._joules[d] += 0.5 * (p0 + p) * max(0.0, t - t0)
                self._last[d] = (t, p)
        self.samples += 1

    def totals(self) -> dict[int, float]:
        """Joules per device so far, extended to now at the last sampled power."""
        now = self.clock()
        with self._lock:
            return {d: self._joules[d] + self._last[d][1] * max(0.0, now - self._last[d][0]) for d in self.devices}

    def start(self) -> None:
        def loop():
            period = 1.0 / self.hz
            while not self._stop.wait(period):
                try:
                    self.sample()
                except Exception:  # noqa: BLE001 - a failed sample keeps the last power
                    pass

        self._thread = threading.Thread(target=loop, name="nvml-power", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)


class NvmlMeter(Meter):
    """Measured GPU energy of ``devices`` (indices; None: every GPU NVML sees), summed."""

    name = "nvml"
    kind = "measured"

    def __init__(self, role: str, devices: Sequence[int] | None = None, *, nvml: Any = None,
                 sample_hz: float = 20.0, clock: Callable[[], float] = time.monotonic, start_sampler: bool = True):
        super().__init__(role, clock)
        if sample_hz < MIN_SAMPLE_HZ:
            raise ValueError(f"sample_hz must be >= {MIN_SAMPLE_HZ:g}, got {sample_hz}")
        self.nvml = nvml if nvml is not None else import_pynvml()
        errors = _error_types(self.nvml)
        try:
            self.nvml.nvmlInit()
        except errors as exc:
            raise EnergyUnavailable(f"NVML cannot start ({exc})", _code(self.nvml, exc)) from exc
        self._sampler: _PowerIntegrator | None = None
        try:
            count = int(self.nvml.nvmlDeviceGetCount())
            if count == 0:
                raise EnergyUnavailable("NVML sees no GPU", ABSENT)
            indices = list(range(count)) if devices is None else [int(d) for d in devices]
            bad = [d for d in indices if not 0 <= d < count]
            if bad:
                raise EnergyUnavailable(f"NVML sees {count} GPU(s); no index {bad}", ABSENT)
            self.handles = {d: self.nvml.nvmlDeviceGetHandleByIndex(d) for d in indices}
            self.counter: list[int] = []
            self.sampled: list[int] = []
            why: dict[int, str] = {}
            for d, h in self.handles.items():
                try:
                    self.nvml.nvmlDeviceGetTotalEnergyConsumption(h)
                    self.counter.append(d)
                    continue
                except errors as exc:
                    why[d] = f"no energy counter ({exc})"
                try:
                    self.nvml.nvmlDeviceGetPowerUsage(h)
                    self.sampled.append(d)
                except errors as exc:
                    raise EnergyUnavailable(f"GPU {d}: {why[d]} and no power reading ({exc})",
                                            _code(self.nvml, exc)) from exc
        except EnergyUnavailable:
            self._shutdown()
            raise
        except errors as exc:
            self._shutdown()
            raise EnergyUnavailable(f"NVML failed ({exc})", _code(self.nvml, exc)) from exc
        names = {}
        for d, h in self.handles.items():
            try:
                name = self.nvml.nvmlDeviceGetName(h)
                names[d] = name.decode() if isinstance(name, bytes) else str(name)
            except Exception:  # noqa: BLE001 - the name is only for the manifest
                names[d] = None
        parts = [f"gpu{d} counter" for d in self.counter] + [f"gpu{d} power sampled at {sample_hz:g} Hz"
                                                             for d in self.sampled]
        self.source = f"nvml ({', '.join(parts)})"
        self.constants = {"devices": list(self.handles), "names": names, "counter": list(self.counter),
                          "sampled": list(self.sampled), "sample_hz": sample_hz if self.sampled else None}
        if self.sampled:
            self.constants["why_sampled"] = {d: why[d] for d in self.sampled}
        self.resources = tuple(f"nvml:{d}" for d in self.handles)
        if self.sampled:
            self._sampler = _PowerIntegrator(self._power_w, self.sampled, sample_hz, clock)
            if start_sampler:
                self._sampler.start()

    def _power_w(self, d: int) -> float:
        return self.nvml.nvmlDeviceGetPowerUsage(self.handles[d]) / 1e3

    def _snapshot(self) -> dict[int, float]:
        out = {d: self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handles[d]) / 1e3 for d in self.counter}
        if self._sampler is not None:
            out.update(self._sampler.totals())
        return out

    def _delta(self, s0, s1, seconds):
        per = {f"gpu{d}": s1[d] - s0[d] for d in s0}
        return sum(per.values()), {"devices": per}

    def _shutdown(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
        self._shutdown()
