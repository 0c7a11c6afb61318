"""Network profiles: the typed schema of ``conf/network/*.yaml``.

A profile says what a link between an edge device and the cloud should deliver: round-trip
time, jitter (standard deviation of the one-way delay, and its distribution), uplink and
downlink rate, per-packet loss, the bottleneck queue, the framing each message and each
TCP segment add, and optionally a time-varying rate trace. Every backend (``netem``, ``tun``,
``relay``) and the harness's virtual link model read the same :class:`NetworkProfile`.

A trace is a list of rate steps (``at_s`` from the link's start), either written out or
generated from a seed (``generate:``); the generated sequence is materialised here, so the
run can store exactly what it used.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Mapping

BACKENDS = ("auto", "netem", "tun", "relay", "none")
JITTER_DISTRIBUTIONS = ("normal", "uniform")
# TCP/IPv4 with the timestamp option: 20 B IP + 20 B TCP + 12 B options per segment; a
# 1500 B MTU then carries 1448 B of payload (Linux's default MSS on such a path).
DEFAULT_HEADER_BYTES = 52
DEFAULT_MSS = 1448


class ProfileError(ValueError):
    """A network profile value is wrong; the message names the key and the fix."""


@dataclass(frozen=True)
class RateStep:
    """From ``at_s`` seconds after the link starts, these rates hold (None = unlimited), and
    this loss probability (None: the profile's own; a loss burst sets one)."""

    at_s: float
    up_bps: float | None
    down_bps: float | None
    loss: float | None = None


@dataclass(frozen=True)
class Trace:
    """A piecewise-constant rate schedule; before the first step and after the last, the
    nearest step's rates hold."""

    steps: tuple[RateStep, ...]
    source: str = "listed"  # "listed" or a description of the seeded generator

    def step_at(self, t: float) -> RateStep:
        """The step in force at ``t``."""
        current = self.steps[0]
        for step in self.steps:
            if step.at_s <= t:
                current = step
            else:
                break
        return current

    def rate(self, direction: str, t: float) -> float | None:
        step = self.step_at(t)
        return step.up_bps if direction == "up" else step.down_bps

    def finish(self, direction: str, start: float, bits: float) -> float:
        """When ``bits`` that begin serializing at ``start`` are out, rate changing on schedule."""
        t, left = start, float(bits)
        bounds = [s.at_s for s in self.steps[1:]]
        while True:
            rate = self.rate(direction, t)
            nxt = next((b for b in bounds if b > t), math.inf)
            if rate is None:
                return t
            if rate == 0:  # an outage: nothing passes until the next step
                if nxt == math.inf:
                    raise ValueError("a trace cannot end in an outage (rate 0): nothing would ever arrive")
                t = nxt
                continue
            if t + left / rate <= nxt:
                return t + left / rate
            left -= (nxt - t) * rate
            t = nxt

    def as_list(self) -> list[dict]:
        return [{"at_s": s.at_s, "up_mbps": _mbps(s.up_bps), "down_mbps": _mbps(s.down_bps),
                 **({"loss": s.loss} if s.loss is not None else {})} for s in self.steps]

    def shifted(self, offset_s: float) -> "Trace":
        """The same schedule seen from ``offset_s`` seconds in (for a run that continues a
        link's time across separately clocked parts)."""
        current = max((i for i, st in enumerate(self.steps) if st.at_s <= offset_s), default=0)
        steps = [RateStep(0.0, self.steps[current].up_bps, self.steps[current].down_bps, self.steps[current].loss)]
        steps += [RateStep(st.at_s - offset_s, st.up_bps, st.down_bps, st.loss) for st in self.steps[current + 1:]]
        return Trace(tuple(steps), self.source)


@dataclass(frozen=True)
class NetworkProfile:
    """One link's configured behaviour, as read from ``conf/network/<name>.yaml``."""

    name: str
    rtt_s: float = 0.0
    up_bps: float | None = None
    down_bps: float | None = None
    jitter_s: float = 0.0
    jitter_distribution: str = "normal"
    loss: float = 0.0
    queue_s: float = 0.1
    overhead_bytes: int = 0
    header_bytes: int = DEFAULT_HEADER_BYTES
    mss: int = DEFAULT_MSS
    trace: Trace | None = None
    backend: str = "auto"
    source: str = ""
    seed: int = 0

    @property
    def shaped(self) -> bool:
        """False for a profile that asks for nothing (loopback): no link needs emulating."""
        return bool(self.rtt_s or self.jitter_s or self.loss or self.up_bps or self.down_bps or self.trace)

    def rate(self, direction: str, t: float = 0.0) -> float | None:
        if self.trace is not None:
            return self.trace.rate(direction, t)
        return self.up_bps if direction == "up" else self.down_bps

    def loss_at(self, t: float = 0.0) -> float:
        """The loss probability in force at ``t`` (a trace step's, else the profile's)."""
        step_loss = self.trace.step_at(t).loss if self.trace is not None else None
        return self.loss if step_loss is None else step_loss

    def wire_bytes(self, nbytes: int) -> int:
        """Bytes a message of ``nbytes`` puts on the wire: framing, then headers per segment."""
        payload = nbytes + self.overhead_bytes
        return payload + self.header_bytes * max(1, -(-payload // self.mss))

    def goodput_fraction(self) -> float:
        """Payload share of a full segment: the most a bulk transfer can get of the rate."""
        return self.mss / (self.mss + self.header_bytes)

    def describe(self) -> dict[str, Any]:
        """The configured figures, in the units of the YAML file (for manifests)."""
        out = {"name": self.name, "rtt_ms": self.rtt_s * 1e3, "up_mbps": _mbps(self.up_bps),
               "down_mbps": _mbps(self.down_bps), "jitter_ms": self.jitter_s * 1e3,
               "jitter_distribution": self.jitter_distribution, "loss": self.loss, "queue_ms": self.queue_s * 1e3,
               "overhead_bytes": self.overhead_bytes, "header_bytes": self.header_bytes, "mss": self.mss,
               "backend": self.backend, "source": self.source, "seed": self.seed}
        if self.trace is not None:
            out["trace"] = {"source": self.trace.source, "steps": self.trace.as_list()}
        return out

    def as_json(self) -> dict[str, Any]:
        """Everything, in SI units, for handing the profile to another process."""
        d = asdict(self)
        d["trace"] = None if self.trace is None else {"source": self.trace.source,
                                                      "steps": [asdict(s) for s in self.trace.steps]}
        return d

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "NetworkProfile":
        d = dict(d)
        if d.get("trace"):
            d["trace"] = Trace(tuple(RateStep(**s) for s in d["trace"]["steps"]), d["trace"]["source"])
        return NetworkProfile(**d)


def _mbps(bps: float | None) -> float | None:
    return None if bps is None else bps / 1e6


KEYS = {
    "name": "the profile's name (network=<name>)",
    "rtt_ms": "round-trip time in ms (half each way)",
    "jitter_ms": "standard deviation of the one-way delay in ms",
    "jitter_distribution": f"one of {', '.join(JITTER_DISTRIBUTIONS)}",
    "up_mbps": "edge->cloud rate in Mbit/s, null for unlimited",
    "down_mbps": "cloud->edge rate in Mbit/s, null for unlimited",
    "loss": "probability a packet is lost, each direction, in [0, 1)",
    "queue_ms": "drop-tail bottleneck queue, in ms of the current rate (default: the RTT, at least 100)",
    "overhead_bytes": "framing bytes per message (the transport's)",
    "header_bytes": "header bytes per TCP segment",
    "mss": "payload bytes per TCP segment",
    "trace": "time-varying rates: {steps: [{at_s, up_mbps, down_mbps}, ...]} or {generate: {...}}",
    "backend": f"link emulation backend, one of {', '.join(BACKENDS)}",
    "source": "where the numbers come from",
    "seed": "seed for jitter, loss and generated traces",
}


def _number(data: Mapping, key: str, default: float | None, *, allow_null: bool = False,
            low: float = 0.0, below: float | None = None) -> float | None:
    value = data.get(key, default)
    if value is None:
        if allow_null:
            return None
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProfileError(f"network.{key} must be a number ({KEYS[key]}), got {value!r}")
    if value < low or (below is not None and value >= below):
        bound = f"in [{low:g}, {below:g})" if below is not None else f">= {low:g}"
        raise ProfileError(f"network.{key} must be {bound} ({KEYS[key]}), got {value!r}")
    return float(value)


def _rate(data: Mapping, key: str, where: str = "network") -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ProfileError(f"{where}.{key} must be a positive rate in Mbit/s (or null for unlimited), got {value!r}")
    return float(value) * 1e6


def parse_trace(node: Any, seed: int) -> Trace:
    """A :class:`Trace` from a ``trace:`` node: listed steps, or a seeded generator."""
    if not isinstance(node, Mapping) or set(node) - {"steps", "generate"} or len(node) != 1:
        raise ProfileError("network.trace must be {steps: [{at_s, up_mbps, down_mbps}, ...]} or "
                           "{generate: {every_s, up_mbps: [lo, hi], down_mbps: [lo, hi], duration_s, seed}}")
    if "steps" in node:
        steps = node["steps"]
        if not isinstance(steps, list) or not steps:
            raise ProfileError("network.trace.steps must be a non-empty list of {at_s, up_mbps, down_mbps}")
        out = []
        for i, s in enumerate(steps):
            where = f"network.trace.steps[{i}]"
            if not isinstance(s, Mapping) or set(s) - {"at_s", "up_mbps", "down_mbps"} or "at_s" not in s:
                raise ProfileError(f"{where} must be a mapping with at_s and up_mbps/down_mbps, got {s!r}")
            at = s["at_s"]
            if isinstance(at, bool) or not isinstance(at, (int, float)) or at < 0:
                raise ProfileError(f"{where}.at_s must be seconds >= 0, got {at!r}")
            if out and at <= out[-1].at_s:
                raise ProfileError(f"{where}.at_s must be later than the step before ({out[-1].at_s:g} s), got {at!r}")
            out.append(RateStep(float(at), _rate(s, "up_mbps", where), _rate(s, "down_mbps", where)))
        return Trace(tuple(out), "listed")
    return generate_trace(node["generate"], seed)


def generate_trace(gen: Any, seed: int) -> Trace:
    """Rate steps drawn uniformly from ``[lo, hi]`` every ``every_s``, seeded: a scenario whose
    source publishes ranges but no sequence. The drawn sequence is the trace."""
    allowed = {"every_s", "up_mbps", "down_mbps", "duration_s", "seed"}
    if not isinstance(gen, Mapping) or set(gen) - allowed or "every_s" not in gen:
        raise ProfileError(f"network.trace.generate must be a mapping with every_s and keys from "
                           f"{', '.join(sorted(allowed))}, got {gen!r}")
    every = gen["every_s"]
    duration = gen.get("duration_s", 3600)
    for key, v in (("every_s", every), ("duration_s", duration)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ProfileError(f"network.trace.generate.{key} must be seconds > 0, got {v!r}")
    bounds = {}
    for key in ("up_mbps", "down_mbps"):
        b = gen.get(key)
        if b is not None and (not isinstance(b, list) or len(b) != 2 or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in b) or b[0] > b[1]):
            raise ProfileError(f"network.trace.generate.{key} must be [low, high] in Mbit/s with "
                               f"0 < low <= high, or null for unlimited, got {b!r}")
        bounds[key] = b
    seed = int(gen.get("seed", seed))
    rng = random.Random(f"specwan-trace-{seed}")
    steps = []
    for i in range(max(1, math.ceil(duration / every))):
        up, down = (None if bounds[k] is None else round(rng.uniform(*bounds[k]) * 10) * 1e5
                    for k in ("up_mbps", "down_mbps"))
        steps.append(RateStep(i * float(every), up, down))
    what = (f"generated: every {every:g} s, up {bounds['up_mbps']} Mbit/s, down {bounds['down_mbps']} Mbit/s, "
            f"uniform, seed {seed}, {duration:g} s (the last step holds after)")
    return Trace(tuple(steps), what)


def parse_profile(data: Mapping[str, Any]) -> NetworkProfile:
    """Check a ``network`` mapping (units as in the YAML files) and build its profile."""
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ProfileError(f"network: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(KEYS))}")
    backend = data.get("backend") or "auto"
    if backend not in BACKENDS:
        raise ProfileError(f"network.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    dist = data.get("jitter_distribution") or "normal"
    if dist not in JITTER_DISTRIBUTIONS:
        raise ProfileError(f"network.jitter_distribution must be one of {', '.join(JITTER_DISTRIBUTIONS)}, "
                           f"got {dist!r}")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ProfileError(f"network.seed must be an integer, got {seed!r}")
    ints = {}
    for key, default, low in (("overhead_bytes", 0, 0), ("header_bytes", DEFAULT_HEADER_BYTES, 0),
                              ("mss", DEFAULT_MSS, 64)):
        v = data.get(key, default)
        v = default if v is None else v
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ProfileError(f"network.{key} must be an integer >= {low} ({KEYS[key]}), got {v!r}")
        ints[key] = v
    trace = None if data.get("trace") is None else parse_trace(data["trace"], seed)
    return NetworkProfile(
        name=str(data.get("name") or "network"),
        rtt_s=_number(data, "rtt_ms", 0.0) / 1e3,
        up_bps=_rate(data, "up_mbps"),
        down_bps=_rate(data, "down_mbps"),
        jitter_s=_number(data, "jitter_ms", 0.0) / 1e3,
        jitter_distribution=dist,
        loss=_number(data, "loss", 0.0, below=1.0),
        queue_s=_queue_s(data),
        trace=trace, backend=backend, source=str(data.get("source") or ""), seed=seed, **ints,
    )


def _queue_s(data: Mapping) -> float:
    # Default: one bandwidth-delay product (the rule-of-thumb router buffer, RTT x rate),
    # at least 100 ms; a smaller queue makes a long-RTT TCP flow lose packets every few RTTs.
    rtt_ms = _number(data, "rtt_ms", 0.0)
    return _number(data, "queue_ms", max(100.0, rtt_ms), low=1.0) / 1e3


def load_profile(path) -> NetworkProfile:
    """Read a profile from a YAML file."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, Mapping):
        raise ProfileError(f"{path}: a network profile is a mapping of keys ({', '.join(sorted(KEYS))})")
    try:
        return parse_profile(data)
    except ProfileError as exc:
        raise ProfileError(f"{path}: {exc}") from exc


def jitter_sample(rng: random.Random, sigma_s: float, distribution: str = "normal") -> float:
    """One draw of the one-way delay's deviation: mean 0, standard deviation ``sigma_s``."""
    if sigma_s <= 0:
        return 0.0
    if distribution == "uniform":
        half = sigma_s * math.sqrt(3.0)
        return rng.uniform(-half, half)
    return rng.gauss(0.0, sigma_s)
