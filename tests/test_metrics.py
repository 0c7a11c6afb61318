"""Reported metrics against hand-computed values: request figures, the round timeline, and
what a window may draft.

Every expected number here is worked out by hand from the scenario (costs, link, models),
not from the code that reports it, so a slip in how a metric is computed or in what the
shared protocol books shows up as a wrong number.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from harness.inprocess import RunOptions, run_system
from harness.link import LinkProfile
from systems.api import EdgePolicy, GenerationRequest, SystemSpec
from systems.engines import create_engine
from systems.engines.toy import EOS
from systems.protocol import SpeculativeEdge, VerifyingCloud
from systems.records import RequestRecord, RoundRecord
from systems.sampling import SamplingParams
from tests.support import greedy_decode


# ---- the request's figures from its rounds -------------------------------------------------
def test_request_figures_by_hand():
    """A request that started at 10 s: 6 tokens, first at 10.5 s, last at 11.5 s; two live
    rounds verified 4 + 2 drafts of 5 + 3 drafted and accepted 3 + 2; a third window was
    discarded (drafted 2, verified none)."""
    rounds = [
        RoundRecord("r", 0, 10.0, 10.5, drafted=5, uploaded=5, verified=4, accepted=3, emitted=4),
        RoundRecord("r", 1, 10.5, 11.5, drafted=3, uploaded=2, verified=2, accepted=2, emitted=2),
        RoundRecord("r", 2, 11.0, 11.6, drafted=2, uploaded=2, extra={"discarded": True}),
    ]
    rec = RequestRecord("r", "vanilla", 3, [5, 6, 7, 8, 9, 1], start=10.0, end=12.0,
                        token_times=[10.5] * 4 + [11.5] * 2, rounds=rounds, bytes_up=123, bytes_down=45)
    assert rec.ttft == pytest.approx(0.5)  # 10.5 - 10.0
    assert rec.e2e == pytest.approx(2.0)
    assert rec.tpot == pytest.approx((2.0 - 0.5) / 5)  # the 5 tokens after the first
    assert rec.acceptance_rate == pytest.approx(5 / 6)  # accepted over verified, not over drafted (10)
    assert rec.drafted == 10 and rec.accepted == 5
    assert rec.accepted_length == pytest.approx(6 / 3)
    assert rec.summary() == {
        "request_id": "r", "system": "vanilla", "prompt_tokens": 3, "tokens": 6,
        "ttft": pytest.approx(0.5), "tpot": pytest.approx(0.3), "e2e": pytest.approx(2.0),
        "tokens_per_s": pytest.approx(3.0), "rounds": 3, "drafted": 10, "accepted": 5,
        "acceptance_rate": pytest.approx(5 / 6), "accepted_length": pytest.approx(2.0),
        "bytes_up": 123, "bytes_down": 45, "error": None, "recovery": None,
    }


def test_a_round_as_a_row_has_every_field():
    import dataclasses

    r = RoundRecord("r", 2, 1.0, 1.5, drafted=5, verified=4, accepted=3, extra={"k": 1})
    row = r.as_row()
    assert set(row) == {f.name for f in dataclasses.fields(RoundRecord)}
    assert (row["request_id"], row["round"], row["drafted"], row["verified"], row["extra"]) == ("r", 2, 5, 4, {"k": 1})


def test_undefined_figures_are_none():
    one = RequestRecord("r", "vanilla", 3, [4], 1.0, 1.25, [1.25])
    assert one.ttft == pytest.approx(0.25) and one.tpot is None and one.acceptance_rate is None
    assert one.summary()["tokens_per_s"] == pytest.approx(4.0)  # 1 token in 0.25 s
    two = RequestRecord("r", "vanilla", 3, [4, 5], 1.0, 1.75, [1.25, 1.75])
    assert two.tpot == pytest.approx(0.5)  # the smallest request with a TPOT
    none = RequestRecord("r", "vanilla", 3, [], 1.0, 1.0, [])
    assert none.ttft is None and none.tpot is None and none.accepted_length is None
    assert none.summary()["tokens_per_s"] is None  # no time elapsed


# ---- a scripted run, timed by hand ---------------------------------------------------------
def _identical_pair(vocab: int = 8, seed: int = 0):
    """A draft equal to its target: under greedy decoding every draft token is accepted."""
    kw = dict(vocab_size=vocab, seed=seed, sharpness=2.0)
    return create_engine("toy", role="draft", agreement=1.0, **kw), create_engine("toy", role="target", **kw)


def _prompt_without_eos(target, n: int, stop_at: int | None = None) -> list[int]:
    """A prompt whose greedy continuation has no EOS in its first ``n`` tokens (or, with
    ``stop_at``, has its first EOS exactly at index ``stop_at``)."""
    for a in range(1, 8):
        for b in range(1, 8):
            out, _ = greedy_decode(target, [a, b], n)
            first = out.index(EOS) if EOS in out else None
            if first == stop_at:
                return [a, b]
    raise AssertionError("no such prompt for this toy pair")


RTT = 0.1
DRAFT_S, EDGE_PREFILL_S, CLOUD_S = 0.01, 0.01, 0.05


def test_vanilla_timeline_by_hand():
    """Vanilla, γ = 4, draft = target, 10 tokens per request, two requests back to back on
    one edge; RTT 0.1 s, no rate limit; each edge op 0.01 s, each cloud op 0.05 s.

    From a request's start t0: OpenSession reaches the cloud at t0+0.05 and its prefill runs
    until t0+0.10; the edge prefills until t0+0.01 and drafts 4 tokens until t0+0.05; they
    reach the cloud at t0+0.10, are verified until t0+0.15, and the verdict (4 accepted +
    the bonus: 5 tokens) lands at t0+0.20. The second window: drafts until t0+0.24, arrives
    t0+0.29, verified until t0+0.34, lands at t0+0.39 with 5 more tokens. So TTFT 0.20 s,
    end-to-end 0.39 s, TPOT (0.39 - 0.20) / 9, and the second request starts at 0.39 s."""
    draft, target = _identical_pair()
    prompts = [_prompt_without_eos(target, 10)] * 2
    reqs = [GenerationRequest(f"r{i}", p, 10, SamplingParams(), seed=i) for i, p in enumerate(prompts)]
    opts = RunOptions(link=LinkProfile("rtt", rtt_s=RTT),
                      edge_cost=lambda op: EDGE_PREFILL_S if op.kind == "prefill" else DRAFT_S,
                      cloud_cost=lambda op: CLOUD_S)
    recs = run_system("vanilla", draft, target, reqs, {"gamma": 4}, opts)
    for i, rec in enumerate(recs):
        t0 = 0.39 * i
        assert rec.start == pytest.approx(t0)
        assert rec.n_tokens == 10
        assert rec.token_times == pytest.approx([t0 + 0.20] * 5 + [t0 + 0.39] * 5)
        assert rec.ttft == pytest.approx(0.20)
        assert rec.e2e == pytest.approx(0.39)
        assert rec.tpot == pytest.approx(0.19 / 9)
        assert rec.acceptance_rate == 1.0 and rec.accepted_length == 5.0
        for k, r in enumerate(rec.rounds):
            assert (r.drafted, r.uploaded, r.verified, r.accepted, r.emitted, r.wasted) == (4, 4, 4, 4, 5, 0)
            assert r.start == pytest.approx(t0 + (0.01, 0.20)[k])  # its first draft starts
            assert r.end == pytest.approx(t0 + (0.20, 0.39)[k])
            assert r.t_draft == pytest.approx(0.04)
            assert r.t_uplink == pytest.approx(0.05)
            assert r.t_queue == pytest.approx(0.0)
            assert r.t_verify == pytest.approx(0.05)
            assert r.t_downlink == pytest.approx(0.05)
            assert (r.n_uploads, r.batch_size, r.committed) == (1, 1, len(prompts[i]) + 5 * (k + 1))
            assert r.edge_digest == r.cloud_digest != "" and "upload_sizes" not in r.extra
        # Every message down is a verdict; up, the rounds' uploads plus opening and closing.
        assert rec.bytes_down == sum(r.bytes_down for r in rec.rounds) > 0
        assert rec.bytes_up - sum(r.bytes_up for r in rec.rounds) == recs[0].bytes_up - sum(
            r.bytes_up for r in recs[0].rounds) > 0


@dataclass
class _NoConfig:
    pass


class _TwoPartEdge(EdgePolicy):
    """Test-only: drafts 4 tokens, uploads 2, waits a second, uploads 2 asking for the verdict."""

    async def generate(self, request, ctx):
        edge = SpeculativeEdge(ctx, request, "greedy")
        await edge.open()
        try:
            while not edge.done:
                n = min(4, edge.remaining - 1)
                for _ in range(n):
                    await edge.draft()
                if n > 2:
                    await edge.upload(2)
                    await ctx.clock.sleep(1.0)
                await edge.upload(verify=True)
                edge.apply(*await edge.next_verdict())
        finally:
            await edge.close()
        return edge.output


def test_round_uplink_time_is_the_closing_uploads():
    """A window sent in two uploads a second apart: its uplink time is the closing upload's
    flight (half the RTT on an unlimited link), not the time since the first one left."""
    draft, target = _identical_pair()
    spec = SystemSpec("two-part-test", _NoConfig, _TwoPartEdge, VerifyingCloud, "test only")
    req = GenerationRequest("r", _prompt_without_eos(target, 10), 10, SamplingParams())
    (rec,) = run_system(spec, draft, target, [req], None,
                        RunOptions(link=LinkProfile("rtt", rtt_s=RTT), edge_cost=lambda op: DRAFT_S))
    assert rec.output_tokens == greedy_decode(target, req.prompt, 10)[0]
    assert [r.n_uploads for r in rec.rounds] == [2, 2]
    for r in rec.rounds:
        # 4 drafts (0.04 s), the first upload, a second's wait, the second upload, up and down
        assert r.t_uplink == pytest.approx(RTT / 2)
        assert r.end - r.start == pytest.approx(0.04 + 1.0 + RTT)
        assert r.extra["upload_sizes"] == [2, 2]
        assert r.extra["t_first_upload"] == pytest.approx(r.start + 0.04)
        assert r.extra["t_last_draft"] == pytest.approx(r.start + 0.04)


# ---- what a window may draft ---------------------------------------------------------------
# Each system set so that only the output's room (or a stop token) closes a window.
ONE_WINDOW = [
    ("vanilla", {"gamma": 100}),
    ("hsl", {"r2": 0.0}),
    ("edgellm", {"r1": 1e-12}),
    ("pipesd", {"r1": 0.0, "r2": 0.0}),
]


@pytest.mark.parametrize("system,params", ONE_WINDOW, ids=[s for s, _ in ONE_WINDOW])
def test_a_window_drafts_only_what_the_output_can_hold(system, params):
    """N = 8 tokens, draft = target: the edge drafts N - 1 (the verdict adds one of its own),
    all accepted, in one round; nothing is drafted that could never be emitted."""
    draft, target = _identical_pair()
    n = 8
    req = GenerationRequest("r", _prompt_without_eos(target, n), n, SamplingParams())
    (rec,) = run_system(system, draft, target, [req], params,
                        RunOptions(link=LinkProfile("rtt", rtt_s=RTT), edge_cost=lambda op: DRAFT_S,
                                   cloud_cost=lambda op: CLOUD_S))
    assert rec.output_tokens == greedy_decode(target, req.prompt, n)[0]
    (r,) = rec.rounds
    assert (r.drafted, r.uploaded, r.verified, r.accepted, r.emitted, r.wasted) == (n - 1, n - 1, n - 1, n - 1, n, 0)
    assert r.t_draft == pytest.approx((n - 1) * DRAFT_S)


@pytest.mark.parametrize("system,params", ONE_WINDOW, ids=[s for s, _ in ONE_WINDOW])
def test_a_window_stops_drafting_at_a_stop_token(system, params):
    """The greedy continuation ends with EOS as its 6th token (limit 12): the edge drafts the
    6 tokens up to and including EOS and no further; the verdict accepts them all."""
    draft, target = _identical_pair(seed=4)
    n, stop = 12, 5
    req = GenerationRequest("r", _prompt_without_eos(target, n, stop_at=stop), n, SamplingParams())
    (rec,) = run_system(system, draft, target, [req], params, RunOptions(link=LinkProfile("rtt", rtt_s=RTT)))
    assert rec.output_tokens == greedy_decode(target, req.prompt, n)[0]
    assert rec.output_tokens[-1] == EOS and rec.n_tokens == stop + 1
    (r,) = rec.rounds
    assert (r.drafted, r.verified, r.accepted, r.emitted, r.wasted) == (stop + 1, stop + 1, stop + 1, stop + 1, 0)


# Thresholds at 1.0 fire on every token, as the papers' comparisons are non-strict (P <= R2,
# product <= R1): a draft so sharp that its confidences are (mostly exactly) 1.0 shows it.
EVERY_TOKEN = [
    ("hsl", {"r2": 1.0}),
    ("edgellm", {"r1": 1.0}),
    ("pipesd", {"r1": 1.0, "r2": 0.0}),
    ("pipesd", {"r1": 0.0, "r2": 1.0}),
]


@pytest.mark.parametrize("system,params", EVERY_TOKEN, ids=["hsl-r2", "edgellm-r1", "pipesd-r1", "pipesd-r2"])
def test_a_threshold_of_one_verifies_every_token(system, params):
    kw = dict(vocab_size=8, seed=0, sharpness=1000.0)
    draft = create_engine("toy", role="draft", agreement=1.0, **kw)
    target = create_engine("toy", role="target", **kw)
    req = GenerationRequest("r", _prompt_without_eos(target, 9), 9, SamplingParams())
    (rec,) = run_system(system, draft, target, [req], {**params, "max_windows": 1} if system != "hsl" else params,
                        RunOptions(link=LinkProfile("rtt", rtt_s=RTT)))
    assert rec.output_tokens == greedy_decode(target, req.prompt, 9)[0]
    live = [r for r in rec.rounds if not r.extra.get("discarded")]
    if system == "edgellm":  # R1 halves after the first, wholly accepted window
        assert live[0].verified == 1 and live[0].extra["trigger"]["r1"] == 1.0
        return
    # 9 tokens: four windows of one draft (each verdict adds its own token), then the last
    # token comes from a verdict alone
    assert [r.verified for r in live] == [1, 1, 1, 1, 0], [r.extra.get("trigger") for r in live]
    assert [r.emitted for r in live] == [2, 2, 2, 2, 1]


@pytest.mark.parametrize("system", ["hsl", "edgellm", "pipesd"])
def test_papers_uplink_is_full_fp16_rows(system):
    """As PipeSD's experiments run them, these systems send each draft token's full
    distribution in fp16 by default, greedy decoding included: 2 bytes per vocabulary entry
    (V = 4096: about 8 kB per token); q_dtype=float32 doubles it; uplink_q=rule sends ids."""
    kw = dict(vocab_size=4096, seed=1, sharpness=2.0)
    draft = create_engine("toy", role="draft", agreement=0.7, **kw)
    target = create_engine("toy", role="target", **kw)
    req = GenerationRequest("r", [1, 2], 24, SamplingParams())
    per_token = {}
    for name, params in [("fp16", {}), ("fp32", {"q_dtype": "float32"}), ("ids", {"uplink_q": "rule"})]:
        (rec,) = run_system(system, draft, target, [req], params, RunOptions(link=LinkProfile("rtt", rtt_s=RTT)))
        assert rec.output_tokens == greedy_decode(target, req.prompt, 24)[0]
        rows = sum(r.uploaded - bool(r.extra.get("lead_implied")) for r in rec.rounds)
        per_token[name] = sum(r.bytes_up for r in rec.rounds) / rows
    assert 2 * 4096 <= per_token["fp16"] < 2 * 4096 * 1.05
    assert 4 * 4096 <= per_token["fp32"] < 4 * 4096 * 1.05
    assert per_token["ids"] < 64


# ---- the same scripted run, as the analysis reports it from the run folder ----------------------
def test_every_reported_metric_of_a_scripted_run_by_hand(tmp_path):
    """The vanilla scenario above (two requests of 10 tokens, each: TTFT 0.20 s, end-to-end 0.39 s,
    chunks of 5 tokens at 0.20 and 0.39 s after its start, two rounds of 4 drafted and accepted),
    written to a run folder and read back by analysis/: the report's summary, the ITL, the
    round timeline's phases and the goodput under an SLO, each against the hand-worked value."""
    from analysis import metrics as M
    from analysis.figures import phase_spans
    from analysis.load import load_runs
    from analysis.report import SUMMARY_METRICS, fmt, goodput_table, summary_table
    from harness.results import RunWriter, build_manifest

    draft, target = _identical_pair()
    prompt = _prompt_without_eos(target, 10)
    reqs = [GenerationRequest(f"r{i}", prompt, 10, SamplingParams(), seed=i) for i in range(2)]
    opts = RunOptions(link=LinkProfile("rtt", rtt_s=RTT),
                      edge_cost=lambda op: EDGE_PREFILL_S if op.kind == "prefill" else DRAFT_S,
                      cloud_cost=lambda op: CLOUD_S)
    recs = run_system("vanilla", draft, target, reqs, {"gamma": 4}, opts)
    with RunWriter(tmp_path / "run", build_manifest({"system": {"name": "vanilla"}}, {"clock": "virtual"})) as w:
        for i, rec in enumerate(recs):
            w.append(rec, {"system": "vanilla", "pair": "toy", "network": "rtt", "workload": "w",
                           "prompt_id": f"p{i}", "clock": "virtual", "seed": i})
    requests, rounds = load_runs(tmp_path / "run")
    requests = requests.assign(wasted=M.wasted_per_request(requests, rounds))

    # the summary: medians over the two identical requests (a CI of one point is that point)
    row = summary_table(requests, n_resamples=99).iloc[0]
    headings = {column: heading for column, heading, _, _ in SUMMARY_METRICS}
    assert row[headings["ttft"]].startswith("0.2 ") and row[headings["e2e"]].startswith("0.39 ")
    assert row[headings["tpot"]].startswith(f"{1e3 * 0.19 / 9:.3g} ")  # (0.39 - 0.20) / (10 - 1) s, in ms
    assert row[headings["acceptance_rate"]].startswith("1 ") and row[headings["accepted_length"]].startswith("5 ")
    assert row[headings["wasted"]].startswith("0 ")
    assert recs[0].bytes_up == recs[1].bytes_up and row[headings["bytes_up"]].split()[0] == fmt(recs[0].bytes_up)
    assert list(requests["bytes_down"]) == [sum(r.bytes_down for r in rec.rounds) for rec in recs]

    # ITL: one gap per request, 0.19 s, bringing 5 tokens (0.038 s a token); never the zero gaps inside a burst
    chunks = M.token_chunks(requests)
    assert list(chunks["tokens"]) == [5, 5] and chunks["itl"].tolist() == pytest.approx([0.19, 0.19])
    assert chunks["itl_per_token"].tolist() == pytest.approx([0.038, 0.038])
    itl = M.itl_summary(requests).iloc[0]
    assert (itl["chunks"], itl["tokens_per_chunk"]) == (2, 5.0)
    assert itl["itl_p50"] == pytest.approx(0.19) and itl["itl_per_token_p99"] == pytest.approx(0.038)

    # the round timeline of the second request: draft 0.04 s from the round's start, then uplink,
    # verify and downlink 0.05 s each, back to back up to the round's end (t0 = 0.39)
    spans, anchored = phase_spans(rounds[rounds["request_id"] == "r1"])
    assert anchored
    ids = sorted(set(spans["round"]))  # window ids: a window restarted after a verdict takes the next one
    got = {(ids.index(r.round), r.phase): (r.begin, r.duration) for r in spans.itertuples()}
    assert len(ids) == 2
    for k, start in enumerate((0.39 + 0.01, 0.39 + 0.20)):
        assert got[(k, "draft")] == pytest.approx((start, 0.04))
        assert got[(k, "uplink")] == pytest.approx((start + 0.04, 0.05))
        assert got[(k, "queue")] == pytest.approx((start + 0.09, 0.0), abs=1e-12)
        assert got[(k, "verify")] == pytest.approx((start + 0.09, 0.05))
        assert got[(k, "downlink")] == pytest.approx((start + 0.14, 0.05))

    # goodput: both requests meet TTFT <= 250 ms and TPOT <= 25 ms (0.0211 s): 2 per 0.78 s of serving;
    # a TPOT objective of 20 ms fails both, one of 0.39 s end to end passes both, 0.38 s neither
    ok = M.goodput(requests, M.SLO.parse("ttft:250,tpot:25")).iloc[0]
    assert (ok["requests"], ok["met"], ok["attainment"]) == (2, 2, 1.0)
    assert ok["serving_s"] == pytest.approx(0.78) and ok["goodput"] == pytest.approx(2 / 0.78)
    assert M.goodput(requests, M.SLO(tpot=0.020)).iloc[0]["met"] == 0
    assert M.goodput(requests, M.SLO(e2e=0.3901)).iloc[0]["met"] == 2
    assert M.goodput(requests, M.SLO(e2e=0.38)).iloc[0]["goodput"] == 0.0
    assert goodput_table(requests, M.SLO(ttft=0.25)).iloc[0]["goodput, req/s"] == f"{2 / 0.78:.3g}"


def test_an_slo_is_read_in_milliseconds_and_a_bad_one_is_named():
    from analysis.metrics import SLO

    assert SLO.parse("ttft:500, tpot:100") == SLO(ttft=0.5, tpot=0.1)
    assert SLO.parse("e2e:2000").describe() == "E2E <= 2000 ms"
    for bad, words in (("ttft=500", "metric:milliseconds"), ("itl:5", "metric:milliseconds"),
                       ("tpot:fast", "not a number"), ("tpot:0", "> 0 ms"), ("", "at least one")):
        with pytest.raises(ValueError, match=words):
            SLO.parse(bad)
