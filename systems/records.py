"""In-memory records of rounds and requests (the harness writes them to disk).

A round is one verification window: the draft tokens the cloud judged in one verdict (or,
for cloud-only, one generated token crossing the link). Times are seconds on the run's
clock (virtual or wall). A figure that could not be measured is None, never zero.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RoundRecord:
    """One verification round with its timeline and its costs."""

    request_id: str
    round: int
    start: float
    end: float
    drafted: int = 0  # draft tokens produced for this window (including ones later discarded)
    uploaded: int = 0  # draft tokens sent to the cloud for this window
    verified: int = 0  # draft tokens the verdict judged
    accepted: int = 0  # draft tokens accepted
    emitted: int = 0  # tokens committed by this verdict (accepted + correction/bonus, after stops)
    wasted: int = 0  # drafted - accepted (rejected or discarded draft work)
    n_uploads: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    t_draft: float = 0.0  # edge compute spent drafting this window's tokens
    t_uplink: float | None = None  # closing upload: sent -> arrived at the cloud
    t_queue: float | None = None  # arrived -> verification started
    t_verify: float | None = None  # verification compute
    t_downlink: float | None = None  # verdict sent -> received at the edge
    batch_size: int = 1  # sessions verified together in the cloud's forward pass
    committed: int = 0  # committed length (prompt + output) after this round
    edge_digest: str = ""
    cloud_digest: str = ""
    extra: dict = field(default_factory=dict)
    # Per verified draft token, in order: the draft's top-token probability and its entropy
    # (nats), both at temperature 1; what a fitted pair is fitted from (systems/engines/fitted.py)
    draft_conf: list[float] = field(default_factory=list)
    draft_entropy: list[float] = field(default_factory=list)
    # Energy attributed to this round by the harness (joules; None when not attributed):
    energy_draft_j: float | None = None  # edge, drafting this window's tokens (discarded ones included)
    energy_wasted_j: float | None = None  # the part of energy_draft_j spent on tokens not accepted
    energy_verify_j: float | None = None  # cloud, this round's share of its verification pass
    energy_wait_j: float | None = None  # edge, idle while waiting for this round's verdict
    energy_kind: str | None = None  # "measured" or "estimated"
    energy_reason: str | None = None  # why figures are null

    def as_row(self) -> dict:
        return asdict(self)


@dataclass
class BatchRecord:
    """One forward pass of a cloud that serves several sessions at once (a verification
    batch, or a decode step of continuous batching), as the cloud policy saw it.

    Per member, in the batch's order: ``sessions`` (``<edge>-<request id>``; in wall mode
    ``<edge>-<request id>@<stream>``, the cloud keeping each edge stream's sessions apart), ``rounds``
    (the verification window; -1 for a decode step), ``new_tokens`` (tokens scored),
    ``context_tokens`` (tokens already cached before the pass) and ``arrived`` (when its
    work reached the cloud). ``predicted_s`` is the policy's estimate of the pass before it
    ran (None: the policy makes none); ``actual_s`` what it took on the run's clock.
    ``extra`` holds a policy's own notes (its order, the members it refused).
    """

    index: int
    kind: str  # "verify" or "decode"
    start: float
    end: float
    sessions: list[str]
    rounds: list[int]
    new_tokens: list[int]
    context_tokens: list[int]
    arrived: list[float]
    actual_s: float
    predicted_s: float | None = None
    policy: str = ""
    extra: dict = field(default_factory=dict)

    def as_row(self) -> dict:
        return asdict(self)


@dataclass
class RequestRecord:
    """One request end to end: latency metrics, token counts and bytes."""

    request_id: str
    system: str
    prompt_tokens: int
    output_tokens: list[int]
    start: float
    end: float
    token_times: list[float]
    rounds: list[RoundRecord] = field(default_factory=list)
    error: str | None = None
    # How the request lived through a lost cloud (None: it did not lose it): "retried N times:
    # <why>" (served again from the start on a new stream) or "edge_only from token N: <why>"
    # (the edge decoded the rest alone, with its draft model; not the system's output).
    recovery: str | None = None
    bytes_up: int = 0  # everything the request put on the link, set-up and tear-down included
    bytes_down: int = 0
    # Energy, set by the harness: edge_j, cloud_j (joules), edge_kind, cloud_kind ("measured" |
    # "estimated"), kind (the two kinds when they agree), edge_idle_j, cloud_idle_j, wasted_j,
    # reason (why a figure is null). None: not metered at all.
    energy: dict | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.output_tokens)

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def tpot(self) -> float | None:
        """(end-to-end - TTFT) / (tokens - 1); undefined for fewer than two tokens."""
        if self.n_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.n_tokens - 1)

    @property
    def drafted(self) -> int:
        return sum(r.drafted for r in self.rounds)

    @property
    def accepted(self) -> int:
        return sum(r.accepted for r in self.rounds)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / verified draft tokens; None when nothing was verified."""
        verified = sum(r.verified for r in self.rounds)
        return self.accepted / verified if verified else None

    @property
    def accepted_length(self) -> float | None:
        """Mean tokens committed per verification round (accepted + 1)."""
        n = len(self.rounds)
        return sum(r.emitted for r in self.rounds) / n if n else None

    def summary(self) -> dict:
        return {
            "request_id": self.request_id,
            "system": self.system,
            "prompt_tokens": self.prompt_tokens,
            "tokens": self.n_tokens,
            "ttft": self.ttft,
            "tpot": self.tpot,
            "e2e": self.e2e,
            "tokens_per_s": self.n_tokens / self.e2e if self.e2e > 0 else None,
            "rounds": len(self.rounds),
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "accepted_length": self.accepted_length,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "error": self.error,
            "recovery": self.recovery,
        }
