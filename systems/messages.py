"""Messages that cross the edge-cloud link, and their wire encoding.

Every message is a dataclass encoded with msgpack as ``[tag, field values...]``; numpy
arrays travel as raw little-endian bytes with their dtype and shape. Byte counts in the
records are the lengths of these encodings, so they are what a real transport would carry
(plus its own framing, which the link adds).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import msgpack
import numpy as np

PROTOCOL_VERSION = 5

_REGISTRY: dict[int, type] = {}


def _message(tag: int):
    def wrap(cls):
        if tag in _REGISTRY:
            raise RuntimeError(f"message tag {tag} used twice")
        cls.TAG = tag
        _REGISTRY[tag] = cls
        return cls

    return wrap


@dataclass
class Message:
    """Base of all wire messages; ``session`` routes it to one edge/cloud session pair."""

    TAG: ClassVar[int] = -1
    session: str


@_message(1)
@dataclass
class OpenSession(Message):
    """Edge -> cloud: start a session; the cloud prefills the prompt."""

    prompt: list[int]
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    rule: str = "greedy"
    sparse_k: int = 10
    seed: int = 0


@_message(2)
@dataclass
class Upload(Message):
    """Edge -> cloud: draft tokens at absolute positions ``start...``.

    The first ``n_fixed`` tokens are already decided by the edge (a correction it resampled
    under the sparse rule) and are appended without verification. ``q_token`` carries q(x)
    per draft token (sparse rule); ``q_rows`` the full draft distributions (rejection rule),
    encoded in ``q_dtype``. ``verify`` asks the cloud to verify everything buffered up to the
    end of this upload; ``round`` names the verification window the tokens belong to and
    ``parent`` the window still awaiting its verdict when they were drafted (-1: none); if
    that verdict discards the speculation, the cloud drops this upload too. ``ack`` asks
    the cloud to confirm receipt with an :class:`Ack` (for edges that time their uploads);
    a ``probe`` carries payload only, to measure the link, and is acknowledged and dropped.
    ``lead_implied``: the first draft token has no row in ``q_rows`` (they start at the
    second). It directly follows the window ``parent``, whose verdict either commits it as
    its own token or discards it, so its distribution would never be read. ``slack``: with
    ``verify``, the seconds from sending until the request's next token is due under its SLO
    (None: no SLO), for deadline-aware schedulers.
    """

    round: int
    start: int
    tokens: list[int]
    parent: int = -1
    n_fixed: int = 0
    verify: bool = False
    q_token: list[float] | None = None
    q_rows: np.ndarray | None = None
    ack: bool = False
    probe: bool = False
    lead_implied: bool = False
    slack: float | None = None


@_message(3)
@dataclass
class Verdict(Message):
    """Cloud -> edge: the outcome of verifying positions ``base ... base + n_verified - 1``.

    The committed sequence becomes ``prefix[:base] + draft[:n_accepted] + [token]``; under
    the sparse rule on rejection ``token`` is None and ``topk_*`` carry TopK(p_j). ``digest``
    fingerprints the cloud's committed prefix so the edge can prove agreement. The ``t_*``
    fields are the cloud's timeline for this round on its own clock. ``stale`` answers a
    verification request for a window that an earlier verdict discarded.
    """

    round: int
    base: int
    n_verified: int
    n_accepted: int
    token: int | None
    topk_ids: list[int] = field(default_factory=list)
    topk_probs: list[float] = field(default_factory=list)
    committed: int = 0
    digest: str = ""
    stale: bool = False
    t_arrived: float = 0.0
    t_queue: float = 0.0
    t_verify: float = 0.0
    batch_size: int = 1


@_message(4)
@dataclass
class Generate(Message):
    """Edge -> cloud: autoregressive generation by the target alone (cloud-only)."""

    prompt: list[int]
    max_new_tokens: int
    stop_ids: list[int] = field(default_factory=list)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


@_message(5)
@dataclass
class TokenOut(Message):
    """Cloud -> edge: one generated token of a cloud-only stream."""

    index: int
    token: int
    last: bool = False
    t_compute: float = 0.0


@_message(6)
@dataclass
class CloseSession(Message):
    """Edge -> cloud: the request is done; free the session."""


@_message(7)
@dataclass
class Ack(Message):
    """Cloud -> edge: an upload that asked for it (``Upload.ack``) has arrived."""

    round: int
    n_tokens: int
    probe: bool = False


@_message(8)
@dataclass
class HiddenStates(Message):
    """Edge -> cloud (split inference): the hidden states the edge's first layers computed for
    positions ``start ... start + len(states) - 1``, shape ``(positions, hidden_size)``, in the
    dtype they travel in. The cloud runs the remaining layers on them and answers with the next
    token (:class:`TokenOut`). The sampling settings matter on a session's first message only."""

    start: int
    states: np.ndarray
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


@_message(9)
@dataclass
class Failure(Message):
    """Cloud -> edge: the cloud refused a message of this session and closed the session;
    ``reason`` says what was wrong. Other sessions are not affected."""

    reason: str


def _pack_value(v):
    if isinstance(v, np.ndarray):
        return {"__nd__": [v.dtype.str, list(v.shape), np.ascontiguousarray(v).tobytes()]}
    return v


def _unpack_value(v):
    if isinstance(v, dict) and "__nd__" in v:
        dtype, shape, raw = v["__nd__"]
        return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)
    return v


def encode(msg: Message) -> bytes:
    """The wire bytes of a message."""
    values = [_pack_value(getattr(msg, f.name)) for f in fields(msg)]
    return msgpack.packb([msg.TAG, *values], use_bin_type=True)


def declared_vocab_padding(actual_vocab: int, declared_vocab: int | None):
    """Extra bytes a message would carry if the vocabulary were ``declared_vocab`` wide, or
    None when it is the actual one. A fitted pair (:mod:`systems.engines.fitted`) models a
    151,936-token vocabulary over a few dozen ids; a full-distribution upload must still cost
    what a row of the declared width costs, so the link adds ``rows x (declared - actual) x
    itemsize`` bytes for each ``q_rows`` array it carries."""
    if declared_vocab is None or declared_vocab == actual_vocab:
        return None
    if declared_vocab < actual_vocab:
        raise ValueError(f"a declared vocabulary ({declared_vocab}) cannot be smaller than the actual one ({actual_vocab})")
    extra_per_entry = declared_vocab - actual_vocab

    def padding(msg: Message) -> int:
        rows = getattr(msg, "q_rows", None)
        if not isinstance(rows, np.ndarray) or rows.ndim != 2:
            return 0
        return rows.shape[0] * extra_per_entry * rows.dtype.itemsize

    return padding


def decode(data: bytes) -> Message:
    """The message encoded in ``data``; unknown tags are an error naming the tag."""
    tag, *values = msgpack.unpackb(data, raw=False)
    cls = _REGISTRY.get(tag)
    if cls is None:
        raise ValueError(f"unknown message tag {tag} (protocol version {PROTOCOL_VERSION})")
    return cls(*[_unpack_value(v) for v in values])
