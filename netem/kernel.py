"""What this machine can do for link emulation, found by trying it, and the backend to use.

:func:`capabilities` creates a throwaway namespace and tries, inside it, the three things
the backends need: a netem qdisc (``netem``), a TUN device (``tun``), and the namespace
itself. Each unavailable backend gets the exact reason (the command's own error text).
:func:`choose` turns ``network.backend`` (``auto`` or a name) into the backend that runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

from netem import ns

ORDER = ("netem", "tun", "relay")  # auto: the first available


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run here; the message gives the probe's reason and the fix."""


@dataclass(frozen=True)
class Capabilities:
    """Which backends can run here; ``reasons[name]`` says why one cannot (None: it can)."""

    reasons: dict = field(default_factory=dict)

    def available(self, backend: str) -> bool:
        return self.reasons.get(backend) is None

    def describe(self) -> dict:
        return {b: ("available" if self.available(b) else self.reasons[b]) for b in (*ORDER, "none")}


_CACHE: Capabilities | None = None


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=20)


def _probe() -> Capabilities:
    reasons: dict = {"relay": None, "none": None}
    why = None
    if os.geteuid() != 0:
        why = "not running as root (network namespaces and TUN devices need CAP_NET_ADMIN)"
    elif shutil.which("ip") is None or shutil.which("tc") is None:
        why = "iproute2's `ip` and `tc` commands are not installed"
    if why is not None:
        return Capabilities({**reasons, "netem": why, "tun": why})
    edge, _ = ns.names(ns.new_tag())
    try:
        ns.create(edge)
    except ns.NamespaceError as exc:
        why = f"cannot create a network namespace: {exc}"
        return Capabilities({**reasons, "netem": why, "tun": why})
    try:
        res = _run("tc", "-n", edge, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms")
        reasons["netem"] = None if res.returncode == 0 else (
            f"`tc qdisc add dev lo root netem delay 1ms` failed: {res.stderr.strip()} "
            "(this kernel lacks sch_netem; on Ubuntu it is in linux-modules-extra-$(uname -r))")
        if not os.path.exists("/dev/net/tun"):
            reasons["tun"] = "/dev/net/tun does not exist (the kernel has no TUN support)"
        else:
            res = _run("ip", "-n", edge, "tuntap", "add", "mode", "tun", "name", "swprobe0")
            reasons["tun"] = None if res.returncode == 0 else (
                f"`ip tuntap add mode tun` failed: {res.stderr.strip()}")
    finally:
        ns.delete(edge)
    return Capabilities(reasons)


def capabilities(refresh: bool = False) -> Capabilities:
    """The probe's findings (cached for the life of the process)."""
    global _CACHE
    if _CACHE is None or refresh:
        _CACHE = _probe()
    return _CACHE


def choose(requested: str, shaped: bool = True) -> tuple[str, str]:
    """``(backend, why)`` for ``network.backend=requested``; an unshaped profile on auto needs none."""
    caps = capabilities()
    if requested == "auto":
        if not shaped:
            return "none", "auto: the profile asks for no shaping (plain loopback)"
        passed = []
        for name in ORDER:
            if caps.available(name):
                note = "; ".join(f"{b} unavailable: {caps.reasons[b]}" for b in passed)
                return name, f"auto: {name}" + (f" ({note})" if note else "")
            passed.append(name)
    if requested not in (*ORDER, "none"):
        raise BackendUnavailable(f"network.backend must be one of auto, {', '.join(ORDER)}, none; got {requested!r}")
    if not caps.available(requested):
        raise BackendUnavailable(f"network.backend={requested} cannot run here: {caps.reasons[requested]}. "
                                 "Use network.backend=auto to take the best available one.")
    return requested, f"requested: {requested}"
