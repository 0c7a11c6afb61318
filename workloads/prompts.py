"""Prompts: the record every prompt set produces, and a user's own prompt file.

A :class:`Prompt` is one conversation to serve: an id that is unique within its set, a
category, and one or more user turns (the second turn is sent after the model's own answer
to the first, as MT-Bench intends).

A user's prompt file is JSON Lines in the layout MT-Bench-style sets use, one object a line::

    {"question_id": 1, "category": "code", "turns": ["Write ...", "Now make it faster."]}

``id`` may stand for ``question_id``; ``category`` is optional (default ``user``); blank
lines are skipped. Every malformed line is reported by its number, all in one error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

USER_CATEGORY = "user"


class WorkloadError(ValueError):
    """A workload cannot be built as configured; the message names the cause and the fix."""


@dataclass(frozen=True)
class Prompt:
    """One conversation of a prompt set."""

    id: str  # unique within a workload; recorded as ``prompt_id`` in every result row
    category: str
    turns: tuple[str, ...]  # the user's turns, in order
    source: str  # the prompt set it came from
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.turns or not all(isinstance(t, str) and t for t in self.turns):
            raise ValueError(f"prompt {self.id!r}: turns must be one or more non-empty strings")


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """The prompts of a user's JSON Lines file; :class:`WorkloadError` lists every bad line."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkloadError(f"prompt file {path} does not exist; give the path of a JSON Lines file "
                            "(one {\"question_id\", \"category\", \"turns\"} object a line)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise WorkloadError(f"cannot read prompt file {path}: {e}") from None
    prompts: list[Prompt] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompt = _parse_line(line, path)
        except ValueError as e:
            errors.append(f"line {number}: {e}")
            continue
        if prompt.id in seen:
            errors.append(f"line {number}: question_id {prompt.id!r} repeats line {seen[prompt.id]}")
            continue
        seen[prompt.id] = number
        prompts.append(prompt)
    if errors:
        shown = "; ".join(errors[:20]) + (f"; ... ({len(errors) - 20} more)" if len(errors) > 20 else "")
        raise WorkloadError(f"prompt file {path}: {len(errors)} malformed line{'s' if len(errors) != 1 else ''}: "
                            f"{shown}. Each line must be a JSON object with \"question_id\" (or \"id\"), "
                            "an optional \"category\" and \"turns\" (a list of non-empty strings)")
    if not prompts:
        raise WorkloadError(f"prompt file {path} holds no prompts")
    return prompts


def _parse_line(line: str, path: Path) -> Prompt:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    qid = obj.get("question_id", obj.get("id"))
    if qid is None or isinstance(qid, (bool, dict, list)) or str(qid) == "":
        raise ValueError("missing \"question_id\" (a string or an integer)")
    category = obj.get("category", USER_CATEGORY)
    if not isinstance(category, str) or not category:
        raise ValueError("\"category\" must be a non-empty string")
    turns = obj.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise ValueError("\"turns\" must be a non-empty list of non-empty strings")
    meta = {k: v for k, v in obj.items() if k not in ("question_id", "id", "category", "turns")}
    return Prompt(str(qid), category, tuple(turns), source=f"file:{path.name}", meta=meta)
