"""Summaries of records' energy that keep each figure's kind with it."""

from __future__ import annotations

from typing import Any, Sequence

ROLES = ("edge", "cloud")


def joules_per_token(records: Sequence[Any], role: str) -> tuple[float | None, str | None, str | None]:
    """``(J/token, kind, reason)`` of ``role`` over ``records`` (``record.energy``).

    None with a reason when any record lacks the role's joules, when the records' kinds
    differ (measured and estimated are never added together), or without output tokens.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    joules, kinds = 0.0, set()
    for rec in records:
        energy = getattr(rec, "energy", None) or {}
        value = energy.get(f"{role}_j")
        if value is None:
            return None, None, energy.get("reason") or "not measured"
        joules += value
        kinds.add(energy.get(f"{role}_kind") or energy.get("kind"))
    if not records:
        return None, None, "no requests"
    if len(kinds) != 1 or None in kinds:
        return None, None, f"{role} figures of different kinds ({', '.join(sorted(map(str, kinds)))}) are not added"
    tokens = sum(rec.n_tokens for rec in records)
    if not tokens:
        return None, kinds.pop(), "no output tokens"
    return joules / tokens, kinds.pop(), None


def describe_per_token(records: Sequence[Any]) -> str:
    """One line: J/token per role with its kind, or why it is missing."""
    parts = []
    for role in ROLES:
        value, kind, reason = joules_per_token(records, role)
        parts.append(f"{role} {value:.3g} J/token ({kind})" if value is not None else f"{role} n/a ({reason})")
    return "energy: " + ", ".join(parts)
