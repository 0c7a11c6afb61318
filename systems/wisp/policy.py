"""WISP's edge and server (SIGMETRICS 2026, arXiv 2601.11652; notes: research/papers.md §3).

Edge: draft up to ``max_draft`` tokens, stopping as soon as the speculation controller (a
small MLP on the draft's confidence, entropy, margin and logit spread; :mod:`.controller`)
predicts the target will reject the token just drafted; then send the round for
verification, with the slack left before the request's next token is due under its SLO.

Server: the verification-time estimator (:mod:`.estimator`) and an SLO-aware batch
scheduler. For each waiting verification request: its slack (deadline less now less its
predicted time alone) and its effective-throughput density (expected accepted tokens + 1,
over the marginal time it adds to a batch). Urgent requests (slack at most
``urgent_slack_s``) go first in earliest-deadline order, then the rest by density; members
are admitted in that order up to ``max_batch``, stopping at the first one the estimator says
would make an already admitted member miss its deadline (it waits for a later batch).

WISP-like: the paper publishes neither the controller's size and threshold, nor the
estimator's form, nor the urgency and density formulas, nor batch limits; the choices here
follow papers.md §3 [I] and each is an option of :class:`WispConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from systems.api import EdgeContext, EdgePolicy, GenerationRequest
from systems.protocol import UPLINK_Q, VERIFICATION, Job, SpeculativeEdge, VerifyingCloud, choose_rule
from systems.records import BatchRecord
from systems.wisp.controller import RejectionPredictor
from systems.wisp.drafting import draft_round
from systems.wisp.estimator import BatchTimeEstimator

REPO_ROOT = Path(__file__).resolve().parents[2]


def controller_path(path: str) -> Path:
    """A controller file given relative to the working folder or, failing that, the repository."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


@dataclass
class WispConfig:
    """Edge: at most ``max_draft`` tokens per round, stopping where the controller (a model
    file from ``specwan train-controller``; None: no controller, every round drafts
    ``max_draft``) predicts a rejection. Server: at most ``max_batch`` members per pass; a
    request with at most ``urgent_slack_s`` seconds of slack is urgent; the estimator
    predicts once it has seen ``estimator_min_batches`` passes."""

    max_draft: int = 8
    controller: str | None = None
    log_features: bool = True
    max_batch: int = 8
    urgent_slack_s: float = 0.05
    estimator_min_batches: int = 8
    verification: str = "full"
    sparse_k: int = 10
    uplink_q: str = "rule"
    q_dtype: str | None = None

    def __post_init__(self):
        if self.max_draft < 1:
            raise ValueError(f"wisp: max_draft must be >= 1, got {self.max_draft}")
        if self.max_batch < 1:
            raise ValueError(f"wisp: max_batch must be >= 1, got {self.max_batch}")
        if self.estimator_min_batches < 1:
            raise ValueError(f"wisp: estimator_min_batches must be >= 1, got {self.estimator_min_batches}")
        if self.uplink_q not in UPLINK_Q:
            raise ValueError(f"wisp: uplink_q must be one of {', '.join(UPLINK_Q)}, got {self.uplink_q!r}")
        if self.verification not in VERIFICATION:
            raise ValueError(f"wisp: verification must be one of {', '.join(VERIFICATION)}, got {self.verification!r}")
        if self.controller is not None and not controller_path(self.controller).is_file():
            raise ValueError(f"wisp: controller file {self.controller!r} not found; train one with "
                             "`specwan train-controller <run folders of system=sled> --out FILE`, or set "
                             "system.params.controller=null to draft max_draft tokens every round")


class WispEdge(EdgePolicy):
    """Draft until the controller predicts a rejection (or ``max_draft``), upload, wait."""

    config: WispConfig

    def __init__(self, config: WispConfig):
        super().__init__(config)
        self.predictor = RejectionPredictor.load(controller_path(config.controller)) if config.controller else None

    async def generate(self, request: GenerationRequest, ctx: EdgeContext) -> list[int]:
        cfg = self.config
        edge = SpeculativeEdge(ctx, request, choose_rule(request.sampling, cfg.verification), cfg.sparse_k,
                               cfg.uplink_q, cfg.q_dtype)
        stop = self.predictor.stop if self.predictor is not None else None
        await edge.open()
        try:
            while not edge.done:
                if await draft_round(edge, cfg.max_draft, cfg.log_features, stop):
                    edge.note("controller_stop", True)
                await edge.upload(verify=True)
                edge.apply(*await edge.next_verdict())
        finally:
            await edge.close()
        return edge.output


@dataclass
class _Candidate:
    job: Job
    new_tokens: int
    context: int
    deadline: float
    slack: float
    density: float


class WispCloud(VerifyingCloud):
    """SLO-aware batches: urgent requests by earliest deadline, then by density, admitted
    while the estimator says no admitted member would miss its deadline."""

    config: WispConfig

    async def serve(self, ctx) -> None:
        self.estimator = BatchTimeEstimator(self.config.estimator_min_batches)
        self._accepted: dict[str, tuple[int, int]] = {}  # session -> (accepted, verified) so far
        self._overall = [0, 0]
        await super().serve(ctx)

    def predict(self, members) -> float | None:
        return self.estimator.predict(members)

    def after_batch(self, record: BatchRecord, outcomes) -> None:
        self.estimator.observe(list(zip(record.new_tokens, record.context_tokens)), record.actual_s)
        for name, n, out in zip(record.sessions, record.new_tokens, outcomes):
            if name in self.sessions:  # one closed during the pass is not scheduled again
                a, v = self._accepted.get(name, (0, 0))
                self._accepted[name] = (a + out.n_accepted, v + n)
            self._overall[0] += out.n_accepted
            self._overall[1] += n

    def drop(self, session: str) -> None:
        super().drop(session)
        self._accepted.pop(session, None)  # nothing is kept per finished request

    def _acceptance(self, session: str) -> float:
        a, v = self._accepted.get(session, (0, 0))
        if v:
            return a / v
        return self._overall[0] / self._overall[1] if self._overall[1] else 0.5

    def _candidate(self, job: Job, now: float) -> _Candidate | None:
        sess = self.sessions.get(job.session)
        if sess is None:
            return None
        context = len(sess.tokens)
        n = max(0, job.end - context)
        alone = self.estimator.predict([(n, context)]) or 0.0
        deadline = math.inf if job.deadline is None else job.deadline
        marginal = self.estimator.predict([(n, context)] * 2)
        marginal = None if marginal is None else max(1e-9, marginal - alone)
        gain = self._acceptance(job.session) * n + 1.0
        return _Candidate(job, n, context, deadline, deadline - now - alone,
                          gain if marginal is None else gain / marginal)

    async def next_batch(self) -> list[Job]:
        now = self.ctx.clock.now()
        # prefills go first; a job whose session has closed is dropped here (it would never be served)
        prefills = [j for j in self.jobs if j.kind != "verify" or j.session not in self.sessions]
        cands = [c for j in self.jobs if j.kind == "verify" and (c := self._candidate(j, now)) is not None]
        urgent = sorted((c for c in cands if c.slack <= self.config.urgent_slack_s), key=lambda c: c.deadline)
        rest = sorted((c for c in cands if c.slack > self.config.urgent_slack_s), key=lambda c: -c.density)
        admitted: list[_Candidate] = []
        refused: list[str] = []
        for c in urgent + rest:
            if len(admitted) == self.config.max_batch:
                break
            if admitted and self._would_make_miss(admitted, c, now):
                refused.append(c.job.session)
                break
            admitted.append(c)
        taken = {id(j) for j in prefills} | {id(c.job) for c in admitted}
        self.jobs = [j for j in self.jobs if id(j) not in taken]
        self.batch_notes = {"order": [c.job.session for c in admitted],
                            "urgent": [c.job.session for c in admitted if c in urgent],
                            "refused": refused, "waiting": [j.session for j in self.jobs]}
        return prefills + [c.job for c in admitted]

    def _would_make_miss(self, admitted: list[_Candidate], c: _Candidate, now: float) -> bool:
        """Whether adding ``c`` makes a member admitted so far miss a deadline it would meet."""
        members = [(a.new_tokens, a.context) for a in admitted]
        before = self.estimator.predict(members)
        after = self.estimator.predict(members + [(c.new_tokens, c.context)])
        if before is None or after is None:
            return False
        return any(now + before <= a.deadline < now + after for a in admitted)
