"""The ``relay`` backend: a TCP relay on loopback that shapes the byte stream (stream-level).

::

    python -m netem.relay --target 127.0.0.1:PORT --profile JSON --origin T --ready FILE --stats FILE

It listens on a free loopback port (written to the ready file), connects each accepted
connection to the target, and forwards each direction in segment-sized chunks at the times
a :class:`netem.shaper.Shaper` gives (rate with per-segment headers charged, as on a
packet link; half the RTT; jitter; FIFO). It reads no faster than the link drains, so the
sender feels the rate. Being a byte stream it has **no** handshake delay, slow start or
packet loss: its results are labelled stream-level. SIGUSR1 writes the counters; SIGTERM
writes them and exits.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import json
import os
import select
import signal
import socket
import sys
import time

from netem.profile import NetworkProfile
from netem.shaper import Shaper, raise_priority, reload_profile, wait_until
from netem.tunwire import EARLY_S, _write_json

CHUNK = 65536
MAX_OUTBUF = 256 * 1024


class _Pipe:
    """One direction of one relayed connection."""

    def __init__(self, src: socket.socket, dst: socket.socket, shaper: Shaper):
        self.src, self.dst, self.shaper = src, dst, shaper
        self.outbuf = bytearray()
        self.in_flight = 0  # chunks scheduled, not yet handed to dst
        self.eof = False  # src said EOF
        self.closed = False  # dst shut for writing


def serve(listener: socket.socket, target: tuple[str, int], profile: NetworkProfile, origin: float,
          stats_path: str | None, reload_path: str | None = None) -> None:
    up, down = Shaper(profile, "up", origin, lossy=False), Shaper(profile, "down", origin, lossy=False)
    pipes: list[_Pipe] = []
    heap: list = []
    seq = 0
    flags = {"stop": False, "dump": False}
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, lambda *_: flags.update(stop=True))
    signal.signal(signal.SIGINT, lambda *_: flags.update(stop=True))
    signal.signal(signal.SIGUSR1, lambda *_: flags.update(dump=True))
    signal.signal(signal.SIGUSR2, lambda *_: flags.update(reload=True))
    connections = 0
    dumps = 0
    seg = profile.mss

    def dump():
        nonlocal dumps
        dumps += 1
        cpu = os.times()
        if stats_path:
            _write_json(stats_path, {"seq": dumps, "up": up.counters(), "down": down.counters(),
                                     "connections": connections, "cpu_s": cpu.user + cpu.system})

    def drop(p: _Pipe):
        for q in [x for x in pipes if x.src in (p.src, p.dst)]:
            pipes.remove(q)
        for s in (p.src, p.dst):
            try:
                s.close()
            except OSError:
                pass

    def flush(p: _Pipe) -> bool:
        if p.outbuf:
            try:
                n = p.dst.send(p.outbuf)
                del p.outbuf[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                drop(p)
                return False
        if p.eof and not p.outbuf and not p.in_flight and not p.closed:
            p.closed = True
            try:
                p.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if all(q.closed for q in pipes if q.src in (p.src, p.dst)):
                drop(p)
        return True

    while not flags["stop"]:
        if flags["dump"]:
            flags["dump"] = False
            dump()
        if flags.get("reload"):
            flags["reload"] = False
            reload_profile(reload_path, (up, down))
        now = time.monotonic()
        readers, writers = [listener, wake_r], []
        for p in pipes:
            if not p.eof and len(p.outbuf) < MAX_OUTBUF and p.shaper.backlog(now) < profile.queue_s:
                readers.append(p.src)
            if p.outbuf:
                writers.append(p.dst)
        timeout = wait_until(heap[0][0] if heap else None, now)
        if timeout is None and any(p.shaper.backlog(now) >= profile.queue_s for p in pipes):
            timeout = 0.001  # a throttled reader resumes once the backlog drains
        r, w, _ = select.select(readers, writers, [], timeout)
        now = time.monotonic()
        if wake_r in r:
            try:
                os.read(wake_r, 64)
            except BlockingIOError:
                pass
        if listener in r:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(target, timeout=5)
            except OSError:
                client = None
            if client is not None:
                connections += 1
                for s in (client, upstream):
                    s.setblocking(False)
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                pipes += [_Pipe(client, upstream, up), _Pipe(upstream, client, down)]
        for p in list(pipes):
            if p.src in r and p in pipes:
                try:
                    data = p.src.recv(CHUNK)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.ECONNRESET, errno.EPIPE):
                        raise
                    drop(p)
                    continue
                if not data:
                    p.eof = True
                    flush(p)
                    continue
                for i in range(0, len(data), seg):
                    chunk = data[i:i + seg]
                    t = p.shaper.admit(now, len(chunk) + profile.header_bytes)
                    seq += 1
                    p.in_flight += 1
                    heapq.heappush(heap, (t, seq, p, chunk))
        for p in list(pipes):
            if p.dst in w and p in pipes:
                flush(p)
        now = time.monotonic()
        while heap and heap[0][0] <= now + EARLY_S:
            _, _, p, chunk = heapq.heappop(heap)
            p.in_flight -= 1
            if p in pipes:
                p.outbuf += chunk
                flush(p)
    dump()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m netem.relay", description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--profile", required=True, help="the NetworkProfile as JSON")
    ap.add_argument("--origin", type=float, required=True, help="time.monotonic() at which the trace starts")
    ap.add_argument("--ready", required=True, help="write {port, pid} here once listening")
    ap.add_argument("--stats", default=None, help="write the counters here on SIGUSR1 and at exit")
    ap.add_argument("--reload", default=None, help="on SIGUSR2, switch to the profile in this file (JSON)")
    args = ap.parse_args(argv)
    host, port = args.target.rsplit(":", 1)
    profile = NetworkProfile.from_json(json.loads(args.profile))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.setblocking(False)
    _write_json(args.ready, {"port": listener.getsockname()[1], "pid": os.getpid(), "priority": raise_priority()})
    serve(listener, (host, int(port)), profile, args.origin, args.stats, args.reload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
