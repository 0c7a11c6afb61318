"""The fleet's islands in worker processes, their records streamed back as they happen.

A verifier and the edges it serves share nothing with the other verifiers (no queue, no
link, no device), so the fleet simulates each such island in its own virtual time
(:func:`harness.fleet.run_fleet`). :func:`run_islands` spreads the islands over worker
processes: worker ``w`` takes islands ``w, w + workers, ...``, simulates each in turn and
sends what it records (pickled, in chunks) down a pipe; this process hands each item to
``receive`` as it comes (the run folder's writer lives here, so the records stay in one
place). An island's records are the same whichever worker simulates it, so the worker count
never changes a result, only how long it takes.

Workers are forked: they start with the engines and the plan already loaded. A worker that
fails sends its error, which is raised here with the worker's traceback as a note; one that
dies without a word (killed) is an error naming its islands. Either way the other workers
are stopped, and what was received before is kept (already handed to ``receive``). A worker
whose parent dies is ended by the kernel (Linux's parent-death signal).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

CHUNK = 64  # items per message down a worker's pipe
PR_SET_PDEATHSIG = 1  # prctl(2)


class _Sender:
    """A worker's end: items go down the pipe in chunks of :data:`CHUNK`."""

    def __init__(self, conn: Connection):
        self.conn, self.items = conn, []

    def __call__(self, item: Any) -> None:
        self.items.append(item)
        if len(self.items) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if self.items:
            self.conn.send(("items", self.items))
            self.items = []


def _die_with_parent(parent: int) -> None:
    """Have Linux end this worker if the process that started it dies first (killed, it could
    not stop its workers), so no worker outlives its run."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (AttributeError, OSError):  # not Linux: the closed pipe stops the worker at its next send
        return
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


def _work(conn: Connection, islands: Sequence[int], simulate: Callable[[int, Callable[[Any], None]], Any],
          parent: int) -> None:
    _die_with_parent(parent)
    send = _Sender(conn)
    try:
        results = []
        for island in islands:
            results.append(simulate(island, send))
            send.flush()
        conn.send(("done", results))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
        send.items = []
        text = traceback.format_exc()
        try:
            conn.send(("error", exc, text))
        except Exception:  # noqa: BLE001 - an exception that cannot be pickled
            conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}"), text))
    finally:
        conn.close()


def run_islands(islands: Sequence[int], workers: int, simulate: Callable[[int, Callable[[Any], None]], Any],
                receive: Callable[[Any], None]) -> list:
    """Simulate each island with ``simulate(island, send)`` in ``workers`` forked processes;
    each item a worker ``send``s reaches ``receive`` here. Returns what ``simulate`` returned
    for each island, in the order of ``islands``."""
    if workers < 2 or len(islands) < 2:
        raise ValueError("run_islands needs at least 2 workers and 2 islands; simulate them in this process")
    context = multiprocessing.get_context("fork")
    shares = [list(islands[w::workers]) for w in range(min(workers, len(islands)))]
    procs, conns = [], {}
    try:
        for share in shares:
            mine, theirs = context.Pipe(duplex=False)
            proc = context.Process(target=_work, args=(theirs, share, simulate, os.getpid()), daemon=True)
            proc.start()
            theirs.close()
            procs.append(proc)
            conns[mine] = share
        results: dict[int, Any] = {}
        while conns:
            for conn in wait(list(conns)):
                share = conns[conn]
                try:
                    message = conn.recv()
                except EOFError:
                    proc = procs[shares.index(share)]
                    proc.join(5)
                    raise RuntimeError(f"the fleet's worker for verifier(s) {share} ended without finishing "
                                       f"(exit code {proc.exitcode}); the requests it finished are recorded") from None
                if message[0] == "items":
                    for item in message[1]:
                        receive(item)
                elif message[0] == "done":
                    results.update(zip(share, message[1]))
                    del conns[conn]
                    conn.close()
                else:
                    _, exc, text = message
                    exc.add_note(f"in the fleet's worker for verifier(s) {share}:\n{text.rstrip()}")
                    raise exc
        return [results[i] for i in islands]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
        for conn in conns:
            conn.close()


__all__ = ("run_islands",)
