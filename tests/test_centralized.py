"""Centralized serving (WISP's baseline): the target decodes every session on the server,
one forward pass per step over all active sessions (continuous batching). Its tokens are
cloud-only's, token for token; only the cloud's scheduling differs."""

from __future__ import annotations

import asyncio

import pytest

import harness.inprocess as inprocess
from harness.compute import InstantCompute
from harness.inprocess import RunOptions, run_system
from harness.link import LinkProfile
from harness.profiles import RoleProfile
from systems.api import CloudContext, Envelope, GenerationRequest, Op, get_system
from systems.engines import create_engine
from systems.messages import Failure, Upload
from systems.sampling import SamplingParams
from tests.support import greedy_decode

PROMPTS = [[1, 2, 3], [5], [7, 7, 2, 4, 1, 3, 6], [4, 4], [6, 1, 2, 5, 3]]
PROFILE = RoleProfile("server", "declared", "test", step_s=0.1, prefill_s_per_token=0.01,
                      step_s_per_ctx_token=0.001, batch_s_per_session=0.002)
WAN = LinkProfile("wan", rtt_s=0.04, up_bps=2e6, down_bps=2e7)


def _target(seed: int = 0, **kw):
    return create_engine("toy", role="target", vocab_size=8, seed=seed, sharpness=2.0, **kw)


def _requests(params: SamplingParams = SamplingParams(), max_new: int = 12) -> list[GenerationRequest]:
    return [GenerationRequest(f"r{i}", p, max_new + i, params, seed=10 + i) for i, p in enumerate(PROMPTS * 2)]


def _outputs(system: str, target, reqs, config=None, clients: int = 3) -> list[list[int]]:
    opts = RunOptions(link=WAN, cloud_cost=PROFILE.cost, clients=clients)
    return [r.output_tokens for r in run_system(system, None, target, reqs, config, opts)]


@pytest.mark.parametrize("max_batch", [1, 2, 16])
def test_greedy_output_equals_cloud_only_with_three_clients(max_batch):
    for seed in range(3):
        target, reqs = _target(seed), _requests()
        got = _outputs("centralized", target, reqs, {"max_batch": max_batch})
        assert got == _outputs("cloud_only", target, reqs)
        assert got == [greedy_decode(target, r.prompt, r.max_new_tokens)[0] for r in reqs]


def test_sampling_equals_cloud_only_for_the_same_seeds():
    target = _target(4, eos_logit=-1.0)
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4, top_p=0.9)):
        reqs = _requests(params)
        got = _outputs("centralized", target, reqs, {"max_batch": 2})
        assert got == _outputs("cloud_only", target, reqs)
        assert len({tuple(t) for t in got}) > 1


class _Batches(list):
    def batch(self, record) -> None:
        self.append(record)


def test_decode_steps_batch_the_concurrent_sessions(monkeypatch):
    batches = _Batches()

    def context(*args, **kw):
        ctx = CloudContext(*args, **kw)
        ctx.recorder = batches
        return ctx

    monkeypatch.setattr(inprocess, "CloudContext", context)
    target = _target(1, eos_logit=-100.0)  # no end of sequence: every request runs to max_new
    prompts, n = PROMPTS[:3], 8
    reqs = [GenerationRequest(f"r{i}", p, n) for i, p in enumerate(prompts)]
    records = run_system("centralized", None, target, reqs, None, RunOptions(cloud_cost=PROFILE.cost, clients=3))
    assert all(r.n_tokens == n for r in records)

    # All three arrive at once: three prefills, then n - 1 steps of all three sessions.
    assert [len(b.sessions) for b in batches] == [3] * (n - 1)
    names = [f"c{i}-r{i}" for i in range(3)]
    for k, b in enumerate(batches):
        assert b.index == k and b.kind == "decode" and b.policy == "centralized" and b.predicted_s is None
        assert sorted(b.sessions) == names
        assert b.rounds == [-1] * 3 and b.new_tokens == [1] * 3 and b.arrived == [0.0] * 3
        assert b.context_tokens == [len(prompts[names.index(s)]) + k for s in b.sessions]
        op = Op("verify", 1, sum(b.context_tokens), batch=3)
        assert b.actual_s == pytest.approx(PROFILE.cost(op)) == pytest.approx(b.end - b.start)
    # By hand from the profile: prefills at 0.01 s a token, then each step is one 0.1 s
    # step at the mean context (0.001 s a token) plus 0.002 s for each of two more sessions.
    prefill = 0.01 * sum(len(p) for p in prompts)
    steps = sum(0.1 + 0.001 * (sum(map(len, prompts)) / 3 + k) + 0.002 * 2 for k in range(n - 1))
    assert max(r.end for r in records) == pytest.approx(prefill + steps)

    alone = run_system("centralized", None, target, reqs[:1], None, RunOptions(cloud_cost=PROFILE.cost))
    assert alone[0].e2e == pytest.approx(0.01 * 3 + sum(0.1 + 0.001 * (3 + k) for k in range(n - 1)))
    assert max(r.end for r in records) < 1.2 * alone[0].e2e < 3 * alone[0].e2e


def test_max_batch_caps_a_step_and_later_sessions_wait(monkeypatch):
    batches = _Batches()

    def context(*args, **kw):
        ctx = CloudContext(*args, **kw)
        ctx.recorder = batches
        return ctx

    monkeypatch.setattr(inprocess, "CloudContext", context)
    target = _target(2, eos_logit=-100.0)
    reqs = [GenerationRequest(f"r{i}", p, 5) for i, p in enumerate(PROMPTS[:3])]
    run_system("centralized", None, target, reqs, {"max_batch": 2}, RunOptions(cloud_cost=PROFILE.cost, clients=3))
    assert max(len(b.sessions) for b in batches) == 2
    assert sum(len(b.sessions) for b in batches) == 3 * (5 - 1)


def test_max_batch_below_one_is_refused_in_one_line_naming_the_key():
    with pytest.raises(ValueError) as err:
        get_system("centralized").make_config({"max_batch": 0})
    assert str(err.value) == "centralized: max_batch must be >= 1, got 0"
    with pytest.raises(ValueError, match="max_batch"):
        get_system("centralized").make_config({"max_batch": "many"})


class _OneMessage:
    """A link that delivers one message, then nothing more; it keeps what the cloud sends."""

    def __init__(self, msg):
        self.msgs, self.sent = [msg], []

    async def recv(self) -> Envelope:
        if not self.msgs:
            await asyncio.Event().wait()
        return Envelope(self.msgs.pop(), 0, 0.0, 0.0)

    async def send(self, msg) -> int:
        self.sent.append(msg)
        return 0


class _Still:
    def now(self) -> float:
        return 0.0


def test_a_message_it_does_not_serve_fails_its_session():
    spec = get_system("centralized")
    link = _OneMessage(Upload("s", round=0, start=3, tokens=[1]))

    async def main():
        server = asyncio.get_running_loop().create_task(
            spec.cloud_cls(spec.make_config()).serve(CloudContext(_target(), _Still(), InstantCompute(), link)))
        await asyncio.wait_for(_first_reply(link), 5.0)
        assert not server.done(), "the server stopped"
        server.cancel()

    asyncio.run(main())
    [reply] = link.sent
    assert isinstance(reply, Failure) and reply.session == "s"
    assert "unexpected message Upload at the centralized server" in reply.reason


async def _first_reply(link: _OneMessage) -> None:
    while not link.sent:
        await asyncio.sleep(0.01)
