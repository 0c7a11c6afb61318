"""The ``tun`` backend's wire: a process that carries IP packets between two TUN devices.

::

    python -m netem.tunwire --edge NS:DEV --cloud NS:DEV --profile JSON \\
        --ready FILE --stats FILE

It attaches to the TUN device in each namespace, reads every packet the kernel routes into
one and writes it into the other at the time a :class:`netem.shaper.Shaper` gives, so the
end hosts' TCP sees real delay, serialization, queueing drops and loss (handshake, slow
start and retransmission included). The loop is ``select``-based with a heap of timers:
``select`` takes microsecond timeouts, where an epoll-based asyncio loop rounds every timer
up to a whole millisecond (a measured ~4 ms on a 50 ms RTT). SIGUSR1 writes the counters to
the stats file; SIGTERM writes them and exits.
"""

from __future__ import annotations

import argparse
import fcntl
import heapq
import json
import os
import select
import signal
import struct
import sys
import time

from netem.ns import entered
from netem.profile import NetworkProfile
from netem.shaper import Shaper, raise_priority, reload_profile, wait_until

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
EARLY_S = 20e-6  # deliver a packet this close to its time now rather than sleep again


def open_tun(ns: str, dev: str) -> int:
    """Attach to the existing TUN device ``dev`` of namespace ``ns``; its fd (non-blocking)."""
    with entered(ns):  # a TUN fd attaches to the device of the namespace it was opened in
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", dev.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def serve(edge_fd: int, cloud_fd: int, profile: NetworkProfile, origin: float, stats_path: str | None,
          reload_path: str | None = None) -> None:
    up, down = Shaper(profile, "up", origin), Shaper(profile, "down", origin)
    route = {edge_fd: (up, cloud_fd), cloud_fd: (down, edge_fd)}
    heap: list = []
    seq = 0
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    flags = {"stop": False, "dump": False}
    signal.signal(signal.SIGTERM, lambda *_: flags.update(stop=True))
    signal.signal(signal.SIGINT, lambda *_: flags.update(stop=True))
    signal.signal(signal.SIGUSR1, lambda *_: flags.update(dump=True))
    signal.signal(signal.SIGUSR2, lambda *_: flags.update(reload=True))
    write_errors = 0
    dumps = 0

    def dump():
        nonlocal dumps
        dumps += 1
        cpu = os.times()
        if stats_path:
            _write_json(stats_path, {"seq": dumps, "up": up.counters(), "down": down.counters(),
                                     "write_errors": write_errors, "cpu_s": cpu.user + cpu.system,
                                     "queued": len(heap)})

    while not flags["stop"]:
        if flags["dump"]:
            flags["dump"] = False
            dump()
        if flags.get("reload"):
            flags["reload"] = False
            reload_profile(reload_path, (up, down))
        timeout = wait_until(heap[0][0] if heap else None, time.monotonic())
        ready, _, _ = select.select([edge_fd, cloud_fd, wake_r], [], [], timeout)
        now = time.monotonic()
        for fd in ready:
            if fd == wake_r:
                while True:
                    try:
                        if not os.read(wake_r, 64):
                            break
                    except BlockingIOError:
                        break
                continue
            shaper, out = route[fd]
            while True:
                try:
                    pkt = os.read(fd, 65536)
                except BlockingIOError:
                    break
                t = shaper.admit(now, len(pkt))
                if t is not None:
                    seq += 1
                    heapq.heappush(heap, (t, seq, out, pkt))
        now = time.monotonic()
        while heap and heap[0][0] <= now + EARLY_S:
            _, _, out, pkt = heapq.heappop(heap)
            try:
                os.write(out, pkt)
            except OSError:  # the device's queue is full: the packet is lost, as on a wire
                write_errors += 1
    dump()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m netem.tunwire", description=__doc__.splitlines()[0])
    ap.add_argument("--edge", required=True, help="NS:DEV of the edge side's TUN device")
    ap.add_argument("--cloud", required=True, help="NS:DEV of the cloud side's TUN device")
    ap.add_argument("--profile", required=True, help="the NetworkProfile as JSON (NetworkProfile.as_json)")
    ap.add_argument("--ready", default=None,
                    help="write {pid, priority, origin} here once both devices are attached (origin: the "
                         "time.monotonic() at which the trace starts)")
    ap.add_argument("--stats", default=None, help="write the counters here on SIGUSR1 and at exit")
    ap.add_argument("--reload", default=None, help="on SIGUSR2, switch to the profile in this file (JSON)")
    args = ap.parse_args(argv)
    profile = NetworkProfile.from_json(json.loads(args.profile))
    try:
        fds = [open_tun(*side.split(":", 1)) for side in (args.edge, args.cloud)]
    except OSError as exc:
        print(f"tunwire: error: cannot attach the TUN devices: {exc}", file=sys.stderr)
        return 2
    priority = raise_priority()
    origin = time.monotonic()  # the trace's time zero: the wire carries packets from now on
    if args.ready:
        _write_json(args.ready, {"pid": os.getpid(), "priority": priority, "origin": origin})
    serve(fds[0], fds[1], profile, origin, args.stats, args.reload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
