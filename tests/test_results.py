"""Results on disk: journals + parquet per request, crash safety, resume, manifest."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import pandas as pd
import pyarrow.parquet as pq
import pytest

from harness.inprocess import run_system
from harness.results import (
    ENERGY_NOT_MEASURED,
    KEY_PACKAGES,
    REQUESTS_JOURNAL,
    REQUESTS_PARQUET,
    ROUNDS_JOURNAL,
    ROUNDS_PARQUET,
    SCHEMA_VERSION,
    JournalWarning,
    ResultsError,
    RunConfigMismatch,
    RunWriter,
    build_manifest,
    git_info,
    load_run,
    model_file_info,
    requests_schema,
    rounds_schema,
)
from systems.api import GenerationRequest
from systems.engines import create_engine
from systems.records import RequestRecord, RoundRecord

CONFIG = {"system": "vanilla", "pair": "toy", "network": {"name": "lan", "rtt_ms": 1.0}, "run_dir": "a"}


def _round(rid: str, i: int, **kw) -> RoundRecord:
    base = dict(start=float(i), end=i + 0.5, drafted=5, uploaded=4, verified=4, accepted=2, emitted=3,
                wasted=3, n_uploads=1, bytes_up=20, bytes_down=30, t_draft=0.1, t_uplink=0.01,
                t_queue=0.0, t_verify=0.2, t_downlink=0.01, committed=10 + 3 * i,
                edge_digest="e", cloud_digest="c", extra={"note": i})
    base.update(kw)
    return RoundRecord(rid, i, **base)


def _record(rid: str, n_rounds: int = 2, error: str | None = None, tokens: int | None = None) -> RequestRecord:
    rounds = [_round(rid, i) for i in range(n_rounds)]
    n = 3 * n_rounds if tokens is None else tokens
    return RequestRecord(
        request_id=rid, system="vanilla", prompt_tokens=5, output_tokens=list(range(n)),
        start=0.25, end=float(n_rounds), token_times=[0.5 + i * 0.1 for i in range(n)],
        rounds=rounds, error=error, bytes_up=20 * n_rounds + 7, bytes_down=30 * n_rounds + 3,
    )


def _ctx(rid: str, **kw) -> dict:
    return {"pair": "toy", "network": "lan", "workload": "smoke", "prompt_id": rid, "category": "code",
            "seed": 0, **kw}


def _manifest(config=CONFIG, **extra) -> dict:
    return build_manifest(config, {"clock": "virtual", "link": "inprocess", **extra})


@pytest.fixture(scope="module")
def manifest() -> dict:
    return _manifest()


def test_rows_appended_per_request_and_parquet_readable(tmp_path, manifest):
    run = tmp_path / "run"
    with RunWriter(run, manifest) as w:
        # Empty but readable before the first request.
        assert pq.read_table(run / REQUESTS_PARQUET).num_rows == 0
        for n, rid in enumerate(["a", "b", "c"], start=1):
            w.append(_record(rid, n_rounds=n), _ctx(rid))
            req = pq.read_table(run / REQUESTS_PARQUET)
            rnd = pq.read_table(run / ROUNDS_PARQUET)
            assert req.schema.equals(requests_schema(), check_metadata=False)
            assert rnd.schema.equals(rounds_schema(), check_metadata=False)
            assert req.schema.metadata[b"specwan.schema_version"] == str(SCHEMA_VERSION).encode()
            assert req.num_rows == n
            assert rnd.num_rows == n * (n + 1) // 2
            assert len((run / REQUESTS_JOURNAL).read_text().splitlines()) == n
    m, requests, rounds = load_run(run)
    assert m["schema_version"] == SCHEMA_VERSION
    assert list(requests.request_id) == ["a", "b", "c"]
    row = requests.iloc[1]
    assert list(row.output_ids) == list(range(6)) and row.n_tokens == 6
    assert row.system == "vanilla" and row.clock == "virtual" and row.config_hash == m["config_hash"]
    # 2 rounds of 5 drafted, 4 verified, 2 accepted, 3 emitted; 6 tokens from 0.5 s, the
    # request from 0.25 s to 2 s: acceptance over verified drafts, TPOT over the 5 after the first
    assert row.acceptance_rate == pytest.approx(0.5) and row.accepted_length == pytest.approx(3.0)
    assert row.ttft == pytest.approx(0.25) and row.e2e == pytest.approx(1.75)
    assert row.tpot == pytest.approx((1.75 - 0.25) / 5) and row.tokens_per_s == pytest.approx(6 / 1.75)
    assert row.drafted == 10 and row.accepted == 4
    assert row.bytes_up == 47 and row.rounds == 2 and row.attempt == 1
    r = rounds[rounds.request_id == "c"].sort_values("round")
    assert list(r["round"]) == [0, 1, 2] and json.loads(r.iloc[2].extra) == {"note": 2}
    assert set(r.prompt_id) == {"c"} and set(r.network) == {"lan"}


def test_round_schema_covers_round_record():
    fields = {f.name for f in dataclasses.fields(RoundRecord)}
    assert fields <= set(rounds_schema().names)


def test_real_runner_records(tmp_path, manifest):
    draft = create_engine("toy", role="draft", vocab_size=8, seed=1)
    target = create_engine("toy", role="target", vocab_size=8, seed=1)
    requests = [GenerationRequest(f"p{i}", [1, 2, 3], 6, seed=i) for i in range(2)]
    records = run_system("vanilla", draft, target, requests)
    with RunWriter(tmp_path / "run", manifest) as w:
        for rec in records:
            w.append(rec, _ctx(rec.request_id))
    _, req, rnd = load_run(tmp_path / "run")
    assert [list(x) for x in req.output_ids] == [r.output_tokens for r in records]
    assert len(rnd) == sum(len(r.rounds) for r in records)


def test_crash_mid_write_loses_only_that_request(tmp_path, manifest):
    run = tmp_path / "run"
    with RunWriter(run, manifest) as w:
        w.append(_record("a"), _ctx("a"))
        w.append(_record("b"), _ctx("b"))
    # A crash while writing request "c": its rounds made it, its request line only in part.
    full = json.dumps({"request_id": "c", "system": "vanilla", "_uid": "x" * 32, "n_tokens": 6})
    with open(run / ROUNDS_JOURNAL, "a") as f:
        f.write(json.dumps({"request_id": "c", "round": 0, "_uid": "x" * 32}) + "\n")
        f.write('{"request_id": "c", "rou')
    with open(run / REQUESTS_JOURNAL, "a") as f:
        f.write(full[: len(full) // 2])
    with pytest.warns(JournalWarning, match="partially written"):
        _, req, rnd = load_run(run)
    assert list(req.request_id) == ["a", "b"] and set(rnd.request_id) == {"a", "b"}
    assert pq.read_table(run / REQUESTS_PARQUET).num_rows == 2  # the parquet never saw "c"

    with pytest.warns(JournalWarning):
        w = RunWriter(run, manifest)  # reopening cuts the partial lines off
    with w:
        assert {k[-1] for k in w.done_keys()} == {"a", "b"}
        w.append(_record("c", n_rounds=3), _ctx("c"))
    for name in (REQUESTS_JOURNAL, ROUNDS_JOURNAL):
        for line in (run / name).read_text().splitlines():
            json.loads(line)  # every line whole again
    _, req, rnd = load_run(run)
    assert list(req.request_id) == ["a", "b", "c"]
    assert len(rnd[rnd.request_id == "c"]) == 3  # the crashed attempt's orphan round is gone


def test_resume_skips_done_and_retries_failed(tmp_path):
    run = tmp_path / "run"
    ids = ["a", "b", "c", "d"]
    with RunWriter(run, _manifest()) as w:
        w.append(_record("a"), _ctx("a"))
        w.append(_record("b", error="cloud died"), _ctx("b"))
    # The rerun builds its manifest afresh (new timestamp, same config) and skips what is done.
    with RunWriter(run, _manifest(config={**CONFIG, "run_dir": "elsewhere"})) as w:
        done = w.done_keys()
        assert done == {("vanilla", "toy", "lan", "smoke", "a", 0, "a")}
        assert w.done_keys(include_failed=True) >= done | {w.key(_ctx("b"), "b", system="vanilla")}
        todo = [rid for rid in ids if w.key(_ctx(rid), rid, system="vanilla") not in done]
        assert todo == ["b", "c", "d"]
        for rid in todo:
            w.append(_record(rid), _ctx(rid))
        with pytest.raises(ResultsError, match="already recorded"):
            w.append(_record("a"), _ctx("a"))
        assert len(w.manifest["resumed"]) == 1
    _, req, _ = load_run(run)
    assert sorted(req.request_id) == ids
    b = req[req.request_id == "b"].iloc[0]
    assert b.attempt == 2 and pd.isna(b.error)  # the retry replaced the failure
    assert len((run / REQUESTS_JOURNAL).read_text().splitlines()) == 5  # the journal keeps history


def test_key_fields_configurable(tmp_path, manifest):
    with RunWriter(tmp_path / "run", manifest, key_fields=("network",)) as w:
        w.append(_record("a"), _ctx("a", network="lan"))
        w.append(_record("a"), _ctx("a", network="wan"))
        assert w.done_keys() == {("lan", "a"), ("wan", "a")}
    with pytest.raises(ValueError, match="not context fields"):
        RunWriter(tmp_path / "other", manifest, key_fields=("colour",))


def test_mismatched_config_refused_naming_the_key(tmp_path, manifest):
    run = tmp_path / "run"
    with RunWriter(run, manifest) as w:
        w.append(_record("a"), _ctx("a"))
    changed = {**CONFIG, "network": {"name": "lan", "rtt_ms": 80.0}}
    with pytest.raises(RunConfigMismatch, match=r"config\.network\.rtt_ms") as info:
        RunWriter(run, _manifest(config=changed))
    assert info.value.keys == ["config.network.rtt_ms"]
    assert "new run folder" in str(info.value)
    with pytest.raises(RunConfigMismatch, match="clock"):
        RunWriter(run, build_manifest(CONFIG, {"clock": "wall", "link": "inprocess"}))
    # Keys that do not change results (where output goes) do not matter.
    RunWriter(run, _manifest(config={**CONFIG, "run_dir": "b", "hydra": {"x": 1}})).close()


def test_model_hash_change_refused(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"weights")
    run = tmp_path / "run"
    RunWriter(run, build_manifest(CONFIG, {"clock": "virtual"}, models={"target": f})).close()
    f.write_bytes(b"other weights")
    with pytest.raises(RunConfigMismatch, match=r"models\.target\.sha256"):
        RunWriter(run, build_manifest(CONFIG, {"clock": "virtual"}, models={"target": f}))


def test_unmeasured_values_are_null_not_zero(tmp_path, manifest):
    one = _record("one", n_rounds=1, tokens=1)  # tpot undefined for one token
    empty = RequestRecord("empty", "vanilla", 5, [], 0.0, 0.0, [], error="failed before any token")
    one.rounds[0] = _round("one", 0, t_uplink=None, t_queue=None)
    with RunWriter(tmp_path / "run", manifest) as w:
        w.append(one, _ctx("one"))
        w.append(empty, _ctx("empty", category=None))
        w.append(_record("measured"), _ctx("measured"),
                 energy={"edge_j": 1.5, "cloud_j": 3.0, "kind": "estimated"})
    table = pq.read_table(tmp_path / "run" / REQUESTS_PARQUET).to_pylist()
    rows = {r["request_id"]: r for r in table}
    for r in (rows["one"], rows["empty"]):
        assert r["energy_edge_j"] is None and r["energy_cloud_j"] is None and r["energy_kind"] is None
        assert r["energy_reason"] == ENERGY_NOT_MEASURED
    assert rows["one"]["tpot"] is None and rows["one"]["ttft"] == pytest.approx(0.5 - 0.25)
    e = rows["empty"]
    assert e["ttft"] is None and e["tpot"] is None and e["tokens_per_s"] is None
    assert e["acceptance_rate"] is None and e["accepted_length"] is None and e["category"] is None
    assert e["output_ids"] == [] and e["error"] == "failed before any token"
    m = rows["measured"]
    assert (m["energy_edge_j"], m["energy_cloud_j"], m["energy_kind"], m["energy_reason"]) == (1.5, 3.0, "estimated", None)
    rnd = pq.read_table(tmp_path / "run" / ROUNDS_PARQUET).to_pylist()
    r0 = next(r for r in rnd if r["request_id"] == "one")
    assert r0["t_uplink"] is None and r0["t_queue"] is None and r0["t_verify"] == 0.2
    _, req, _ = load_run(tmp_path / "run")
    assert req.set_index("request_id").loc["empty", "energy_edge_j"] != 0  # NaN, not 0
    assert req["seed"].dtype.name == "Int64"


def test_bad_context_rejected_before_writing(tmp_path, manifest):
    run = tmp_path / "run"
    with RunWriter(run, manifest, extra_context={"client": "int64"}) as w:
        with pytest.raises(ValueError, match="unknown context field"):
            w.append(_record("a"), _ctx("a", colour="red"))
        with pytest.raises(ValueError, match="'seed' must be int64"):
            w.append(_record("a"), _ctx("a", seed="zero"))
        with pytest.raises(ValueError, match="clock"):
            w.append(_record("a"), _ctx("a", clock="wall"))
        assert (run / REQUESTS_JOURNAL).read_text() == ""
        w.append(_record("a"), _ctx("a", client=3))
    _, req, _ = load_run(run)
    assert req.client.tolist() == [3]


def test_folder_locked_while_written(tmp_path, manifest):
    with RunWriter(tmp_path / "run", manifest):
        with pytest.raises(ResultsError, match="another process"):
            RunWriter(tmp_path / "run", manifest)


def test_manifest_fields_and_update(tmp_path):
    model = tmp_path / "draft.gguf"
    model.write_bytes(b"draft weights")
    plain = tmp_path / "target.gguf"
    plain.write_bytes(b"target weights")
    st = model.stat()
    recorded = "ab" * 32  # the fetcher's sidecar is trusted while size and mtime match
    (tmp_path / "draft.gguf.sha256").write_text(
        json.dumps({"sha256": recorded, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    m = build_manifest(CONFIG, {"clock": "wall", "device_profiles": {"edge": {"kind": "declared"}},
                                "link": {"backend": "grpc-loopback"}, "note": "x"},
                       models={"draft": model, "target": plain, "toy": None})
    assert m["schema_version"] == SCHEMA_VERSION and m["clock"] == "wall" and m["note"] == "x"
    assert m["config"] == CONFIG and m["created"].endswith("+00:00")
    assert set(m["git"]) == {"commit", "dirty", "reason"}
    assert m["git"]["commit"] is None or len(m["git"]["commit"]) == 40
    assert set(m["packages"]) == set(KEY_PACKAGES)
    assert m["packages"]["pyarrow"] and m["packages"]["pandas"]
    for key in ("platform", "python", "cpu_model", "cpu_count", "memory_bytes"):
        assert key in m["machine"]
    assert m["models"]["draft"]["sha256"] == recorded and m["models"]["draft"]["sha256_source"] == "sidecar"
    assert m["models"]["target"]["sha256"] == hashlib.sha256(b"target weights").hexdigest()
    assert m["models"]["target"]["sha256_source"] == "hashed" and m["models"]["target"]["size"] == 14
    assert m["models"]["toy"]["sha256"] is None and m["models"]["toy"]["reason"]
    assert m["device_profiles"]["edge"]["kind"] == "declared"
    assert m["link"] == {"backend": "grpc-loopback", "measured": None}
    assert m["energy"]["edge"] == {"kind": None, "reason": ENERGY_NOT_MEASURED}

    run = tmp_path / "run"
    with RunWriter(run, m) as w:
        w.update_manifest({"link": {"measured": {"rtt_ms": 0.08}}})
    on_disk = json.loads((run / "manifest.json").read_text())
    assert on_disk["link"] == {"backend": "grpc-loopback", "measured": {"rtt_ms": 0.08}}
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]
    # Measured link figures are facts, not config: a rerun still matches, and keeps them.
    with RunWriter(run, m) as w:
        assert w.manifest["link"]["measured"] == {"rtt_ms": 0.08}


def test_git_outside_a_checkout(tmp_path):
    info = git_info(tmp_path)
    assert info["commit"] is None and info["dirty"] is None and info["reason"]


def test_missing_model_file_recorded_with_reason(tmp_path):
    info = model_file_info(tmp_path / "nope.gguf")
    assert info["sha256"] is None and info["reason"] == "file not found"


def test_load_prefers_current_parquet_else_journals(tmp_path, manifest):
    run = tmp_path / "run"
    with RunWriter(run, manifest, parquet_every=2) as w:
        w.append(_record("a"), _ctx("a"))
        w.append(_record("b"), _ctx("b"))
        w.append(_record("c"), _ctx("c"))  # journalled; parquet not rewritten yet
        assert pq.read_table(run / REQUESTS_PARQUET).num_rows == 2
        assert len(load_run(run)[1]) == 3  # stale parquet: rebuilt from the journals
        assert len(load_run(run, from_journals=False)[1]) == 2
    assert pq.read_table(run / REQUESTS_PARQUET).num_rows == 3  # close writes what is pending
    (run / REQUESTS_JOURNAL).rename(tmp_path / "moved")  # parquet alone is enough to analyse
    (run / ROUNDS_JOURNAL).unlink()
    _, req, rnd = load_run(run)
    assert list(req.request_id) == ["a", "b", "c"] and len(rnd) == 6


def test_key_fields_change_refused(tmp_path, manifest):
    RunWriter(tmp_path / "run", manifest).close()
    with pytest.raises(RunConfigMismatch, match="results.key_fields"):
        RunWriter(tmp_path / "run", manifest, key_fields=("network",))


def test_load_batches_can_read_only_the_first_passes(tmp_path):
    import json as _json

    from harness.results import load_batches

    rows = [{"index": i, "kind": "verify", "sessions": [f"s{i}"]} for i in range(5)]
    (tmp_path / "batches.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows) + '{"index": 5, "ki')
    capped = load_batches(tmp_path, max_rows=2)
    assert list(capped["index"]) == [0, 1] and capped.attrs["passes_total"] == 5  # the partial line is not a pass
    assert list(load_batches(tmp_path, max_rows=10)["index"]) == [0, 1, 2, 3, 4]
