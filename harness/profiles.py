"""Device profiles: what model work costs on a role's device, for virtual-time runs.

A profile prices the :class:`systems.api.Op` units the policies run: a prompt prefill, one
draft or decode step, a verification block (per session, in a batch), or a slice of the
target's layers (split inference: that share of a target prefill or decode step). Every profile says
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
    # The target model's forward pass on this device, for work that runs target layers here
    # (split inference's edge); None: step_s and prefill_s_per_token, the device's own model
    # being the target. ``target_layers``: decoder layers of the target these costs describe
    # (None: the loaded target's), over which a slice of layers is priced; ``target_source``
    # says where these figures come from.
    target_step_s: float | None = None
    target_prefill_s_per_token: float | None = None
    target_layers: int | None = None
    target_source: str | None = None

    def __post_init__(self):
        if self.kind not in ("declared", "measured"):
            raise ValueError(f"device profile {self.name!r}: kind must be 'declared' or 'measured', got {self.kind!r}")
        for field_name in ("step_s", "prefill_s_per_token", "verify_s_per_token", "step_s_per_ctx_token",
                           "batch_s_per_session"):
            if getattr(self, field_name) < 0:
                raise ValueError(f"device profile {self.name!r}: {field_name} must be >= 0")
        for field_name in ("verify_s", "target_step_s", "target_prefill_s_per_token"):
            value = getattr(self, field_name)
            if value is not None and value < 0:
                raise ValueError(f"device profile {self.name!r}: {field_name} must be >= 0 (or null)")
        if self.target_layers is not None and (isinstance(self.target_layers, bool)
                                               or not isinstance(self.target_layers, int) or self.target_layers < 1):
            raise ValueError(f"device profile {self.name!r}: target_layers must be an integer >= 1 (or null), "
                             f"got {self.target_layers!r}")
        for field_name in ("active_w", "idle_w", "tdp_w"):
            value = getattr(self, field_name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"device profile {self.name!r}: {field_name} must be a number >= 0 (or null), "
                                 f"got {value!r}")
        if self.hw_threads is not None and (isinstance(self.hw_threads, bool) or not isinstance(self.hw_threads, int)
                                            or self.hw_threads < 1):
            raise ValueError(f"device profile {self.name!r}: hw_threads must be an integer >= 1 (or null), "
                             f"got {self.hw_threads!r}")

    @property
    def prices_target(self) -> bool:
        """Whether the profile declares the target's costs on this device (target_step_s and
        target_prefill_s_per_token), as an edge that runs target layers needs."""
        return self.target_step_s is not None and self.target_prefill_s_per_token is not None

    def cost(self, op: Op) -> float:
        if op.layers is not None:
            return self._layer_share(op.layers) * self._target_cost(op)
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

    def _target_cost(self, op: Op) -> float:
        """A whole target forward pass of ``op``'s kind on this device."""
        if op.kind == "prefill":
            rate = self.target_prefill_s_per_token
            return (self.prefill_s_per_token if rate is None else rate) * op.tokens
        if op.kind == "decode":
            step = self.step_s if self.target_step_s is None else self.target_step_s
            return step + self.step_s_per_ctx_token * op.context
        raise ValueError(f"device profile {self.name!r}: a slice of layers is priced for prefill or decode, "
                         f"not {op.kind!r}")

    def _layer_share(self, layers: tuple[int, int, int]) -> float:
        """The share of a target forward pass that layers ``[first, last)`` of ``total`` are.

        Over ``target_layers`` when declared: the edge's first layers keep their count in the
        model the costs describe, and a part that ends the loaded model ends that one too."""
        first, last, total = layers
        n = self.target_layers or total
        hi = n if last == total else last
        if not 0 <= first < hi <= n:
            raise ValueError(f"device profile {self.name!r}: layers [{first}, {last}) of {total} do not fit the "
                             f"{n} layers its target costs describe (target_layers)")
        return (hi - first) / n

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


def require_target_costs(edge: RoleProfile, system: str) -> None:
    """Refuse an edge profile that cannot price a system whose edge runs target layers."""
    if not edge.prices_target:
        raise ValueError(f"system {system} runs target layers on the edge, so the edge profile {edge.name!r} must "
                         "price the target there: set edge.target_step_s and edge.target_prefill_s_per_token "
                         "(as conf/device/picospec_qwen.yaml does)")
