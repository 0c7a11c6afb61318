"""Device profiles: what model work costs on a role's device, for virtual-time runs.

A profile prices the :class:`systems.api.Op` units the policies run: a prompt prefill, one
draft or decode step, a verification block (per session, in a batch). Every profile says
whether its numbers were measured (and where) or declared (and from what source), and the
run's manifest records it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from systems.api import Op


@dataclass(frozen=True)
class RoleProfile:
    """Cost model of one role's device: seconds for each kind of model work."""

    name: str
    kind: str  # "declared" or "measured"
    source: str
    step_s: float  # one token step (draft or decode) at empty context
    prefill_s_per_token: float
    verify_s_per_token: float = 0.0  # extra per verified token beyond one step
    step_s_per_ctx_token: float = 0.0  # growth of a step with context length
    batch_s_per_session: float = 0.0  # extra per additional session in a batched verification
    # Fixed cost of a verification pass (its intercept); None: the same as one step. A
    # measured profile sets it, since a block pass differs from a one-token step.
    verify_s: float | None = None
    # Power (optional; used by harness.energy): the modelled device draws ``active_w`` while
    # it runs model work and ``idle_w`` otherwise (virtual time); ``tdp_w`` / ``hw_threads``
    # price CPU-seconds in the wall-clock estimate. ``power_source`` says where they come from.
    active_w: float | None = None
    idle_w: float | None = None
    tdp_w: float | None = None
    hw_threads: int | None = None
    power_source: str | None = None

    def __post_init__(self):
        if self.kind not in ("declared", "measured"):
            raise ValueError(f"device profile {self.name!r}: kind must be 'declared' or 'measured', got {self.kind!r}")
        for field_name in ("step_s", "prefill_s_per_token", "verify_s_per_token", "step_s_per_ctx_token",
                           "batch_s_per_session"):
            if getattr(self, field_name) < 0:
                raise ValueError(f"device profile {self.name!r}: {field_name} must be >= 0")
        if self.verify_s is not None and self.verify_s < 0:
            raise ValueError(f"device profile {self.name!r}: verify_s must be >= 0 (or null)")
        for field_name in ("active_w", "idle_w", "tdp_w"):
            value = getattr(self, field_name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"device profile {self.name!r}: {field_name} must be a number >= 0 (or null), "
                                 f"got {value!r}")
        if self.hw_threads is not None and (isinstance(self.hw_threads, bool) or not isinstance(self.hw_threads, int)
                                            or self.hw_threads < 1):
            raise ValueError(f"device profile {self.name!r}: hw_threads must be an integer >= 1 (or null), "
                             f"got {self.hw_threads!r}")

    def cost(self, op: Op) -> float:
        if op.kind == "prefill":
            return self.prefill_s_per_token * op.tokens
        context = op.context / max(1, op.batch)
        step = self.step_s + self.step_s_per_ctx_token * context
        if op.kind in ("draft", "decode"):
            return step
        if op.kind == "verify":
            base = step if self.verify_s is None else self.verify_s + self.step_s_per_ctx_token * context
            return base + self.verify_s_per_token * op.tokens + self.batch_s_per_session * (op.batch - 1)
        raise ValueError(f"unknown op kind {op.kind!r}")

    def as_dict(self) -> dict:
        return asdict(self)


def role_profile(data: dict) -> RoleProfile:
    """A profile from a config mapping; unknown or missing keys are named in the error."""
    fields = set(RoleProfile.__dataclass_fields__)
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"device profile: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    try:
        return RoleProfile(**data)
    except TypeError as exc:
        raise ValueError(f"device profile {data.get('name', '?')!r}: {exc}") from exc
