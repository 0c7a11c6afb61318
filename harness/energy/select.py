"""``energy=auto``: per role, the first meter that works, and why the others did not."""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, Mapping

from harness.energy.base import ALREADY_CLAIMED, DISABLED, EnergyUnavailable, Meter, NullMeter
from harness.energy.estimate import CpuTimeMeter
from harness.energy.nvml import MIN_SAMPLE_HZ, NvmlMeter
from harness.energy.rapl import POWERCAP_ROOT, RaplMeter

MODES = ("auto", "estimate", "none")
CHAIN = ("nvml", "rapl", "estimate")


@dataclass(frozen=True)
class EnergyConfig:
    """The ``energy`` config group (conf/energy/*.yaml); every field but ``mode`` is optional."""

    mode: str = "auto"  # auto: NVML, then RAPL, then the estimate; estimate: the estimate only; none: off
    nvml_devices: tuple[int, ...] | None = None  # GPU indices a role's NVML meter reads (None: all)
    sample_hz: float = 20.0  # power sampling where a GPU has no energy counter
    powercap_root: str = POWERCAP_ROOT
    cpu_tdp_w: float | None = None  # estimate: TDP (None: the profile's tdp_w, else 4 W per thread)
    hw_threads: int | None = None  # estimate: hardware threads (None: the profile's, else this machine's)
    static_w: float | None = None  # estimate: static power x wall time (None: the profile's idle_w, else 0)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"energy.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not isinstance(self.sample_hz, (int, float)) or self.sample_hz < MIN_SAMPLE_HZ:
            raise ValueError(f"energy.sample_hz must be a number >= {MIN_SAMPLE_HZ:g}, got {self.sample_hz!r}")
        for name in ("cpu_tdp_w", "static_w"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"energy.{name} must be a number >= 0 (or null), got {value!r}")
        if self.hw_threads is not None and (isinstance(self.hw_threads, bool) or not isinstance(self.hw_threads, int)
                                            or self.hw_threads < 1):
            raise ValueError(f"energy.hw_threads must be an integer >= 1 (or null), got {self.hw_threads!r}")


def energy_config(data: Mapping[str, Any] | EnergyConfig | str | None) -> EnergyConfig:
    """An :class:`EnergyConfig` from a config mapping (or a mode name); bad keys are named."""
    if data is None:
        return EnergyConfig()
    if isinstance(data, EnergyConfig):
        return data
    if isinstance(data, str):
        return EnergyConfig(mode=data)
    data = dict(data)
    allowed = {f.name for f in fields(EnergyConfig)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"energy: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(allowed))}")
    if data.get("nvml_devices") is not None:
        data["nvml_devices"] = tuple(int(d) for d in data["nvml_devices"])
    return EnergyConfig(**data)


def _estimate(role: str, cfg: EnergyConfig, profile: Any, pid: int | None, cpu_seconds, clock) -> CpuTimeMeter:
    tdp, threads, static = cfg.cpu_tdp_w, cfg.hw_threads, cfg.static_w
    origin = []
    if tdp is not None:
        origin.append("tdp_w: flag energy.cpu_tdp_w")
    elif getattr(profile, "tdp_w", None) is not None:
        tdp = profile.tdp_w
        origin.append(f"tdp_w: device profile {profile.name!r}")
    if threads is not None:
        origin.append("hw_threads: flag energy.hw_threads")
    elif getattr(profile, "hw_threads", None) is not None:
        threads = profile.hw_threads
        origin.append(f"hw_threads: device profile {profile.name!r}")
    if static is not None:
        origin.append("static_w: flag energy.static_w")
    elif getattr(profile, "idle_w", None) is not None:
        static = profile.idle_w
        origin.append(f"static_w: device profile {profile.name!r} idle_w")
    return CpuTimeMeter(role, pid, tdp_w=tdp, hw_threads=threads, static_w=static,
                        constants_from="; ".join(origin) or None, cpu_seconds=cpu_seconds, clock=clock)


def select_meter(role: str, cfg: Mapping[str, Any] | EnergyConfig | str | None = None, *, profile: Any = None,
                 pid: int | None = None, claimed: set[str] | None = None, nvml: Any = None,
                 rapl_read: Callable | None = None, cpu_seconds: Callable[[], float] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> Meter:
    """The energy meter for ``role``: with mode auto, NVML, then RAPL, then the CPU-time estimate.

    The returned meter's ``tried`` lists each attempt (``meter``, ``ok``, ``code``,
    ``reason``) and ``describe()`` gives the manifest entry. ``claimed`` (shared between the
    roles of one machine) holds the counters already given to another role: a counter reads
    a whole device, so two roles on one machine never both get it (pick the cloud first).
    ``profile`` (a RoleProfile) supplies the estimate's constants; ``pid`` the process tree
    (default: this process). ``nvml``, ``rapl_read`` and ``cpu_seconds`` are for tests.
    """
    cfg = energy_config(cfg)
    if cfg.mode == "none":
        meter = NullMeter(role, "energy=none: not requested", clock)
        meter.tried = [{"meter": "none", "ok": True, "code": DISABLED, "reason": "energy=none"}]
        return meter
    chain = CHAIN if cfg.mode == "auto" else ("estimate",)
    claimed = claimed if claimed is not None else set()
    tried: list[dict[str, Any]] = []
    for name in chain:
        try:
            if name == "nvml":
                meter = NvmlMeter(role, cfg.nvml_devices, nvml=nvml, sample_hz=cfg.sample_hz, clock=clock)
            elif name == "rapl":
                meter = RaplMeter(role, cfg.powercap_root, read=rapl_read, clock=clock)
            else:
                meter = _estimate(role, cfg, profile, pid, cpu_seconds, clock)
        except EnergyUnavailable as exc:
            tried.append({"meter": name, "ok": False, "code": exc.code, "reason": exc.reason})
            continue
        taken = sorted(set(meter.resources) & claimed)
        if taken:
            meter.close()
            tried.append({"meter": name, "ok": False, "code": ALREADY_CLAIMED,
                          "reason": f"{', '.join(taken)} already metered for another role on this machine "
                                    "(a counter reads the whole device)"})
            continue
        claimed.update(meter.resources)
        tried.append({"meter": name, "ok": True, "code": None, "reason": None})
        meter.tried = tried
        return meter
    meter = NullMeter(role, "; ".join(f"{t['meter']}: {t['reason']}" for t in tried), clock)
    meter.tried = tried
    return meter


def select_meters(cfg: Mapping[str, Any] | EnergyConfig | str | None = None, *,
                  profiles: Mapping[str, Any] | None = None, pids: Mapping[str, int] | None = None,
                  roles: Iterable[str] = ("cloud", "edge"), **kw) -> dict[str, Meter]:
    """One meter per role on this machine (the cloud first, so it gets the GPU counter)."""
    claimed: set[str] = set()
    return {role: select_meter(role, cfg, profile=(profiles or {}).get(role), pid=(pids or {}).get(role),
                               claimed=claimed, **kw) for role in roles}
