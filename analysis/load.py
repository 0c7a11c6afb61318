"""Loading run folders (one run, several, or a sweep folder holding many) into two tables.

    requests, rounds = load_runs(["results/sweep-1", "results/one-run"])

Each row gains a ``run`` column and the run's resolved config as ``config.<dotted key>``
columns (``config.network.rtt_ms``, ``config.system.name``...; the prefix keeps them apart
from the rows' own context columns such as ``system`` or ``network``). Records are read only
through the records' reader, :func:`harness.results.load_run`; nothing is re-run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from harness.results import load_run

MANIFEST_NAME = "manifest.json"  # what marks a folder as a run folder
CONFIG_PREFIX = "config."


class RunFolderError(ValueError):
    """A path given to :func:`load_runs` is not a run (or a folder of runs), or cannot be read."""


def find_runs(path: str | os.PathLike) -> list[Path]:
    """The run folders at ``path``: itself if it holds a manifest, else every folder beneath it
    that does (searched recursively, not descending into a run folder), sorted by path.

    Raises :class:`RunFolderError` when ``path`` does not exist or holds no run at all.
    """
    root = Path(path)
    if not root.is_dir():
        raise RunFolderError(f"{root}: no such folder")
    if (root / MANIFEST_NAME).is_file():
        return [root]
    found: list[Path] = []
    for here, dirs, files in os.walk(root):
        if MANIFEST_NAME in files and Path(here) != root:
            found.append(Path(here))
            dirs[:] = []  # a run folder is a leaf: its sub-folders are not further runs
        else:
            dirs.sort()
    if not found:
        raise RunFolderError(f"{root} is not a run folder (no {MANIFEST_NAME}) and holds none")
    return sorted(found)


def flatten_config(config: Mapping[str, Any], prefix: str = CONFIG_PREFIX) -> dict[str, Any]:
    """A nested config as ``{prefix + dotted key: leaf}``.

    Scalars (str, int, float, bool, None) are kept as they are; lists, and empty mappings, are
    leaves stored as their JSON text, so every column holds hashable values that group and
    compare (``config.systems == '["vanilla", "pipesd"]'``).
    """
    out: dict[str, Any] = {}

    def walk(obj: Any, key: str) -> None:
        if isinstance(obj, Mapping) and obj:
            for k, v in obj.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif obj is None or isinstance(obj, (str, int, float, bool)):
            out[prefix + key] = obj
        else:
            out[prefix + key] = json.dumps(obj, sort_keys=True, default=str)

    walk(config, "")
    return out


def _read(run_dir: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    try:
        return load_run(run_dir)
    except (RuntimeError, ValueError, OSError) as exc:  # the reader's ResultsError is a RuntimeError
        raise RunFolderError(f"{run_dir}: cannot be read as a run ({exc})") from exc


def _label(run_dir: Path, root: Path) -> str:
    """The ``run`` value: the folder's name, or its path under the sweep folder it was found in."""
    return run_dir.resolve().name if run_dir == root else run_dir.relative_to(root).as_posix()


def _with_run_columns(df: pd.DataFrame, run: str, config: Mapping[str, Any]) -> pd.DataFrame:
    extra = pd.DataFrame({"run": run, **config}, index=df.index)
    return pd.concat([df, extra], axis=1)


def labelled_runs(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> dict[Path, str]:
    """Every run folder found at ``paths`` (resolved, each once) with its ``run`` label."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    runs: dict[Path, str] = {}
    for path in paths:
        root = Path(path)
        for run_dir in find_runs(root):
            runs.setdefault(run_dir.resolve(), _label(run_dir, root))
    return runs


def load_runs(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(requests_df, rounds_df)`` of every run found at ``paths``, one after another.

    ``paths``: one path or several; each is a run folder (it holds ``manifest.json``) or a
    folder of runs (a sweep), searched recursively. Each row gains ``run`` (the run folder's
    name; for a run found inside a sweep folder, its path relative to that folder, e.g.
    ``"seed=1/lan"``) and the run's config as ``config.<dotted key>`` columns (a key one run
    lacks is null in its rows). A run reached twice (a sweep and one of its runs) is read once.

    Raises :class:`RunFolderError` naming the folder for a path that is not a run and holds
    none, for a run that cannot be read, and for two different runs with the same ``run``.
    """
    runs = labelled_runs(paths)
    if not runs:
        raise RunFolderError("no run folders given")
    seen: dict[str, Path] = {}
    for run_dir, label in runs.items():
        if label in seen:
            raise RunFolderError(f"two runs are both named {label!r} ({seen[label]} and {run_dir}); "
                                 "load them through a common parent folder, which names them by their paths")
        seen[label] = run_dir
    requests, rounds = [], []
    for run_dir, label in runs.items():
        manifest, req, rnd = _read(run_dir)
        config = flatten_config(manifest.get("config") or {})
        requests.append(_with_run_columns(req, label, config))
        rounds.append(_with_run_columns(rnd, label, config))
    return _concat(requests), _concat(rounds)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    if len(frames) == 1:
        return frames[0].reset_index(drop=True)
    return pd.concat(frames, ignore_index=True, sort=False)


__all__ = ["CONFIG_PREFIX", "MANIFEST_NAME", "RunFolderError", "find_runs", "flatten_config", "labelled_runs",
           "load_runs"]
