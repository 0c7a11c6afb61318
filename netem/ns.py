"""Network namespaces: unique names per run, entering one from a thread, stale-set clean-up.

Every namespace this package creates is named ``swn<pid>x<tag>-<role>``: ``swn`` marks it
as SpecWAN's, ``<pid>`` is the process that owns it, ``<tag>`` tells apart the links one
process brings up. :func:`clean_stale` deletes only sets whose owning process is dead (a
killed run); devices inside a namespace go with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import subprocess
import threading

PREFIX = "swn"
_NAME = re.compile(rf"^{PREFIX}(\d+)x([0-9a-z]+)-(edge|cloud)$")
CLONE_NEWNET = 0x40000000
_counter = 0
_lock = threading.Lock()


class NamespaceError(RuntimeError):
    """A namespace could not be made, entered or removed; the message carries the command's error."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip ARGS``; a failure raises :class:`NamespaceError` with the command and its stderr."""
    try:
        res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    except FileNotFoundError as exc:
        raise NamespaceError("the `ip` command (iproute2) is not installed") from exc
    if check and res.returncode != 0:
        raise NamespaceError(f"`ip {' '.join(args)}` failed: {res.stderr.strip() or res.returncode}")
    return res


def new_tag() -> str:
    global _counter
    with _lock:
        _counter += 1
        return f"{_counter:x}{os.urandom(2).hex()}"


def names(tag: str, pid: int | None = None) -> tuple[str, str]:
    """The (edge, cloud) namespace names of one link."""
    base = f"{PREFIX}{pid or os.getpid()}x{tag}"
    return f"{base}-edge", f"{base}-cloud"


def list_ours() -> list[str]:
    """Namespaces that carry this package's prefix, whoever owns them."""
    out = ip("netns", "list", check=False).stdout if _have_ip() else ""
    return [line.split()[0] for line in out.splitlines() if line.strip() and _NAME.match(line.split()[0])]


def owner(name: str) -> int | None:
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def _have_ip() -> bool:
    from shutil import which

    return which("ip") is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale() -> list[str]:
    """Delete our namespaces whose owning process is dead; the names deleted."""
    gone = []
    for name in list_ours():
        pid = owner(name)
        if pid is not None and pid != os.getpid() and not _alive(pid):
            if ip("netns", "delete", name, check=False).returncode == 0:
                gone.append(name)
    return gone


def create(name: str) -> None:
    ip("netns", "add", name)
    ip("-n", name, "link", "set", "lo", "up")


def delete(name: str) -> None:
    ip("netns", "delete", name, check=False)


def sysctl(ns: str, key: str, value: str) -> None:
    """Set a per-namespace sysctl (``net.ipv4.*``) inside ``ns``."""
    path = "/proc/sys/" + key.replace(".", "/")
    with entered(ns):
        # /proc/sys/net shows the namespace of the thread that opens it
        with open(path, "w") as f:
            f.write(value)


_libc = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NamespaceError(f"setns failed: {os.strerror(err)}")


@contextlib.contextmanager
def entered(ns: str | None):
    """Run the body with this thread inside network namespace ``ns`` (None: stay).

    Sockets opened in the body belong to ``ns`` for their whole life, whichever thread uses
    them later; the thread returns to its own namespace on exit.
    """
    if ns is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    except OSError as exc:
        os.close(home)
        raise NamespaceError(f"network namespace {ns!r} does not exist ({exc.strerror})") from exc
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)
