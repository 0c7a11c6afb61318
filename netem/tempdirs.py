"""Temporary folders that say which process owns them, so a later start removes the ones a
killed process left behind (as stale network namespaces are removed).

Every folder made here holds ``owner.pid`` (the process id and its start time). A folder with
the same prefix whose owner is gone is stale: :func:`remove_stale` deletes it. A folder whose
owner file is missing or unreadable (another program's, or one being created) is left alone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import psutil

OWNER = "owner.pid"


def _identity(pid: int) -> str:
    try:
        return f"{pid} {psutil.Process(pid).create_time():.3f}"
    except psutil.Error:
        return f"{pid} ?"


def owned_tempdir(prefix: str) -> Path:
    """A new folder ``<tmp>/<prefix>XXXX`` marked as this process's (after removing stale ones)."""
    remove_stale(prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix))
    (path / OWNER).write_text(_identity(os.getpid()))
    return path


def remove_stale(prefix: str) -> list[Path]:
    """Delete the folders ``<tmp>/<prefix>*`` whose owner process has exited; returns them."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            pid, started = (path / OWNER).read_text().split()
            pid = int(pid)
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and _identity(pid) != f"{pid} {started}":
            _remove(path)
            removed.append(path)
    return removed


def _remove(path: Path, tries: int = 5, pause_s: float = 0.1) -> None:
    """Delete ``path``, again if a file lands in it meanwhile: a dead owner's emulator, told of
    the death by a signal, writes its counters there as it exits, and a folder emptied around
    that write would stay behind without its owner file, never recognised as stale again."""
    for _ in range(tries):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(pause_s)
