"""What every energy meter shares: named windows, readings, and the reasons a meter is absent."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

KINDS = ("measured", "estimated")

# Why a meter could not be used; a reading's ``reason`` starts with the meter's name.
ABSENT = "absent"  # no such hardware or interface here
NO_PERMISSION = "no_permission"  # it exists, but this process may not read it
UNSUPPORTED = "unsupported"  # it exists, but lacks what the meter needs
ALREADY_CLAIMED = "already_claimed"  # another role on this machine reads the same counter
DISABLED = "disabled"  # turned off by configuration


class EnergyUnavailable(RuntimeError):
    """A meter cannot read on this machine; ``code`` classifies why, the message explains."""

    def __init__(self, reason: str, code: str = ABSENT):
        super().__init__(reason)
        self.reason = reason
        self.code = code


@dataclass(frozen=True)
class Reading:
    """Energy of one role over one named window.

    ``joules`` is None (with a ``reason``) when nothing could be read, never 0 for "unknown".
    ``kind`` is "measured" (a hardware counter) or "estimated" (a model: then ``model`` is its
    formula and ``constants`` the numbers used). ``detail`` holds per-zone or per-device parts.
    """

    role: str
    window: str
    joules: float | None
    kind: str | None
    source: str
    seconds: float
    model: str | None = None
    constants: dict = field(default_factory=dict)
    detail: dict = field(default_factory=dict)
    reason: str | None = None

    @property
    def watts(self) -> float | None:
        return self.joules / self.seconds if self.joules is not None and self.seconds > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Meter:
    """Reads a role's energy over named windows: ``begin(name)`` ... ``end(name)`` -> Reading.

    Windows may overlap (each keeps its own start snapshot). Subclasses implement
    :meth:`_snapshot` (the cumulative state now) and :meth:`_delta` (joules and detail
    between two snapshots). ``tried`` lists what :func:`harness.energy.select_meter` tried
    before settling on this meter, and why the others failed.
    """

    name = "meter"
    kind: str | None = None
    model: str | None = None

    def __init__(self, role: str, clock: Callable[[], float] = time.monotonic):
        self.role = role
        self.clock = clock
        self.source = self.name
        self.constants: dict[str, Any] = {}
        self.tried: list[dict[str, Any]] = []
        self.resources: tuple[str, ...] = ()  # counters this meter reads (a role claims them)
        self._open: dict[str, tuple[float, Any]] = {}

    # -- windows --

    def begin(self, window: str) -> None:
        if window in self._open:
            raise ValueError(f"{self.role}: energy window {window!r} is already open")
        self._open[window] = (self.clock(), self._snapshot())

    def end(self, window: str) -> Reading:
        try:
            t0, s0 = self._open.pop(window)
        except KeyError:
            raise ValueError(f"{self.role}: energy window {window!r} was never begun") from None
        s1, t1 = self._snapshot(), self.clock()
        joules, detail = self._delta(s0, s1, t1 - t0)
        why = detail.pop("reason", None) if isinstance(detail, dict) else None
        return Reading(self.role, window, joules, self.kind if joules is not None else None, self.source, t1 - t0,
                       self.model, dict(self.constants), detail, (why or self.reason) if joules is None else None)

    @contextmanager
    def window(self, name: str) -> Iterator[dict]:
        """``with meter.window("req-1") as out: ...``; afterwards ``out["reading"]`` holds the Reading."""
        out: dict[str, Reading] = {}
        self.begin(name)
        try:
            yield out
        finally:
            out["reading"] = self.end(name)

    # -- description --

    @property
    def reason(self) -> str | None:
        """Why the first choices were not used (None when this is the first choice)."""
        failed = [f"{t['meter']}: {t['reason']}" for t in self.tried if not t.get("ok")]
        return "; ".join(failed) or None

    def describe(self) -> dict[str, Any]:
        """The role's energy source for the run manifest."""
        return {"kind": self.kind, "source": self.source, "model": self.model, "constants": dict(self.constants),
                "reason": self.reason, "tried": list(self.tried)}

    def close(self) -> None:
        pass

    # -- to implement --

    def _snapshot(self) -> Any:
        raise NotImplementedError

    def _delta(self, s0: Any, s1: Any, seconds: float) -> tuple[float | None, dict]:
        raise NotImplementedError


class NullMeter(Meter):
    """No reading at all: every window gives ``joules=None`` with the reason."""

    name = "none"

    def __init__(self, role: str, reason: str, clock: Callable[[], float] = time.monotonic):
        super().__init__(role, clock)
        self.source = "none"
        self._why = reason

    @property
    def reason(self) -> str:
        return self._why

    def _snapshot(self) -> None:
        return None

    def _delta(self, s0, s1, seconds):
        return None, {}
