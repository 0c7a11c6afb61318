"""Results on disk: one folder per run, rows appended as requests finish.

A run folder holds::

    manifest.json      what ran: resolved config, git commit, packages, model hashes, machine,
                       clock, device profiles, link backend (and measured link figures)
    requests.jsonl     append-only journal, one line per finished request (the source of truth)
    rounds.jsonl       append-only journal, one line per verification round
    requests.parquet   one row per request, regenerated from the journals after each append
    rounds.parquet     one row per round, likewise
    link.json          wall mode: the link's configured figures, the probe's measured ones
                       (side by side), the backend, and the emulator's counters over the run

Crash safety: a request's round lines are written and fsync'd first, then its request line
(the commit), then both parquet files are rewritten atomically (tmp + ``os.replace``). A crash
therefore loses at most the request in flight; a partially written last journal line is
ignored with a :class:`JournalWarning` (and cut off when the folder is reopened for writing),
and round lines whose request line never arrived are dropped.

Resume: :meth:`RunWriter.done_keys` gives the keys (key context fields + ``request_id``) of
the requests already recorded, so a rerun of the same folder skips them. Reopening a folder
whose manifest records a config that differs in a way that matters raises
:class:`RunConfigMismatch` naming the differing keys.

The schema is versioned (:data:`SCHEMA_VERSION`, in the manifest and in the parquet metadata)
and documented in ``results/README.md``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import fcntl
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from systems.records import BatchRecord, RequestRecord, RoundRecord

SCHEMA_VERSION = 1

MANIFEST = "manifest.json"
REQUESTS_JOURNAL = "requests.jsonl"
ROUNDS_JOURNAL = "rounds.jsonl"
REQUESTS_PARQUET = "requests.parquet"
ROUNDS_PARQUET = "rounds.parquet"
BATCHES_JOURNAL = "batches.jsonl"  # the cloud's forward passes over several sessions (multi-edge runs)
LINK_JSON = "link.json"  # wall mode: the link's configured and measured figures, side by side
_LOCK = ".lock"
_JOURNAL_BYTES = b"specwan.journal_bytes"  # parquet metadata: "<requests.jsonl bytes>,<rounds.jsonl bytes>"

CLOCKS = ("virtual", "wall")
ENERGY_KINDS = ("measured", "estimated")
ENERGY_NOT_MEASURED = "not measured: no energy meter or model for this run"
_ENERGY_KEYS = ("edge_j", "cloud_j", "kind", "edge_kind", "cloud_kind", "edge_idle_j", "cloud_idle_j", "wasted_j",
                "reason")
_ROUND_ENERGY_J = ("energy_draft_j", "energy_wasted_j", "energy_verify_j", "energy_wait_j")

# The run coordinates every row carries, with their types (all nullable).
CONTEXT_FIELDS: dict[str, pa.DataType] = {
    "system": pa.string(),
    "pair": pa.string(),
    "network": pa.string(),
    "workload": pa.string(),
    "prompt_id": pa.string(),
    "category": pa.string(),
    "clock": pa.string(),
    "seed": pa.int64(),
    "config_hash": pa.string(),
}

# What identifies a request within a run folder (request_id is always appended).
DEFAULT_KEY_FIELDS: tuple[str, ...] = ("system", "pair", "network", "workload", "prompt_id", "seed")

# Config keys (dotted prefixes) that do not change results: where output goes, how chatty.
DEFAULT_IGNORED_CONFIG_KEYS: tuple[str, ...] = (
    "hydra", "run_dir", "output_dir", "results_dir", "resume", "progress", "verbose", "log_level",
    "out",  # where the run folders go: moving a sweep changes nothing it measured
    "fleet.workers",  # how many processes simulate a fleet: its records are the same with any number
)

# Manifest entries compared (besides the config) when a run folder is reopened.
_COMPARED_MANIFEST_KEYS = ("schema_version", "clock", "device_profiles", "link.backend", "models")

KEY_PACKAGES = (
    "specwan", "torch", "llama-cpp-python", "transformers", "numpy",
    "hydra-core", "grpcio", "pandas", "pyarrow", "nvidia-ml-py", "psutil",
)

_EXTRA_TYPES: dict[Any, pa.DataType] = {
    str: pa.string(), "string": pa.string(), "str": pa.string(),
    int: pa.int64(), "int64": pa.int64(), "int": pa.int64(),
    float: pa.float64(), "float64": pa.float64(), "double": pa.float64(), "float": pa.float64(),
    bool: pa.bool_(), "bool": pa.bool_(),
}
_TYPE_NAMES = {pa.string(): "string", pa.int64(): "int64", pa.float64(): "float64", pa.bool_(): "bool"}


class ResultsError(RuntimeError):
    """A run folder cannot be written or read as asked; the message says why."""


class RunConfigMismatch(ResultsError):
    """The run folder was written with a different config; ``keys`` names what differs."""

    def __init__(self, run_dir: Path, diffs: list[tuple[str, Any, Any]]):
        self.run_dir = run_dir
        self.keys = [k for k, _, _ in diffs]
        lines = "; ".join(f"{k}: recorded {_short(a)}, now {_short(b)}" for k, a, b in diffs)
        super().__init__(
            f"run folder {run_dir} was written with a different config ({len(diffs)} differing "
            f"key{'s' if len(diffs) != 1 else ''}: {', '.join(self.keys)}): {lines}. "
            "A run with a different config must use a new run folder."
        )


class JournalWarning(UserWarning):
    """A journal had a partially written last line (a crash mid-write); it was ignored."""


# ---- schemas ------------------------------------------------------------------------------

_REQUEST_FIELDS: list[pa.Field] = [
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("attempt", pa.int64(), nullable=False),
    pa.field("prompt_tokens", pa.int64(), nullable=False),
    pa.field("n_tokens", pa.int64(), nullable=False),
    pa.field("output_ids", pa.list_(pa.field("element", pa.int64(), nullable=False)), nullable=False),
    pa.field("start", pa.float64(), nullable=False),
    pa.field("end", pa.float64(), nullable=False),
    pa.field("token_times", pa.list_(pa.field("element", pa.float64(), nullable=False)), nullable=False),
    pa.field("ttft", pa.float64()),
    pa.field("tpot", pa.float64()),
    pa.field("e2e", pa.float64(), nullable=False),
    pa.field("tokens_per_s", pa.float64()),
    pa.field("rounds", pa.int64(), nullable=False),
    pa.field("drafted", pa.int64(), nullable=False),
    pa.field("accepted", pa.int64(), nullable=False),
    pa.field("acceptance_rate", pa.float64()),
    pa.field("accepted_length", pa.float64()),
    pa.field("bytes_up", pa.int64(), nullable=False),
    pa.field("bytes_down", pa.int64(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("recovery", pa.string()),
    pa.field("energy_edge_j", pa.float64()),
    pa.field("energy_cloud_j", pa.float64()),
    pa.field("energy_kind", pa.string()),
    pa.field("energy_reason", pa.string()),
    pa.field("energy_edge_kind", pa.string()),
    pa.field("energy_cloud_kind", pa.string()),
    pa.field("energy_edge_idle_j", pa.float64()),
    pa.field("energy_cloud_idle_j", pa.float64()),
    pa.field("energy_wasted_j", pa.float64()),
]

_ROUND_FIELDS: list[pa.Field] = [
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("attempt", pa.int64(), nullable=False),
    pa.field("round", pa.int64(), nullable=False),
    pa.field("start", pa.float64(), nullable=False),
    pa.field("end", pa.float64(), nullable=False),
    pa.field("drafted", pa.int64(), nullable=False),
    pa.field("uploaded", pa.int64(), nullable=False),
    pa.field("verified", pa.int64(), nullable=False),
    pa.field("accepted", pa.int64(), nullable=False),
    pa.field("emitted", pa.int64(), nullable=False),
    pa.field("wasted", pa.int64(), nullable=False),
    pa.field("n_uploads", pa.int64(), nullable=False),
    pa.field("bytes_up", pa.int64(), nullable=False),
    pa.field("bytes_down", pa.int64(), nullable=False),
    pa.field("t_draft", pa.float64(), nullable=False),
    pa.field("t_uplink", pa.float64()),
    pa.field("t_queue", pa.float64()),
    pa.field("t_verify", pa.float64()),
    pa.field("t_downlink", pa.float64()),
    pa.field("batch_size", pa.int64(), nullable=False),
    pa.field("committed", pa.int64(), nullable=False),
    pa.field("edge_digest", pa.string(), nullable=False),
    pa.field("cloud_digest", pa.string(), nullable=False),
    pa.field("extra", pa.string(), nullable=False),  # RoundRecord.extra as a JSON object
    pa.field("draft_conf", pa.list_(pa.float32())),  # per verified draft token
    pa.field("draft_entropy", pa.list_(pa.float32())),
    pa.field("energy_draft_j", pa.float64()),
    pa.field("energy_wasted_j", pa.float64()),
    pa.field("energy_verify_j", pa.float64()),
    pa.field("energy_wait_j", pa.float64()),
    pa.field("energy_kind", pa.string()),
    pa.field("energy_reason", pa.string()),
]


def _context_schema(extra_context: Mapping[str, pa.DataType]) -> list[pa.Field]:
    fields = {**CONTEXT_FIELDS, **extra_context}
    return [pa.field(name, kind) for name, kind in fields.items()]


def _schema(table: str, fields: list[pa.Field], extra_context: Mapping[str, pa.DataType]) -> pa.Schema:
    return pa.schema(_context_schema(extra_context) + fields).with_metadata({
        b"specwan.schema_version": str(SCHEMA_VERSION).encode(),
        b"specwan.table": table.encode(),
    })


def requests_schema(extra_context: Mapping[str, pa.DataType] | None = None) -> pa.Schema:
    """The schema of ``requests.parquet``: context fields, then the request's figures."""
    return _schema("requests", _REQUEST_FIELDS, _extra_types(extra_context))


def rounds_schema(extra_context: Mapping[str, pa.DataType] | None = None) -> pa.Schema:
    """The schema of ``rounds.parquet``: context fields, then one RoundRecord."""
    return _schema("rounds", _ROUND_FIELDS, _extra_types(extra_context))


def _extra_types(extra_context: Mapping[str, Any] | None) -> dict[str, pa.DataType]:
    """Normalise declared extra context columns to pyarrow types (string/int64/float64/bool)."""
    out: dict[str, pa.DataType] = {}
    reserved = set(CONTEXT_FIELDS) | {f.name for f in _REQUEST_FIELDS} | {f.name for f in _ROUND_FIELDS}
    for name, kind in (extra_context or {}).items():
        if name in reserved:
            raise ValueError(f"extra context column {name!r} clashes with a built-in column")
        if isinstance(kind, pa.DataType) and kind in _TYPE_NAMES:
            out[name] = kind
        elif not isinstance(kind, pa.DataType) and kind in _EXTRA_TYPES:
            out[name] = _EXTRA_TYPES[kind]
        else:
            raise ValueError(
                f"extra context column {name!r}: type {kind!r} not supported (use string, int64, float64 or bool)"
            )
    return out


# ---- JSON helpers -----------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    for attr in ("tolist", "item"):  # numpy arrays and scalars
        if hasattr(obj, attr):
            try:
                return getattr(obj, attr)()
            except (TypeError, ValueError):
                pass
    return str(obj)


_ENCODERS = {sort: json.JSONEncoder(default=_json_default, ensure_ascii=False, sort_keys=sort) for sort in (False, True)}


def _dumps(obj: Any, **kw) -> str:
    if kw.keys() <= {"sort_keys"}:  # a row or a record's extra: one encoder each, not one per call
        return _ENCODERS[kw.get("sort_keys", False)].encode(obj)
    return json.dumps(obj, default=_json_default, ensure_ascii=False, **kw)


def _plain(obj: Any) -> Any:
    """``obj`` as JSON would bring it back (tuples to lists, Paths to strings...)."""
    return json.loads(_dumps(obj))


def _short(value: Any, limit: int = 80) -> str:
    text = "(absent)" if value is _ABSENT else _dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _atomic_write_parquet(path: Path, table: pa.Table) -> None:
    # No fsync: the parquet files are derived from the (fsync'd) journals and regenerated when
    # the folder is reopened; the rename alone keeps them whole if the process dies.
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def config_hash(config: Mapping[str, Any], ignore: Iterable[str] = DEFAULT_IGNORED_CONFIG_KEYS) -> str:
    """A short stable hash of the config's keys that matter (the ignored ones left out)."""
    flat = {k: v for k, v in _flatten(_plain(dict(config))).items() if not _ignored(k, ignore)}
    return hashlib.sha256(_dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys; lists and scalars are leaves."""
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _ignored(key: str, ignore: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in ignore)


# ---- the manifest ----------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_info(repo_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"commit", "dirty", "reason"}`` of the checkout holding this code; None with a reason outside one."""
    cwd = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=True
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain").strip())
    except FileNotFoundError:
        return {"commit": None, "dirty": None, "reason": "git is not installed"}
    except subprocess.CalledProcessError as e:
        why = (e.stderr or "").strip().splitlines()
        return {"commit": None, "dirty": None,
                "reason": f"not a git checkout ({why[0] if why else 'git failed'})"}
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"commit": None, "dirty": None, "reason": f"git failed: {e}"}
    return {"commit": commit, "dirty": dirty, "reason": None}


def package_versions(names: Sequence[str] = KEY_PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names``; None for those not installed."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict[str, Any]:
    """Platform, Python, CPU model, cores and memory of this machine."""
    from harness.sysinfo import cpu_info

    cpu = cpu_info()
    cpu_model = cpu.model or platform.processor() or None
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if memory is None:
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    usable = cpu.usable_cores
    return {
        "platform": platform.platform(),
        "system": platform.system(),
        "machine": platform.machine(),
        "hostname": platform.node() or None,
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "cpu_simd": cpu.simd,
        "memory_bytes": memory,
    }


def _llama_build_info() -> dict[str, Any]:
    """How the installed llama.cpp was built (flags, wheel), as ``specwan doctor`` reports it."""
    from harness.sysinfo import llama_build

    return llama_build().as_dict()


def _sidecar_hash(path: Path, sidecar: Path) -> str | None:
    """The sha256 a verification sidecar records for ``path``, if it still matches size and mtime."""
    try:
        record = json.loads(sidecar.read_text())
        st = path.stat()
        digest = record["sha256"]
        if (record["size"] == st.st_size and record["mtime_ns"] == st.st_mtime_ns
                and isinstance(digest, str) and len(digest) == 64):
            return digest
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def model_file_info(path: str | os.PathLike | None) -> dict[str, Any]:
    """File name, size and sha256 of one model file (from its verification record when current)."""
    if path is None:
        return {"file": None, "path": None, "size": None, "sha256": None, "sha256_source": None,
                "reason": "no model file (e.g. a toy engine)"}
    p = Path(path).expanduser()
    if not p.is_file():
        return {"file": p.name, "path": str(p), "size": None, "sha256": None, "sha256_source": None,
                "reason": "file not found"}
    from harness.models import local_record, sha256_file

    candidates = [p.with_name(p.name + ".sha256")]
    try:  # local files are verified with a record kept in the cache, keyed by their path
        candidates.append(local_record(p))
    except Exception:  # noqa: BLE001 - no cache location: just hash
        pass
    digest, source = None, "hashed"
    for sidecar in candidates:
        digest = _sidecar_hash(p, sidecar)
        if digest is not None:
            source = "sidecar"
            break
    if digest is None:
        digest = sha256_file(p)
    return {"file": p.name, "path": str(p.resolve()), "size": p.stat().st_size, "sha256": digest,
            "sha256_source": source, "reason": None}


def build_manifest(
    config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    *,
    models: Mapping[str, str | os.PathLike | None] | None = None,
    repo_dir: str | os.PathLike | None = None,
    ignore_config_keys: Iterable[str] = DEFAULT_IGNORED_CONFIG_KEYS,
) -> dict[str, Any]:
    """Everything needed to know what a run was: config, code, packages, models, machine.

    ``extra`` adds run facts: ``clock`` ("virtual" | "wall"), ``device_profiles``, ``link``
    (a mapping with ``backend`` and, when known, ``measured``; a string is taken as the
    backend), ``energy`` (source per role) and anything else (kept as given). ``models`` maps
    role -> model file path (None for a role without a file); ``extra["models"]`` is used when
    ``models`` is not given.
    """
    extra = dict(extra or {})
    models = models if models is not None else extra.pop("models", None)
    extra.pop("models", None)
    clock = extra.pop("clock", None)
    if clock is not None and clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    link = extra.pop("link", None)
    if "link_backend" in extra:
        link = {"backend": extra.pop("link_backend"), **(link or {})}
    if isinstance(link, str):
        link = {"backend": link}
    link = {"backend": None, "measured": None, **(link or {})}
    energy = extra.pop("energy", None) or {
        role: {"kind": None, "reason": ENERGY_NOT_MEASURED} for role in ("edge", "cloud")
    }
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": _now(),
        "clock": clock,
        "config": _plain(dict(config)),
        "config_hash": config_hash(config, ignore_config_keys),
        "git": git_info(repo_dir),
        "packages": package_versions(),
        "models": {role: model_file_info(path) for role, path in (models or {}).items()},
        "machine": machine_info(),
        "llama_cpp_build": _llama_build_info(),
        "device_profiles": extra.pop("device_profiles", None),
        "link": link,
        "energy": energy,
    }
    for key, value in extra.items():
        if key in manifest:
            raise ValueError(f"extra key {key!r} would overwrite the manifest's own {key!r}")
        manifest[key] = value
    return _plain(manifest)


def _deep_merge(base: dict, changes: Mapping) -> dict:
    out = dict(base)
    for k, v in changes.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _get_dotted(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            return _ABSENT
        obj = obj[part]
    return obj


def manifest_differences(
    recorded: Mapping[str, Any],
    current: Mapping[str, Any],
    ignore_config_keys: Iterable[str] = DEFAULT_IGNORED_CONFIG_KEYS,
) -> list[tuple[str, Any, Any]]:
    """``(key, recorded, current)`` for each difference that matters between two manifests.

    Compared: every config key (dotted, except the ignored ones), the schema version, the
    clock, the device profiles, the link backend and the model files' sha256. Not compared:
    timestamps, git commit, package versions, machine, measured link figures.
    """
    ignore = tuple(ignore_config_keys)
    diffs: list[tuple[str, Any, Any]] = []
    a = _flatten(_plain(recorded.get("config") or {}))
    b = _flatten(_plain(current.get("config") or {}))
    for key in sorted(set(a) | set(b)):
        if key and _ignored(key, ignore):
            continue
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va != vb:
            diffs.append((f"config.{key}" if key else "config", va, vb))
    for key in _COMPARED_MANIFEST_KEYS:
        if key == "models":
            ma, mb = recorded.get("models") or {}, current.get("models") or {}
            for role in sorted(set(ma) | set(mb)):
                ha = (ma.get(role) or {}).get("sha256", _ABSENT) if role in ma else _ABSENT
                hb = (mb.get(role) or {}).get("sha256", _ABSENT) if role in mb else _ABSENT
                if ha != hb:
                    diffs.append((f"models.{role}.sha256", ha, hb))
            continue
        va, vb = _get_dotted(recorded, key), _get_dotted(current, key)
        if (va if va is _ABSENT else _plain(va)) != (vb if vb is _ABSENT else _plain(vb)):
            diffs.append((key, va, vb))
    return diffs


def completed_run(run_dir: str | os.PathLike, config: Mapping[str, Any],
                  ignore_config_keys: Iterable[str] = DEFAULT_IGNORED_CONFIG_KEYS) -> bool:
    """Whether ``run_dir`` holds a run marked complete (``"complete": true`` in its manifest,
    set by :meth:`RunWriter.mark_complete`) that was written with ``config``.

    A sweep rerun after an interruption skips such runs without loading a model; a folder
    written with another config is not complete for this one (reopening it names the keys).
    """
    path = Path(run_dir) / MANIFEST
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if recorded.get("complete") is not True:
        return False
    return not manifest_differences({"config": recorded.get("config")}, {"config": _plain(dict(config))},
                                    ignore_config_keys)


# ---- journals ---------------------------------------------------------------------------------


def read_journal(path: Path, repair: bool = False) -> list[dict]:
    """The complete lines of a JSON-lines journal.

    A partially written last line (no newline, or not JSON) is ignored with a
    :class:`JournalWarning`; with ``repair`` it is also cut off so appends start clean. A bad
    line anywhere else is corruption and raises :class:`ResultsError`.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    rows: list[dict] = []
    good_end = 0
    pos = 0
    lineno = 0
    while pos < len(data):
        lineno += 1
        nl = data.find(b"\n", pos)
        last = nl == -1 or nl == len(data) - 1
        chunk = data[pos:] if nl == -1 else data[pos:nl]
        try:
            row = json.loads(chunk) if nl != -1 else None
            if nl != -1 and not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if not last:
                raise ResultsError(f"{path}: line {lineno} is corrupt ({e}); the journal cannot be read") from None
            row = None
        if row is None:
            if chunk.strip():
                warnings.warn(
                    f"{path.name}: ignoring a partially written last line ({len(chunk)} bytes; "
                    "a crash while writing it): the request it belonged to is not recorded",
                    JournalWarning, stacklevel=2,
                )
            break
        rows.append(row)
        pos = nl + 1
        good_end = pos
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return rows


def _committed(request_lines: list[dict], round_lines: list[dict], key_fields: Sequence[str]):
    """The latest committed row per key, attempts numbered, and the rounds belonging to them."""
    latest: dict[tuple, dict] = {}
    attempts: dict[tuple, int] = {}
    for line in request_lines:
        key = _key_of(line, key_fields)
        attempts[key] = attempts.get(key, 0) + 1
        latest.pop(key, None)  # keep the order of the latest attempt
        latest[key] = {**line, "attempt": attempts[key]}
    uid_attempt = {row["_uid"]: row["attempt"] for row in latest.values()}
    rounds = [{**r, "attempt": uid_attempt[r["_uid"]]} for r in round_lines if r.get("_uid") in uid_attempt]
    return list(latest.values()), rounds


def _key_of(row: Mapping[str, Any], key_fields: Sequence[str]) -> tuple:
    return tuple(row.get(f) for f in key_fields) + (row["request_id"],)


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    names = schema.names
    return pa.Table.from_pylist([{n: r.get(n) for n in names} for r in rows], schema=schema)


# ---- the writer -------------------------------------------------------------------------------


class RunWriter:
    """Writes one run folder: the manifest, then one request (and its rounds) at a time.

    ``key_fields``: the context fields that, with ``request_id``, identify a request in the
    folder (for resume). ``extra_context``: further context columns and their types
    (``{"client": "int64"}``); any other context key is an error. ``parquet_every``: rewrite
    the parquet files every N appends (1: after each; the journals are always current, and
    :meth:`close` writes what is pending).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        manifest: Mapping[str, Any],
        *,
        key_fields: Sequence[str] = DEFAULT_KEY_FIELDS,
        extra_context: Mapping[str, Any] | None = None,
        ignore_config_keys: Iterable[str] = DEFAULT_IGNORED_CONFIG_KEYS,
        parquet_every: int = 1,
    ):
        self.run_dir = Path(run_dir)
        self.extra_context = _extra_types(extra_context)
        self.context_fields = {**CONTEXT_FIELDS, **self.extra_context}
        unknown = [f for f in key_fields if f not in self.context_fields]
        if unknown:
            raise ValueError(f"key fields {unknown} are not context fields ({', '.join(self.context_fields)})")
        self.key_fields = tuple(key_fields)
        self.parquet_every = max(1, int(parquet_every))
        self._requests_schema = requests_schema(self.extra_context)
        self._rounds_schema = rounds_schema(self.extra_context)
        manifest = _plain(dict(manifest))
        version = manifest.setdefault("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ResultsError(f"manifest schema_version {version!r}; this code writes {SCHEMA_VERSION}")
        manifest["results"] = {
            "key_fields": list(self.key_fields),
            "extra_context": {k: _TYPE_NAMES[v] for k, v in self.extra_context.items()},
        }

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.run_dir / _LOCK, "a+b")
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise ResultsError(f"run folder {self.run_dir} is being written by another process") from None
        try:
            self._open(manifest, tuple(ignore_config_keys))
        except BaseException:
            self._release()
            raise

    def _open(self, manifest: dict, ignore: tuple[str, ...]) -> None:
        path = self.run_dir / MANIFEST
        journals = [self.run_dir / REQUESTS_JOURNAL, self.run_dir / ROUNDS_JOURNAL]
        if path.exists():
            try:
                recorded = json.loads(path.read_text())
            except ValueError as e:
                raise ResultsError(f"{path} is not valid JSON ({e})") from None
            diffs = manifest_differences(recorded, manifest, ignore)
            layout = recorded.get("results") or {}
            for name, default in (("key_fields", list(DEFAULT_KEY_FIELDS)), ("extra_context", {})):
                if layout.get(name, default) != manifest["results"][name]:
                    diffs.append((f"results.{name}", layout.get(name, default), manifest["results"][name]))
            if diffs:
                raise RunConfigMismatch(self.run_dir, diffs)
            resumes = list(recorded.get("resumed") or [])
            resumes.append({"at": _now(), "git": manifest.get("git")})
            measured = _get_dotted(recorded, "link.measured")
            manifest = {**_deep_merge(recorded, manifest), "config": manifest.get("config"),
                        "created": recorded.get("created", manifest.get("created")), "resumed": resumes}
            if _get_dotted(manifest, "link.measured") is None and measured not in (None, _ABSENT):
                manifest["link"]["measured"] = measured  # figures measured earlier stay
        elif any(j.exists() and j.stat().st_size for j in journals):
            raise ResultsError(f"run folder {self.run_dir} has journals but no {MANIFEST}; use a new run folder")
        self.manifest = manifest
        self._write_manifest()
        self._request_lines = read_journal(journals[0], repair=True)
        self._round_lines = read_journal(journals[1], repair=True)
        self._requests_f = open(journals[0], "a", encoding="utf-8")
        self._rounds_f = open(journals[1], "a", encoding="utf-8")
        self._pending = 0
        self._rebuild()
        self._write_parquet()

    # -- manifest --

    def mark_complete(self) -> None:
        """Record that every request of the run is in the folder (see :func:`completed_run`)."""
        self.update_manifest({"complete": True})

    def _write_manifest(self) -> None:
        _atomic_write_text(self.run_dir / MANIFEST, _dumps(self.manifest, indent=2, sort_keys=False) + "\n")

    def write_link(self, data: Mapping[str, Any]) -> Path:
        """Write ``link.json`` (the link's configured and measured figures) atomically."""
        path = self.run_dir / LINK_JSON
        _atomic_write_text(path, _dumps(dict(data), indent=2, sort_keys=True) + "\n")
        return path

    def update_manifest(self, changes: Mapping[str, Any]) -> dict:
        """Merge ``changes`` into the manifest (nested mappings merge) and rewrite it atomically.

        For facts known only later, e.g. ``{"link": {"measured": {"rtt_ms": 41.8}}}``.
        """
        self.manifest = _deep_merge(self.manifest, _plain(dict(changes)))
        self._write_manifest()
        return self.manifest

    # -- rows --

    def normalise_context(self, context: Mapping[str, Any], system: str | None = None) -> dict[str, Any]:
        """``context`` checked against the declared fields and types, with run-level defaults filled."""
        ctx = dict(context)
        unknown = sorted(set(ctx) - set(self.context_fields))
        if unknown:
            raise ValueError(
                f"unknown context field(s) {unknown}; known: {', '.join(self.context_fields)} "
                "(declare more with RunWriter(extra_context={...}))"
            )
        if system is not None:
            if ctx.get("system") not in (None, system):
                raise ValueError(f"context system {ctx['system']!r} differs from the record's {system!r}")
            ctx["system"] = system
        if ctx.get("clock") is None and self.manifest.get("clock") is not None:
            ctx["clock"] = self.manifest["clock"]
        if ctx.get("clock") is not None and ctx["clock"] not in CLOCKS:
            raise ValueError(f"context clock must be one of {CLOCKS}, got {ctx['clock']!r}")
        if self.manifest.get("clock") is not None and ctx["clock"] != self.manifest["clock"]:
            raise ValueError(f"context clock {ctx['clock']!r} differs from the run's {self.manifest['clock']!r}")
        if ctx.get("config_hash") is None and self.manifest.get("config_hash") is not None:
            ctx["config_hash"] = self.manifest["config_hash"]
        ctx = _plain(ctx)
        for name, kind in self.context_fields.items():
            value = ctx.get(name)
            if value is None:
                continue
            ok = {
                pa.string(): lambda v: isinstance(v, str),
                pa.int64(): lambda v: isinstance(v, int) and not isinstance(v, bool),
                pa.float64(): lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                pa.bool_(): lambda v: isinstance(v, bool),
            }[kind](value)
            if not ok:
                raise ValueError(f"context field {name!r} must be {_TYPE_NAMES[kind]}, got {value!r}")
        return {name: ctx.get(name) for name in self.context_fields}

    def key(self, context: Mapping[str, Any], request_id: str, system: str | None = None) -> tuple:
        """The resume key of a request: the key context fields (normalised) and ``request_id``."""
        ctx = self.normalise_context(context, system=system)
        return tuple(ctx.get(f) for f in self.key_fields) + (request_id,)

    def done_keys(self, include_failed: bool = False) -> set[tuple]:
        """Keys of the requests already recorded (by default only those that finished without error,
        so a rerun retries failed ones; the retry's row replaces the failed one in the tables)."""
        return set(self._done_all) if include_failed else set(self._done_ok)

    def is_done(self, context: Mapping[str, Any], request_id: str, include_failed: bool = False) -> bool:
        key = self.key(context, request_id)
        return key in (self._done_all if include_failed else self._done_ok)

    def _rebuild(self) -> None:
        """Resume state and the committed tables, from the journal lines."""
        self._done_all: dict[tuple, bool] = {}
        self._attempts: dict[tuple, int] = {}
        for line in self._request_lines:
            key = _key_of(line, self.key_fields)
            self._done_all[key] = line.get("error") is None
            self._attempts[key] = self._attempts.get(key, 0) + 1
        self._done_ok = {k for k, ok in self._done_all.items() if ok}
        requests, rounds = _committed(self._request_lines, self._round_lines, self.key_fields)
        self._req_parts = [_table(requests, self._requests_schema)]
        self._rnd_parts = [_table(rounds, self._rounds_schema)]

    def append(
        self,
        record: RequestRecord,
        context: Mapping[str, Any],
        energy: Mapping[str, Any] | None = None,
    ) -> tuple:
        """Record one finished request and its rounds; returns its key.

        ``energy`` (optional, default ``record.energy``): ``edge_j``, ``cloud_j`` (joules),
        ``kind`` ("measured" | "estimated", for both roles) or ``edge_kind`` / ``cloud_kind``,
        ``edge_idle_j``, ``cloud_idle_j``, ``wasted_j``, ``reason``; without any, the energy
        columns are null with the reason :data:`ENERGY_NOT_MEASURED`. Appending a key already
        recorded without error raises; a key recorded with an error may be appended again (a
        retry): the new row replaces the old one in the tables (``attempt`` counts), the
        journal keeps both.
        """
        ctx = self.normalise_context(context, system=record.system)
        key = tuple(ctx.get(f) for f in self.key_fields) + (record.request_id,)
        if key in self._done_ok:
            raise ResultsError(f"request {key} is already recorded in {self.run_dir} (skip done_keys() on resume)")
        uid = uuid.uuid4().hex
        attempt = self._attempts.get(key, 0) + 1
        energy = energy if energy is not None else record.energy
        request_row = {**ctx, **request_row_fields(record, energy), "attempt": attempt, "_uid": uid}
        round_rows = [{**ctx, **round_row_fields(r, record.request_id), "attempt": attempt, "_uid": uid}
                      for r in record.rounds]
        # Typed against the schemas before anything touches the disk.
        new_req = _table([request_row], self._requests_schema)
        new_rnd = _table(round_rows, self._rounds_schema)
        if round_rows:
            self._rounds_f.write("".join(_dumps(r) + "\n" for r in round_rows))
            self._rounds_f.flush()
            os.fsync(self._rounds_f.fileno())
        self._requests_f.write(_dumps(request_row) + "\n")  # the commit
        self._requests_f.flush()
        os.fsync(self._requests_f.fileno())
        self._request_lines.append(request_row)
        self._round_lines.extend(round_rows)
        if attempt > 1:  # a retry replaces earlier rows: rebuild (rare)
            self._rebuild()
        else:
            self._attempts[key] = 1
            self._done_all[key] = record.error is None
            if record.error is None:
                self._done_ok.add(key)
            self._req_parts.append(new_req)
            self._rnd_parts.append(new_rnd)
            if len(self._req_parts) > 32:
                self._req_parts = [pa.concat_tables(self._req_parts).combine_chunks()]
                self._rnd_parts = [pa.concat_tables(self._rnd_parts).combine_chunks()]
        self._pending += 1
        if self._pending >= self.parquet_every:
            self._write_parquet()
        return key

    def append_batch(self, record: BatchRecord, context: Mapping[str, Any] | None = None) -> None:
        """Record one of the cloud's forward passes (:class:`BatchRecord`) in ``batches.jsonl``,
        with ``context`` (e.g. the system and network) on its line; written through at once."""
        if getattr(self, "_batches_f", None) is None:
            self._batches_f = open(self.run_dir / BATCHES_JOURNAL, "a", encoding="utf-8")
        row = {**_plain(dict(context or {})), **_plain(record.as_row())}
        self._batches_f.write(_dumps(row) + "\n")
        self._batches_f.flush()
        os.fsync(self._batches_f.fileno())

    def _write_parquet(self) -> None:
        # Each file records the journal sizes it reflects, so readers know whether it is current.
        sizes = f"{os.fstat(self._requests_f.fileno()).st_size},{os.fstat(self._rounds_f.fileno()).st_size}"
        for path, parts in ((self.run_dir / ROUNDS_PARQUET, self._rnd_parts),
                            (self.run_dir / REQUESTS_PARQUET, self._req_parts)):
            table = pa.concat_tables(parts)
            meta = {**table.schema.metadata, _JOURNAL_BYTES: sizes.encode()}
            _atomic_write_parquet(path, table.replace_schema_metadata(meta))
        self._pending = 0

    # -- life cycle --

    def close(self) -> None:
        if getattr(self, "_lock_file", None) is None:
            return
        try:
            if getattr(self, "_pending", 0):
                self._write_parquet()
        finally:
            for f in (getattr(self, "_requests_f", None), getattr(self, "_rounds_f", None),
                      getattr(self, "_batches_f", None)):
                if f is not None:
                    f.close()
            self._release()

    def _release(self) -> None:
        if self._lock_file is not None:
            try:
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            finally:
                self._lock_file.close()
                self._lock_file = None

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _num(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def request_row_fields(record: RequestRecord, energy: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The non-context columns of a request's row."""
    s = record.summary()
    energy = dict(energy or {})
    unknown = set(energy) - set(_ENERGY_KEYS)
    if unknown:
        raise ValueError(f"unknown energy field(s) {sorted(unknown)}; use {', '.join(_ENERGY_KEYS)}")
    for key in ("kind", "edge_kind", "cloud_kind"):
        if energy.get(key) is not None and energy[key] not in ENERGY_KINDS:
            raise ValueError(f"energy {key} must be one of {ENERGY_KINDS} or None, got {energy[key]!r}")
    edge_j, cloud_j = _num(energy.get("edge_j")), _num(energy.get("cloud_j"))
    # each role's kind (``kind`` stands for both when a role's own is not given); a null
    # figure has no kind, and energy_kind is set only where the roles' kinds agree
    edge_kind = energy.get("edge_kind", energy.get("kind")) if edge_j is not None else None
    cloud_kind = energy.get("cloud_kind", energy.get("kind")) if cloud_j is not None else None
    kinds = {edge_kind, cloud_kind} - {None}
    kind = kinds.pop() if len(kinds) == 1 else None
    reason = energy.get("reason")
    if reason is None and (edge_j is None or cloud_j is None):
        reason = ENERGY_NOT_MEASURED
    return {
        "request_id": record.request_id,
        "prompt_tokens": int(record.prompt_tokens),
        "n_tokens": int(s["tokens"]),
        "output_ids": [int(t) for t in record.output_tokens],
        "start": float(record.start),
        "end": float(record.end),
        "token_times": [float(t) for t in record.token_times],
        "ttft": _num(s["ttft"]),
        "tpot": _num(s["tpot"]),
        "e2e": float(s["e2e"]),
        "tokens_per_s": _num(s["tokens_per_s"]),
        "rounds": int(s["rounds"]),
        "drafted": int(s["drafted"]),
        "accepted": int(s["accepted"]),
        "acceptance_rate": _num(s["acceptance_rate"]),
        "accepted_length": _num(s["accepted_length"]),
        "bytes_up": int(s["bytes_up"]),
        "bytes_down": int(s["bytes_down"]),
        "error": s["error"],
        "recovery": s["recovery"],
        "energy_edge_j": edge_j,
        "energy_cloud_j": cloud_j,
        "energy_kind": kind,
        "energy_reason": reason,
        "energy_edge_kind": edge_kind,
        "energy_cloud_kind": cloud_kind,
        "energy_edge_idle_j": _num(energy.get("edge_idle_j")) if edge_j is not None else None,
        "energy_cloud_idle_j": _num(energy.get("cloud_idle_j")) if cloud_j is not None else None,
        "energy_wasted_j": _num(energy.get("wasted_j")),
    }


_ROUND_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(RoundRecord))


def round_row_fields(record: RoundRecord, request_id: str | None = None) -> dict[str, Any]:
    """The non-context columns of a round's row (``extra`` as a JSON string)."""
    row = {name: getattr(record, name) for name in _ROUND_RECORD_FIELDS}
    if request_id is not None:
        row["request_id"] = request_id
    row["extra"] = _dumps(row.get("extra") or {}, sort_keys=True)
    for name in ("t_uplink", "t_queue", "t_verify", "t_downlink", *_ROUND_ENERGY_J):
        row[name] = _num(row[name])
    if row["energy_kind"] is not None and row["energy_kind"] not in ENERGY_KINDS:
        raise ValueError(f"round energy_kind must be one of {ENERGY_KINDS} or None, got {row['energy_kind']!r}")
    if all(row[name] is None for name in _ROUND_ENERGY_J):
        row["energy_kind"] = None
        row["energy_reason"] = row["energy_reason"] or ENERGY_NOT_MEASURED
    return row


# ---- reading -----------------------------------------------------------------------------------


def load_run(run_dir: str | os.PathLike, from_journals: bool | None = None):
    """``(manifest, requests_df, rounds_df)`` of a run folder, as pandas DataFrames.

    The parquet files are read when they are current (they record the journal sizes they
    reflect); otherwise (a crash before they were rewritten, or ``from_journals=True``) the
    tables are rebuilt from the journals, the source of truth, and a partially written last
    journal line is ignored with a :class:`JournalWarning`.
    """
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    if not path.exists():
        raise ResultsError(f"{run_dir} is not a run folder (no {MANIFEST})")
    manifest = json.loads(path.read_text())
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ResultsError(f"{run_dir}: results schema version {version!r}, this code reads {SCHEMA_VERSION}")
    results = manifest.get("results") or {}
    extra = _extra_types(results.get("extra_context"))
    key_fields = tuple(results.get("key_fields") or DEFAULT_KEY_FIELDS)
    req_schema, rnd_schema = requests_schema(extra), rounds_schema(extra)
    journals = run_dir / REQUESTS_JOURNAL, run_dir / ROUNDS_JOURNAL
    tables = None
    if not from_journals:
        tables = _current_parquet(run_dir, journals, require=from_journals is False or not journals[0].exists())
    if tables is None:
        request_lines, round_lines = read_journal(journals[0]), read_journal(journals[1])
        requests, rounds = _committed(request_lines, round_lines, key_fields)
        tables = _table(requests, req_schema), _table(rounds, rnd_schema)
    return manifest, _to_pandas(tables[0]), _to_pandas(tables[1])


def load_batches(run_dir: str | os.PathLike, max_rows: int | None = None):
    """The cloud's recorded forward passes of a run folder (``batches.jsonl``), one row per
    pass, as a pandas DataFrame (columns of :class:`systems.records.BatchRecord` and the
    context written with them); empty when the run recorded none. A partially written last
    line is ignored with a :class:`JournalWarning`. ``max_rows``: only the first passes (a
    fleet of a thousand edges records hundreds of megabytes of them);
    ``frame.attrs["passes_total"]`` then says how many there were."""
    import pandas as pd

    path = Path(run_dir) / BATCHES_JOURNAL
    columns = [f.name for f in dataclasses.fields(BatchRecord)]
    if max_rows is None or not path.exists():
        rows = read_journal(path) if path.exists() else []
        return pd.DataFrame(rows, columns=None if rows else columns)
    rows, total = [], 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break  # a partially written last line
            total += 1
            if len(rows) < max_rows:
                rows.append(json.loads(line))
    frame = pd.DataFrame(rows, columns=None if rows else columns)
    frame.attrs["passes_total"] = total
    return frame


def _current_parquet(run_dir: Path, journals, require: bool):
    """Both parquet tables if they reflect the journals as they are now (or ``require``), else None."""
    tables = []
    for name in (REQUESTS_PARQUET, ROUNDS_PARQUET):
        path = run_dir / name
        if not path.exists():
            if require:
                raise ResultsError(f"{path} does not exist")
            return None
        table = pq.read_table(path)
        meta = table.schema.metadata or {}
        version = meta.get(b"specwan.schema_version")
        if version != str(SCHEMA_VERSION).encode():
            raise ResultsError(f"{path}: schema version {version!r}, this code reads {SCHEMA_VERSION}")
        sizes = ",".join(str(j.stat().st_size) if j.exists() else "0" for j in journals).encode()
        if not require and meta.get(_JOURNAL_BYTES) != sizes:
            return None
        tables.append(table)
    return tuple(tables)


def _to_pandas(table: pa.Table):
    """Integers and booleans as pandas' nullable dtypes (a null stays NA, never a float NaN)."""
    import pandas as pd

    mapping = {pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}
    return table.to_pandas(types_mapper=mapping.get)


__all__ = [
    "CONTEXT_FIELDS", "DEFAULT_KEY_FIELDS", "ENERGY_NOT_MEASURED", "JournalWarning", "ResultsError",
    "RunConfigMismatch", "RunWriter", "SCHEMA_VERSION", "build_manifest", "config_hash", "git_info",
    "load_batches", "load_run", "machine_info", "manifest_differences", "model_file_info", "package_versions",
    "read_journal", "requests_schema", "rounds_schema",
]
