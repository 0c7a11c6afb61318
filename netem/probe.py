"""The link probe: what a link really delivers, measured end to end over TCP.

A small server runs on the cloud side of a :class:`netem.backends.Link` (its socket opened
in the cloud namespace), the client on the edge side. Measured:

- **RTT**: ``pings`` (>= 30) ping-pongs of 32 B with TCP_NODELAY, ``ping_gap_s`` apart, on one
  connection; median, min, p95, standard deviation (the jitter spread: sqrt(2) x the
  one-way jitter for independent draws each way);
- **goodput** each way: a bulk transfer timed **at the receiver** (a sender's clock hides
  megabytes in socket buffers): the slope of bytes received against time over the second
  half of the bytes (past slow start and its losses), for max(2 s, 30 RTT);
  the data's CRC is checked on arrival;
- **retransmissions** each way: the sending socket's ``tcpi_total_retrans`` (TCP_INFO);
- **new-connection time**: ``connect()`` on fresh connections, about one RTT on a packet-level
  link and about zero on the stream-level relay, which tells which backend really ran;
- the emulator's own counters over the probe (packets, losses, queue drops), where it has them.
"""

from __future__ import annotations

import json
import random
import socket
import statistics
import struct
import threading
import time
import zlib

PING = 32
TCP_INFO_RETRANS = struct.Struct("=I")  # tcpi_total_retrans, at byte 100 of struct tcp_info
PATTERN = random.Random(0x5EC).randbytes(1 << 20)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"the connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def total_retrans(sock: socket.socket) -> int | None:
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return None
    return TCP_INFO_RETRANS.unpack_from(info, 100)[0] if len(info) >= 104 else None


def _send_pattern(sock: socket.socket, n: int) -> int:
    crc, sent = 0, 0
    while sent < n:
        piece = PATTERN[: min(len(PATTERN), n - sent)]
        sock.sendall(piece)
        crc = zlib.crc32(piece, crc)
        sent += len(piece)
    return crc


def _receive(sock: socket.socket, n: int) -> dict:
    """Receive ``n`` bytes, stamping arrivals; goodput over the second half of the bytes."""
    got, crc, marks = 0, 0, []
    while got < n:
        chunk = sock.recv(min(1 << 18, n - got))
        if not chunk:
            break
        now = time.perf_counter()
        crc = zlib.crc32(chunk, crc)
        got += len(chunk)
        marks.append((now, got))
    if not marks:
        return {"bytes": 0, "crc": crc, "goodput_bps": None}
    return {"bytes": got, "crc": crc, "seconds": marks[-1][0] - marks[0][0],
            "goodput_bps": slope([(t, b) for t, b in marks if b >= n / 2]), "marks": marks}


def slope(marks: list[tuple[float, int]]) -> float | None:
    """Bits per second: least-squares slope of bytes received against time. A byte-count
    cut alone would be skewed by a burst that a retransmission releases (head-of-line)."""
    if len(marks) < 2 or marks[-1][0] <= marks[0][0]:
        return None
    ts = [t for t, _ in marks]
    bs = [b for _, b in marks]
    mt, mb = statistics.fmean(ts), statistics.fmean(bs)
    var = sum((t - mt) ** 2 for t in ts)
    return 8 * sum((t - mt) * (b - mb) for t, b in marks) / var if var > 0 else None


class ProbeServer:
    """Echo, sink and source on the cloud side; one thread per connection."""

    def __init__(self, link):
        with link.entered("cloud"):
            self.sock = socket.create_server((link.cloud_bind, 0), backlog=64)
        self.port = self.sock.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._stop = False
        self._accept = threading.Thread(target=self._serve, daemon=True, name="probe-accept")
        self._accept.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True, name="probe-conn")
            t.start()
            self._threads.append(t)

    def _handle(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            cmd = conn.recv(1)
            if cmd == b"P":
                while True:
                    msg = conn.recv(PING)
                    if not msg:
                        return
                    msg += _recv_exact(conn, PING - len(msg)) if len(msg) < PING else b""
                    conn.sendall(msg)
            elif cmd == b"U":
                (n,) = struct.unpack("!Q", _recv_exact(conn, 8))
                res = _receive(conn, n)
                res.pop("marks")
                conn.sendall(json.dumps(res).encode() + b"\n")
            elif cmd == b"D":
                (n,) = struct.unpack("!Q", _recv_exact(conn, 8))
                crc = _send_pattern(conn, n)
                _recv_exact(conn, 1)  # everything arrived: the retransmission count is final
                conn.sendall(json.dumps({"crc": crc, "retransmissions": total_retrans(conn)}).encode() + b"\n")
            elif cmd == b"M":  # messages: n bytes each way, for delivery-time measurements
                while True:
                    head = conn.recv(8)
                    if not head:
                        return
                    (n,) = struct.unpack("!Q", head + _recv_exact(conn, 8 - len(head)))
                    _recv_exact(conn, n)
                    conn.sendall(struct.pack("!d", time.perf_counter()))
            else:  # "C" and anything else: a connection test, nothing to do
                conn.recv(1)
        except (OSError, ConnectionError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


class ProbeClient:
    """The edge side's measurements against a :class:`ProbeServer`."""

    def __init__(self, link, server: ProbeServer):
        self.link = link
        self.address = link.endpoint(server.port)

    def connect(self, cmd: bytes, timeout: float = 30.0) -> tuple[socket.socket, float]:
        with self.link.entered("edge"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        sock.connect(self.address)
        took = time.perf_counter() - t0
        sock.sendall(cmd)
        return sock, took

    def rtts(self, n: int, gap_s: float) -> list[float]:
        sock, _ = self.connect(b"P")
        out = []
        try:
            msg = bytes(PING)
            for i in range(n + 1):
                t0 = time.perf_counter()
                sock.sendall(msg)
                _recv_exact(sock, PING)
                if i:  # the first exchange also pays for the connection's first segment
                    out.append(time.perf_counter() - t0)
                time.sleep(gap_s)
        finally:
            sock.close()
        return out

    def connects(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            sock, took = self.connect(b"C")
            sock.close()
            out.append(took)
        return out

    def upload(self, nbytes: int) -> dict:
        sock, _ = self.connect(b"U")
        try:
            sock.sendall(struct.pack("!Q", nbytes))
            crc = _send_pattern(sock, nbytes)
            res = json.loads(_readline(sock))
            res["retransmissions"] = total_retrans(sock)
        finally:
            sock.close()
        res["intact"] = res["bytes"] == nbytes and res.pop("crc") == crc
        return res

    def download(self, nbytes: int) -> dict:
        sock, _ = self.connect(b"D")
        try:
            sock.sendall(struct.pack("!Q", nbytes))
            res = _receive(sock, nbytes)
            sock.sendall(b"k")
            peer = json.loads(_readline(sock))
        finally:
            sock.close()
        res["intact"] = res["bytes"] == nbytes and res.pop("crc") == peer["crc"]
        res["retransmissions"] = peer["retransmissions"]
        return res


def _readline(sock: socket.socket) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _summary(samples: list[float]) -> dict:
    ms = sorted(x * 1e3 for x in samples)
    return {"median": statistics.median(ms), "min": ms[0], "max": ms[-1], "p95": ms[int(0.95 * (len(ms) - 1))],
            "mean": statistics.fmean(ms), "stdev": statistics.stdev(ms) if len(ms) > 1 else 0.0, "n": len(ms)}


def bulk_bytes(link, direction: str, seconds: float) -> int:
    rate = link.profile.rate(direction, time.monotonic() - link.origin)
    if rate is None:
        return 64 << 20
    return max(64 << 10, int(rate * link.profile.goodput_fraction() / 8 * seconds))


def probe_link(link, *, pings: int = 30, ping_gap_s: float = 0.01, bulk_s: float | None = None,
               connects: int = 5, directions=("up", "down")) -> dict:
    """Measure ``link``; a dict of measured figures (times in ms, rates in Mbit/s)."""
    if pings < 30:
        raise ValueError(f"pings must be >= 30 for a usable RTT median, got {pings}")
    p = link.profile
    bulk_s = bulk_s if bulk_s is not None else min(8.0, max(2.0, 30 * p.rtt_s))
    t0 = time.monotonic()
    before = link.counters()
    server = ProbeServer(link)
    try:
        client = ProbeClient(link, server)
        try:
            conn = client.connects(connects)
        except OSError as exc:
            from netem.backends import LinkError

            raise LinkError(f"the probe cannot reach the cloud side over the {link.backend} link "
                            f"({exc}); emulator: {link.health()}") from exc
        rtt = client.rtts(pings, ping_gap_s)
        out = {"kind": "measured", "backend": link.backend, "level": link.level,
               "rtt_ms": _summary(rtt), "connect_ms": _summary(conn)}
        out["jitter_ms"] = {"rtt_stdev": out["rtt_ms"]["stdev"],
                            "expected_rtt_stdev": (2 ** 0.5) * p.jitter_s * 1e3,
                            "note": "expected: sqrt(2) x the configured one-way standard deviation (modelled)"}
        for direction in directions:
            n = bulk_bytes(link, direction, bulk_s)
            res = client.upload(n) if direction == "up" else client.download(n)
            res.pop("marks", None)
            rate = p.rate(direction, time.monotonic() - link.origin)
            res["goodput_mbps"] = None if res.get("goodput_bps") is None else res.pop("goodput_bps") / 1e6
            res["expected_mbps"] = None if rate is None else rate * p.goodput_fraction() / 1e6
            out[direction] = res
    finally:
        server.close()
    after = link.counters()
    if after is not None:
        delta = {d: {k: after[d][k] - (before[d][k] if before else 0) for k in after[d]} for d in ("up", "down")}
        for d in ("up", "down"):
            sent = delta[d]["packets"] + delta[d]["lost"] + delta[d]["queue_drops"]
            delta[d]["loss_fraction"] = delta[d]["lost"] / sent if sent else None
        delta["cpu_s"] = after["cpu_s"] - (before["cpu_s"] if before else 0.0)
        out["emulator"] = delta
    out["duration_s"] = time.monotonic() - t0
    return out


def message_times(link, sizes: list[int], repeats: int = 3, gap_s: float = 0.05,
                  warm_bytes: int = 0) -> dict[int, float]:
    """Median edge->cloud delivery time (s) of a message of each size on one connection:
    from just before the sender's ``sendall`` to the receiver's last byte (one clock).
    ``warm_bytes`` are sent first, so the connection is past slow start (a warm stream)."""
    server = ProbeServer(link)
    try:
        client = ProbeClient(link, server)
        sock, _ = client.connect(b"M")
        out = {}

        def once(n: int) -> float:
            payload = PATTERN[:n] if n <= len(PATTERN) else (PATTERN * (n // len(PATTERN) + 1))[:n]
            t0 = time.perf_counter()
            sock.sendall(struct.pack("!Q", n) + payload)
            (t1,) = struct.unpack("!d", _recv_exact(sock, 8))
            time.sleep(gap_s + link.profile.rtt_s)
            return t1 - t0

        try:
            if warm_bytes:
                once(warm_bytes)
            for n in sizes:
                out[n] = statistics.median(once(n) for _ in range(repeats))
        finally:
            sock.close()
    finally:
        server.close()
    return out


def summary(result: dict) -> dict:
    """The probe's headline figures (all measured), for a run's manifest."""
    out = {"kind": "measured", "rtt_ms_median": result["rtt_ms"]["median"], "rtt_ms_min": result["rtt_ms"]["min"],
           "rtt_ms_p95": result["rtt_ms"]["p95"], "rtt_ms_stdev": result["rtt_ms"]["stdev"],
           "connect_ms_median": result["connect_ms"]["median"]}
    for d in ("up", "down"):
        if d in result:
            out[f"{d}_goodput_mbps"] = result[d]["goodput_mbps"]
            out[f"{d}_retransmissions"] = result[d]["retransmissions"]
            out[f"{d}_intact"] = result[d]["intact"]
        emu = result.get("emulator")
        if emu is not None:
            out[f"{d}_loss_fraction"] = emu[d]["loss_fraction"]
    return out


def side_by_side(profile, result: dict) -> list[dict]:
    """Configured vs measured, one row per figure (the configured goodput is the rate after headers)."""
    rows = [("RTT median (ms)", profile.rtt_s * 1e3, result["rtt_ms"]["median"]),
            ("RTT stdev (ms)", (2 ** 0.5) * profile.jitter_s * 1e3, result["rtt_ms"]["stdev"]),
            ("new connection (ms)", None, result["connect_ms"]["median"])]
    for d in ("up", "down"):
        if d in result:
            rows.append((f"{d} goodput (Mbit/s)", result[d]["expected_mbps"], result[d]["goodput_mbps"]))
            rows.append((f"{d} retransmissions", None, result[d]["retransmissions"]))
        emu = result.get("emulator")
        if emu is not None:
            rows.append((f"{d} loss", profile.loss, emu[d]["loss_fraction"]))
    return [{"figure": f, "configured": c, "measured": m} for f, c, m in rows]
