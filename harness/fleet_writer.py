"""The fleet's run folder: the files every run writes (see :mod:`harness.results`), streamed.

:class:`harness.results.RunWriter` keeps every row it wrote (to rewrite the parquet files
after each request and to resume), and syncs each line to disk. A fleet writes many
thousands of requests: :class:`FleetWriter` appends each request's round lines and request
line to the journals as it ends, flushed to the operating system (a killed run keeps every
request that finished), keeps nothing of them, syncs to disk every ``sync_every_s``
seconds and at the end, and builds the parquet files once, at the end, from the journals in
chunks. Until then the parquet files are out of date, and readers take the journals
(:func:`harness.results.load_run` checks). A fleet does not resume: its edges share one
virtual time, so a rerun into an unfinished folder starts it again (:func:`restart`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

import pyarrow.parquet as pq

from harness.results import (
    BATCHES_JOURNAL,
    MANIFEST,
    REQUESTS_JOURNAL,
    REQUESTS_PARQUET,
    ROUNDS_JOURNAL,
    ROUNDS_PARQUET,
    RunWriter,
    _dumps,
    _table,
    request_row_fields,
    round_row_fields,
)
from systems.records import BatchRecord, RequestRecord

_BATCH_FIELDS = tuple(f.name for f in dataclasses.fields(BatchRecord))
_JOURNAL_BYTES = b"specwan.journal_bytes"  # as harness.results records it in the parquet metadata
CHUNK_ROWS = 20_000


def restart(run_dir: str | os.PathLike) -> bool:
    """Clear an unfinished fleet run's records (not its manifest) so it runs again from virtual
    time 0; True if there were any."""
    run_dir = Path(run_dir)
    try:
        complete = json.loads((run_dir / MANIFEST).read_text()).get("complete") is True
    except (OSError, ValueError):
        complete = False
    names = (REQUESTS_JOURNAL, ROUNDS_JOURNAL, BATCHES_JOURNAL, REQUESTS_PARQUET, ROUNDS_PARQUET)
    found = [run_dir / n for n in names if (run_dir / n).exists()]
    if complete or not found:
        return False
    for path in found:
        path.unlink()
    return True


class FleetWriter(RunWriter):
    """A :class:`RunWriter` that streams: each request's rows go to the journals and are
    dropped; the parquet files are built at :meth:`close`. ``rounds=False`` writes no
    per-round rows (the requests keep their round counts)."""

    def __init__(self, run_dir, manifest: Mapping[str, Any], *, extra_context: Mapping[str, Any],
                 rounds: bool = True, sync_every_s: float = 5.0):
        self.rounds = rounds
        self.sync_every_s = sync_every_s
        self._synced = time.monotonic()
        self._count = 0
        super().__init__(run_dir, manifest, extra_context=extra_context)

    def _rebuild(self) -> None:
        self._done_all, self._attempts, self._done_ok = {}, {}, set()
        self._request_lines, self._round_lines = [], []

    def append(self, record: RequestRecord, context: Mapping[str, Any],
               energy: Mapping[str, Any] | None = None) -> tuple:
        """Append one finished request (and, with ``rounds``, its rounds) to the journals."""
        ctx = self.normalise_context(context, system=record.system)
        uid = f"{self._count:x}"
        self._count += 1
        energy = energy if energy is not None else record.energy
        request_row = {**ctx, **request_row_fields(record, energy), "attempt": 1, "_uid": uid}
        if self.rounds and record.rounds:
            self._rounds_f.write("".join(
                _dumps({**ctx, **round_row_fields(r, record.request_id), "attempt": 1, "_uid": uid}) + "\n"
                for r in record.rounds))
            self._rounds_f.flush()
        self._requests_f.write(_dumps(request_row) + "\n")  # the commit
        self._requests_f.flush()
        self._pending = 1
        if time.monotonic() - self._synced > self.sync_every_s:
            self.sync()
        return tuple(ctx.get(f) for f in self.key_fields) + (record.request_id,)

    def append_batch(self, record: BatchRecord, context: Mapping[str, Any] | None = None) -> None:
        """Append one of a verifier's passes to ``batches.jsonl`` (flushed, synced with the rest)."""
        if getattr(self, "_batches_f", None) is None:
            self._batches_f = open(self.run_dir / BATCHES_JOURNAL, "a", encoding="utf-8")
        # the record's fields as they are (BatchRecord.as_row deep-copies them, for nothing here)
        self._batches_f.write(_dumps({**(context or {}), **{f: getattr(record, f) for f in _BATCH_FIELDS}}) + "\n")
        self._batches_f.flush()

    def sync(self) -> None:
        """Put what the journals hold on disk."""
        for f in (self._rounds_f, self._requests_f, getattr(self, "_batches_f", None)):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
        self._synced = time.monotonic()

    def _write_parquet(self) -> None:
        self.sync()
        sizes = f"{os.fstat(self._requests_f.fileno()).st_size},{os.fstat(self._rounds_f.fileno()).st_size}"
        for journal, path, schema in ((ROUNDS_JOURNAL, ROUNDS_PARQUET, self._rounds_schema),
                                      (REQUESTS_JOURNAL, REQUESTS_PARQUET, self._requests_schema)):
            schema = schema.with_metadata({**schema.metadata, _JOURNAL_BYTES: sizes.encode()})
            tmp = self.run_dir / f".{path}.tmp"
            with pq.ParquetWriter(tmp, schema) as out, open(self.run_dir / journal, encoding="utf-8") as lines:
                rows: list[dict] = []
                for line in lines:
                    if line.endswith("\n"):
                        rows.append(json.loads(line))
                    if len(rows) >= CHUNK_ROWS:
                        out.write_table(_table(rows, schema))
                        rows = []
                out.write_table(_table(rows, schema))
            os.replace(tmp, self.run_dir / path)
        self._pending = 0


__all__ = ("FleetWriter", "restart")
