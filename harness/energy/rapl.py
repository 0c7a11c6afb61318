"""CPU package energy through RAPL, as Linux's powercap interface exposes it.

Layout (``/sys/class/powercap``; AMD's RAPL appears under the same ``intel-rapl`` name)::

    intel-rapl:0/            name = package-0, energy_uj, max_energy_range_uj
    intel-rapl:0/intel-rapl:0:0/   name = core     (a sub-zone: part of package-0)
    intel-rapl:0/intel-rapl:0:1/   name = dram     (a sub-zone on some platforms)
    intel-rapl:1/            name = package-1 (a second socket) or psys (the whole platform)

The total is the sum of the ``package-*`` zones. Sub-zones and other top-level domains
(``psys`` contains the packages) are reported in the reading's ``detail`` and never added
to it. A counter that passed ``max_energy_range_uj`` wrapped to 0: the delta is
``max - before + after`` (as Zeus and the kernel's own perf driver do); a window spanning
more than one wrap (minutes at hundreds of watts) cannot be told apart, so keep windows short.

Since Linux 5.10, ``energy_uj`` is readable by root only (CVE-2020-8694, "Platypus"):
that is reported as "no permission", not as absence.
"""

from __future__ import annotations

import errno
import re
import time
from pathlib import Path
from typing import Callable

from harness.energy.base import ABSENT, NO_PERMISSION, EnergyUnavailable, Meter

POWERCAP_ROOT = "/sys/class/powercap"
_TOP = re.compile(r"intel-rapl:(\d+)")
_SUB = re.compile(r"intel-rapl:(\d+):(\d+)")


def _read_text(path: Path) -> str:
    return path.read_text()


class _Zone:
    def __init__(self, path: Path, label: str, max_uj: int):
        self.path, self.label, self.max_uj = path, label, max_uj


class RaplMeter(Meter):
    """Measured CPU package energy from powercap; ``root`` and ``read`` are injectable for tests."""

    name = "rapl"
    kind = "measured"

    def __init__(self, role: str, root: str | Path = POWERCAP_ROOT, *, read: Callable[[Path], str] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(role, clock)
        self.root = Path(root)
        self.read = read or _read_text
        if not self.root.is_dir():
            raise EnergyUnavailable(f"no powercap interface at {self.root} (a kernel without powercap/intel_rapl, "
                                    "or a virtual machine that hides it)", ABSENT)
        tops = sorted((p for p in self.root.iterdir() if _TOP.fullmatch(p.name)),
                      key=lambda p: int(_TOP.fullmatch(p.name).group(1)))
        if not tops:
            raise EnergyUnavailable(f"no RAPL zones (intel-rapl:N) under {self.root}", ABSENT)
        self.packages: list[_Zone] = []
        self.others: list[_Zone] = []  # top-level domains that are not packages (psys...)
        self.subzones: list[_Zone] = []
        for top in tops:
            name = self._name(top)
            zone = self._zone(top, name)
            (self.packages if name.startswith("package") else self.others).append(zone)
            subs = sorted((p for p in top.iterdir() if _SUB.fullmatch(p.name)),
                          key=lambda p: int(_SUB.fullmatch(p.name).group(2)))
            for sub in subs:
                self.subzones.append(self._zone(sub, f"{name}/{self._name(sub)}"))
        if not self.packages:
            names = ", ".join(z.label for z in self.others)
            raise EnergyUnavailable(f"no RAPL package zone under {self.root} (found: {names})", ABSENT)
        self._snapshot()  # every counter readable now, or the meter is unusable
        self.source = f"rapl ({'+'.join(z.label for z in self.packages)} via powercap)"
        self.constants = {"root": str(self.root), "packages": [z.label for z in self.packages],
                          "subzones": [z.label for z in self.subzones], "others": [z.label for z in self.others],
                          "max_energy_range_uj": {z.label: z.max_uj for z in self.packages}}
        self.resources = tuple(f"rapl:{z.label}" for z in self.packages)

    def _name(self, zone: Path) -> str:
        try:
            return self.read(zone / "name").strip() or zone.name
        except OSError:
            return zone.name

    def _zone(self, path: Path, label: str) -> _Zone:
        try:
            max_uj = int(self.read(path / "max_energy_range_uj").strip())
        except (OSError, ValueError):
            max_uj = 0  # unknown range: a wrap is then reported as unknown
        return _Zone(path, label, max_uj)

    def _energy_uj(self, zone: _Zone) -> int:
        path = zone.path / "energy_uj"
        try:
            return int(self.read(path).strip())
        except PermissionError as exc:
            raise EnergyUnavailable(
                f"no permission to read {path} (energy_uj is root-only since Linux 5.10, CVE-2020-8694; "
                "run as root or make it readable)", NO_PERMISSION) from exc
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise EnergyUnavailable(f"no permission to read {path} ({exc.strerror})", NO_PERMISSION) from exc
            raise EnergyUnavailable(f"cannot read {path} ({exc})", ABSENT) from exc
        except ValueError as exc:
            raise EnergyUnavailable(f"{path} does not hold a number ({exc})", ABSENT) from exc

    def _snapshot(self) -> dict[str, int]:
        return {z.label: self._energy_uj(z) for z in (*self.packages, *self.subzones, *self.others)}

    @staticmethod
    def _diff(zone: _Zone, before: int, after: int) -> float | None:
        if after >= before:
            return (after - before) / 1e6
        if zone.max_uj <= 0:
            return None  # wrapped, range unknown
        return (zone.max_uj - before + after) / 1e6

    def _delta(self, s0, s1, seconds):
        packages = {z.label: self._diff(z, s0[z.label], s1[z.label]) for z in self.packages}
        detail = {"packages": packages,
                  "subzones": {z.label: self._diff(z, s0[z.label], s1[z.label]) for z in self.subzones},
                  "others": {z.label: self._diff(z, s0[z.label], s1[z.label]) for z in self.others}}
        if any(v is None for v in packages.values()):
            detail["reason"] = "a package counter wrapped and its max_energy_range_uj is unknown"
            return None, detail
        return sum(packages.values()), detail
