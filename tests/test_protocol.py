"""The shared edge/cloud mechanics under speculation beyond a pending verdict.

A test-only system drafts continuously, uploads every token as soon as it is drafted and
keeps up to ``depth`` windows in flight (the pattern of PipeSD's proactive tokens and of
PicoSpec's pre-drafting). It must stay lossless, keep edge and cloud in agreement, and
show both promotions and discards.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest

from harness.inprocess import RunOptions, run_system
from harness.link import LinkProfile
from systems.api import EdgeContext, EdgePolicy, SystemSpec
from systems.messages import TokenOut, Upload, Verdict, decode, encode
from systems.protocol import SpeculativeEdge, VerifyingCloud, choose_rule
from systems.sampling import SamplingParams
from systems.api import GenerationRequest
from systems.engines import create_engine
from tests.support import chi2_against, exact_sequence_probs, greedy_decode


@dataclass
class PipelinedConfig:
    gamma: int = 3
    depth: int = 2
    verification: str = "full"
    lead_row: bool = True
    sparse_k: int = 10


class PipelinedEdge(EdgePolicy):
    async def generate(self, request, ctx):
        gamma, depth = self.config.gamma, self.config.depth
        edge = SpeculativeEdge(ctx, request, choose_rule(request.sampling, self.config.verification),
                               sparse_k=self.config.sparse_k, lead_row=self.config.lead_row)
        await edge.open()
        try:
            while not edge.done:
                spec = edge.speculative
                stopped = bool(spec) and edge.is_stop(spec[-1].token)
                room = edge.remaining - 1 - len(spec)
                if len(edge.awaiting) < depth and room > 0 and not stopped:
                    d = await edge.draft()
                    close = edge.window_size == gamma or edge.is_stop(d.token) or room == 1
                    await edge.upload(verify=close)
                elif edge.window_size or not edge.awaiting:
                    await edge.upload(verify=True)
                else:
                    edge.apply(*await edge.next_verdict())
        finally:
            await edge.close()
        return edge.output


SPEC = SystemSpec("pipelined-test", PipelinedConfig, PipelinedEdge, VerifyingCloud, "test only")
LINK = LinkProfile("wan", rtt_s=0.1, up_bps=1e6, down_bps=1e7)


def _pair(seed, agreement, vocab=8, sharpness=2.0):
    kw = dict(vocab_size=vocab, seed=seed, sharpness=sharpness)
    return create_engine("toy", role="draft", agreement=agreement, **kw), create_engine("toy", role="target", **kw)


def _promotions(rec) -> int:
    """Windows drafted on top of a pending verdict that survived it: window k + 1 began
    before window k's verdict was applied and was itself verified (a discard would have
    restarted it under a new id or answered it as unused)."""
    live = {r.round: r for r in rec.rounds if not r.extra.get("discarded")}
    return sum(k + 1 in live and live[k + 1].start < r.end for k, r in live.items())


@pytest.mark.parametrize("depth,lead_row", [(1, True), (2, True), (3, True), (2, False), (3, False)])
def test_speculation_beyond_pending_verdicts_is_lossless(depth, lead_row):
    discarded = promoted = 0
    for seed in range(8):
        for agreement in (0.3, 0.8, 1.0):
            draft, target = _pair(seed, agreement)
            reqs = [GenerationRequest(f"r{i}", [i + 1, 3], 30, SamplingParams(), seed=i) for i in range(3)]
            recs = run_system(SPEC, draft, target, reqs, {"depth": depth, "lead_row": lead_row},
                              RunOptions(link=LINK, edge_cost=lambda op: 0.02, cloud_cost=lambda op: 0.05, clients=2))
            for req, rec in zip(reqs, recs):
                assert rec.output_tokens == greedy_decode(target, req.prompt, 30)[0]
                promoted += _promotions(rec)
                for r in rec.rounds:
                    if r.extra.get("discarded"):
                        discarded += 1
                        assert r.verified == 0 and r.accepted == 0 and r.emitted == 0, "an unused answer counted"
                    else:
                        assert r.edge_digest == r.cloud_digest
    if depth > 1:
        assert promoted > 0, "no speculation beyond a pending verdict was ever promoted"
        assert discarded > 0, "no window was ever discarded: the discard path went untested"
    else:
        assert promoted == 0, "stop-and-wait has nothing to promote"


@pytest.mark.statistical
@pytest.mark.parametrize("verification,lead_row", [("full", True), ("sparse", True), ("full", False)])
def test_speculation_preserves_distribution(verification, lead_row):
    draft, target = _pair(seed=5, agreement=0.6, vocab=4, sharpness=1.0)
    params, n = SamplingParams(temperature=1.0), 10_000
    reqs = [GenerationRequest(f"r{i}", [2], 4, params, seed=i) for i in range(n)]
    recs = run_system(SPEC, draft, target, reqs, {"depth": 2, "gamma": 2, "verification": verification,
                                                  "lead_row": lead_row})
    counts = Counter(tuple(r.output_tokens) for r in recs)
    assert chi2_against(counts, exact_sequence_probs(target, [2], 4, params), n) > 1e-3


def test_wire_sizes_are_real_encodings():
    """Full verification ships V floats per token; sparse ships a scalar; greedy only ids."""
    vocab = 4096
    draft, target = _pair(seed=1, agreement=0.7, vocab=vocab)
    sizes = {}
    for name, params, cfg in [("greedy", SamplingParams(), {}),
                              ("full", SamplingParams(temperature=1.0), {}),
                              ("sparse", SamplingParams(temperature=1.0), {"verification": "sparse"})]:
        rec = run_system("vanilla", draft, target, [GenerationRequest("r", [1, 2], 12, params, seed=3)], cfg)[0]
        per_token = sum(r.bytes_up for r in rec.rounds) / max(1, sum(r.uploaded for r in rec.rounds))
        sizes[name] = per_token
    assert sizes["full"] > 4 * vocab  # float32 rows
    assert sizes["greedy"] < 64 and sizes["sparse"] < 64


def test_first_token_beyond_a_pending_window_goes_without_its_row(monkeypatch):
    """With lead_row off, the token right after a window awaiting its verdict travels as an
    id only (that verdict commits it as its own token or discards it); every other draft
    token carries its row, the output is unchanged and fewer bytes go up."""
    sent: list[tuple[bool, int, int]] = []  # (lead_implied, tokens, rows)
    real_prepare = SpeculativeEdge.prepare

    def spy(self, *a, **kw):
        msg = real_prepare(self, *a, **kw)
        rows = 0 if msg.q_rows is None else len(msg.q_rows)
        sent.append((msg.lead_implied, len(msg.tokens), rows))
        return msg

    monkeypatch.setattr(SpeculativeEdge, "prepare", spy)
    draft, target = _pair(seed=2, agreement=0.9, vocab=64)
    req = GenerationRequest("r", [1, 2], 40, SamplingParams(temperature=1.0), seed=4)
    opts = RunOptions(link=LINK, edge_cost=lambda op: 0.02, cloud_cost=lambda op: 0.05)
    outs, up = {}, {}
    for lead_row in (True, False):
        sent.clear()
        (rec,) = run_system(SPEC, draft, target, [req], {"depth": 2, "lead_row": lead_row}, opts)
        outs[lead_row], up[lead_row] = rec.output_tokens, rec.bytes_up
        implied = [s for s in sent if s[0]]
        assert all(rows == n - implied for implied, n, rows in sent)
        assert bool(implied) == (not lead_row), "lead tokens went up without rows only with lead_row off"
    assert outs[True] == outs[False]
    assert up[False] < up[True]


@pytest.mark.parametrize("uplink_q", ["rule", "full"])
def test_the_rows_sent_are_the_distributions_the_tokens_were_drawn_from(monkeypatch, uplink_q):
    """Under rejection sampling at T = 0.7 with top-p, each draft token's row on the wire is
    the processed distribution after its context (computed here from the draft's own logits),
    not the model's raw softmax; PipeSD's "full" rows are the same when sampling."""
    import numpy as np

    from systems.sampling import probabilities

    params = SamplingParams(temperature=0.7, top_p=0.9)
    draft, target = _pair(seed=3, agreement=0.6, vocab=16, sharpness=1.0)
    checked = []
    real_prepare = SpeculativeEdge.prepare

    def spy(self, *a, **kw):
        msg = real_prepare(self, *a, **kw)
        if msg.q_rows is not None:
            first = msg.start + msg.n_fixed + (1 if msg.lead_implied else 0)
            for j, row in enumerate(msg.q_rows):
                context = self.drafter.session.tokens[:first + j]
                want = probabilities(draft.logits_for(context), params).astype(np.float32)
                np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-7)
                checked.append(first + j)
        return msg

    monkeypatch.setattr(SpeculativeEdge, "prepare", spy)
    reqs = [GenerationRequest(f"r{i}", [i + 1, 2], 12, params, seed=i) for i in range(4)]
    run_system("vanilla", draft, target, reqs, {"uplink_q": uplink_q})
    assert len(checked) >= 20


def test_messages_round_trip():
    import numpy as np

    up = Upload("s", round=2, start=7, tokens=[1, 2], parent=1, verify=True, q_rows=np.eye(2, dtype=np.float16),
                lead_implied=True)
    back = decode(encode(up))
    assert back.tokens == [1, 2] and back.parent == 1 and back.q_rows.dtype == np.float16 and back.lead_implied
    assert np.array_equal(back.q_rows, up.q_rows)
    v = decode(encode(Verdict("s", 2, 7, 2, 1, 5, digest="ab")))
    assert (v.n_accepted, v.token, v.digest) == (1, 5, "ab")
    with pytest.raises(ValueError, match="unknown message tag"):
        decode(b"\x92\x63\x00")


@pytest.mark.parametrize("system,params", [("vanilla", {"verification": "sparse", "sparse_k": 1, "gamma": 4}),
                                           (SPEC, {"verification": "sparse", "sparse_k": 1, "depth": 2})],
                         ids=["vanilla", "pipelined"])
def test_a_correction_the_edge_resampled_voids_what_was_drafted_beyond(system, params):
    """With K = 1 a rejected draft token is often the target's top token, and then the edge's
    resampled correction equals it; the cloud does not know that token until the edge sends
    it and has dropped every draft beyond, so the edge must drop them too, whatever they
    are. Edge and cloud stay in agreement (checked after every verdict) and every request
    completes."""
    draft, target = _pair(seed=4, agreement=0.5, vocab=6, sharpness=1.0)
    params_t1 = SamplingParams(temperature=1.0)
    reqs = [GenerationRequest(f"r{i}", [1 + i % 5, 2], 12, params_t1, seed=i) for i in range(200)]
    recs = run_system(system, draft, target, reqs, params, RunOptions(link=LINK, clients=2))
    for req, rec in zip(reqs, recs):
        assert rec.error is None and 1 <= rec.n_tokens <= 12
        assert sum(r.emitted for r in rec.rounds) == rec.n_tokens
        for r in rec.rounds:
            assert r.extra.get("discarded") or r.edge_digest == r.cloud_digest


def test_round_records_account_for_every_token():
    """Every output token is accounted for by a verdict the edge used: accepted drafts plus
    one token of the verdict's own per live round (the last cut at the limit or a stop);
    an unused answer (a window discarded, or still in flight at the end) counts nothing,
    and the acceptance rate is over the drafts the used verdicts judged."""
    dead_seen = 0
    for seed in range(6):
        draft, target = _pair(seed, 0.9)
        reqs = [GenerationRequest(f"r{i}", [i + 1, 3], 9, SamplingParams(), seed=i) for i in range(4)]
        recs = run_system(SPEC, draft, target, reqs, {"depth": 3, "gamma": 2},
                          RunOptions(link=LINK, edge_cost=lambda op: 0.02, cloud_cost=lambda op: 0.05))
        for rec in recs:
            live = [r for r in rec.rounds if not r.extra.get("discarded")]
            dead = [r for r in rec.rounds if r.extra.get("discarded")]
            dead_seen += len(dead)
            assert all((r.verified, r.accepted, r.emitted) == (0, 0, 0) for r in dead)
            assert all(r.emitted == r.accepted + 1 for r in live[:-1])
            assert 1 <= live[-1].emitted <= live[-1].accepted + 1
            assert rec.accepted == sum(r.accepted for r in live)
            assert rec.acceptance_rate == pytest.approx(rec.accepted / sum(r.verified for r in live))
            assert all(r.wasted == r.drafted - r.accepted for r in rec.rounds)
    assert dead_seen > 0, "no window was discarded: the case went untested"


class _ClaimingCloud(VerifyingCloud):
    """A cloud that answers a discarded window as if it had verified it (three tokens judged,
    two accepted) instead of marking the answer stale. The edge must still count nothing for
    it: it discarded the window itself, so no answer to it can be used."""

    claimed = 0

    async def _send(self, sess, job, verdict):
        import dataclasses

        if verdict.stale:
            _ClaimingCloud.claimed += 1
            verdict = dataclasses.replace(verdict, stale=False, n_verified=3, n_accepted=2, token=0)
        await super()._send(sess, job, verdict)


def test_an_answer_to_a_discarded_window_counts_nothing_whatever_it_claims():
    spec = SystemSpec("claiming-test", PipelinedConfig, PipelinedEdge, _ClaimingCloud, "test only")
    _ClaimingCloud.claimed = dead_seen = 0
    for seed in range(4):
        draft, target = _pair(seed, 0.7)
        reqs = [GenerationRequest(f"r{i}", [i + 1, 3], 12, SamplingParams(), seed=i) for i in range(3)]
        for req, rec in zip(reqs, run_system(spec, draft, target, reqs, {"depth": 3, "gamma": 2},
                                             RunOptions(link=LINK, edge_cost=lambda op: 0.02,
                                                        cloud_cost=lambda op: 0.05))):
            assert rec.output_tokens == greedy_decode(target, req.prompt, 12)[0]
            for r in rec.rounds:
                if r.extra.get("discarded"):
                    dead_seen += 1
                    assert (r.verified, r.accepted, r.emitted, r.wasted) == (0, 0, 0, r.drafted)
            live = [r for r in rec.rounds if not r.extra.get("discarded")]
            assert rec.acceptance_rate == pytest.approx(rec.accepted / sum(r.verified for r in live))
    assert _ClaimingCloud.claimed > 0 and dead_seen >= _ClaimingCloud.claimed


class _Delivers:
    """The edge's end of a link on which the cloud has sent exactly ``msg``."""

    def __init__(self, msg):
        self.msg = msg

    async def recv(self):
        from systems.api import Envelope

        return Envelope(self.msg, nbytes=12, t_sent=0.0, t_recv=0.01)


@pytest.mark.parametrize("msg", [TokenOut("s", index=1, token=7), TokenOut("s", index=0, token=7, last=True),
                                 Verdict("s", 0, 0, 0, 0, 7)],
                         ids=["skipped-index", "repeated-index", "not-a-token"])
def test_a_streamed_token_out_of_order_is_refused(msg):
    """Cloud-only and split-inference streams accept the next index only, and only a TokenOut."""
    import asyncio

    from systems.protocol import ProtocolError, receive_token

    output = [5] if isinstance(msg, TokenOut) and msg.last else []  # index 0 again after one token
    ctx = EdgeContext("s", None, None, _Delivers(msg), None, None, None)  # refused before any clock or record
    request = GenerationRequest("r", [1, 2], 4, SamplingParams())
    with pytest.raises(ProtocolError, match="^split stream out of order: "):
        asyncio.run(receive_token(ctx, request, output, 0.0, 0, "split"))


def test_a_serial_uploader_takes_only_uploads_that_wait_for_their_ack():
    """The next upload waits for the last one's ack: one prepared without ``ack`` is refused
    with a line saying how to prepare it, and nothing is queued. Stopping ends the sender,
    even one that takes several turns of the loop to wind down a send."""
    import asyncio
    from types import SimpleNamespace

    from harness.clock import LoopClock
    from systems.protocol import SerialUploader

    class _SlowToStop:
        """An edge whose send never completes and, cancelled, cleans up over a few turns."""

        ctx = SimpleNamespace(clock=LoopClock())

        def is_void(self, msg):
            return False

        async def send(self, msg):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                for _ in range(5):
                    await asyncio.sleep(0)
                raise

    async def main():
        uploader = SerialUploader(_SlowToStop())
        with pytest.raises(ValueError, match="^SerialUploader: prepare uploads with ack=True"):
            uploader.put(Upload("s", round=0, start=3, tokens=[1]))
        assert uploader.queue.empty()
        uploader.put(Upload("s", round=0, start=3, tokens=[1], ack=True))
        assert uploader.queue.qsize() == 1
        await asyncio.sleep(0)  # the sender takes it and starts sending
        await asyncio.sleep(0)
        await uploader.stop()
        assert uploader.task.cancelled()  # stopped means ended, not asked to end

    asyncio.run(main())


class _TidyCheckingCloud(VerifyingCloud):
    """A cloud that checks, after each verdict it commits, that its buffer holds nothing at a
    position the committed prefix already covers (what a verdict settled is never read again),
    and that its list of committed tokens is its verifier's (corrections the edge resampled
    included)."""

    commits, stale, astray, fixed = 0, [], [], 0

    def _block(self, sess, job):
        _TidyCheckingCloud.fixed += sum(e.fixed for e in sess.buffer.values())
        return super()._block(sess, job)

    def _commit(self, sess, job, base, tokens, out):
        super()._commit(sess, job, base, tokens, out)
        _TidyCheckingCloud.commits += 1
        _TidyCheckingCloud.stale += [p for p in sess.buffer if p < len(sess.tokens)]
        held = sess.verifier.session.tokens
        if sess.tokens[:len(held)] != held[:len(sess.tokens)]:
            _TidyCheckingCloud.astray.append((sess.tokens, list(held)))


@pytest.mark.parametrize("params,verification", [(SamplingParams(), "full"),
                                                 (SamplingParams(temperature=1.0), "sparse")],
                         ids=["greedy", "sparse-T1"])
def test_a_verdict_leaves_no_buffered_draft_at_a_position_it_settled(params, verification):
    """Speculative tokens uploaded beyond a window awaiting its verdict sit in the cloud's
    buffer; a rejection drops every one from the corrected position on, the correction's own
    position included, so nothing settled lingers for the session's lifetime. Under the sparse
    rule the edge's own corrections join the committed tokens as they are."""
    spec = SystemSpec("tidy-test", PipelinedConfig, PipelinedEdge, _TidyCheckingCloud, "test only")
    _TidyCheckingCloud.commits, _TidyCheckingCloud.stale, _TidyCheckingCloud.astray = 0, [], []
    _TidyCheckingCloud.fixed = 0
    for seed in range(3):
        draft, target = _pair(seed, 0.5)
        reqs = [GenerationRequest(f"r{i}", [i + 1, 3], 16, params, seed=i) for i in range(3)]
        for req, rec in zip(reqs, run_system(spec, draft, target, reqs,
                                             {"depth": 3, "gamma": 2, "verification": verification},
                                             RunOptions(link=LINK, edge_cost=lambda op: 0.02,
                                                        cloud_cost=lambda op: 0.05))):
            if params.greedy:
                assert rec.output_tokens == greedy_decode(target, req.prompt, 16)[0]
    assert _TidyCheckingCloud.commits > 20 and (_TidyCheckingCloud.fixed > 0) == (verification == "sparse")
    assert _TidyCheckingCloud.stale == [] and _TidyCheckingCloud.astray == []


async def _plain_cloud(target, session: str = "s"):
    """A verifying cloud serving ``target`` in this loop, and the edge end of ``session``:
    (cloud, its server task, the end)."""
    import asyncio

    from harness.clock import LoopClock
    from harness.compute import InstantCompute
    from harness.link import CloudEnd
    from systems.api import CloudContext, get_system

    cloud_end = CloudEnd()
    spec = get_system("vanilla")  # its cloud is the plain verifying cloud
    cloud = spec.cloud_cls(spec.make_config({}))
    server = asyncio.get_running_loop().create_task(
        cloud.serve(CloudContext(target, LoopClock(), InstantCompute(), cloud_end)))
    link = cloud_end.new_link(LinkProfile())
    cloud_end.route(session, link)
    return cloud, server, link.edge_end(session)


def test_an_upload_drafted_on_a_prefix_a_verdict_replaced_is_dropped_with_what_followed_it():
    """An upload whose token at a committed position differs from the committed one was drafted
    on a prefix the cloud has replaced: its window is void, the tokens buffered after that
    position go with it, its verification is answered stale, and the session lives on."""
    import asyncio

    import numpy as np

    from harness.clock import run
    from systems.messages import OpenSession

    vocab, prompt = 16, [1, 2, 3]
    target = create_engine("toy", role="target", vocab_size=vocab, seed=1)
    correction = int(np.argmax(target.logits_for(prompt)))
    wrong = (correction + 1) % vocab

    async def main():
        cloud, server, end = await _plain_cloud(target)
        await end.send(OpenSession("s", prompt))
        await end.send(Upload("s", round=0, start=3, tokens=[wrong], verify=True))
        first = (await asyncio.wait_for(end.recv(), 5.0)).msg  # rejected: the correction is committed at 3
        await end.send(Upload("s", round=1, start=5, tokens=[4, 5]))  # buffered beyond the correction
        await asyncio.sleep(0.01)
        held_before = sorted(cloud.sessions["s"].buffer)
        await end.send(Upload("s", round=1, start=3, tokens=[wrong]))  # on the replaced prefix
        await asyncio.sleep(0.01)
        held_after = sorted(cloud.sessions["s"].buffer)
        await end.send(Upload("s", round=1, start=4, tokens=[6], verify=True))
        second = (await asyncio.wait_for(end.recv(), 5.0)).msg
        assert not server.done(), server.exception()
        server.cancel()
        return first, held_before, held_after, second

    first, held_before, held_after, second = run(main(), virtual=True)
    assert isinstance(first, Verdict) and (first.n_accepted, first.token) == (0, correction), first
    assert held_before == [5, 6] and held_after == []
    assert isinstance(second, Verdict) and second.stale and second.round == 1, second


@pytest.mark.parametrize("uploads", [
    [Upload("s", round=0, start=4, tokens=[5], verify=True)],  # nothing at 3: a gap before it
    [Upload("s", round=0, start=3, tokens=[4]), Upload("s", round=1, start=4, tokens=[5], verify=True)],
], ids=["a-gap", "another-windows-tokens"])
def test_a_verification_over_tokens_not_all_its_windows_is_answered_stale(uploads):
    """A window can be verified only over its own tokens, every position from the committed
    length to its end: a gap, or a token of another window in that range, gets a stale answer
    (nothing judged), and the session is served on."""
    import asyncio

    from harness.clock import run
    from systems.messages import OpenSession

    target = create_engine("toy", role="target", vocab_size=16, seed=1)

    async def main():
        cloud, server, end = await _plain_cloud(target)
        await end.send(OpenSession("s", [1, 2, 3]))
        for msg in uploads:
            await end.send(msg)
        reply = (await asyncio.wait_for(end.recv(), 5.0)).msg
        await end.send(Upload("s", round=7, start=3, tokens=[2], verify=True))  # then an honest window
        after = (await asyncio.wait_for(end.recv(), 5.0)).msg
        assert not server.done(), server.exception()
        server.cancel()
        return reply, after

    reply, after = run(main(), virtual=True)
    assert isinstance(reply, Verdict) and reply.stale and reply.round == uploads[-1].round, reply
    assert isinstance(after, Verdict) and not after.stale and after.n_verified == 1, after


@pytest.mark.parametrize("system", ["vanilla", "sled", "pipesd"])
def test_nucleus_sampling_never_emits_a_token_outside_the_targets_nucleus(system):
    """An exact property of lossless top-p decoding: every output token lies in the nucleus of
    the target's distribution after its context (the cloud verifies against the target's
    processed distribution, top-p included; a verifier that ignored top-p would accept tokens
    outside it). Checked over many short sampled requests on a pair whose nucleus is narrow."""
    import numpy as np

    from systems.sampling import probabilities

    params = SamplingParams(temperature=1.0, top_p=0.5)
    draft, target = _pair(seed=6, agreement=0.3, vocab=8, sharpness=0.7)
    reqs = [GenerationRequest(f"r{i}", [1 + i % 5, 2], 4, params, seed=i) for i in range(150)]
    outside = checked = 0
    for req, rec in zip(reqs, run_system(system, draft, target, reqs)):
        context = list(req.prompt)
        for tok in rec.output_tokens:
            outside += probabilities(target.logits_for(context), params)[tok] == 0.0
            checked += 1
            context.append(tok)
    assert checked > 400 and outside == 0, f"{outside} of {checked} tokens outside the target's nucleus"


def test_a_window_drafted_on_top_of_a_rejected_one_is_answered_stale_even_when_it_arrives_after():
    """A window uploaded with ``parent`` = a window the cloud has already rejected (the edge
    drafted it before the verdict reached it) is void: it is answered stale, not judged, even
    though its tokens start exactly at the committed length."""
    import asyncio

    import numpy as np

    from harness.clock import run
    from systems.messages import OpenSession

    vocab, prompt = 16, [1, 2, 3]
    target = create_engine("toy", role="target", vocab_size=vocab, seed=1)
    correction = int(np.argmax(target.logits_for(prompt)))

    async def main():
        cloud, server, end = await _plain_cloud(target)
        await end.send(OpenSession("s", prompt))
        await end.send(Upload("s", round=0, start=3, tokens=[(correction + 1) % vocab], verify=True))
        first = (await asyncio.wait_for(end.recv(), 5.0)).msg
        await end.send(Upload("s", round=1, parent=0, start=4, tokens=[5], verify=True))
        second = (await asyncio.wait_for(end.recv(), 5.0)).msg
        assert not server.done(), server.exception()
        server.cancel()
        return first, second

    first, second = run(main(), virtual=True)
    assert isinstance(first, Verdict) and first.n_accepted == 0 and first.committed == 4, first
    assert isinstance(second, Verdict) and second.stale and second.round == 1, second
