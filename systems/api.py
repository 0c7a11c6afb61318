"""The one interface every collaborative decoding system is written against.

Three roles, kept apart (see the architecture page):

1. :class:`~systems.engines.base.Engine` -- a model backend (tokenize, sessions, one-pass
   block scoring batched across sessions, rollback). Knows nothing of speculation.
2. :class:`Drafter` / :class:`Verifier` -- the edge and cloud halves of speculative
   decoding over an engine: drafting with draft-side information, and scoring a block and
   applying an acceptance rule from :mod:`systems.sampling`.
3. A system plug-in -- an :class:`EdgePolicy` and a :class:`CloudPolicy`, registered by name
   with a config dataclass (:func:`register_system`). Only plug-ins hold a paper's algorithm.

Policies are coroutines that touch the outside world only through their context: a
:class:`Clock`, a :class:`Compute` device that runs model work (and, in virtual time,
charges its modelled cost), and a link that carries :mod:`systems.messages`. The same
policy code therefore runs in one process, across real processes, and in virtual time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, TypeVar

import numpy as np

from systems.engines.base import Engine, EngineSession
from systems.messages import Message
from systems.records import BatchRecord, RoundRecord
from systems.sampling import (
    Outcome,
    SamplingParams,
    confidence,
    entropy,
    probabilities,
    sample,
    verify_greedy,
    verify_rejection,
    verify_sparse,
)

T = TypeVar("T")


# ---- the world a policy sees -----------------------------------------------------------
class Clock(Protocol):
    """Time source: wall clock in real runs, an event-driven clock in virtual time."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


@dataclass(frozen=True)
class Op:
    """A unit of model work, described so a device profile can price it.

    kind: "prefill" (a prompt), "draft" (one draft token), "verify" (a block of ``tokens``
    per session for ``batch`` sessions at total context ``context``), or "decode" (one
    autoregressive target token). ``sessions`` names the sessions the work serves, so a
    shared device's time (and energy) can be attributed to them; empty when unknown.
    ``layers`` = ``(first, last, n_layers)`` marks work that runs only the target's decoder
    layers ``[first, last)`` of its ``n_layers`` (split inference; a "prefill" of the prompt's
    positions or a "decode" of one), so a profile prices that share of a target forward pass.
    """

    kind: str
    tokens: int
    context: int
    batch: int = 1
    sessions: tuple[str, ...] = ()
    layers: tuple[int, int, int] | None = None


class Compute(Protocol):
    """Runs model work on a role's device; returns the work's result."""

    async def run(self, op: Op, fn: Callable[[], T]) -> T: ...


@dataclass
class Envelope:
    """A received message with what the link observed about it."""

    msg: Message
    nbytes: int
    t_sent: float
    t_recv: float


class EdgeLink(Protocol):
    """The edge's end of the link to the cloud."""

    async def send(self, msg: Message) -> int:
        """Queue a message; returns its size on the wire in bytes."""
        ...

    async def recv(self) -> Envelope: ...


class CloudLink(Protocol):
    """The cloud's end: messages from every edge session, replies routed by session."""

    async def send(self, msg: Message) -> int: ...

    async def recv(self) -> Envelope: ...


class Recorder(Protocol):
    """Where a policy reports rounds and emitted tokens (the harness computes metrics)."""

    def round(self, record: RoundRecord) -> None: ...

    def emit(self, tokens: Sequence[int]) -> None: ...


class BatchRecorder(Protocol):
    """Where a cloud policy reports each forward pass it runs over several sessions."""

    def batch(self, record: BatchRecord) -> None: ...


@dataclass
class GenerationRequest:
    """One prompt to complete."""

    request_id: str
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    # Service-level objective (seconds; None: none): the first token within ``slo_ttft_s`` of
    # the request's arrival, then one token per ``slo_tpot_s`` on average. ``arrival`` is when
    # the request reached its edge device on the run's clock (None: when serving began).
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    arrival: float | None = None

    def deadline(self, n_emitted: int) -> float | None:
        """When the request's next token (after ``n_emitted``) is due under its SLO, on the
        run's clock; None without an SLO or an arrival time."""
        if self.arrival is None or self.slo_ttft_s is None:
            return None
        return self.arrival + self.slo_ttft_s + n_emitted * (self.slo_tpot_s or 0.0)


@dataclass
class EdgeContext:
    """Everything an edge policy may use while serving one request.

    ``engine`` is the edge device's model (:attr:`SystemSpec.edge_model`); ``drafter`` drafts
    with it when that model is the draft (None otherwise).
    """

    session: str
    clock: Clock
    compute: Compute
    link: EdgeLink | None
    recorder: Recorder
    drafter: "Drafter | None"
    rng: np.random.Generator
    engine: Engine | None = None
    device: str = ""  # the edge device's profile name, for per-device settings


@dataclass
class CloudContext:
    """Everything a cloud policy may use while serving all sessions."""

    engine: Engine
    clock: Clock
    compute: Compute
    link: CloudLink
    recorder: BatchRecorder | None = None  # None: batches are not recorded


# ---- drafter and verifier --------------------------------------------------------------
@dataclass
class DraftToken:
    """A drafted token with its draft-side information.

    ``q`` is the processed draft distribution the token was sampled from (kept on the edge;
    uploaded only when the acceptance rule needs it); under greedy decoding it is one-hot
    and left as None to spare a vocabulary-sized vector per token. ``q_token`` = q(token);
    ``logits`` the raw row; :attr:`confidence` the largest softmax probability at
    temperature 1 and :attr:`entropy` the softmax's entropy (nats), computed on first use.
    """

    token: int
    q_token: float
    q: np.ndarray | None
    logits: np.ndarray
    _confidence: float | None = field(default=None, repr=False)
    _entropy: float | None = field(default=None, repr=False)

    @property
    def confidence(self) -> float:
        if self._confidence is None:
            self._confidence = confidence(self.logits)
        return self._confidence

    @property
    def entropy(self) -> float:
        if self._entropy is None:
            self._entropy = entropy(self.logits)
        return self._entropy


def prefix_digest(tokens: Sequence[int]) -> str:
    """A short fingerprint of a token prefix, compared across the link after every verdict."""
    return hashlib.blake2b(np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=8).hexdigest()


class Drafter:
    """The edge half of SD: drafts tokens and keeps them until a verdict settles them.

    ``q_dtype`` is the precision the draft distributions travel in; tokens are sampled from
    the distribution *as transmitted*, so the verifier's q equals the edge's q exactly.
    """

    def __init__(self, engine: Engine, params: SamplingParams, rng: np.random.Generator, q_dtype: str = "float32"):
        self.engine, self.params, self.rng = engine, params, rng
        self.q_dtype = np.dtype(q_dtype)
        self.session: EngineSession | None = None
        self.committed = 0
        self.pending: list[DraftToken] = []

    def start(self, prompt: Sequence[int]) -> None:
        if self.session is not None:
            self.session.close()
        self.session = self.engine.new_session()
        self.session.extend(prompt)
        self.committed = len(prompt)
        self.pending = []

    def prefill(self) -> None:
        self.session.next_logits()

    @property
    def position(self) -> int:
        """Absolute position of the next token to draft."""
        return len(self.session)

    def draft(self) -> DraftToken:
        logits = self.session.next_logits()
        if self.params.greedy:
            token, q, q_token = int(np.argmax(logits)), None, 1.0
        else:
            q = probabilities(logits, self.params)
            if self.q_dtype != np.float64:
                q = q.astype(self.q_dtype).astype(np.float64)
                q /= q.sum()
            token = sample(q, self.rng)
            q_token = float(q[token])
        self.session.extend([token])
        d = DraftToken(token, q_token, q, logits)
        self.pending.append(d)
        return d

    def apply(self, base: int, n_accepted: int, token: int, keep_speculation: bool = True) -> bool:
        """Commit ``pending[:n_accepted] + [token]``; True when the drafts beyond survive.

        The drafts after the verified ones (pre-drafted or proactive) survive only when the
        verdict's token equals the first of them; otherwise they are discarded.
        """
        if base != self.committed:
            raise RuntimeError(f"verdict for position {base} but the edge has committed {self.committed}")
        keep = base + n_accepted
        survive = (keep_speculation and len(self.pending) > n_accepted
                   and self.pending[n_accepted].token == token)
        if survive:
            self.pending = self.pending[n_accepted + 1 :]
        else:
            self.session.rollback(keep)
            self.session.extend([token])
            self.pending = []
        self.committed = keep + 1
        return survive

    def commit_all(self) -> None:
        """Commit every drafted token as final (decoding with the draft model alone)."""
        self.pending = []
        self.committed = self.position

    def committed_tokens(self) -> list[int]:
        return self.session.tokens[: self.committed]

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


class Verifier:
    """The cloud half of SD: holds the target session and judges draft blocks."""

    def __init__(self, engine: Engine, params: SamplingParams, rng: np.random.Generator, rule: str, sparse_k: int = 10):
        if rule not in ("greedy", "rejection", "sparse"):
            raise ValueError(f"unknown acceptance rule {rule!r}; valid: greedy, rejection, sparse")
        if rule == "greedy" and not params.greedy:
            raise ValueError("the greedy rule needs temperature 0; use 'rejection' or 'sparse' for sampling")
        self.engine, self.params, self.rng = engine, params, rng
        self.rule, self.sparse_k = rule, sparse_k
        self.session = engine.new_session()

    @property
    def committed(self) -> int:
        return len(self.session)

    def start(self, prompt: Sequence[int]) -> None:
        self.session.extend(prompt)

    def prefill(self) -> None:
        self.session.next_logits()

    def append(self, tokens: Sequence[int]) -> None:
        """Append tokens decided elsewhere (a correction the edge resampled)."""
        self.session.extend(tokens)

    def decide(self, base: int, block: Sequence[int], rows: np.ndarray, q_token, q_rows) -> Outcome:
        """Apply the acceptance rule to scored rows and commit the outcome."""
        if self.rule == "greedy":
            out = verify_greedy(rows, block)
        else:
            p_rows = np.stack([probabilities(r, self.params) for r in rows])
            if self.rule == "rejection":
                out = verify_rejection(p_rows, np.asarray(q_rows, dtype=np.float64), block, self.rng)
            else:
                out = verify_sparse(p_rows, q_token, block, self.rng, self.sparse_k)
        self.session.rollback(base + out.n_accepted)
        if out.token is not None:
            self.session.extend([out.token])
        return out

    def digest(self) -> str:
        return prefix_digest(self.session.tokens)

    def close(self) -> None:
        self.session.close()


def verify_batch(items: Sequence[tuple[Verifier, Sequence[int], Any, Any]]) -> list[Outcome]:
    """Verify blocks of several sessions with ONE forward pass of their shared engine.

    ``items``: ``(verifier, block, q_token, q_rows)``; every verifier must be at the block's
    base position already (fixed tokens appended).
    """
    if not items:
        return []
    engine = items[0][0].engine
    if any(v.engine is not engine for v, *_ in items):
        raise ValueError("verify_batch needs verifiers on one engine")
    bases = [v.committed for v, *_ in items]
    rows = engine.score_batch([(v.session, block) for v, block, *_ in items])
    return [v.decide(b, blk, r, qt, qr) for (v, blk, qt, qr), b, r in zip(items, bases, rows)]


# ---- policies and the registry ----------------------------------------------------------
class EdgePolicy(ABC):
    """The edge half of a system: when to draft, upload, ask for verification; what to do
    with a verdict. One instance per edge device, living across its requests."""

    def __init__(self, config: Any):
        self.config = config

    @abstractmethod
    async def generate(self, request: GenerationRequest, ctx: EdgeContext) -> list[int]:
        """Serve one request; return the emitted tokens (also reported via ctx.recorder)."""

    async def warm_up(self, ctx: EdgeContext) -> None:
        """One-time device set-up before a request's clock starts (e.g. link probes); the
        context is the request's. Its time and bytes are not the request's. Default: none."""


class CloudPolicy(ABC):
    """The cloud half of a system: how to queue, batch and schedule work for all edges."""

    def __init__(self, config: Any):
        self.config = config

    @abstractmethod
    async def serve(self, ctx: CloudContext) -> None:
        """Serve messages until cancelled."""


@dataclass(frozen=True)
class SystemSpec:
    """A registered system: its policies, its config dataclass and what it must equal.

    ``reference`` names the model whose own greedy decode the system's greedy output must
    reproduce ("target" for every speculative system; "draft" for edge-only).
    ``variants`` are named config overrides the conformance suite also runs.
    ``report`` (optional) turns a run's request records into the system's own figures
    (a dict with a one-line ``summary``), shown beside the run's measurements.
    ``edge_model`` names the model the edge device runs: "draft" (every speculative system)
    or "target" (split inference runs the target's first layers there).
    ``check`` (optional) ``check(config, engine)`` refuses an engine a side of the system
    cannot run on (a missing capability, a setting the model does not allow) with one line
    naming the problem and the fix (a ValueError); the harness calls it with each side's
    engine before serving anything (:meth:`check_engine`).
    """

    name: str
    config_cls: type
    edge_cls: type[EdgePolicy]
    cloud_cls: type[CloudPolicy] | None
    description: str
    reference: str = "target"
    variants: dict = field(default_factory=dict)
    report: Callable[[Sequence[Any]], dict | None] | None = None
    edge_model: str = "draft"
    check: Callable[[Any, Engine], None] | None = None

    def make_config(self, overrides: dict | None = None):
        return build_config(self.config_cls, overrides or {}, where=f"system={self.name}")

    def check_engine(self, config, engine: Engine | None) -> None:
        """Raise ValueError (one line) if this system cannot run with ``config`` on ``engine``."""
        if self.check is not None and engine is not None:
            self.check(config, engine)


_SYSTEMS: dict[str, SystemSpec] = {}


class UnknownSystemError(KeyError):
    """An unknown system name; the message lists the valid ones."""

    def __str__(self) -> str:
        return str(self.args[0])


def register_system(
    name: str,
    *,
    config: type,
    edge: type[EdgePolicy],
    cloud: type[CloudPolicy] | None,
    description: str,
    reference: str = "target",
    variants: dict | None = None,
    report: Callable[[Sequence[Any]], dict | None] | None = None,
    edge_model: str = "draft",
    check: Callable[[Any, Engine], None] | None = None,
) -> SystemSpec:
    if name in _SYSTEMS:
        raise RuntimeError(f"system {name!r} registered twice")
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config of system {name!r} must be a dataclass")
    if edge_model not in ("draft", "target"):
        raise ValueError(f"system {name!r}: edge_model must be 'draft' or 'target', got {edge_model!r}")
    spec = SystemSpec(name, config, edge, cloud, description, reference, dict(variants or {}), report,
                      edge_model, check)
    _SYSTEMS[name] = spec
    return spec


def _discover() -> None:
    import importlib
    import pkgutil

    import systems

    for mod in pkgutil.iter_modules(systems.__path__):
        if mod.ispkg and mod.name != "engines":
            importlib.import_module(f"systems.{mod.name}")


def system_names() -> list[str]:
    _discover()
    return sorted(_SYSTEMS)


def get_system(name: str) -> SystemSpec:
    _discover()
    if name not in _SYSTEMS:
        raise UnknownSystemError(f"unknown system {name!r}; valid systems: {', '.join(sorted(_SYSTEMS))}")
    return _SYSTEMS[name]


def build_config(cls: type, overrides: dict, where: str = "config"):
    """Instantiate a config dataclass from a mapping, with errors that name the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    values = {}
    for key, value in overrides.items():
        expected = hints[key]
        base = typing.get_origin(expected) or expected
        if base in (int, float, str, bool) and not _fits(value, base):
            raise ValueError(f"{where}: key {key!r} must be {base.__name__}, got {value!r}")
        values[key] = float(value) if base is float else value
    return cls(**values)


def _fits(value, base) -> bool:
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, base)

